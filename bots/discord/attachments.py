"""Text attachments of a Discord message, read (within a cap) and appended to the question."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import PurePosixPath

import aiohttp
import discord

log = logging.getLogger(__name__)

#: Our cap on one attachment read into a question; larger files are not downloaded at all. Far
#: above MAX_INPUT_CHARS on purpose: the engine, not this module, decides what is too long and
#: tells the user in plain words.
MAX_ATTACHMENT_BYTES = 512 * 1024
#: Our cap on how many attachments of one message are read.
MAX_ATTACHMENTS_READ = 5
#: Files read as text when Discord gives no text/* content type.
TEXT_SUFFIXES = frozenset(
    {".txt", ".md", ".py", ".js", ".ts", ".json", ".yaml", ".yml", ".toml", ".csv", ".log",
     ".sql", ".sh", ".html", ".css", ".xml", ".ini", ".cfg", ".rs", ".go", ".java", ".c", ".h",
     ".cpp", ".rb", ".php", ".kt", ".swift"}
)  # fmt: skip


def is_text(attachment: discord.Attachment) -> bool:
    """Whether an attachment looks like text worth reading."""
    content_type = (attachment.content_type or "").split(";")[0].strip().lower()
    if content_type.startswith("text/") or content_type in ("application/json", "application/xml"):
        return True
    return PurePosixPath(attachment.filename).suffix.lower() in TEXT_SUFFIXES


async def with_attachments(text: str, attachments: Sequence[discord.Attachment]) -> str:
    """``text`` followed by each readable text attachment, and a note for each one skipped."""
    parts = [text] if text else []
    for index, attachment in enumerate(attachments):
        name = attachment.filename
        if index >= MAX_ATTACHMENTS_READ:
            parts.append(f"(attachment {name} not read: at most {MAX_ATTACHMENTS_READ} are)")
        elif not is_text(attachment):
            parts.append(f"(attachment {name} not read: only text files are)")
        elif attachment.size > MAX_ATTACHMENT_BYTES:
            parts.append(
                f"(attachment {name} not read: {attachment.size:,} bytes, over the "
                f"{MAX_ATTACHMENT_BYTES:,}-byte limit)"
            )
        else:
            try:
                data = await attachment.read()
            except (discord.HTTPException, aiohttp.ClientError) as error:
                log.warning("could not download attachment %s: %s", attachment.url, error)
                parts.append(f"(attachment {name} could not be downloaded)")
                continue
            body = data[:MAX_ATTACHMENT_BYTES].decode("utf-8", errors="replace")
            parts.append(f"--- {name} ---\n{body}")
    return "\n\n".join(parts)
