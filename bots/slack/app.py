"""The Slack bot: Bolt's async app translating Slack events into engine turns.

``SlackBot`` is a translation and a dispatch, like Bolt's own adapters: a Slack event becomes a
``SlackArrival`` and a slash command a ``Command``, both handed to the front door
(``core.bot.FrontDoor``), which routes, streams the answer into a ``SlackReply`` and keeps the
turns in flight. Platform checks stay at this edge:

- Events are taken in ``_intake``, our middleware (Bolt has verified the signature before it):
  noise first (edits, deletions, joins, bot messages, ours included, and every event we do not
  handle get a bare 200 and nothing else), then the front door records the question durably
  (``FrontDoor.admit``) and only then is the event acknowledged: a database that cannot be
  reached within ``INTAKE_DEADLINE_SECONDS`` answers 503 (in Socket Mode: no ack), so Slack
  delivers the event again instead of the question being lost. The turn runs in a task the
  front door keeps, cancelled on shutdown so each open reply shows a note.
- Exactly once: Slack delivers a mention as both ``app_mention`` and ``message`` and retries
  events (``X-Slack-Retry-Num``). Both deliveries build the same message id ``channel:ts``; the
  engine records it under a unique constraint (correct across processes), and a per-process
  memory of recent ids drops the second copy before any database work.
- Where a message goes is the front door's decision (``core.bot.route``); this module says what
  Slack calls a DM, a mention and a thread, and reads a thread's earlier messages
  (``conversations.replies``) when the front door asks for them.
- Who may change a channel's defaults is Slack's answer (``may_change_channel``): workspace
  admins and owners, from ``users.info``, remembered per user for ``ADMIN_CACHE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse

from bots.metrics_http import add_metrics_route
from bots.slack.formatting import (
    FEEDBACK_ACTION_ID,
    REASON_ACTION_ID,
    REASON_BLOCK_ID,
    REASON_CALLBACK_ID,
    mentions,
    reason_view,
    strip_mention,
    to_plain,
)
from bots.slack.surface import (
    NATIVE_STREAMS,
    STATUS_REFRESH_SECONDS,
    ReplyTarget,
    SlackExtras,
    SlackReply,
    message_id,
    translate,
    translated_errors,
)
from core.attachments import MAX_ATTACHMENT_BYTES, Attachment
from core.bot import (
    SHUTDOWN_NOTE,
    Budgets,
    Facts,
    FrontDoor,
    NativeMode,
    PlatformProfile,
    RateScope,
    Route,
    ThreadLine,
)
from core.commands import ChannelTarget, Command, HelpStyle, parse_command
from core.config import Settings
from core.conversation import ConversationKey
from core.engine import ChatEngine
from core.errors import (
    ConfigError,
    PermanentSurfaceError,
    StoreUnavailableError,
    SurfaceError,
    TransientSurfaceError,
)
from core.feedback import BAD, GOOD, Click, parse_feedback_id

log = logging.getLogger(__name__)

PLATFORM = "slack"
#: Request URL path for events, slash commands and interactivity (the manifest names it).
EVENTS_PATH = "/slack/events"
HEALTH_PATH = "/healthz"
#: Slack wants an HTTP 200 within 3 seconds or it retries (docs.slack.dev Events API). Events are
#: acked before any work; a slash command's answer is computed inline only while it takes less
#: than this budget, otherwise it is acked empty and sent later through its response_url.
COMMAND_ACK_BUDGET_SECONDS = 2.0
#: Message subtypes that carry a person's words; every other subtype (message_changed,
#: message_deleted, channel_join, bot_message, ...) is dropped.
ANSWERED_SUBTYPES = frozenset({"thread_broadcast", "file_share"})
#: Event types the bot answers; every other event is acked and dropped (but ``LIFECYCLE_EVENTS``).
HANDLED_EVENTS = frozenset({"app_mention", "message"})
#: Events about the app's assistant threads and agent sessions, acked at once (Slack wants its
#: 200 within 3 s) and handled in the background: a new assistant thread (Assistant messaging
#: experience) or an opened DM (Agent messaging experience) gets the suggested prompts; a click
#: on an agent session's stop button stops the answer streaming in that thread.
LIFECYCLE_EVENTS = frozenset(
    {"assistant_thread_started", "app_home_opened", "agent_session_stopped"}
)
#: Seconds the suggested prompts call may wait for its budget; it is Tier 4: 100+ per minute.
PROMPTS_WAIT_SECONDS = 2.0
SUGGESTED_PROMPTS_PER_SECOND = 100 / 60
SUGGESTED_PROMPTS_BURST = 5
#: Message ids remembered per process to drop second deliveries before any database work.
RECENT_MESSAGE_IDS = 10_000
#: Thread messages read to seed a conversation (conversations.replies allows up to 1,000 a page;
#: new non-Marketplace apps get 15, docs.slack.dev changelog 2025-05). The history policy caps
#: what is sent to the model anyway.
THREAD_CONTEXT_LIMIT = 200
#: Slack wants the 200 within 3 s: a question not recorded by then is answered 503, and Slack
#: delivers it again (at once, after a minute, after five).
INTAKE_DEADLINE_SECONDS = 2.0
#: Largest request body accepted on the events endpoint (a 100 KB message escaped as JSON fits).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
#: SLACK_STREAMING -> how the front door uses native streams.
NATIVE_MODES: dict[str, NativeMode] = {"auto": "auto", "native": "always", "update": "never"}
#: Who may change a channel's defaults on Slack, said to someone who may not.
CHANNEL_RIGHTS_NEEDED = (
    "Only workspace admins and owners (or users in ADMIN_USERS) can change this channel's defaults."
)
#: ``users.info`` fields that make a workspace admin (an owner is always an admin too, but
#: Slack's docs list the three separately).
ADMIN_FLAGS = ("is_admin", "is_owner", "is_primary_owner")
#: Seconds a user's admin standing is remembered (users.info is Tier 4; a demoted admin keeps
#: the rights this long).
ADMIN_CACHE_SECONDS = 300.0
#: Where Slack serves files (``url_private_download``); the bot token is sent nowhere else (but
#: to SLACK_API_URL's host, where a proxy or a test double stands in for Slack).
SLACK_FILE_HOSTS = frozenset({"files.slack.com"})
#: Seconds a file download may take in all, and to connect.
FILE_DOWNLOAD_SECONDS = 30.0
FILE_CONNECT_SECONDS = 10.0
#: The most bytes one download reads, whatever Slack said the file's size is.
FILE_MAX_BYTES = 20 * 1024 * 1024
#: Read size of a download's body.
FILE_CHUNK_BYTES = 64 * 1024


#: What a thumbs-up, a click that does not count, or one we failed to store answer (ephemeral).
THANKS = "Thanks for the feedback."
FEEDBACK_REFUSED = "That answer can't be rated from here."
FEEDBACK_FAILED = "Sorry, your feedback couldn't be saved. Please try again in a moment."


def profile(
    settings: Settings, *, command_deadline: float = COMMAND_ACK_BUDGET_SECONDS
) -> PlatformProfile:
    """Slack as the front door sees it: typed commands after SLACK_COMMAND, the thread's status
    (``assistant.threads.setStatus``) as the typing indicator, renewed before Slack drops it,
    native streams (``chat.startStream``) used as SLACK_STREAMING says."""
    return PlatformProfile(
        name=PLATFORM,
        help=HelpStyle(prefix=settings.slack_command + " ", native_streams=True),
        command_deadline=command_deadline,
        typing_refresh=STATUS_REFRESH_SECONDS,
        native=NATIVE_STREAMS,
        native_mode=NATIVE_MODES[settings.slack_streaming],
        channel_rights=CHANNEL_RIGHTS_NEEDED,
    )


def build_client(settings: Settings) -> AsyncWebClient:
    """The Web API client: base URL from SLACK_API_URL, and no retries of its own.

    slack_sdk's default handlers retry dropped connections, and optional ones retry 429s; the
    streamer's budgets are the one retry layer, so the client gets none (``retry_handlers=[]``).
    """
    check_settings(settings, socket_mode=True)
    return AsyncWebClient(
        token=settings.slack_bot_token,
        base_url=settings.slack_api_url,
        retry_handlers=[],
        logger=logging.getLogger("slack_sdk.web"),
    )


def check_settings(settings: Settings, *, socket_mode: bool, client: bool = False) -> None:
    """Raise ConfigError naming the first Slack setting that is missing (before any other work).

    The token is not needed when a ``client`` is injected; the signing secret only in HTTP mode.
    """
    if not client and not settings.slack_bot_token:
        raise ConfigError(
            "SLACK_BOT_TOKEN is not set: copy the Bot User OAuth Token (xoxb-...) from your "
            "Slack app's OAuth & Permissions page",
            setting="SLACK_BOT_TOKEN",
        )
    if not socket_mode and not settings.slack_signing_secret:
        raise ConfigError(
            "SLACK_SIGNING_SECRET is not set: copy the Signing Secret from your Slack app's "
            "Basic Information page (or set SLACK_APP_TOKEN for Socket Mode)",
            setting="SLACK_SIGNING_SECRET",
        )


class SlackBot:
    """The Bolt app, its handlers and its HTTP endpoints. ``start`` before serving, ``close`` after.

    ``client`` and ``budgets`` are injectable (tests point the client at a local fake Slack);
    ``rate_scale`` multiplies Slack's published rates (tests and benchmarks run Slack's minute
    faster, against a fake scaled alike). ``socket_mode`` defaults to whether SLACK_APP_TOKEN is
    set: then requests arrive over Slack's authenticated websocket and are not signed.
    """

    def __init__(
        self,
        settings: Settings,
        engine: ChatEngine,
        *,
        client: AsyncWebClient | None = None,
        budgets: Budgets | None = None,
        rate_scale: float = 1.0,
        socket_mode: bool | None = None,
        command_ack_budget: float = COMMAND_ACK_BUDGET_SECONDS,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.socket_mode = bool(settings.slack_app_token) if socket_mode is None else socket_mode
        check_settings(settings, socket_mode=self.socket_mode, client=client is not None)
        self.client = client or build_client(settings)
        self.door = FrontDoor(
            settings,
            engine,
            profile(settings, command_deadline=command_ack_budget),
            budgets=budgets,
            reopen=self.reopen,
        )
        self.rate_scale = rate_scale
        self.extras = SlackExtras(
            self.door.budgets,
            loading_messages=settings.slack_loading_messages,
            rate_scale=rate_scale,
        )
        self.bot_user_id = ""
        self.team_id = ""
        self.ready = False
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._identity: AsyncSlackResponse | None = None
        self._identity_lock = asyncio.Lock()
        # user id -> (workspace admin, monotonic time the answer expires).
        self._admins: dict[str, tuple[bool, float]] = {}

        # A plain function: Bolt injects arguments by parameter name and trips over ``self``.
        async def authorize(enterprise_id: str | None, team_id: str | None) -> AuthorizeResult:
            return await self._authorize(enterprise_id, team_id)

        self.app = AsyncApp(
            name="threadbot",
            # Bolt's per-request clients copy this one; the token comes from ``_authorize``.
            client=AsyncWebClient(
                base_url=self.client.base_url, timeout=self.client.timeout, retry_handlers=[]
            ),
            authorize=authorize,
            # Passed even when empty so Bolt never reads the environment itself.
            signing_secret=settings.slack_signing_secret or "",
            request_verification_enabled=not self.socket_mode,
            process_before_response=False,
        )
        self.app.middleware(self._intake)
        self.app.command(settings.slack_command)(self._on_command)
        self.app.action(FEEDBACK_ACTION_ID)(self._on_feedback)
        self.app.view(REASON_CALLBACK_ID)(self._on_reason)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the token (auth.test) and learn who the bot is; then the bot is ready."""
        # Bolt's clients share the Web API connection pool (set on self.client by the caller).
        self.app.client.session = self.client.session
        try:
            identity = await self.identity()
        except SlackApiError as error:
            refusal = translate(error, method="auth.test", scope=None)
            code = refusal.code if isinstance(refusal, PermanentSurfaceError) else None
            if code and not code.startswith("http_"):
                raise ConfigError(
                    f"Slack refused SLACK_BOT_TOKEN ({code}); copy the Bot "
                    "User OAuth Token from your app's OAuth & Permissions page",
                    setting="SLACK_BOT_TOKEN",
                ) from error
            # Not Slack's word on the token: a proxy's page, an outage, a 429.
            raise ConfigError(
                f"Slack's Web API did not answer auth.test ({refusal}); check SLACK_API_URL "
                "and any proxy in front of Slack, then start again",
                setting="SLACK_API_URL",
            ) from error
        self.bot_user_id = str(identity.get("user_id") or "")
        self.team_id = str(identity.get("team_id") or "")
        self.ready = True
        # Replies a worker that died left unfinished are finished (now and from time to time).
        self.door.start_recovery()
        # The start-up line (bots/slack/__main__.py) says who and where; this is the detail.
        log.debug(
            "Slack bot ready: <@%s> in workspace %s (%s mode, streaming %s)",
            self.bot_user_id,
            self.team_id,
            "Socket" if self.socket_mode else "HTTP",
            self.settings.slack_streaming,
        )

    async def identity(self) -> AsyncSlackResponse:
        """The bot token's auth.test answer, asked once per process (single flight).

        Bolt's built-in single-workspace authorization would call auth.test for every request
        until its first answer is cached, so a burst of events just after start would be a
        burst of auth.test calls (and 429s); a token's identity does not change while we run.
        """
        async with self._identity_lock:
            if self._identity is None:
                self._identity = await self.client.auth_test()
            return self._identity

    async def _authorize(self, enterprise_id: str | None, team_id: str | None) -> AuthorizeResult:
        """Bolt's authorization of a request: our token and identity, without a network call."""
        identity = await self.identity()
        return AuthorizeResult(
            enterprise_id=enterprise_id,
            team_id=team_id or str(identity.get("team_id") or ""),
            bot_user_id=str(identity.get("user_id") or ""),
            bot_id=str(identity.get("bot_id") or ""),
            bot_token=self.client.token,
        )

    async def close(self, note: str = SHUTDOWN_NOTE) -> None:
        """Stop taking work; end every reply in progress with ``note`` and wait for them."""
        self.ready = False
        await self.door.close(note)
        await self.extras.close()

    async def drain(self) -> None:
        """Wait until every event accepted so far has been answered (tests, benchmarks), and
        its agent-session calls made."""
        await self.door.drain()
        await self.extras.drain()

    def web_app(self, *, events: bool = True) -> web.Application:
        """The HTTP endpoints: ``POST /slack/events`` (Bolt, unless ``events`` is false: Socket
        Mode) and ``GET /healthz``; both answer 503 until ``start`` succeeded and from ``close``
        on. ``GET /metrics`` (Prometheus) always answers."""
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        if events:
            app.router.add_post(EVENTS_PATH, self._handle_http)
        app.router.add_get(HEALTH_PATH, self._handle_health)
        add_metrics_route(app, self.engine.metrics)
        return app

    async def _handle_http(self, request: web.Request) -> web.Response:
        if not self.ready:
            # Starting or shutting down: a 200 now would start a turn that is never answered
            # or is cut off at once; on a 503 Slack delivers the event again later.
            return web.json_response({"ok": False, "status": "unavailable"}, status=503)
        bolt_request = await to_bolt_request(request)
        bolt_response = await self.app.async_dispatch(bolt_request)
        return await to_aiohttp_response(bolt_response)

    async def _handle_health(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"ok": False, "status": "starting"}, status=503)
        problem = await self.door.health()
        if problem is not None:
            # A load balancer should send Slack's retries to a worker that can record them.
            return web.json_response({"ok": False, "status": problem}, status=503)
        return web.json_response({"ok": True, "turns_in_progress": self.door.in_flight})

    # -- events ----------------------------------------------------------------------------

    async def _intake(
        self, req: AsyncBoltRequest, body: dict[str, Any], next: Callable[[], Awaitable[None]]
    ) -> BoltResponse | None:
        """Take an event: drop noise, record the question, then acknowledge (see the module
        docstring). Everything else (slash commands) goes on to Bolt's listeners."""
        if body.get("type") != "event_callback":
            await next()
            return None
        if not self.ready:
            # Shutting down: Slack delivers the event again, to a worker that will answer it.
            return BoltResponse(status=503, body="")
        event = body.get("event") or {}
        if event.get("type") in LIFECYCLE_EVENTS:
            self._lifecycle(body, event)
            return BoltResponse(status=200, body="")
        if event.get("type") not in HANDLED_EVENTS or _is_noise(event, self.bot_user_id):
            return BoltResponse(status=200, body="")
        id_ = message_id(str(event.get("channel", "")), str(event.get("ts", "")))
        if id_ in self._recent or not self._is_candidate(event):
            retries = req.headers.get("x-slack-retry-num") or []
            log.debug("dropped %s (retry %s): a second delivery or not for us", id_, retries[:1])
            return BoltResponse(status=200, body="")
        # Remembered before the first await, so the twin delivery (app_mention + message)
        # dispatched concurrently is dropped here.
        self._remember(id_)
        team = str(body.get("team_id") or event.get("team") or self.team_id)
        try:
            async with asyncio.timeout(INTAKE_DEADLINE_SECONDS):
                admission = await self.door.admit(SlackArrival(self, event, team))
        except (StoreUnavailableError, TimeoutError) as error:
            self._recent.pop(id_, None)
            # A TimeoutError has no text of its own: say which deadline passed.
            reason = str(error) or f"not recorded within {INTAKE_DEADLINE_SECONDS:g} s"
            log.warning("%s not taken (%s): answering 503 so Slack delivers it again", id_, reason)
            return BoltResponse(status=503, body="")
        if admission is not None:
            arrival = admission.arrival
            turn = self.door.start(admission)
            if isinstance(arrival, SlackArrival):
                # Whatever happened to the turn, the thread's agent session is active again.
                turn.add_done_callback(lambda _: arrival.turn_ended())
        return BoltResponse(status=200, body="")

    def _lifecycle(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        """An assistant-thread or agent-session event: acknowledged at once (the caller answers
        200), delivered once (Slack's retries carry the same event id), handled in a task."""
        event_id = str(body.get("event_id") or "")
        if event_id:
            if f"event:{event_id}" in self._recent:
                return
            self._remember(f"event:{event_id}")
        team = str(body.get("team_id") or self.team_id)
        kind = event.get("type")
        if kind == "assistant_thread_started":
            thread = event.get("assistant_thread") or {}
            channel, thread_ts = str(thread.get("channel_id") or ""), thread.get("thread_ts")
            if channel and thread_ts:
                self.door.spawn(self.suggest_prompts(team, channel, str(thread_ts)), name=kind)
        elif kind == "agent_session_stopped":
            channel, thread_ts = str(event.get("channel") or ""), str(event.get("thread_ts") or "")
            if channel and thread_ts:
                user = str(event.get("user") or "")
                self.door.spawn(self.stop_session(team, channel, thread_ts, user), name=kind)
        elif kind == "app_home_opened":
            # The Agent messaging experience: the DM's Messages tab opened; prompts go without
            # a thread (a thread_ts would make Slack drop the call for an agent app).
            channel = str(event.get("channel") or "")
            if event.get("tab") == "messages" and channel:
                self.door.spawn(self.suggest_prompts(team, channel, None), name=kind)

    async def stop_session(self, team: str, channel: str, thread_ts: str, user: str) -> bool:
        """A click on the stop button of the agent session in ``thread_ts``: the answer streaming
        in that thread's conversation stops (kept as shown, marked stopped), here or at another
        worker; whether one was streaming. The session leaves ``processing`` when that answer
        ends (``SlackReply.end_session``), or at once when nothing was streaming (a session
        left behind by a restart)."""
        direct = channel.startswith("D")
        if self.door.access.refusal(PLATFORM, channel, user, direct) is not None:
            # Someone the bot does not answer there (BLOCKED_USERS, ALLOWED_USERS, ...).
            log.info(
                "stop in %s:%s from %s ignored: outside the access rules", channel, thread_ts, user
            )
            return False
        # A DM is one conversation, whichever of its threads the answer went to.
        key = ConversationKey(PLATFORM, team, channel, "" if direct else thread_ts)
        stopped = await self.door.stop(key, user_id=user or None)
        if not stopped:
            kwargs = {"channel_id": channel, "thread_ts": thread_ts, "status": "active"}
            await self.extras.call(
                team,
                "agents.sessions.setStatus",
                self.extras.session_scopes(team),
                self.client.agents_sessions_setStatus,
                kwargs,
                wait=PROMPTS_WAIT_SECONDS,
            )
        return stopped

    async def suggest_prompts(self, team: str, channel: str, thread_ts: str | None) -> bool:
        """The deployment's suggested prompts (SLACK_SUGGESTED_PROMPTS) in a new assistant thread
        or an opened agent DM (``assistant.threads.setSuggestedPrompts``); whether Slack took
        them. Nothing is called when none are set."""
        prompts = self.settings.slack_suggested_prompts
        if not prompts:
            return False
        kwargs: dict[str, Any] = {
            "channel_id": channel,
            "prompts": [{"title": title, "message": message} for title, message in prompts],
        }
        if thread_ts:
            kwargs["thread_ts"] = thread_ts
        scopes = (
            RateScope(
                f"slack:{team}:assistant.threads.setSuggestedPrompts",
                SUGGESTED_PROMPTS_PER_SECOND * self.rate_scale,
                SUGGESTED_PROMPTS_BURST,
            ),
        )
        return await self.extras.call(
            team,
            "assistant.threads.setSuggestedPrompts",
            scopes,
            self.client.assistant_threads_setSuggestedPrompts,
            kwargs,
            wait=PROMPTS_WAIT_SECONDS,
        )

    def _is_candidate(self, event: dict[str, Any]) -> bool:
        """Cheap checks that need no database: DMs, mentions and thread replies go on."""
        if event.get("channel_type") == "im" or event.get("type") == "app_mention":
            return True
        return bool(event.get("thread_ts")) or mentions(
            str(event.get("text", "")), self.bot_user_id
        )

    def _remember(self, id_: str) -> None:
        self._recent[id_] = None
        while len(self._recent) > RECENT_MESSAGE_IDS:
            self._recent.popitem(last=False)

    async def thread_lines(self, channel: str, thread_ts: str, *, before: str) -> list[ThreadLine]:
        """The thread's messages before ``before``, oldest first (``conversations.replies``)."""
        try:
            with translated_errors("conversations.replies", None):
                response = await self.client.conversations_replies(
                    channel=channel, ts=thread_ts, limit=THREAD_CONTEXT_LIMIT
                )
        except SurfaceError as error:
            # The answer still goes out, only without the thread's earlier messages.
            log.warning("thread %s:%s: no earlier context (%s)", channel, thread_ts, error)
            return []
        lines: list[ThreadLine] = []
        for message in response.get("messages") or []:
            ts = str(message.get("ts", ""))
            if float(ts or 0) >= float(before or 0):
                continue
            text = str(message.get("text", ""))
            if message.get("user") == self.bot_user_id:
                lines.append(ThreadLine("", text, from_bot=True))
            elif message.get("subtype") in (None, *ANSWERED_SUBTYPES):
                plain = to_plain(strip_mention(text, self.bot_user_id))
                lines.append(ThreadLine(_speaker(message), plain))
        return lines

    async def download_file(self, url: str, *, max_bytes: int = FILE_MAX_BYTES) -> bytes:
        """A file's bytes from its ``url_private_download``, with the bot token (``files:read``).

        Raises ``PermanentSurfaceError`` when the URL is not Slack's, when Slack sends the
        request to sign in instead (a redirect: the app lacks ``files:read`` or the file is not
        shared with it) or the file holds more than ``max_bytes``; ``TransientSurfaceError``
        for timeouts, dropped connections, 429s and 5xx. The caller (core) turns any failure
        into a one-line note after the answer.
        """
        host = (urlsplit(url).hostname or "").lower()
        api_host = (urlsplit(self.settings.slack_api_url).hostname or "").lower()
        if url.split(":", 1)[0].lower() not in ("https", "http") or host not in (
            SLACK_FILE_HOSTS | {api_host}
        ):
            raise PermanentSurfaceError(f"not a Slack file URL: {url!r}", code="not_slack_file")
        headers = {"Authorization": f"Bearer {self.client.token}"}
        timeout = aiohttp.ClientTimeout(total=FILE_DOWNLOAD_SECONDS, connect=FILE_CONNECT_SECONDS)
        session = self.client.session
        own = session is None or session.closed
        if own:
            session = aiohttp.ClientSession()
        assert session is not None
        try:
            async with session.get(
                url, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                status = response.status
                if status == 429 or status >= 500 or status == 408:
                    raise TransientSurfaceError(f"Slack file download: HTTP {status}")
                # Redirects are not followed: Slack's is to its sign-in page, never the file.
                if 300 <= status < 400 or status in (401, 403):
                    raise PermanentSurfaceError(
                        f"Slack file download refused (HTTP {status}): the app needs the "
                        "files:read scope, and the file must be shared where the bot is",
                        code="file_access_denied",
                    )
                if status != 200:
                    raise PermanentSurfaceError(
                        f"Slack file download: HTTP {status}", code=f"http_{status}"
                    )
                data = bytearray()
                async for chunk in response.content.iter_chunked(FILE_CHUNK_BYTES):
                    data += chunk
                    if len(data) > max_bytes:
                        raise PermanentSurfaceError(
                            f"Slack file larger than {max_bytes} bytes", code="file_too_large"
                        )
                return bytes(data)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise TransientSurfaceError(
                f"Slack file download: {type(error).__name__}: {error}"
            ) from error
        finally:
            if own:
                await session.close()

    def attachments(self, event: dict[str, Any]) -> tuple[Attachment, ...]:
        """The files of a message event as the core takes them, each downloaded only when the
        core asks (``fetch``), bounded by the largest file the core may want."""
        bound = max(self.settings.max_image_bytes, MAX_ATTACHMENT_BYTES)
        found: list[Attachment] = []
        for file in event.get("files") or ():
            if not isinstance(file, dict):
                continue
            url = file.get("url_private_download") or file.get("url_private")
            if not url or file.get("mode") == "tombstone":
                continue  # Deleted, or beyond what the workspace's plan lets the app see.
            found.append(
                Attachment(
                    name=str(file.get("name") or file.get("title") or file.get("id") or "file"),
                    media_type=str(file.get("mimetype") or ""),
                    size=int(file.get("size") or 0),
                    fetch=functools.partial(self.download_file, str(url), max_bytes=bound),
                )
            )
        return tuple(found)

    def reply_surface(self, target: ReplyTarget) -> SlackReply:
        """The surface one answer at ``target`` is streamed into."""
        return SlackReply(self.client, target, rate_scale=self.rate_scale, extras=self.extras)

    async def reopen(self, place: str) -> SlackReply | None:
        """The surface of a reply a worker that died left unfinished (``SlackReply.place``)."""
        try:
            return self.reply_surface(ReplyTarget.from_place(place))
        except (ValueError, TypeError, KeyError):
            log.warning("cannot reopen a reply at %r", place)
            return None

    async def may_change_channel(self, user_id: str) -> bool:
        """Whether ``user_id`` is a workspace admin or owner (``users.info``, cached a while).

        A failed look-up counts as no (and is not remembered): rights are never granted by an
        outage.
        """
        cached = self._admins.get(user_id)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        try:
            with translated_errors("users.info", None):
                response = await self.client.users_info(user=user_id)
        except SurfaceError as error:
            log.warning(
                "cannot tell whether %s is a workspace admin (%s); the app needs the users:read "
                "scope",
                user_id,
                error,
            )
            return False
        user = response.get("user") or {}
        admin = any(bool(user.get(flag)) for flag in ADMIN_FLAGS)
        self._admins[user_id] = (admin, time.monotonic() + ADMIN_CACHE_SECONDS)
        return admin

    # -- slash command ---------------------------------------------------------------------

    async def _on_command(
        self,
        ack: Callable[..., Awaitable[None]],
        command: dict[str, Any],
        respond: Callable[..., Awaitable[Any]],
    ) -> None:
        """``/chatbot reset|system|history|help``, answered ephemerally: in the acknowledgement
        when quick, else acknowledged empty and answered through the response_url."""
        parsed = parse_command(str(command.get("text", ""))) or Command("help")
        team = str(command.get("team_id") or self.team_id)
        channel = str(command.get("channel_id", ""))
        user = str(command.get("user_id", ""))
        target: ConversationKey | ChannelTarget
        direct = channel.startswith("D") or command.get("channel_name") == "directmessage"
        if direct:
            target = ConversationKey(PLATFORM, team, channel, "")
        else:
            target = ChannelTarget(PLATFORM, team, channel)
        acknowledged = False

        async def acknowledge() -> None:
            nonlocal acknowledged
            acknowledged = True
            await ack()

        answer = await self.door.command(
            parsed,
            target,
            acknowledge=acknowledge,
            user_id=user,
            direct=direct,
            may_change_channel=functools.partial(self.may_change_channel, user),
        )
        if acknowledged:
            await respond(response_type="ephemeral", text=answer)
        else:
            await ack(response_type="ephemeral", text=answer)

    # -- feedback --------------------------------------------------------------------------

    async def _on_feedback(
        self,
        ack: Callable[..., Awaitable[None]],
        body: dict[str, Any],
        respond: Callable[..., Awaitable[Any]],
    ) -> None:
        """A click on the feedback buttons under an answer (``block_actions``): acknowledged at
        once, stored when it came from that answer's message; a thumbs-down then offers the
        optional reason modal, a thumbs-up a quiet thanks."""
        await ack()
        action = (body.get("actions") or [{}])[0]
        parsed = parse_feedback_id(str(action.get("value") or ""))
        container = body.get("container") or {}
        channel = str(container.get("channel_id") or (body.get("channel") or {}).get("id") or "")
        message = message_id(channel, str(container.get("message_ts") or ""))
        user = str((body.get("user") or {}).get("id") or "")
        if parsed is None:
            log.warning("Slack feedback from %s with a value that is not ours: %r", user, action)
            return
        value, reply_id = parsed
        if not await self._rate(Click(PLATFORM, message, user, reply_id, value), respond):
            return
        if value == GOOD:
            await respond(response_type="ephemeral", replace_original=False, text=THANKS)
            return
        metadata = json.dumps({"reply": reply_id, "message": message})
        try:
            with translated_errors("views.open", None):
                await self.client.views_open(
                    trigger_id=str(body.get("trigger_id") or ""), view=reason_view(metadata)
                )
        except SurfaceError as error:
            # The thumbs-down is stored; only the chance to say why is lost.
            log.warning("Slack feedback reason modal not opened: %s", error)

    async def _on_reason(self, ack: Callable[..., Awaitable[None]], body: dict[str, Any]) -> None:
        """The reason modal submitted (``view_submission``): stored as the user's latest click."""
        await ack()
        view = body.get("view") or {}
        state = (view.get("state") or {}).get("values") or {}
        reason = str(
            (state.get(REASON_BLOCK_ID) or {}).get(REASON_ACTION_ID, {}).get("value") or ""
        )
        if not reason.strip():
            return  # Skipped in all but name: the thumbs-down is already stored.
        try:
            metadata = json.loads(str(view.get("private_metadata") or ""))
            reply_id, message = int(metadata["reply"]), str(metadata["message"])
        except (ValueError, TypeError, KeyError):
            log.warning("Slack feedback reason with metadata that is not ours: %r", view)
            return
        user = str((body.get("user") or {}).get("id") or "")
        await self._rate(Click(PLATFORM, message, user, reply_id, BAD, reason), None)

    async def _rate(self, click: Click, respond: Callable[..., Awaitable[Any]] | None) -> bool:
        """Store ``click``; whether it counted. The clicker hears when it could not."""
        try:
            counted = await self.door.feedback.record(click) is not None
            answer = None if counted else FEEDBACK_REFUSED
        except Exception:
            log.exception("Slack feedback on answer %s not stored", click.reply_id)
            counted, answer = False, FEEDBACK_FAILED
        if answer is not None and respond is not None:
            await respond(response_type="ephemeral", replace_original=False, text=answer)
        return counted


class SlackArrival:
    """One Slack message event, translated for the front door (``core.bot.Arrival``)."""

    def __init__(self, bot: SlackBot, event: dict[str, Any], team: str) -> None:
        self.bot = bot
        self.event = event
        channel = str(event.get("channel", ""))
        ts = str(event.get("ts", ""))
        thread_ts = str(event.get("thread_ts") or "") or None
        self.user_id = str(event.get("user", ""))
        self.message_id: str | None = message_id(channel, ts)
        raw = str(event.get("text", ""))
        direct = event.get("channel_type") == "im"
        mentioned = event.get("type") == "app_mention" or mentions(raw, bot.bot_user_id)
        self.facts = Facts(direct=direct, mentioned=mentioned, in_thread=thread_ts is not None)
        # A DM (assistant threads included) is read by the asker alone: native streams there.
        self.private = direct
        self.surface: SlackReply | None = None
        self.attachments = bot.attachments(event)
        user_team = str(event.get("user_team") or event.get("team") or team)
        if direct:
            # The DM is one conversation; answer where the person wrote (top level or thread).
            self.key = ConversationKey(PLATFORM, team, channel, "")
            self.target = ReplyTarget(team, channel, thread_ts, self.user_id, user_team)
        else:
            self.key = ConversationKey(PLATFORM, team, channel, thread_ts or ts)
            self.target = ReplyTarget(team, channel, thread_ts or ts, self.user_id, user_team)

    @property
    def place(self) -> str:
        """Where the answer goes, recorded with the turn at intake (``core.bot.Placed``)."""
        return self.target.place

    async def question(self) -> str:
        return to_plain(strip_mention(str(self.event.get("text", "")), self.bot.bot_user_id))

    async def thread(self) -> Sequence[ThreadLine]:
        before = str(self.event.get("ts", ""))
        return await self.bot.thread_lines(self.target.channel, self.key.thread, before=before)

    async def reply(self, route: Route) -> SlackReply:
        self.surface = self.bot.reply_surface(self.target)
        return self.surface

    def turn_ended(self) -> None:
        """The turn's task ended: the thread's agent session goes back to ``active``."""
        if self.surface is not None:
            self.surface.end_session()

    async def may_change_channel(self) -> bool:
        return await self.bot.may_change_channel(self.user_id)


def _speaker(message: dict[str, Any]) -> str:
    """Who wrote a thread message: the display name Slack includes, else the user id."""
    profile = message.get("user_profile") or {}
    name = profile.get("display_name") or profile.get("real_name")
    return str(name or message.get("user") or message.get("username") or "someone")


def _is_noise(event: dict[str, Any], bot_user_id: str) -> bool:
    """Messages nobody should answer: edits, deletions, joins, bots (ourselves included)."""
    if event.get("bot_id") or event.get("bot_profile") or event.get("hidden"):
        return True
    if bot_user_id and event.get("user") == bot_user_id:
        return True
    subtype = event.get("subtype")
    if subtype is not None and subtype not in ANSWERED_SUBTYPES:
        return True
    return not event.get("user") or not event.get("ts") or not event.get("channel")


__all__ = [
    "COMMAND_ACK_BUDGET_SECONDS",
    "EVENTS_PATH",
    "HEALTH_PATH",
    "SlackBot",
    "build_client",
]
