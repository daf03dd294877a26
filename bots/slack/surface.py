"""SlackReply: one answer's messages in a Slack thread or DM, as the streamer drives them.

``SlackReply`` is an ``AppendReplySurface`` over slack_sdk's ``AsyncWebClient``:

- the edit path: ``chat.postMessage`` then ``chat.update``, each message a ``markdown`` block
  (Slack renders the model's Markdown itself; editing with blocks shows no "(edited)"), with a
  short plain ``text`` for notifications;
- the native path: ``chat.startStream`` / ``appendStream`` / ``stopStream`` with
  ``markdown_text``; the streamer falls back to the edit path when Slack answers that streaming
  is not allowed (``NATIVE_STREAMS``: Slack's codes and limits, for the front door's profile),
  and the front door decides per reply whether to stream natively at all;
- the status while the answer is on its way (``show_typing``): ``assistant.threads.setStatus``
  ("is thinking…" and the rotating loading messages) in the reply's thread, in DMs, assistant
  threads and channel threads alike (Slack's changelog of 2026-03-05: ``chat:write`` is enough);
  never waiting for its budget, never raising: a refusal is just no status;
- the agent session of the reply's thread (``AgentSessions``): ``processing`` while the answer
  is on its way, so Slack shows its stop button, ``active`` when it has landed
  (``controls``, the streamer's ``LiveControls``, and ``end_session`` at the end of the turn);
  best effort, in the background, bounded.

Every call names the rate-limit scopes it consumes, keyed as Slack limits them: per method per
workspace (``slack:T123:chat.update``), and for ``chat.postMessage`` also per channel. slack_sdk
errors are translated here and nowhere else (``translated_errors``, whatever the body: Slack's
JSON, a proxy's HTML or plain text, nothing): HTTP 429 -> ``SurfaceRateLimited`` with the
``Retry-After`` seconds, 5xx / 408 / timeouts / dropped connections -> ``TransientSurfaceError``,
anything else -> ``PermanentSurfaceError`` carrying Slack's error string (else ``http_<status>``)
as ``code``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
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
from core.bot import Budgets, NativeStreams, RateScope
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
#: chat.postMessage: "1 per second per channel, short bursts above it allowed", and "several
#: hundred a minute" across the workspace. With a thread's status showing, a burst of short
#: answers lands as one post each, all at about the same time: two at once in a channel and ten
#: across the workspace (each scope keeps its sustained rate) let twenty conversations land
#: within seconds. RATE_LIMITS lowers them (``slack:*:chat.postMessage=300/60/1``).
POST_CHANNEL_BURST = 2
POST_WORKSPACE_BURST = 10
STREAM_BURST = 3
APPEND_BURST = 5

#: assistant.threads.setStatus: "Special rate limits apply" and Slack does not publish them; we
#: assume 600 a minute per workspace with a burst of 20 (a burst of conversations each shows
#: its status at once). RATE_LIMITS overrides it (``slack:*:assistant.threads.setStatus``).
STATUS_PER_SECOND = 600 / 60
STATUS_BURST = 20
#: agents.sessions.setStatus is Tier 3: 50+ per minute.
SESSION_PER_SECOND = 50 / 60
SESSION_BURST = 3
#: What the status says while the answer is on its way (Slack shows "<app name> is thinking…").
STATUS_TEXT = "is thinking\u2026"
#: Slack rotates through at most 10 loading messages.
MAX_LOADING_MESSAGES = 10
#: A status lasts until the app posts in the thread, or two minutes: renewed before that while
#: the model is still silent (the streamer's typing refresh).
STATUS_REFRESH_SECONDS = 100.0
#: Seconds one status or agent-session call may take before it counts as failed.
STATUS_CALL_TIMEOUT = 3.0
#: Seconds a reply's ``processing`` session call may wait for its budget (a burst of replies
#: shares Tier 3); a reply that has ended by then never opens its session.
SESSION_START_WAIT = 5.0
#: Seconds the closing ``active`` call may wait for its budget.
SESSION_END_WAIT = 30.0
#: Error strings meaning the app or workspace cannot use a method at all (scope, app type): the
#: process stops calling it in that workspace.
REFUSED_FOR_GOOD = frozenset(
    {
        "missing_scope",
        "not_allowed",
        "not_allowed_token_type",
        "method_not_supported",
        "unknown_method",
        "feature_not_enabled",
        "invalid_auth",
        "not_authed",
        "no_permission",
        "access_denied",
    }
)

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


class SlackExtras:
    """What every reply of one bot shares beyond the Web API client: the budgets its status and
    agent-session calls take from, the loading messages, the workspaces that refused a method
    for good, and the background tasks of agent-session calls (``close`` cancels them)."""

    def __init__(
        self,
        budgets: Budgets | None = None,
        *,
        loading_messages: Sequence[str] = (),
        rate_scale: float = 1.0,
    ) -> None:
        self.budgets = budgets
        self.loading_messages = list(loading_messages)[:MAX_LOADING_MESSAGES]
        self.rate_scale = rate_scale
        #: (workspace, method) pairs Slack refused for good (``REFUSED_FOR_GOOD``).
        self.refused: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def status_scopes(self, team: str) -> tuple[RateScope, ...]:
        return (
            RateScope(
                f"slack:{team}:assistant.threads.setStatus",
                STATUS_PER_SECOND * self.rate_scale,
                STATUS_BURST,
            ),
        )

    def session_scopes(self, team: str) -> tuple[RateScope, ...]:
        return (
            RateScope(
                f"slack:{team}:agents.sessions.setStatus",
                SESSION_PER_SECOND * self.rate_scale,
                SESSION_BURST,
            ),
        )

    def spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Wait for the agent-session calls in flight (tests, benchmarks)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    async def call(
        self,
        team: str,
        method: str,
        scopes: tuple[RateScope, ...],
        function: Callable[..., Awaitable[AsyncSlackResponse]],
        kwargs: dict[str, Any],
        *,
        wait: float | None,
        started: Callable[[], None] | None = None,
    ) -> bool:
        """One best-effort call: whether Slack accepted it. Never raises (but cancellation).

        ``wait`` None: only when the scopes' budgets can grant it now; else wait at most that
        long for them. A method Slack refused for good in this workspace is not called again.
        """
        if (team, method) in self.refused:
            return False
        try:
            async with asyncio.timeout(STATUS_CALL_TIMEOUT + (wait or 0.0)):
                if self.budgets is not None:
                    if wait is None and not await self.budgets.idle(scopes):
                        return False
                    await self.budgets.acquire(scopes)
                if started is not None:
                    started()
                async with asyncio.timeout(STATUS_CALL_TIMEOUT):
                    with translated_errors(method, scopes[0].key):
                        await function(**kwargs)
        except SurfaceRateLimited as error:
            if self.budgets is not None:
                self.budgets.pause(error.scope or scopes[0].key, error.retry_after)
            log.info("%s not shown: %s", method, error)
            return False
        except PermanentSurfaceError as error:
            if error.code in REFUSED_FOR_GOOD:
                self.refused.add((team, method))
                log.warning(
                    "Slack refused %s in workspace %s (%s): not calling it again; see the "
                    "README's Slack set-up for the scopes and features it needs",
                    method, team, error.code,
                )  # fmt: skip
            else:
                log.info("%s refused: %s", method, error)
            return False
        except (SurfaceError, TimeoutError) as error:
            log.info("%s failed: %s", method, error or "timed out")
            return False
        return True


class AgentSession:
    """The agent session of one reply's thread: ``processing`` while the answer is on its way
    (Slack shows a stop button), ``active`` once it landed. Calls go in order in the background;
    the closing ``active`` is sent only if ``processing`` was."""

    def __init__(self, client: AsyncWebClient, target: ReplyTarget, extras: SlackExtras) -> None:
        self.client = client
        self.target = target
        self.extras = extras
        self._wanted: str | None = None
        self._sent: str | None = None
        # True from the moment a call leaves (it may reach Slack even if cancelled then).
        self._calling = False
        self._worker: asyncio.Task[None] | None = None

    def want(self, status: str) -> None:
        """Ask for ``status`` (``processing`` or ``active``); the latest wish wins."""
        if not self.target.thread_ts or self._wanted == status:
            return
        if status == "active" and self._sent is None and not self._calling:
            # Still waiting for its budget: the reply ended before its session opened, so it
            # never does.
            if self._worker is not None:
                self._worker.cancel()
                self._worker = None
            self._wanted = status
            return
        self._wanted = status
        if self._worker is None or self._worker.done():
            self._worker = self.extras.spawn(self._apply(), name="slack agent session")

    async def _apply(self) -> None:
        while self._wanted is not None and self._wanted != self._sent:
            status = self._wanted
            if status == "active" and self._sent is None:
                return
            kwargs = {
                "channel_id": self.target.channel,
                "thread_ts": self.target.thread_ts,
                "status": status,
            }
            if status == "processing" and self.target.user:
                kwargs["initiator_user_id"] = self.target.user
            wait = SESSION_START_WAIT if status == "processing" else SESSION_END_WAIT
            try:
                ok = await self.extras.call(
                    self.target.team,
                    "agents.sessions.setStatus",
                    self.extras.session_scopes(self.target.team),
                    self.client.agents_sessions_setStatus,
                    kwargs,
                    wait=wait,
                    started=self._started,
                )
            finally:
                self._calling = False
            if not ok:
                return
            self._sent = status

    def _started(self) -> None:
        self._calling = True


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
        extras: SlackExtras | None = None,
    ) -> None:
        self.client = client
        self.target = target
        self.place = target.place
        self.extras = extras or SlackExtras(rate_scale=rate_scale)
        self.session = AgentSession(client, target, self.extras)
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
                    POST_CHANNEL_BURST,
                ),
                RateScope(
                    f"slack:{team}:chat.postMessage",
                    POST_PER_WORKSPACE_PER_SECOND * s,
                    POST_WORKSPACE_BURST,
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
        if call == "status":
            return self.extras.status_scopes(team)
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
        """The thread's status, "is thinking…" with the loading messages rotating
        (``assistant.threads.setStatus``); True when Slack accepted it. Never waits for its budget
        and never raises: without a status the streamer posts its "Thinking…" message instead.
        A reply at the top of a DM has no thread to show a status in. The agent session of the
        thread is set ``processing`` alongside (in the background)."""
        thread_ts = self.target.thread_ts
        if not thread_ts:
            return False
        kwargs: dict[str, Any] = {
            "channel_id": self.target.channel,
            "thread_ts": thread_ts,
            "status": STATUS_TEXT,
        }
        if self.extras.loading_messages:
            kwargs["loading_messages"] = self.extras.loading_messages
        shown = await self.extras.call(
            self.target.team,
            "assistant.threads.setStatus",
            self.extras.status_scopes(self.target.team),
            self.client.assistant_threads_setStatus,
            kwargs,
            wait=None,
        )
        self.session.want("processing")
        return shown

    def controls(self, live: bool) -> None:
        """``core.streaming.LiveControls``: the agent session is ``processing`` (Slack's stop
        button) while a message of the answer is still streaming, ``active`` once it lands."""
        self.session.want("processing" if live else "active")

    def end_session(self) -> None:
        """The turn ended (whatever happened): the thread's agent session is ``active`` again."""
        self.session.want("active")

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
