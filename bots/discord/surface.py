"""DiscordReply: one answer's messages in a Discord channel, thread or DM, as the streamer drives it.

While a message streams it carries a Stop button (``controls``, ``core.streaming.LiveControls``);
the call that lands its final text takes every button off, and the answer's last message then
gets the feedback buttons and Regenerate in one edit (``offer_feedback``). No call may ping.

Also the two things that connect discord.py's HTTP layer to the shared pacing budgets: the rate
scopes of a channel (``channel_scopes``) and an aiohttp trace (``rate_limit_trace``) that feeds
Discord's ``X-RateLimit-*`` headers, and its 429s, to the budgets of the same scopes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, Literal

import aiohttp
import discord

from bots.discord.controls import regenerate_button, stop_view
from bots.discord.feedback import feedback_view
from core.bot import Budgets, RateScope
from core.conversation import ConversationKey
from core.errors import (
    PermanentSurfaceError,
    SurfaceError,
    SurfaceRateLimited,
    TransientSurfaceError,
)

log = logging.getLogger(__name__)

#: discord-api-docs "Message" / "Create Message": ``content`` holds up to 2,000 characters.
MAX_MESSAGE_CHARS = 2000
#: Create Message is bucketed per channel: 5 per 5 s (discord-api-docs "Rate Limits" example
#: bucket; the live numbers arrive in X-RateLimit-* headers and override these).
CHANNEL_POSTS_PER_WINDOW = 5
#: Message edits share a per-channel bucket of about 5 per 5 s (undocumented; observed headers).
CHANNEL_EDITS_PER_WINDOW = 5
CHANNEL_WINDOW_SECONDS = 5.0
#: discord-api-docs "Rate Limits": a bot may make 50 requests per second in total.
BOT_REQUESTS_PER_SECOND = 50
#: Retry-After assumed when a 429 carries neither the header nor a JSON ``retry_after``.
DEFAULT_RETRY_AFTER = 1.0

BOT_SCOPE_KEY = "discord:bot"
#: Replies pace themselves below the bot-wide cap, with a small burst, leaving headroom for the
#: calls that do not go through the budgets (thread starts, typing, interaction answers).
BOT_REPLY_SHARE = 0.8
BOT_REPLY_BURST = 10
BOT_SCOPE = RateScope(
    BOT_SCOPE_KEY, BOT_REQUESTS_PER_SECOND * BOT_REPLY_SHARE, burst=BOT_REPLY_BURST
)

Call = Literal["post", "edit"]

# discord.py's routes for posting and editing a message, as they appear in the request path.
_POST_PATH = re.compile(r"/channels/(\d+)/messages$")
_EDIT_PATH = re.compile(r"/channels/(\d+)/messages/\d+$")


def scope_key(channel_id: int | str, call: Call) -> str:
    """The budget key of a channel's post or edit bucket (threads and DMs are channels too)."""
    return f"discord:channel:{channel_id}:{call}"


def channel_scopes(channel_id: int | str, call: Call) -> tuple[RateScope, ...]:
    """The scopes one post or edit in ``channel_id`` consumes: the channel's bucket and the bot's."""
    per_window = CHANNEL_POSTS_PER_WINDOW if call == "post" else CHANNEL_EDITS_PER_WINDOW
    channel = RateScope(
        scope_key(channel_id, call), per_window / CHANNEL_WINDOW_SECONDS, burst=per_window
    )
    return (channel, BOT_SCOPE)


def _retry_after(error: discord.HTTPException) -> float:
    headers = getattr(error.response, "headers", None) or {}
    for name in ("Retry-After", "X-RateLimit-Reset-After"):
        # A 429 from a proxy in front of Discord may carry neither header.
        with contextlib.suppress(KeyError, TypeError, ValueError):
            return max(0.0, float(headers[name]))
    return DEFAULT_RETRY_AFTER


@contextlib.contextmanager
def translated_errors(key: str) -> Iterator[None]:
    """Translate discord.py and aiohttp failures of one call into the surface error tree.

    discord.py has already slept on Retry-After and retried (5 tries) before a 429 gets here. The
    body need not be Discord's JSON (a proxy's HTML or plain text page, or nothing): discord.py
    keeps it as text with code 0, so the HTTP status decides, and the code of a permanent error is
    Discord's code, else the status.
    """
    try:
        yield
    except discord.RateLimited as error:  # over discord.py's max_ratelimit_timeout
        raise SurfaceRateLimited(str(error), retry_after=error.retry_after, scope=key) from error
    except discord.HTTPException as error:
        if error.status == 429:
            wait = _retry_after(error)
            raise SurfaceRateLimited(str(error), retry_after=wait, scope=key) from error
        if error.status >= 500:
            raise TransientSurfaceError(str(error)) from error
        raise PermanentSurfaceError(str(error), code=str(error.code or error.status)) from error
    except (TimeoutError, aiohttp.ClientError, ConnectionError) as error:
        raise TransientSurfaceError(f"Discord unreachable: {error!r}") from error


def place_of(channel_id: int, key: ConversationKey | None) -> str:
    """A reply's place as stored with its turn: the channel it goes to and its conversation."""
    place: dict[str, Any] = {"channel": channel_id}
    if key is not None:
        place["key"] = [key.workspace, key.channel, key.thread]
    return json.dumps(place)


class DiscordReply:
    """A ``ReplySurface`` over one Discord channel (text channel, thread or DM).

    ``reference`` makes the first message a reply to the user's message: used when the bot
    answers in the channel because it may not open a thread there. ``key``, the conversation the
    reply belongs to, is what the Stop and Regenerate buttons name (without it there are none).
    """

    max_chars = MAX_MESSAGE_CHARS

    def __init__(
        self,
        channel: discord.abc.Messageable,
        *,
        reference: discord.Message | None = None,
        key: ConversationKey | None = None,
    ) -> None:
        channel_id = getattr(channel, "id", None)
        if not isinstance(channel_id, int):
            raise TypeError("DiscordReply needs a channel with an id")
        self.channel = channel
        self.channel_id = channel_id
        self.reference = reference
        self.key = key
        self.message_ids: list[str] = []
        # Whether the next post or edit shows text still streaming (it then carries Stop).
        self._live = False

    @property
    def place(self) -> str:
        """Where this reply goes, stored with the turn so another worker can reopen it."""
        return place_of(self.channel_id, self.key)

    def controls(self, live: bool) -> None:
        """``core.streaming.LiveControls``: whether the next call shows streaming text (with the
        Stop button) or a message's final text (every button taken off)."""
        self._live = live

    def _stop_view(self) -> discord.ui.View | None:
        return stop_view(self.key) if self._live and self.key is not None else None

    def render(self, text: str) -> str:
        # Discord renders Markdown itself.
        return text

    def scopes(self, call: str) -> tuple[RateScope, ...]:
        return channel_scopes(self.channel_id, "edit" if call == "edit" else "post")

    async def post(self, text: str) -> str:
        # Only the first message of the reply points at the question; continuations follow it.
        reference = self.reference if not self.message_ids else None
        view = self._stop_view()
        with translated_errors(scope_key(self.channel_id, "post")):
            if reference is not None:
                message = await self.channel.send(
                    text,
                    reference=reference,
                    mention_author=False,
                    allowed_mentions=discord.AllowedMentions.none(),
                    view=view,  # type: ignore[arg-type]
                )
            else:
                message = await self.channel.send(
                    text,
                    allowed_mentions=discord.AllowedMentions.none(),
                    view=view,  # type: ignore[arg-type]
                )
        self.message_ids.append(str(message.id))
        return str(message.id)

    async def edit(self, message_id: str, text: str) -> None:
        """Replace a message's text; while it streams it carries Stop, else no button at all
        (also the buttons of an answer being regenerated in place, or retracted)."""
        partial = discord.PartialMessage(channel=self.channel, id=int(message_id))  # type: ignore[arg-type]
        with translated_errors(scope_key(self.channel_id, "edit")):
            await partial.edit(
                content=text,
                view=self._stop_view(),
                allowed_mentions=discord.AllowedMentions.none(),
            )

    async def offer_feedback(self, reply_id: int, message_id: str, shown: str) -> None:
        """The feedback buttons and Regenerate on the answer's last message: one edit that
        sends only the view, so the text stays exactly as shown (``shown`` is not needed)."""
        view = feedback_view(reply_id)
        if self.key is not None:
            view.add_item(regenerate_button(self.key))
        partial = discord.PartialMessage(channel=self.channel, id=int(message_id))  # type: ignore[arg-type]
        with translated_errors(scope_key(self.channel_id, "edit")):
            await partial.edit(view=view, allowed_mentions=discord.AllowedMentions.none())

    async def show_typing(self) -> bool:
        # One typing call shows the indicator for 10 s or until the bot's next message.
        try:
            with translated_errors(scope_key(self.channel_id, "post")):
                await self.channel.typing()
        except SurfaceError as error:
            log.debug("typing indicator failed in %s: %s", self.channel_id, error)
            return False
        return True


def _header_float(headers: Any, name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def rate_limit_trace(budgets: Budgets) -> aiohttp.TraceConfig:
    """An aiohttp trace that feeds message posts' and edits' rate-limit headers to ``budgets``.

    discord.py keeps these headers to itself; reading them here lets every reply in a channel
    slow down together before Discord says 429. A 429 pauses the scope for its Retry-After.
    """

    async def on_request_end(
        session: aiohttp.ClientSession, context: SimpleNamespace, params: Any
    ) -> None:
        path = params.url.path
        if params.method == "POST" and (match := _POST_PATH.search(path)):
            key = scope_key(match.group(1), "post")
        elif params.method == "PATCH" and (match := _EDIT_PATH.search(path)):
            key = scope_key(match.group(1), "edit")
        else:
            return
        headers = params.response.headers
        if params.response.status == 429:
            wait = _header_float(headers, "Retry-After")
            if headers.get("X-RateLimit-Global"):
                key = BOT_SCOPE_KEY
            budgets.pause(key, wait if wait is not None else DEFAULT_RETRY_AFTER)
            return
        remaining = _header_float(headers, "X-RateLimit-Remaining")
        if remaining is None:
            return
        budgets.observe(
            key, remaining=remaining, reset_after=_header_float(headers, "X-RateLimit-Reset-After")
        )

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    return trace
