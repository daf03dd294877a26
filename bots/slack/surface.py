"""SlackReply: one answer's messages in a Slack thread or DM, as the streamer drives them.

``SlackReply`` is an ``AppendReplySurface`` over slack_sdk's ``AsyncWebClient``:

- the edit path: ``chat.postMessage`` then ``chat.update``, each message a ``markdown`` block
  (Slack renders the model's Markdown itself; editing with blocks shows no "(edited)"), with a
  short plain ``text`` for notifications;
- the native path: ``chat.startStream`` / ``appendStream`` / ``stopStream`` with
  ``markdown_text``; the streamer falls back to the edit path when Slack answers that streaming
  is not allowed (``NATIVE_STREAMS``: Slack's codes and limits, for the front door's profile),
  and the front door decides per reply whether to stream natively at all.

Every call names the rate-limit scopes it consumes, keyed as Slack limits them: per method per
workspace (``slack:T123:chat.update``), and for ``chat.postMessage`` also per channel. slack_sdk
errors are translated here and nowhere else (``translated_errors``, whatever the body: Slack's
JSON, a proxy's HTML or plain text, nothing): HTTP 429 -> ``SurfaceRateLimited`` with the
``Retry-After`` seconds, 5xx / 408 / timeouts / dropped connections -> ``TransientSurfaceError``,
anything else -> ``PermanentSurfaceError`` carrying Slack's error string (else ``http_<status>``)
as ``code``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse

from bots.slack.formatting import (
    MAX_MARKDOWN_CHARS,
    fallback_text,
    feedback_block,
    markdown_blocks,
    neutralise_mentions,
)
from core.bot import NativeStreams, RateScope
from core.errors import (
    PermanentSurfaceError,
    SurfaceError,
    SurfaceRateLimited,
    TransientSurfaceError,
)
from core.feedback import BAD, GOOD, feedback_id

log = logging.getLogger(__name__)

# Slack's published rates (docs.slack.dev "Rate limits" and each method's reference page), per
# workspace per app unless noted, in calls per second.
#: chat.update is Tier 3: 50+ per minute.
CHAT_UPDATE_PER_SECOND = 50 / 60
#: chat.postMessage: about 1 per second per channel ("short bursts above it are allowed").
POST_PER_CHANNEL_PER_SECOND = 1.0
#: chat.postMessage across a workspace: "several hundred messages per minute"; we assume 300.
POST_PER_WORKSPACE_PER_SECOND = 300 / 60
#: chat.startStream and chat.stopStream are Tier 2: 20+ per minute.
STREAM_START_STOP_PER_SECOND = 20 / 60
#: chat.appendStream is Tier 4: 100+ per minute.
STREAM_APPEND_PER_SECOND = 100 / 60
#: Calls a scope may spend at once after a quiet spell. Slack tolerates "occasional bursts" on
#: every tier; small numbers keep the start of a busy minute from tripping a 429.
EDIT_BURST = 3
POST_BURST = 1
STREAM_BURST = 3
APPEND_BURST = 5

#: Slack error strings that mean "try again later" rather than "this cannot work".
TRANSIENT_ERRORS = frozenset(
    {"internal_error", "fatal_error", "service_unavailable", "request_timeout", "team_not_ready"}
)
#: Seconds to wait on a 429 that carries no Retry-After (Slack always sends one; be safe).
DEFAULT_RETRY_AFTER = 1.0
#: RFC 9110 "408 Request Timeout": what a proxy answers when Slack took too long; try again.
HTTP_REQUEST_TIMEOUT = 408

#: Slack's native streams (chat.startStream / appendStream / stopStream reference pages):
#: - error strings meaning "this workspace or channel cannot stream natively": use edits;
#: - ``message_not_in_streaming_state``: the stream ended (Slack ends them after about 5
#:   minutes); stop ours a little earlier (270 s) and go on with chat.update;
#: - 3 at once per workspace in SLACK_STREAMING=auto: each costs a chat.startStream and a
#:   chat.stopStream, Tier 2 (~20 a minute, with a burst of a few); more replies use edits.
NATIVE_STREAMS = NativeStreams(
    unsupported_codes=frozenset(
        {
            "not_allowed",
            "not_allowed_token_type",
            "method_not_supported_for_channel_type",
            "method_not_supported",
            "unknown_method",
            "missing_scope",
            "feature_not_enabled",
        }
    ),
    ended_code="message_not_in_streaming_state",
    max_age_seconds=270.0,
    per_scope=3,
)


@dataclass(frozen=True, slots=True)
class ReplyTarget:
    """Where one reply goes: a thread (``thread_ts``) or the top of a DM (``thread_ts`` None).

    ``user`` and ``user_team`` are whom the answer is for: native streams need them
    (``recipient_user_id`` / ``recipient_team_id``).
    """

    team: str
    channel: str
    thread_ts: str | None
    user: str
    user_team: str

    @property
    def place(self) -> str:
        """This target as text, stored with the turn so another worker can reopen the reply."""
        return json.dumps(
            {
                "team": self.team,
                "channel": self.channel,
                "thread_ts": self.thread_ts,
                "user": self.user,
                "user_team": self.user_team,
            }
        )

    @classmethod
    def from_place(cls, place: str) -> ReplyTarget:
        """The target a ``place`` describes."""
        data = json.loads(place)
        return cls(
            str(data["team"]),
            str(data["channel"]),
            None if data.get("thread_ts") is None else str(data["thread_ts"]),
            str(data.get("user") or ""),
            str(data.get("user_team") or ""),
        )


def message_id(channel: str, ts: str) -> str:
    """The platform id of a Slack message, as stored: ``channel:ts``."""
    return f"{channel}:{ts}"


def split_message_id(value: str) -> tuple[str, str]:
    """``(channel, ts)`` of a ``message_id``."""
    channel, _, ts = value.rpartition(":")
    return channel, ts


def translate(error: Exception, *, method: str, scope: str | None) -> SurfaceError:
    """The core error for a failed slack_sdk call of ``method`` (rate-limit ``scope``).

    Slack answers JSON, but what answers may be a proxy or load balancer in front of it: an HTML
    or plain-text page, or nothing. slack_sdk then hands over a response whose ``data`` is a
    string or empty (or aiohttp's own response when a JSON content type held no JSON), so the
    body is read only when it is Slack's JSON and the HTTP status decides otherwise.
    """
    if isinstance(error, SlackApiError):
        return _api_error(error.response, method=method, scope=scope)
    if isinstance(error, aiohttp.ClientError | TimeoutError):
        return TransientSurfaceError(f"Slack {method}: {type(error).__name__}: {error}")
    raise error


@contextlib.contextmanager
def translated_errors(method: str, scope: str | None) -> Iterator[None]:
    """Translate slack_sdk and aiohttp failures of one call into the surface error tree."""
    try:
        yield
    except (SlackApiError, aiohttp.ClientError, TimeoutError) as error:
        translated = translate(error, method=method, scope=scope)
        log.debug("%s", translated)
        raise translated from error
    except AttributeError as error:
        if not _raised_in_slack_sdk(error):
            raise
        # slack_sdk's response check reads a 200 plain-text body (a proxy's page) as a dict.
        raise TransientSurfaceError(f"Slack {method}: not Slack's answer ({error})") from error


def _raised_in_slack_sdk(error: BaseException) -> bool:
    """Whether ``error`` was raised by slack_sdk's own code (its innermost frame)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("slack_sdk")


def _api_error(response: Any, *, method: str, scope: str | None) -> SurfaceError:
    # AsyncSlackResponse has ``status_code``; aiohttp's ClientResponse (a broken JSON body) has
    # ``status``.
    status = _status(response)
    data = getattr(response, "data", None)
    code = str(data.get("error") or "") if isinstance(data, dict) else ""
    if status == 429 or code == "ratelimited":
        retry_after = _retry_after(getattr(response, "headers", None))
        return SurfaceRateLimited(
            f"Slack {method}: rate limited for {retry_after:g}s",
            retry_after=retry_after,
            scope=scope,
        )
    if code in TRANSIENT_ERRORS or status >= 500 or status == HTTP_REQUEST_TIMEOUT:
        return TransientSurfaceError(f"Slack {method}: {code or 'no Slack answer'} (HTTP {status})")
    if not code and 200 <= status < 300:
        # A success status with a body that is not Slack's: a proxy's page, try again.
        return TransientSurfaceError(f"Slack {method}: not Slack's answer (HTTP {status})")
    code = code or f"http_{status}"
    return PermanentSurfaceError(f"Slack {method}: {code} (HTTP {status})", code=code)


def _status(response: Any) -> int:
    for name in ("status_code", "status"):
        value = getattr(response, name, None)
        if isinstance(value, int):
            return value
    return 0


def _retry_after(headers: Any) -> float:
    raw = (headers.get("Retry-After") or headers.get("retry-after")) if headers else None
    try:
        wait = float(raw) if raw is not None else DEFAULT_RETRY_AFTER
    except ValueError:
        return DEFAULT_RETRY_AFTER
    return wait if wait >= 0 else DEFAULT_RETRY_AFTER


class SlackReply:
    """``AppendReplySurface`` for one answer in one Slack thread or DM (see the module docstring)."""

    #: What one message may hold: its markdown block's 12,000 characters.
    max_chars = MAX_MARKDOWN_CHARS

    def __init__(
        self,
        client: AsyncWebClient,
        target: ReplyTarget,
        *,
        rate_scale: float = 1.0,
    ) -> None:
        self.client = client
        self.target = target
        self.place = target.place
        # Native-stream admission counts per workspace; Slack streams only as a reply to a
        # message, so a top-level DM answer cannot stream.
        self.native_scope = target.team if target.thread_ts else ""
        # Tests and benchmarks run Slack's minute faster; the fake server scales its limits alike.
        self.rate_scale = rate_scale

    def render(self, text: str) -> str:
        """The model's Markdown as sent (Slack renders it), with its mentions made silent."""
        return neutralise_mentions(text)

    def scopes(self, call: str) -> tuple[RateScope, ...]:
        team, s = self.target.team, self.rate_scale
        if call == "post":
            return (
                RateScope(
                    f"slack:{team}:{self.target.channel}:chat.postMessage",
                    POST_PER_CHANNEL_PER_SECOND * s,
                    POST_BURST,
                ),
                RateScope(
                    f"slack:{team}:chat.postMessage", POST_PER_WORKSPACE_PER_SECOND * s, POST_BURST
                ),
            )
        if call == "edit":
            return (RateScope(f"slack:{team}:chat.update", CHAT_UPDATE_PER_SECOND * s, EDIT_BURST),)
        if call in ("start", "stop"):
            method = "chat.startStream" if call == "start" else "chat.stopStream"
            return (
                RateScope(f"slack:{team}:{method}", STREAM_START_STOP_PER_SECOND * s, STREAM_BURST),
            )
        if call == "append":
            return (
                RateScope(
                    f"slack:{team}:chat.appendStream", STREAM_APPEND_PER_SECOND * s, APPEND_BURST
                ),
            )
        raise ValueError(f"unknown Slack surface call {call!r}")

    async def post(self, text: str) -> str:
        # Every method silences mentions itself too (a no-op on rendered text), so no caller
        # can post a ping by skipping ``render``.
        text = neutralise_mentions(text)
        kwargs: dict[str, Any] = {
            "channel": self.target.channel,
            "text": fallback_text(text),
            "blocks": markdown_blocks(text),
            # Link previews would jump around while the answer is still being written.
            "unfurl_links": False,
            "unfurl_media": False,
        }
        if self.target.thread_ts:
            kwargs["thread_ts"] = self.target.thread_ts
        response = await self._call(
            "post", "chat.postMessage", self.client.chat_postMessage, kwargs
        )
        return message_id(self.target.channel, str(response["ts"]))

    async def edit(self, message_id: str, text: str) -> None:
        channel, ts = split_message_id(message_id)
        text = neutralise_mentions(text)
        kwargs = {
            "channel": channel,
            "ts": ts,
            "text": fallback_text(text),
            "blocks": markdown_blocks(text),
        }
        await self._call("edit", "chat.update", self.client.chat_update, kwargs)

    async def offer_feedback(self, reply_id: int, message_id: str, shown: str) -> None:
        """The feedback buttons under the answer's last message: a ``chat.update`` with the
        same markdown block and a ``context_actions`` block after it."""
        channel, ts = split_message_id(message_id)
        text = neutralise_mentions(shown)
        kwargs = {
            "channel": channel,
            "ts": ts,
            "text": fallback_text(text),
            "blocks": [
                *markdown_blocks(text),
                feedback_block(feedback_id(GOOD, reply_id), feedback_id(BAD, reply_id)),
            ],
        }
        await self._call("edit", "chat.update", self.client.chat_update, kwargs)

    async def show_typing(self) -> bool:
        """Nothing to show: Slack has no typing indicator for bots outside assistant threads, so
        the streamer's "Thinking…" message is the sign of life."""
        return False

    async def _call(
        self,
        call: str,
        method: str,
        function: Callable[..., Awaitable[AsyncSlackResponse]],
        kwargs: dict[str, Any],
    ) -> AsyncSlackResponse:
        with translated_errors(method, self.scopes(call)[0].key):
            return await function(**kwargs)

    async def start(self, text: str) -> str:
        if not self.target.thread_ts:
            # Slack streams only as a reply to a message; a top-level DM answer cannot stream.
            raise PermanentSurfaceError("Slack streams only into threads", code="not_allowed")
        kwargs: dict[str, Any] = {
            "channel": self.target.channel,
            "thread_ts": self.target.thread_ts,
            # Bot tokens must name the recipient, in DMs too.
            "recipient_user_id": self.target.user,
            "recipient_team_id": self.target.user_team,
        }
        if text:
            kwargs["markdown_text"] = neutralise_mentions(text)
        response = await self._call(
            "start", "chat.startStream", self.client.chat_startStream, kwargs
        )
        return message_id(self.target.channel, str(response["ts"]))

    async def append(self, message_id: str, delta: str) -> None:
        if not delta:
            return
        channel, ts = split_message_id(message_id)
        kwargs = {"channel": channel, "ts": ts, "markdown_text": neutralise_mentions(delta)}
        await self._call("append", "chat.appendStream", self.client.chat_appendStream, kwargs)

    async def stop(self, message_id: str, delta: str) -> None:
        channel, ts = split_message_id(message_id)
        kwargs: dict[str, Any] = {"channel": channel, "ts": ts}
        if delta:
            kwargs["markdown_text"] = neutralise_mentions(delta)
        await self._call("stop", "chat.stopStream", self.client.chat_stopStream, kwargs)
