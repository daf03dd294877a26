"""A Discord message's files, as the front door reads them (``core.attachments.Attachment``).

Core decides what becomes of each file (text inlined into the question, images sent to vision
models, a note for what is skipped); this module only says what Discord told us and downloads
the bytes from Discord's CDN when core asks, with failures translated to core's errors.
"""

from __future__ import annotations

import aiohttp
import discord

from core.attachments import Attachment
from core.errors import PermanentSurfaceError, TransientSurfaceError


def media_type(file: discord.Attachment) -> str:
    """The file's media type without parameters (``text/plain; charset=utf-8`` → ``text/plain``);
    ``""`` when Discord did not say."""
    return (file.content_type or "").split(";")[0].strip().lower()


def attachment(file: discord.Attachment) -> Attachment:
    """One file of a message, downloaded only when ``fetch`` is awaited."""

    async def fetch() -> bytes:
        try:
            return await file.read()
        except discord.HTTPException as error:
            if error.status >= 500:
                raise TransientSurfaceError(f"Discord CDN: {error}") from error
            raise PermanentSurfaceError(str(error), code=str(error.code or error.status)) from error
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as error:
            raise TransientSurfaceError(f"Discord CDN unreachable: {error!r}") from error

    return Attachment(name=file.filename, media_type=media_type(file), size=file.size, fetch=fetch)
