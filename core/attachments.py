"""Files attached to a question: text files are inlined, images go to models that see them.

Adapters hand a message's files over as ``Attachment`` values on their ``Arrival``
(``attachments``), each with a ``fetch`` that downloads its bytes the platform's way. At intake
the front door inlines the text files into the question that is stored (``with_text_files``),
naming the images there too so the history stays readable. When the turn runs, the images are
fetched and sent with that one turn as image parts (``load_images``), to a model that sees
images, within ``MAX_IMAGES`` and ``MAX_IMAGE_BYTES``; what is not sent is said in one plain
line after the answer. Images are never stored.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from core.conversation import ImagePart
from core.models import ModelChoice

log = logging.getLogger(__name__)

#: Our cap on one text file read into a question; larger files are not downloaded at all. Far
#: above MAX_INPUT_CHARS on purpose: the engine decides what is too long and says so plainly.
MAX_ATTACHMENT_BYTES = 512 * 1024
#: Our cap on how many text files of one message are read.
MAX_ATTACHMENTS_READ = 5
#: Files read as text when the platform gives no text/* media type.
TEXT_SUFFIXES = frozenset(
    {".txt", ".md", ".py", ".js", ".ts", ".json", ".yaml", ".yml", ".toml", ".csv", ".log",
     ".sql", ".sh", ".html", ".css", ".xml", ".ini", ".cfg", ".rs", ".go", ".java", ".c", ".h",
     ".cpp", ".rb", ".php", ".kt", ".swift"}
)  # fmt: skip
#: Image types both OpenAI and Anthropic take, by media type and by file suffix.
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
IMAGE_SUFFIXES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
}


@dataclass(frozen=True)
class Attachment:
    """One file of a platform message."""

    name: str  # file name as shown to users
    media_type: str  # "image/png", "text/plain", ... ("" when the platform did not say)
    size: int  # bytes, as the platform reports
    fetch: Callable[[], Awaitable[bytes]]  # downloads the bytes (adapter: bot token / CDN)


def _media_type(attachment: Attachment) -> str:
    return attachment.media_type.split(";")[0].strip().lower()


def is_text(attachment: Attachment) -> bool:
    """Whether a file looks like text worth reading into the question."""
    media_type = _media_type(attachment)
    if media_type.startswith("text/") or media_type in ("application/json", "application/xml"):
        return True
    return PurePosixPath(attachment.name).suffix.lower() in TEXT_SUFFIXES


def image_type(attachment: Attachment) -> str | None:
    """The image's media type when it is one the models take (png, jpeg, gif, webp), else None."""
    media_type = _media_type(attachment)
    if media_type in IMAGE_TYPES:
        return media_type
    if media_type and media_type != "application/octet-stream":
        return None
    return IMAGE_SUFFIXES.get(PurePosixPath(attachment.name).suffix.lower())


def images_of(attachments: Sequence[Attachment]) -> tuple[Attachment, ...]:
    """The images among ``attachments``, in order."""
    return tuple(a for a in attachments if image_type(a) is not None)


async def with_text_files(text: str, attachments: Sequence[Attachment]) -> str:
    """The question to store: ``text``, each readable text file, a note for each file skipped,
    and the names of the images (sent separately, with this turn only)."""
    parts = [text] if text else []
    read = 0
    images: list[str] = []
    for attachment in attachments:
        name = attachment.name
        if image_type(attachment) is not None:
            images.append(name)
        elif not is_text(attachment):
            parts.append(f"(attachment {name} not read: only text files and images are)")
        elif read >= MAX_ATTACHMENTS_READ:
            parts.append(f"(attachment {name} not read: at most {MAX_ATTACHMENTS_READ} are)")
        elif attachment.size > MAX_ATTACHMENT_BYTES:
            parts.append(
                f"(attachment {name} not read: {attachment.size:,} bytes, over the "
                f"{MAX_ATTACHMENT_BYTES:,}-byte limit)"
            )
        else:
            read += 1
            try:
                data = await attachment.fetch()
            except Exception as error:
                log.warning("could not download attachment %s: %s", name, error)
                parts.append(f"(attachment {name} could not be downloaded)")
                continue
            body = data[:MAX_ATTACHMENT_BYTES].decode("utf-8", errors="replace")
            parts.append(f"--- {name} ---\n{body}")
    if images:
        parts.append(f"(image{'s' if len(images) > 1 else ''} attached: {', '.join(images)})")
    return "\n\n".join(parts)


async def load_images(
    attachments: Sequence[Attachment], choice: ModelChoice, *, max_images: int, max_bytes: int
) -> tuple[tuple[ImagePart, ...], list[str]]:
    """The images to send to ``choice`` and one plain line for each reason some were not sent.

    Never raises: a failed download is a note too, and the question is answered regardless.
    """
    images = images_of(attachments)
    if not images:
        return (), []
    if not choice.vision:
        return (), [_note([a.name for a in images], f"{choice.name} cannot see images")]
    sent: list[ImagePart] = []
    too_many: list[str] = []
    too_large: list[str] = []
    failed: list[str] = []
    for attachment in images:
        if len(sent) >= max_images:
            too_many.append(attachment.name)
            continue
        if attachment.size > max_bytes:
            too_large.append(attachment.name)
            continue
        try:
            data = await attachment.fetch()
        except Exception as error:
            log.warning("could not download image %s: %s", attachment.name, error)
            failed.append(attachment.name)
            continue
        if len(data) > max_bytes:
            too_large.append(attachment.name)
            continue
        media_type = image_type(attachment) or "image/png"
        sent.append(ImagePart(attachment.name, media_type, data))
    notes = []
    if too_large:
        notes.append(_note(too_large, f"over the {_size(max_bytes)} limit for an image"))
    if too_many:
        notes.append(_note(too_many, f"at most {max_images} images go with one message"))
    if failed:
        notes.append(_note(failed, "it could not be downloaded"))
    return tuple(sent), notes


def images_refused_note(names: Sequence[str], model: str) -> str:
    """The line after an answer whose images the model refused (it was asked again without)."""
    return _note(names, f"{model} refused them: it cannot see images")


def _note(names: Sequence[str], reason: str) -> str:
    listed = ", ".join(names)
    verb = "was" if len(names) == 1 else "were"
    return f"_({listed} {verb} not sent: {reason})_"


def _size(size: int) -> str:
    if size >= 1024 * 1024 and size % (1024 * 1024) == 0:
        return f"{size // (1024 * 1024)} MB"
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MB"
    if size >= 1024:
        return f"{size // 1024} KB"
    return f"{size} bytes"


__all__ = [
    "IMAGE_TYPES",
    "MAX_ATTACHMENTS_READ",
    "MAX_ATTACHMENT_BYTES",
    "TEXT_SUFFIXES",
    "Attachment",
    "image_type",
    "images_of",
    "is_text",
    "load_images",
    "with_text_files",
]
