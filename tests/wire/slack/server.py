"""A local HTTP server that imitates the Slack Web API, for the real slack_sdk AsyncWebClient.

It speaks the wire format slack_sdk uses: ``POST /api/<method>`` (``GET`` for
``conversations.replies``) with the token in ``Authorization: Bearer``, arguments as a query
string, a form body or a JSON body. It answers like Slack: HTTP 200 with ``{"ok": true, ...}`` or
``{"ok": false, "error": "<code>"}``, and HTTP 429 with ``Retry-After`` (whole seconds) and
``{"ok": false, "error": "ratelimited"}`` when a method's rate limit for the workspace (or, for
``chat.postMessage``, the channel) is exceeded.

Rate limits are token buckets per method per workspace, at Slack's published tier rates
(``METHOD_LIMITS``). ``rate_scale`` multiplies every rate (tests run Slack's minute in a few
seconds: the bot's budgets are scaled by the same factor). Each bucket also holds a little more
than the bot's own burst (``NETWORK_SLACK_CALLS``): calls paced exactly at the limit arrive with
jittered network latency, and Slack itself tolerates short bursts above a tier's rate.

Everything is recorded for assertions: every call (``calls``), counts per method (``counts``),
429s per method (``ratelimited``), and each message with its successive visible states
(``messages`` / ``message(channel, ts).states``). ``responses`` holds one-shot failures to inject:
Slack's own errors (``fail_next``) or a proxy's non-JSON answers (``answer_next``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

#: Slack tier rates in calls per minute (docs.slack.dev "Rate limits": Tier 2 20+/min, Tier 3
#: 50+/min, Tier 4 100+/min; chat.postMessage "1 per second per channel" with short bursts).
TIER_2_PER_MINUTE = 20.0
TIER_3_PER_MINUTE = 50.0
TIER_4_PER_MINUTE = 100.0
POST_MESSAGE_PER_CHANNEL_PER_MINUTE = 60.0
#: chat.postMessage across a workspace: "several hundred per minute"; the bot assumes 300.
POST_MESSAGE_PER_WORKSPACE_PER_MINUTE = 300.0
#: assistant.threads.setStatus: "Special rate limits apply", unpublished; the bot assumes (and
#: the fake enforces) 600 a minute per workspace with a burst of 20 (bots/slack/surface.py).
SET_STATUS_PER_MINUTE = 600.0
SET_STATUS_BURST = 20

#: Text limits (docs.slack.dev chat.postMessage and Block Kit reference): ``text`` answers
#: msg_too_long beyond about 4,000 characters in practice, ``markdown_text`` and the markdown
#: blocks of one payload hold 12,000 characters in total, a section block's text at most 3,000,
#: a message at most 50 blocks.
MAX_TEXT_CHARS = 4_000
MAX_MARKDOWN_CHARS = 12_000
MAX_SECTION_CHARS = 3_000
MAX_BLOCKS = 50
#: Block Kit "Context actions block": at most 5 elements.
CONTEXT_ACTIONS_MAX = 5
#: assistant.threads.setStatus: at most 10 loading messages; setSuggestedPrompts: at most 4.
MAX_LOADING_MESSAGES = 10
MAX_SUGGESTED_PROMPTS = 4
#: agents.sessions.setStatus's acceptable values.
SESSION_STATUSES = frozenset({"active", "processing", "suspended", "closed"})
#: Where a file download without the bot token is sent (Slack answers a redirect to sign in).
SIGN_IN_PATH = "/signin"

#: A native stream stops accepting appends about 5 minutes after chat.startStream.
STREAM_LIFETIME_SECONDS = 300.0

#: Extra calls each bucket holds beyond the bot's own burst: see the module docstring.
NETWORK_SLACK_CALLS = 3


@dataclass(frozen=True, slots=True)
class Limit:
    """One method's limit: ``per_minute`` sustained, ``burst`` at once, per workspace or channel."""

    per_minute: float
    burst: int
    per_channel: bool = False


#: Slack's limits per method (the bot's ``RateScope`` bursts plus ``NETWORK_SLACK_CALLS``).
METHOD_LIMITS: dict[str, Limit] = {
    "chat.postMessage": Limit(POST_MESSAGE_PER_CHANNEL_PER_MINUTE, 2 + NETWORK_SLACK_CALLS, True),
    "chat.update": Limit(TIER_3_PER_MINUTE, 3 + NETWORK_SLACK_CALLS),
    "chat.startStream": Limit(TIER_2_PER_MINUTE, 3 + NETWORK_SLACK_CALLS),
    "chat.appendStream": Limit(TIER_4_PER_MINUTE, 5 + NETWORK_SLACK_CALLS),
    "chat.stopStream": Limit(TIER_2_PER_MINUTE, 3 + NETWORK_SLACK_CALLS),
    "chat.postEphemeral": Limit(TIER_4_PER_MINUTE, 5 + NETWORK_SLACK_CALLS),
    "conversations.replies": Limit(TIER_3_PER_MINUTE, 3 + NETWORK_SLACK_CALLS),
    "reactions.add": Limit(TIER_3_PER_MINUTE, 3 + NETWORK_SLACK_CALLS),
    "users.info": Limit(TIER_4_PER_MINUTE, 5 + NETWORK_SLACK_CALLS),
    "auth.test": Limit(TIER_4_PER_MINUTE, 5 + NETWORK_SLACK_CALLS),
    "assistant.threads.setStatus": Limit(SET_STATUS_PER_MINUTE, SET_STATUS_BURST),
    "assistant.threads.setSuggestedPrompts": Limit(TIER_4_PER_MINUTE, 5 + NETWORK_SLACK_CALLS),
    "agents.sessions.setStatus": Limit(TIER_3_PER_MINUTE, 3 + NETWORK_SLACK_CALLS),
}
#: Limits applied across the workspace on top of a per-channel limit of the same method.
WORKSPACE_LIMITS: dict[str, Limit] = {
    "chat.postMessage": Limit(POST_MESSAGE_PER_WORKSPACE_PER_MINUTE, 10 + NETWORK_SLACK_CALLS),
}


class TokenBucket:
    """A token bucket on an injected clock."""

    def __init__(self, per_second: float, burst: int, now: Callable[[], float]) -> None:
        self.per_second = per_second
        self.burst = burst
        self._now = now
        self._tokens = float(burst)
        self._at = now()

    def wait(self) -> float:
        """Seconds until a token is available (0: one is)."""
        now = self._now()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_second)
        self._at = now
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.per_second

    def take(self) -> None:
        """Spend a token (after ``wait`` answered 0)."""
        self._tokens -= 1


@dataclass(frozen=True, slots=True)
class Team:
    """A workspace the fake knows, and its bot."""

    team_id: str
    token: str
    bot_user_id: str
    bot_id: str
    name: str = "Test Workspace"


@dataclass
class Message:
    """One message in the fake workspace, with each visible state it went through."""

    team_id: str
    channel: str
    ts: str
    user: str
    text: str
    thread_ts: str | None = None
    bot_id: str | None = None
    blocks: list[dict[str, Any]] | None = None
    streaming: bool = False
    stream_started: float = 0.0
    recipient: tuple[str, str] | None = None
    #: The author's display name, which Slack includes as ``user_profile`` when it has one.
    display_name: str | None = None
    states: list[str] = field(default_factory=list)
    #: When each state appeared (the fake's clock), parallel to ``states``.
    times: list[float] = field(default_factory=list)
    #: The block types each state carried (``markdown``, ``context_actions``, ...), parallel too.
    block_types: list[tuple[str, ...]] = field(default_factory=list)

    def show(self, at: float) -> None:
        """Record the current visible text as a new state."""
        self.states.append(self.visible())
        self.times.append(at)
        self.block_types.append(tuple(str(b.get("type")) for b in self.blocks or ()))

    def feedback_values(self) -> tuple[str, str] | None:
        """The values of the feedback buttons the message carries now (positive, negative)."""
        for block in self.blocks or ():
            if block.get("type") != "context_actions":
                continue
            for element in block.get("elements") or ():
                if element.get("type") == "feedback_buttons":
                    return (
                        str(element["positive_button"]["value"]),
                        str(element["negative_button"]["value"]),
                    )
        return None

    def visible(self) -> str:
        """What Slack shows: the markdown blocks' text, else ``text``."""
        if self.blocks:
            return "".join(
                str(b.get("text", "")) for b in self.blocks if b.get("type") == "markdown"
            ) or "".join(
                str(b.get("text", {}).get("text", ""))
                for b in self.blocks
                if b.get("type") == "section"
            )
        return self.text

    def as_api(self) -> dict[str, Any]:
        """The message as conversations.replies returns it."""
        data: dict[str, Any] = {"type": "message", "ts": self.ts, "user": self.user}
        data["text"] = self.visible()
        if self.thread_ts:
            data["thread_ts"] = self.thread_ts
        if self.bot_id:
            data["bot_id"] = self.bot_id
        if self.display_name:
            data["user_profile"] = {"display_name": self.display_name}
        if self.blocks:
            data["blocks"] = self.blocks
        return data


@dataclass(frozen=True, slots=True)
class Call:
    """One request the fake received (after authentication), with its merged arguments."""

    method: str
    args: dict[str, Any]
    status: int
    error: str | None
    at: float


@dataclass(frozen=True, slots=True)
class StatusCall:
    """One accepted ``assistant.threads.setStatus``: where, what, and when (the fake's clock)."""

    channel: str
    thread_ts: str
    status: str
    loading_messages: tuple[str, ...]
    at: float


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file in the fake workspace, served at ``url_private_download`` to the bot token only."""

    id: str
    team_id: str
    name: str
    mimetype: str
    content: bytes


@dataclass(frozen=True, slots=True)
class RawAnswer:
    """An answer that is not Slack's JSON: what a proxy or load balancer in front of Slack sends
    (an HTML error page, plain text, or nothing at all)."""

    status: int
    body: str = ""
    content_type: str | None = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()

    def response(self) -> web.Response:
        headers = dict(self.headers)
        if self.content_type is None:
            return web.Response(status=self.status, body=self.body.encode(), headers=headers)
        return web.Response(
            status=self.status, text=self.body, content_type=self.content_type, headers=headers
        )


class SlackError(Exception):
    """Answer ``{"ok": false, "error": code}`` with HTTP ``status``."""

    def __init__(self, code: str, status: int = 200) -> None:
        super().__init__(code)
        self.code = code
        self.status = status


class FakeSlack:
    """The fake Slack Web API. ``async with FakeSlack() as slack:`` serves it on 127.0.0.1."""

    def __init__(
        self,
        *,
        teams: tuple[Team, ...] = (Team("T0001", "xoxb-test-token", "UBOT", "BBOT"),),
        rate_scale: float = 1.0,
        limits: dict[str, Limit] | None = None,
        now: Callable[[], float] = time.monotonic,
        stream_lifetime: float = STREAM_LIFETIME_SECONDS,
    ) -> None:
        self.teams = {t.token: t for t in teams}
        self.rate_scale = rate_scale
        self.limits = dict(METHOD_LIMITS if limits is None else limits)
        self.workspace_limits = dict(WORKSPACE_LIMITS if limits is None else {})
        self.stream_lifetime = stream_lifetime
        self._now = now
        self._buckets: dict[tuple[str, ...], TokenBucket] = {}
        self._ts = itertools.count(1)
        self.messages: dict[tuple[str, str], Message] = {}
        self.calls: list[Call] = []
        self.counts: Counter[str] = Counter()
        self.ratelimited: Counter[str] = Counter()
        self.ephemeral: list[dict[str, Any]] = []
        self.responded: list[dict[str, Any]] = []
        self.reactions: list[dict[str, Any]] = []
        #: Modals opened with views.open: (trigger_id, view).
        self.views: list[tuple[str, dict[str, Any]]] = []
        #: One-shot answers to inject: method -> queue of (error code, HTTP status) or raw answers.
        self.responses: dict[str, deque[tuple[str, int] | RawAnswer]] = {}
        #: When set, chat.startStream answers this error (a workspace without native streaming).
        self.native_streaming_error: str | None = None
        #: Seconds each answer is held back (a slow Slack); 0 answers at once.
        self.latency = 0.0
        self.users: dict[str, dict[str, Any]] = {}
        #: Methods answering ``missing_scope`` on every call (an app installed without a scope).
        self.missing_scopes: set[str] = set()
        #: Accepted assistant.threads.setStatus calls, in order; the status showing per thread
        #: (Slack clears it when the app posts in the thread, and after two minutes).
        self.statuses: list[StatusCall] = []
        self.showing: dict[tuple[str, str], str] = {}
        #: assistant.threads.setSuggestedPrompts calls: (channel, thread_ts or None, args).
        self.suggested: list[tuple[str, str | None, dict[str, Any]]] = []
        #: Agent sessions: (channel, thread_ts) -> status history (agents.sessions.setStatus).
        self.sessions: dict[tuple[str, str], list[str]] = {}
        #: Files people attached, by id; ``downloads`` counts authorised downloads, ``refused``
        #: downloads without the bot token.
        self.files: dict[str, StoredFile] = {}
        self._file_ids = itertools.count(1)
        self.downloads: Counter[str] = Counter()
        self.refused_downloads = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The Web API base URL, as SLACK_API_URL takes it."""
        return f"http://127.0.0.1:{self.port}/api/"

    def response_url(self, name: str = "1") -> str:
        """A slash command's response_url served by this fake."""
        return f"http://127.0.0.1:{self.port}/respond/{name}"

    def web_app(self) -> web.Application:
        """The routes this fake serves (subclasses add theirs: Socket Mode's websocket)."""
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/api/{method}", self._handle)
        app.router.add_post("/respond/{name}", self._respond)
        app.router.add_get("/files-pri/{team_file}/download/{name}", self._download)
        app.router.add_get(SIGN_IN_PATH, self._sign_in)
        return app

    async def start(self) -> Self:
        self._runner = web.AppRunner(self.web_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- test set-up and inspection -----------------------------------------------------------

    @property
    def team(self) -> Team:
        """The first (usually only) workspace."""
        return next(iter(self.teams.values()))

    def next_ts(self) -> str:
        """A fresh, increasing message timestamp."""
        return f"1700000000.{next(self._ts):06d}"

    def add_message(
        self,
        channel: str,
        text: str,
        *,
        user: str = "U_ALICE",
        thread_ts: str | None = None,
        bot_id: str | None = None,
        team_id: str | None = None,
        display_name: str | None = None,
    ) -> Message:
        """A message a person (or another bot) posted, as conversations.replies will list it."""
        ts = self.next_ts()
        message = Message(team_id or self.team.team_id, channel, ts, user, text, thread_ts, bot_id)
        message.display_name = display_name
        message.show(self._now())
        self.messages[(channel, ts)] = message
        return message

    def fail_next(self, method: str, error: str, status: int = 200, times: int = 1) -> None:
        """Make the next ``times`` calls of ``method`` answer ``error`` (HTTP ``status``)."""
        self.responses.setdefault(method, deque()).extend([(error, status)] * times)

    def answer_next(
        self,
        method: str,
        status: int,
        body: str = "",
        *,
        content_type: str | None = "text/plain",
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """Make the next ``times`` calls of ``method`` answer ``status`` with ``body`` as a proxy
        would (``content_type`` None: no Content-Type header), instead of Slack's JSON."""
        answer = RawAnswer(status, body, content_type, tuple((headers or {}).items()))
        self.responses.setdefault(method, deque()).extend([answer] * times)

    def message(self, channel: str, ts: str) -> Message:
        return self.messages[(channel, ts)]

    def bot_messages(
        self, channel: str | None = None, thread_ts: str | None = None
    ) -> list[Message]:
        """Messages the bot posted, oldest first, optionally in one channel/thread."""
        bots = {t.bot_user_id for t in self.teams.values()}
        return [
            m
            for m in self.messages.values()
            if m.user in bots
            and (channel is None or m.channel == channel)
            and (thread_ts is None or m.thread_ts == thread_ts)
        ]

    def thread_text(self, channel: str, thread_ts: str) -> str:
        """The bot's visible text in one thread, its messages joined in order."""
        return "".join(m.visible() for m in self.bot_messages(channel, thread_ts))

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def add_file(
        self, name: str, content: bytes, *, mimetype: str = "text/plain", team_id: str | None = None
    ) -> dict[str, Any]:
        """A file a person attached: the ``files`` entry of their message event, as Slack sends
        it (``url_private_download`` points at this fake and needs the bot token)."""
        team = team_id or self.team.team_id
        stored = StoredFile(f"F{next(self._file_ids):08d}", team, name, mimetype, content)
        self.files[stored.id] = stored
        base = f"http://127.0.0.1:{self.port}/files-pri/{team}-{stored.id}"
        return {
            "id": stored.id,
            "created": 1700000000,
            "name": name,
            "title": name,
            "mimetype": mimetype,
            "filetype": name.rpartition(".")[2] if "." in name else "binary",
            "pretty_type": mimetype,
            "user": "U_ALICE",
            "mode": "hosted",
            "is_external": False,
            "is_public": False,
            "size": len(content),
            "url_private": f"{base}/{name}",
            "url_private_download": f"{base}/download/{name}",
        }

    def calls_in_order(self, *methods: str) -> list[Call]:
        """The accepted calls of ``methods`` (all when none named), in the order they came."""
        return [c for c in self.calls if c.status == 200 and (not methods or c.method in methods)]

    # -- HTTP --------------------------------------------------------------------------------

    async def _respond(self, request: web.Request) -> web.Response:
        body = await request.read()
        payload = json.loads(body) if body else {}
        payload["_name"] = request.match_info["name"]
        self.responded.append(payload)
        return web.json_response({"ok": True})

    async def _download(self, request: web.Request) -> web.Response:
        """A file's bytes for the bot token of its workspace; anyone else is sent to sign in,
        as Slack does (a redirect to an HTML login page, never the file)."""
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        team = self.teams.get(token)
        _, _, file_id = request.match_info["team_file"].partition("-")
        stored = self.files.get(file_id)
        if team is None or stored is None or stored.team_id != team.team_id:
            self.refused_downloads += 1
            raise web.HTTPFound(f"{SIGN_IN_PATH}?redir={request.path}")
        self.downloads[stored.id] += 1
        return web.Response(body=stored.content, content_type=stored.mimetype)

    async def _sign_in(self, request: web.Request) -> web.Response:
        return web.Response(
            text="<!DOCTYPE html><html><body>Sign in to Slack</body></html>",
            content_type="text/html",
        )

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if self.latency:
            await asyncio.sleep(self.latency)
        args = await _arguments(request)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        token = token or str(args.pop("token", ""))
        team = self.teams.get(token)
        if team is None:
            return web.json_response(
                {"ok": False, "error": "not_authed" if not token else "invalid_auth"}
            )
        now = self._now()
        self.counts[method] += 1
        wait = self._rate_check(team, method, args)
        if wait:
            self.ratelimited[method] += 1
            self.calls.append(Call(method, args, 429, "ratelimited", now))
            return web.json_response(
                {"ok": False, "error": "ratelimited"},
                status=429,
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        try:
            injected = self.responses.get(method)
            if injected:
                answer = injected.popleft()
                if isinstance(answer, RawAnswer):
                    self.calls.append(Call(method, args, answer.status, None, now))
                    return answer.response()
                raise SlackError(*answer)
            if method in self.missing_scopes:
                raise SlackError("missing_scope")
            handler = getattr(self, "_m_" + method.replace(".", "_"), None)
            if handler is None:
                raise SlackError("unknown_method", 404)
            result: dict[str, Any] = handler(team, args)
        except SlackError as error:
            self.calls.append(Call(method, args, error.status, error.code, now))
            return web.json_response({"ok": False, "error": error.code}, status=error.status)
        self.calls.append(Call(method, args, 200, None, now))
        return web.json_response({"ok": True, **result})

    def _rate_check(self, team: Team, method: str, args: dict[str, Any]) -> float:
        """0 when the call may go, else the seconds until it could (a token is spent if 0)."""
        keys: list[tuple[tuple[str, ...], Limit]] = []
        limit = self.limits.get(method)
        if limit is not None:
            key: tuple[str, ...] = (team.team_id, method)
            if limit.per_channel:
                key += (str(args.get("channel", "")),)
            keys.append((key, limit))
        workspace = self.workspace_limits.get(method)
        if workspace is not None:
            keys.append(((team.team_id, method, "*"), workspace))
        buckets = [self._bucket(key, limit) for key, limit in keys]
        waits = [bucket.wait() for bucket in buckets]
        if any(waits):
            return max(waits)
        for bucket in buckets:
            bucket.take()
        return 0.0

    def _bucket(self, key: tuple[str, ...], limit: Limit) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            rate = limit.per_minute / 60.0 * self.rate_scale
            bucket = self._buckets[key] = TokenBucket(rate, limit.burst, self._now)
        return bucket

    # -- methods -----------------------------------------------------------------------------

    def _m_auth_test(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": f"https://{team.team_id.lower()}.slack.com/",
            "team": team.name,
            "user": "threadbot",
            "team_id": team.team_id,
            "user_id": team.bot_user_id,
            "bot_id": team.bot_id,
            "is_enterprise_install": False,
        }

    def _m_users_info(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        user = str(_required(args, "user"))
        return {"user": self.users.get(user, {"id": user, "name": user, "team_id": team.team_id})}

    def _m_chat_postMessage(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        channel = str(_required(args, "channel"))
        text, blocks = _content(args)
        thread_ts = args.get("thread_ts") or None
        message = Message(
            team.team_id,
            channel,
            self.next_ts(),
            team.bot_user_id,
            text,
            str(thread_ts) if thread_ts else None,
            team.bot_id,
            blocks,
        )
        message.show(self._now())
        self.messages[(channel, message.ts)] = message
        if message.thread_ts:
            # Slack clears the thread's status when the app replies in it.
            self.showing.pop((channel, message.thread_ts), None)
        return {"channel": channel, "ts": message.ts, "message": message.as_api()}

    def _m_chat_update(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        message = self._own_message(team, args)
        text, blocks = _content(args)
        message.text, message.blocks = text, blocks
        message.show(self._now())
        return {"channel": message.channel, "ts": message.ts, "text": text}

    def _m_chat_postEphemeral(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        _required(args, "channel")
        _required(args, "user")
        _content(args)
        self.ephemeral.append(args)
        return {"message_ts": self.next_ts()}

    def _m_chat_startStream(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        if self.native_streaming_error:
            raise SlackError(self.native_streaming_error)
        channel = str(_required(args, "channel"))
        thread_ts = str(_required(args, "thread_ts"))
        # Bot tokens must name who the stream is for, DMs included.
        if not args.get("recipient_team_id"):
            raise SlackError("missing_recipient_team_id")
        if not args.get("recipient_user_id"):
            raise SlackError("missing_recipient_user_id")
        text = _markdown_chunk(args)
        message = Message(
            team.team_id,
            channel,
            self.next_ts(),
            team.bot_user_id,
            text,
            thread_ts,
            team.bot_id,
            streaming=True,
            stream_started=self._now(),
            recipient=(str(args["recipient_team_id"]), str(args["recipient_user_id"])),
        )
        message.show(self._now())
        self.messages[(channel, message.ts)] = message
        self.showing.pop((channel, thread_ts), None)
        return {"channel": channel, "ts": message.ts}

    def _m_chat_appendStream(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        message = self._live_stream(team, args)
        chunk = _markdown_chunk(args)
        if not chunk:
            raise SlackError("invalid_arguments")
        message.text += chunk
        message.show(self._now())
        return {"channel": message.channel, "ts": message.ts}

    def _m_chat_stopStream(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        message = self._live_stream(team, args)
        chunk = _markdown_chunk(args)
        if chunk:
            message.text += chunk
            message.show(self._now())
        message.streaming = False
        return {"channel": message.channel, "ts": message.ts, "message": message.as_api()}

    def _m_assistant_threads_setStatus(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        channel = str(_required(args, "channel_id"))
        thread_ts = str(_required(args, "thread_ts"))
        status = args.get("status")
        if status is None:
            raise SlackError("invalid_arguments")
        loading = args.get("loading_messages") or []
        if not isinstance(loading, list) or len(loading) > MAX_LOADING_MESSAGES:
            raise SlackError("invalid_arguments")
        call = StatusCall(channel, thread_ts, str(status), tuple(map(str, loading)), self._now())
        self.statuses.append(call)
        if status:
            self.showing[(channel, thread_ts)] = str(status)
        else:
            self.showing.pop((channel, thread_ts), None)
        return {}

    def _m_assistant_threads_setSuggestedPrompts(
        self, team: Team, args: dict[str, Any]
    ) -> dict[str, Any]:
        channel = str(_required(args, "channel_id"))
        prompts = args.get("prompts")
        if not isinstance(prompts, list) or not 1 <= len(prompts) <= MAX_SUGGESTED_PROMPTS:
            raise SlackError("invalid_arguments")
        for prompt in prompts:
            if not isinstance(prompt, dict) or not prompt.get("title") or not prompt.get("message"):
                raise SlackError("invalid_arguments")
        thread_ts = args.get("thread_ts")
        self.suggested.append((channel, str(thread_ts) if thread_ts else None, args))
        return {}

    def _m_agents_sessions_setStatus(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        status = str(args.get("status") or "")
        if status not in SESSION_STATUSES:
            raise SlackError("invalid_arguments")
        channel = str(_required(args, "channel_id"))
        thread_ts = str(args.get("thread_ts") or "")
        if not thread_ts:
            raise SlackError("invalid_thread_ts")
        self.sessions.setdefault((channel, thread_ts), []).append(status)
        return {"status": status, "agent_status": status}

    def session_status(self, channel: str, thread_ts: str) -> str | None:
        """The agent session's current status in a thread (None: no session there)."""
        history = self.sessions.get((channel, thread_ts))
        return history[-1] if history else None

    def _m_conversations_replies(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        channel = str(_required(args, "channel"))
        ts = str(_required(args, "ts"))
        if (channel, ts) not in self.messages:
            raise SlackError("thread_not_found")
        limit = int(args.get("limit") or 1000)
        thread = [
            m
            for m in self.messages.values()
            if m.channel == channel and (m.ts == ts or m.thread_ts == ts)
        ]
        thread.sort(key=lambda m: m.ts)
        cursor = int(args.get("cursor") or 0)
        page = thread[cursor : cursor + limit]
        more = cursor + limit < len(thread)
        return {
            "messages": [m.as_api() for m in page],
            "has_more": more,
            "response_metadata": {"next_cursor": str(cursor + limit) if more else ""},
        }

    def _m_reactions_add(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        self.reactions.append(
            {
                "channel": _required(args, "channel"),
                "timestamp": _required(args, "timestamp"),
                "name": _required(args, "name"),
            }
        )
        return {}

    def _m_views_open(self, team: Team, args: dict[str, Any]) -> dict[str, Any]:
        trigger_id = str(_required(args, "trigger_id"))
        view = args.get("view")
        if isinstance(view, str):
            view = json.loads(view)
        if not isinstance(view, dict) or view.get("type") != "modal" or not view.get("blocks"):
            raise SlackError("invalid_arguments")
        self.views.append((trigger_id, view))
        return {"view": {"id": f"V{len(self.views):04d}", **view}}

    def _own_message(self, team: Team, args: dict[str, Any]) -> Message:
        key = (str(_required(args, "channel")), str(_required(args, "ts")))
        message = self.messages.get(key)
        if message is None:
            raise SlackError("message_not_found")
        if message.user != team.bot_user_id:
            raise SlackError("cant_update_message")
        return message

    def _live_stream(self, team: Team, args: dict[str, Any]) -> Message:
        message = self._own_message(team, args)
        if not message.streaming:
            raise SlackError("message_not_in_streaming_state")
        if self._now() - message.stream_started > self.stream_lifetime:
            message.streaming = False
            raise SlackError("message_not_in_streaming_state")
        return message


async def _arguments(request: web.Request) -> dict[str, Any]:
    """Query string, form body and JSON body merged, as Slack reads them."""
    args: dict[str, Any] = dict(request.query)
    if request.method == "POST" and request.can_read_body:
        if request.content_type == "application/json":
            body = await request.json()
            if isinstance(body, dict):
                args.update(body)
        else:
            args.update(dict(await request.post()))
    for name in ("blocks", "chunks"):
        if isinstance(args.get(name), str):
            try:
                args[name] = json.loads(args[name])
            except json.JSONDecodeError:
                # Raised by _content, where Slack would answer it.
                args[name] = SlackError("invalid_blocks_format")
    return args


def _required(args: dict[str, Any], name: str) -> Any:
    value = args.get(name)
    if value in (None, ""):
        raise SlackError("channel_not_found" if name == "channel" else "invalid_arguments")
    return value


def _content(args: dict[str, Any]) -> tuple[str, list[dict[str, Any]] | None]:
    """Validate text / blocks / markdown_text the way Slack does; return (text, blocks)."""
    text = str(args.get("text") or "")
    blocks = args.get("blocks")
    markdown_text = args.get("markdown_text")
    if isinstance(blocks, SlackError):
        raise blocks
    if markdown_text is not None and (text or blocks):
        raise SlackError("markdown_text_conflict")
    if markdown_text is not None:
        if len(str(markdown_text)) > MAX_MARKDOWN_CHARS:
            raise SlackError("msg_too_long")
        return "", [{"type": "markdown", "text": str(markdown_text)}]
    if blocks:
        if not isinstance(blocks, list) or len(blocks) > MAX_BLOCKS:
            raise SlackError("invalid_blocks")
        markdown_total = 0
        for block in blocks:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "markdown":
                markdown_total += len(str(block.get("text", "")))
            elif kind == "section":
                if len(str(block.get("text", {}).get("text", ""))) > MAX_SECTION_CHARS:
                    raise SlackError("invalid_blocks")
            elif kind == "context_actions":
                _check_context_actions(block)
            elif kind is None:
                raise SlackError("invalid_blocks")
        if markdown_total > MAX_MARKDOWN_CHARS:
            raise SlackError("msg_blocks_too_long")
        if len(text) > MAX_TEXT_CHARS:
            raise SlackError("msg_too_long")
        return text, list(blocks)
    if not text:
        raise SlackError("no_text")
    if len(text) > MAX_TEXT_CHARS:
        raise SlackError("msg_too_long")
    return text, None


def _markdown_chunk(args: dict[str, Any]) -> str:
    chunk = str(args.get("markdown_text") or "")
    if len(chunk) > MAX_MARKDOWN_CHARS:
        raise SlackError("msg_too_long")
    return chunk


def _check_context_actions(block: dict[str, Any]) -> None:
    """A ``context_actions`` block as Block Kit defines it: 1-5 feedback or icon buttons; a
    feedback_buttons element has a positive and a negative button, each with text and value."""
    elements = block.get("elements")
    if not isinstance(elements, list) or not 1 <= len(elements) <= CONTEXT_ACTIONS_MAX:
        raise SlackError("invalid_blocks")
    for element in elements:
        if element.get("type") not in ("feedback_buttons", "icon_button"):
            raise SlackError("invalid_blocks")
        if element["type"] == "feedback_buttons":
            for side in ("positive_button", "negative_button"):
                button = element.get(side) or {}
                if button.get("text", {}).get("type") != "plain_text" or not button.get("value"):
                    raise SlackError("invalid_blocks")
