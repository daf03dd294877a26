"""The Slack bot: Bolt's async app translating Slack events into engine turns.

``SlackBot`` is a translation and a dispatch, like Bolt's own adapters: a Slack event or slash
command -> ``IncomingMessage`` / ``Command`` -> ``ChatEngine``, the answer streamed back by a
``ReplyStreamer`` over ``SlackReply``. Platform checks stay at this edge:

- Noise is dropped first (``_drop_noise``, the first of our middleware; Bolt has verified the
  signature before it): edits, deletions, joins, bot messages (ours included) and every event
  we do not handle get a bare 200 and nothing else.
- Every request is acked at once; the turn runs in a task the bot keeps (``_spawn``), cancelled
  on shutdown so each open reply shows a note instead of stopping mid-sentence.
- Exactly once: Slack delivers a mention as both ``app_mention`` and ``message`` and retries
  events (``X-Slack-Retry-Num``). Both deliveries build the same message id ``channel:ts``; the
  engine records it under a unique constraint (correct across processes), and a per-process
  memory of recent ids drops the second copy before any database work.
- Where a message goes: a mention in a channel starts (or continues) the conversation of the
  thread under it; a thread the bot has a conversation in continues without a mention (unless
  ``REQUIRE_MENTION``); a DM is one conversation. When first mentioned inside an existing
  thread, the thread's earlier messages (``conversations.replies``) seed the conversation.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

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

from bots.slack.formatting import mentions, strip_mention, to_plain
from bots.slack.surface import ReplyTarget, SlackReply, message_id, translate
from core.commands import ChannelTarget, Command, parse_command
from core.config import Settings
from core.conversation import ChatMessage, ConversationKey, IncomingMessage
from core.engine import ChatEngine
from core.errors import ConfigError
from core.limiters import budgets_for
from core.ratelimit import Budgets
from core.streaming import (
    EMPTY_ANSWER_TEXT,
    RETRACTED_TEXT,
    STREAMING_INDICATOR,
    THINKING_TEXT,
    ReplyStreamer,
)

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
#: Event types the bot answers; every other event is acked and dropped.
HANDLED_EVENTS = frozenset({"app_mention", "message"})
#: Message ids remembered per process to drop second deliveries before any database work.
RECENT_MESSAGE_IDS = 10_000
#: Thread messages read to seed a conversation (conversations.replies allows up to 1,000 a page;
#: new non-Marketplace apps get 15, docs.slack.dev changelog 2025-05). The history policy caps
#: what is sent to the model anyway.
THREAD_CONTEXT_LIMIT = 200
#: Native streams at once per workspace in SLACK_STREAMING=auto: each costs a chat.startStream and
#: a chat.stopStream, Tier 2 (~20 a minute, with a burst of a few); more replies use the edit path.
NATIVE_STREAMS_PER_WORKSPACE = 3
#: Largest request body accepted on the events endpoint (a 100 KB message escaped as JSON fits).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
#: What a reply still streaming shows when the bot shuts down.
SHUTDOWN_NOTE = "_Stopped: the bot is restarting. Please ask again in a minute._"
#: The streamer's own texts, left out of a thread's context.
STREAMER_TEXTS = frozenset({THINKING_TEXT, EMPTY_ANSWER_TEXT, RETRACTED_TEXT})


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


@dataclass(frozen=True, slots=True)
class Turn:
    """One routed user message: what the engine gets and where the answer goes."""

    incoming: IncomingMessage
    target: ReplyTarget
    fetch_context: bool


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
        self.budgets = budgets or budgets_for(settings, engine.store)
        self.rate_scale = rate_scale
        self.command_ack_budget = command_ack_budget
        self.bot_user_id = ""
        self.team_id = ""
        self.ready = False
        self.tasks: set[asyncio.Task[Any]] = set()
        # Events passed on to Bolt's listeners that have not spawned their turn yet (drain).
        self._routing = 0
        self._recent: OrderedDict[str, None] = OrderedDict()
        # Workspaces that answered chat.startStream with "not allowed" (SLACK_STREAMING=auto).
        self._native_refused: set[str] = set()
        # Replies streaming natively right now, per workspace (SLACK_STREAMING=auto).
        self._native_in_flight: dict[str, int] = {}
        self._identity: AsyncSlackResponse | None = None
        self._identity_lock = asyncio.Lock()

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
        self.app.middleware(self._drop_noise)
        self.app.event("app_mention")(self._on_event)
        self.app.event("message")(self._on_event)
        self.app.command(settings.slack_command)(self._on_command)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the token (auth.test) and learn who the bot is; then the bot is ready."""
        # Bolt's clients share the Web API connection pool (set on self.client by the caller).
        self.app.client.session = self.client.session
        try:
            identity = await self.identity()
        except SlackApiError as error:
            raise ConfigError(
                f"Slack refused SLACK_BOT_TOKEN ({error.response.get('error')}); copy the Bot "
                "User OAuth Token from your app's OAuth & Permissions page",
                setting="SLACK_BOT_TOKEN",
            ) from error
        self.bot_user_id = str(identity.get("user_id") or "")
        self.team_id = str(identity.get("team_id") or "")
        self.ready = True
        log.info(
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
        await self.engine.cancel_all(note)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)
        await self.budgets.aclose()

    async def drain(self) -> None:
        """Wait until every event accepted so far has been answered (tests, benchmarks)."""
        while self.tasks or self._routing:
            if self.tasks:
                await asyncio.wait(list(self.tasks))
            else:
                # Bolt runs listeners in its own tasks, just after the ack.
                await asyncio.sleep(0.005)

    def web_app(self, *, events: bool = True) -> web.Application:
        """The HTTP endpoints: ``POST /slack/events`` (Bolt, unless ``events`` is false: Socket
        Mode) and ``GET /healthz``; both answer 503 until ``start`` succeeded and from ``close``
        on."""
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        if events:
            app.router.add_post(EVENTS_PATH, self._handle_http)
        app.router.add_get(HEALTH_PATH, self._handle_health)
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
        return web.json_response({"ok": True, "turns_in_progress": len(self.tasks)})

    def _spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    # -- events ----------------------------------------------------------------------------

    async def _drop_noise(
        self, req: AsyncBoltRequest, body: dict[str, Any], next: Callable[[], Awaitable[None]]
    ) -> BoltResponse | None:
        """Ack and drop what the bot never answers, before any other work of ours."""
        if body.get("type") == "event_callback":
            event = body.get("event") or {}
            if event.get("type") not in HANDLED_EVENTS or _is_noise(event, self.bot_user_id):
                return BoltResponse(status=200, body="")
            id_ = message_id(str(event.get("channel", "")), str(event.get("ts", "")))
            if id_ in self._recent:
                retries = req.headers.get("x-slack-retry-num") or []
                log.debug("dropped a second delivery of %s (retry %s)", id_, retries[:1])
                return BoltResponse(status=200, body="")
            self._routing += 1
        await next()
        return None

    async def _on_event(self, event: dict[str, Any], body: dict[str, Any]) -> None:
        """A message or mention (already acked by Bolt): route it and run the turn in a task."""
        try:
            team = str(body.get("team_id") or event.get("team") or self.team_id)
            id_ = message_id(str(event.get("channel", "")), str(event.get("ts", "")))
            # Remembered before the first await, so the twin delivery is dropped even when it
            # is dispatched concurrently.
            if not self._is_candidate(event) or id_ in self._recent:
                return
            self._remember(id_)
            self._spawn(self._run_event(event, team), name=f"slack turn {id_}")
        finally:
            self._routing -= 1

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

    async def _run_event(self, event: dict[str, Any], team: str) -> None:
        turn = await self._route(event, team)
        if turn is None:
            return
        incoming = turn.incoming
        if turn.fetch_context:
            context = await self._thread_context(
                turn.target.channel, incoming.key.thread, before=str(event.get("ts"))
            )
            incoming = IncomingMessage(
                incoming.key,
                incoming.text,
                incoming.user_id,
                incoming.message_id,
                thread_context=context,
                allow_commands=incoming.allow_commands,
            )
        team = turn.target.team
        native = self._native_for(turn.target)
        streamer = ReplyStreamer(
            self.reply_surface(turn.target),
            self.budgets,
            native=native,
            log_context=str(incoming.key),
        )
        if native:
            self._native_in_flight[team] = self._native_in_flight.get(team, 0) + 1
        try:
            result = await self.engine.handle(incoming, streamer)
        finally:
            if native:
                self._native_in_flight[team] -= 1
        log.info("%s: %s (%s)", incoming.message_id, result.status, incoming.key)

    async def _route(self, event: dict[str, Any], team: str) -> Turn | None:
        """Where ``event`` belongs, or None when the bot stays silent."""
        channel = str(event.get("channel", ""))
        ts = str(event.get("ts", ""))
        thread_ts = str(event.get("thread_ts") or "") or None
        user = str(event.get("user", ""))
        raw = str(event.get("text", ""))
        mentioned = event.get("type") == "app_mention" or mentions(raw, self.bot_user_id)
        text = to_plain(strip_mention(raw, self.bot_user_id))
        user_team = str(event.get("user_team") or event.get("team") or team)
        id_ = message_id(channel, ts)
        if event.get("channel_type") == "im":
            # The DM is one conversation; answer where the person wrote (top level or thread).
            key = ConversationKey(PLATFORM, team, channel, "")
            target = ReplyTarget(team, channel, thread_ts, user, user_team)
            return Turn(IncomingMessage(key, text, user, id_), target, False)
        key = ConversationKey(PLATFORM, team, channel, thread_ts or ts)
        target = ReplyTarget(team, channel, thread_ts or ts, user, user_team)
        if mentioned:
            fetch = thread_ts is not None and not await self.engine.knows(key)
            return Turn(IncomingMessage(key, text, user, id_), target, fetch)
        if thread_ts is None or self.settings.require_mention:
            return None
        if not await self.engine.knows(key):
            # A thread the bot was never mentioned in.
            return None
        return Turn(IncomingMessage(key, text, user, id_, allow_commands=False), target, False)

    async def _thread_context(
        self, channel: str, thread_ts: str, *, before: str
    ) -> tuple[ChatMessage, ...]:
        """The thread's messages before ``before``, oldest first, as the model should see them."""
        try:
            response = await self.client.conversations_replies(
                channel=channel, ts=thread_ts, limit=THREAD_CONTEXT_LIMIT
            )
        except (SlackApiError, aiohttp.ClientError, TimeoutError) as error:
            # The answer still goes out, only without the thread's earlier messages.
            reason = translate(error, method="conversations.replies", scope=None)
            log.warning("thread %s:%s: no earlier context (%s)", channel, thread_ts, reason)
            return ()
        context: list[ChatMessage] = []
        for message in response.get("messages") or []:
            ts = str(message.get("ts", ""))
            if float(ts or 0) >= float(before or 0):
                continue
            text = str(message.get("text", "")).strip()
            if message.get("user") == self.bot_user_id:
                shown = text.removesuffix(STREAMING_INDICATOR.strip()).strip()
                if shown and shown not in STREAMER_TEXTS:
                    context.append(ChatMessage("assistant", shown))
                continue
            if not text or message.get("subtype") not in (None, *ANSWERED_SUBTYPES):
                continue
            who = str(message.get("user") or message.get("username") or "someone")
            plain = to_plain(strip_mention(text, self.bot_user_id))
            if plain:
                context.append(ChatMessage("user", f"@{who}: {plain}"))
        return tuple(context)

    # -- replies ---------------------------------------------------------------------------

    def reply_surface(self, target: ReplyTarget) -> SlackReply:
        """The surface one answer at ``target`` is streamed into."""
        return SlackReply(
            self.client,
            target,
            rate_scale=self.rate_scale,
            on_native_refused=self._remember_refusal,
        )

    def _native_for(self, target: ReplyTarget) -> bool:
        """Whether this reply should try Slack's native streaming.

        ``update`` never; ``native`` wherever a thread is (Slack streams only as a reply); ``auto``
        like native, except in workspaces that refused it and under load: chat.startStream and
        chat.stopStream are Tier 2 (~20 a minute per workspace, two calls per reply), so beyond
        ``NATIVE_STREAMS_PER_WORKSPACE`` streams at once, or while a start or stop would have to
        queue, new replies take the edit path (Tier 3) instead of waiting for a stream.
        """
        mode = self.settings.slack_streaming
        if mode == "update" or not target.thread_ts:
            return False
        if mode == "native":
            return True
        if target.team in self._native_refused:
            return False
        if self._native_in_flight.get(target.team, 0) >= NATIVE_STREAMS_PER_WORKSPACE:
            return False
        surface = self.reply_surface(target)
        return all(
            self.budgets.budget(scope).waiting == 0 and self.budgets.budget(scope).delay() == 0
            for call in ("start", "stop")
            for scope in surface.scopes(call)
        )

    def _remember_refusal(self, team: str, code: str) -> None:
        if team not in self._native_refused:
            log.info("workspace %s does not allow native streaming (%s): using edits", team, code)
        if self.settings.slack_streaming == "auto":
            self._native_refused.add(team)

    # -- slash command ---------------------------------------------------------------------

    async def _on_command(
        self,
        ack: Callable[..., Awaitable[None]],
        command: dict[str, Any],
        respond: Callable[..., Awaitable[Any]],
    ) -> None:
        """``/chatbot reset|system|system <text>|system clear|help``, answered ephemerally."""
        parsed = parse_command(str(command.get("text", ""))) or Command("help")
        team = str(command.get("team_id") or self.team_id)
        channel = str(command.get("channel_id", ""))
        target: ConversationKey | ChannelTarget
        if channel.startswith("D") or command.get("channel_name") == "directmessage":
            target = ConversationKey(PLATFORM, team, channel, "")
        else:
            target = ChannelTarget(PLATFORM, team, channel)
        work = self._spawn(self._command_answer(parsed, target), name=f"slack command {channel}")
        # A budget of 0 always answers through the response_url.
        done = False
        if self.command_ack_budget > 0:
            await asyncio.wait({work}, timeout=self.command_ack_budget)
            done = work.done()
        if done:
            await ack(response_type="ephemeral", text=work.result())
            return
        # Slow (a busy database): ack now, answer through the response_url when ready.
        await ack()

        async def respond_later() -> None:
            await respond(response_type="ephemeral", text=await work)

        self._spawn(respond_later(), name=f"slack command answer {channel}")

    async def _command_answer(
        self, command: Command, target: ConversationKey | ChannelTarget
    ) -> str:
        try:
            return await self.engine.run_command(command, target)
        except Exception:
            log.exception("command %s on %s failed", command.action, target)
            return "Sorry, that command failed on my side. Please try again."


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
    "SHUTDOWN_NOTE",
    "SlackBot",
    "build_client",
]
