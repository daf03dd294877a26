"""The front door: what every platform adapter hands its messages and commands to.

An adapter is a translator, as Bolt's adapters are: a platform event becomes an ``Arrival`` (the
routing facts, the conversation it belongs to, and callbacks that do platform I/O), a
platform command becomes a ``Command`` with its target. Everything between lives here, once:

- **Access** (``core.access``): who may use the bot where, applied before routing: silence for
  messages outside the rules, one refusal a day for a DM where DMs are off, a short answer for a
  command; the rights a command that changes a channel's defaults needs (ADMIN_USERS, or what
  the platform says through the adapter's ``ChannelRights``).
- **Routing** (``route``): one pure decision for every platform: DMs, mentions of the bot (its
  user or one of its roles), threads the bot is in, ``REQUIRE_MENTION``; where typed words such
  as ``reset`` are commands; when a thread's earlier messages seed a new conversation.
- **The turn** (``FrontDoor.receive`` / ``FrontDoor.answer``): builds the ``ReplyStreamer`` over
  the adapter's surface with the deployment's shared budgets, admits native streaming, runs
  ``ChatEngine.handle``.
- **Turns in flight**: every turn runs in a task kept here; ``close`` ends each reply with one
  shutdown note; ``drain`` waits until every accepted message is answered.
- **Commands** (``FrontDoor.command``): answered within the platform's acknowledgement window
  when they are quick, acknowledged first and answered later when they are not; one apology.
- **Thread context** (``seed_context``): one speaker-label convention.
- **Feedback** (``core.feedback``): once an answer is stored, its buttons are added to the last
  message of the reply, where the surface can show them, paced like the reply's edits.
- **Stop and regenerate** (``FrontDoor.stop`` / ``FrontDoor.regenerate``): a person stops the
  answer streaming in a conversation (this worker's at once; another worker's through
  ``turns.stop_requested_at``, which every worker polls for its live turns), or has the newest
  answer written again in place of the old one.
- **Durable turns**: ``admit`` records an accepted question (with the dedupe of its platform
  event, in one transaction) before the adapter acknowledges it, so a database that cannot be
  reached answers "try again" (Slack: 503, and Slack redelivers) instead of losing it; where the
  platform never redelivers, ``receive`` retries the intake and tells the person when it
  cannot. A worker holds a lease on each turn it answers; ``recover`` takes over turns whose
  worker died and finishes their replies in place (or marks one too old with a note).

What differs between platforms is a small ``PlatformProfile`` the adapter supplies. A new
platform is a surface, a translator and a profile; nothing here changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, runtime_checkable

from core.access import COMMAND_REFUSALS, DM_REFUSAL, AccessRules, dm_refusal_key
from core.attachments import images_of, with_text_files
from core.commands import ChannelTarget, Command, HelpStyle, changes_channel, parse_command
from core.config import Settings
from core.conversation import ChatMessage, ConversationKey, IncomingMessage
from core.engine import ChatEngine, TurnResult
from core.errors import (
    PermanentSurfaceError,
    StoreUnavailableError,
    SurfaceError,
    SurfaceRateLimited,
    ThreadbotError,
)
from core.feedback import Feedback, FeedbackSurface
from core.limiters import budgets_for
from core.outcomes import (
    REGENERATE_BUSY,
    REGENERATE_FAILED,
    REGENERATE_NOTHING,
    REGENERATE_ONLY_NEWEST,
    STOPPED_NOTE,
)
from core.ratelimit import Budgets as Budgets

# What adapters need of pacing and streaming, taken from here with the rest of the front door:
# a profile's native streams, a surface's rate scopes, and the budgets a bot may be given (and
# feeds a platform's rate-limit headers to).
from core.ratelimit import RateScope as RateScope
from core.reply import ReplySurface
from core.store import TurnRecord, database_errors
from core.streaming import (
    EMPTY_ANSWER_TEXT,
    RETRACTED_TEXT,
    STREAMING_INDICATOR,
    THINKING_TEXT,
    TYPING_REFRESH_SECONDS,
    AppendReplySurface,
    ReplyStreamer,
)
from core.streaming import NativeStreams as NativeStreams

log = logging.getLogger(__name__)

#: What a reply still streaming shows when the bot shuts down (every platform).
SHUTDOWN_NOTE = "_Stopped: the bot is restarting. Please ask again in a minute._"
#: What a command that failed on our side answers (every platform).
COMMAND_FAILED = "Sorry, that command failed on my side. Please try again in a moment."
#: Attempts to add the feedback buttons to a reply (each waits for the scope's budget first).
FEEDBACK_OFFER_ATTEMPTS = 3
#: Seconds ``close`` waits for turns to end after cancelling them.
SHUTDOWN_WAIT_SECONDS = 10.0
#: The streamer's own texts: never part of a thread's context.
STREAMER_TEXTS = frozenset({THINKING_TEXT, EMPTY_ANSWER_TEXT, RETRACTED_TEXT})

#: What a question gets when its intake could not be recorded (platforms that never redeliver).
INTAKE_FAILED_NOTE = (
    "_I couldn't take this question: my database is not answering. Please ask again in a minute._"
)
#: What a reply left unfinished by a worker that died shows when it is too old to redo.
INTERRUPTED_NOTE = (
    "_This answer was interrupted when the bot restarted, and it is too late to finish it. "
    "Please ask again._"
)
#: Attempts to record a question where the platform never redelivers, and the first wait.
INTAKE_ATTEMPTS = 4
INTAKE_RETRY_BASE_SECONDS = 0.5
#: A turn left unfinished by a dead worker older than this is marked, not answered again.
RECOVERY_MAX_AGE = timedelta(minutes=10)
#: A lease must have lapsed this long before a turn is taken over: after a database outage its
#: own worker, if alive, saves the turn's outcome within a moment (core.engine
#: OUTCOME_RETRY_INTERVAL_SECONDS), and the turn must not be answered again by another.
RECOVERY_GRACE_SECONDS = 3.0
#: Takeovers of one turn before it counts as failing for good (each worker died on it).
MAX_TAKEOVERS = 3
#: How often a worker with turns in flight reads whether someone asked (on another worker) to
#: stop one of them: one indexed read for all of its turns.
STOP_POLL_SECONDS = 0.5

#: Who may change a channel's defaults, said to someone who may not (profiles say their own).
CHANNEL_RIGHTS_NEEDED = "Only users in ADMIN_USERS can change this channel's defaults."

NativeMode = Literal["auto", "always", "never"]
#: How a channel's ``streaming`` setting maps onto a profile's native mode (``auto`` stays).
CHANNEL_STREAMING_MODES: dict[str, NativeMode] = {"native": "always", "update": "never"}
#: Answers whether the person behind a message or command has the platform's own rights to
#: change its channel's defaults (Slack: a workspace admin; Discord: Manage Channels).
ChannelRights = Callable[[], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class PlatformProfile:
    """What the front door needs to know of a platform, supplied by its adapter.

    ``command_deadline``: seconds a command may run before the adapter must acknowledge it
    (platforms want an answer within about 3 s). ``typing_refresh``: how often a typing
    indicator is renewed while the model is silent. ``native``: what the platform's native
    streams can do (None: it has none); ``native_mode`` how to use them: ``always``, ``never``,
    or ``auto`` (where the asker is the only reader, the scope allows it and its budgets are
    idle; a channel's ``streaming`` setting overrides ``auto``: ``native`` is ``always``,
    ``update`` is ``never``). ``channel_rights``: who may change a channel's defaults, the
    answer to someone who may not.
    """

    name: str
    help: HelpStyle
    command_deadline: float
    typing_refresh: float = TYPING_REFRESH_SECONDS
    native: NativeStreams | None = None
    native_mode: NativeMode = "never"
    channel_rights: str = CHANNEL_RIGHTS_NEEDED


@dataclass(frozen=True, slots=True)
class Facts:
    """What an adapter reads off one message, for routing.

    ``mentioned``: the message mentions the bot's user or one of the bot's roles. ``in_thread``:
    it was written inside a thread (not a DM's own thread: a DM is one conversation).
    """

    direct: bool
    mentioned: bool
    in_thread: bool


@dataclass(frozen=True, slots=True)
class Route:
    """Whether and how to answer one message.

    ``commands``: typed words such as ``reset`` act as commands (only where the bot is addressed
    directly: a DM or a mention). ``seed``: read the thread's earlier messages first (the bot is
    new to the thread). ``new_thread``: the answer opens a thread under the message.
    """

    answer: bool
    commands: bool = False
    seed: bool = False
    new_thread: bool = False


SILENT = Route(False)


def route(facts: Facts, *, known: bool, require_mention: bool) -> Route:
    """The one routing decision of every platform; ``known``: the bot has a conversation in the
    message's thread."""
    if facts.direct:
        return Route(True, commands=True)
    if not facts.in_thread:
        return Route(True, commands=True, new_thread=True) if facts.mentioned else SILENT
    if facts.mentioned:
        return Route(True, commands=True, seed=not known)
    # An unmentioned follow-up is a question, never a command: in a thread several people share,
    # a bare "reset" should not wipe the conversation for everyone.
    return Route(True) if known and not require_mention else SILENT


def silence_reason(facts: Facts, *, known: bool, require_mention: bool) -> str:
    """Why ``route`` leaves a message unanswered, in words for the log."""
    if not facts.in_thread:
        return "not addressed (no mention, not in a thread)"
    if not known:
        # Also a follow-up written before the thread's first question was recorded.
        return "not addressed (no mention, and the bot has no conversation in this thread)"
    if require_mention:
        return "not addressed (no mention, and REQUIRE_MENTION is on)"
    return "not addressed"


@dataclass(frozen=True, slots=True)
class ThreadLine:
    """One earlier message of a thread: who wrote it (a display name, else the platform's user
    id), its text, and whether the bot wrote it."""

    speaker: str
    text: str
    from_bot: bool = False


def seed_context(lines: Sequence[ThreadLine]) -> tuple[ChatMessage, ...]:
    """A thread's earlier messages as the model sees them: ``speaker: text`` for people, the
    bot's own answers as assistant messages (without the streamer's indicator or its notices)."""
    context: list[ChatMessage] = []
    for line in lines:
        text = line.text.strip()
        if line.from_bot:
            shown = text.removesuffix(STREAMING_INDICATOR.strip()).strip()
            if shown and shown not in STREAMER_TEXTS:
                context.append(ChatMessage("assistant", shown))
        elif text:
            context.append(ChatMessage("user", f"{line.speaker}: {text}"))
    return tuple(context)


class Arrival(Protocol):
    """One platform message, as its adapter hands it over.

    ``key`` is the conversation the message belongs to if it is answered (for a mention at the
    top of a channel: the thread its answer opens). The three methods do the platform's I/O, in
    the turn's task and only when needed: ``question`` the text for the model (mentions
    stripped, attachments inlined), ``thread`` the thread's earlier messages (oldest first),
    ``reply`` the surface the answer goes to (it may open a thread, as ``route.new_thread``
    asks, or answer in place where it may not). ``may_change_channel`` answers, when a typed
    command would change the channel's defaults, whether the writer has the platform's rights.

    An arrival may also have ``private: bool``: the asker is the only reader of the answer (a
    DM, a Slack assistant thread). With ``native_mode`` ``auto`` an answer streams natively
    only where it is private (others would see a native stream only when it stops); an arrival
    without the attribute leaves the choice to admission alone.
    """

    facts: Facts
    key: ConversationKey
    user_id: str
    message_id: str | None

    async def question(self) -> str: ...

    async def thread(self) -> Sequence[ThreadLine]: ...

    async def reply(self, route: Route) -> ReplySurface: ...

    async def may_change_channel(self) -> bool: ...


@runtime_checkable
class Placed(Protocol):
    """A surface (or an arrival) that can say where its reply goes (``place``, text such as
    JSON), so that a worker taking over the turn can reopen it there (the adapter's ``reopen``).
    An arrival's place is recorded at intake, its surface's when the reply begins."""

    @property
    def place(self) -> str: ...


#: Rebuilds the surface of a reply from its ``place`` (None: it cannot be reached any more).
Reopen = Callable[[str], Awaitable[ReplySurface | None]]


@dataclass(frozen=True, slots=True)
class Admission:
    """A message the front door accepted and recorded: what its turn needs to run."""

    arrival: Arrival
    route: Route
    question: str
    turn_id: int
    #: When the message arrived (``time.monotonic``): the start of the reply's latency figures.
    received: float | None = None
    #: Where the answer goes as recorded at intake (``Placed``), if the arrival could say.
    place: str | None = None


def worker_name() -> str:
    """This process's name on the turns it holds: host, pid and a random tag."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


class FrontDoor:
    """Routing, turns, commands and shutdown for one platform (see the module docstring).

    ``budgets`` paces every reply of the process (default: the deployment's, shared across
    processes where ``REDIS_URL`` or PostgreSQL allow).
    """

    def __init__(
        self,
        settings: Settings,
        engine: ChatEngine,
        profile: PlatformProfile,
        *,
        budgets: Budgets | None = None,
        reopen: Reopen | None = None,
        recovery_grace: float = RECOVERY_GRACE_SECONDS,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.profile = profile
        self.budgets = budgets or budgets_for(settings, engine.store)
        self.feedback = Feedback(engine.store, engine.metrics)
        self.reopen = reopen
        self.recovery_grace = recovery_grace
        self.access = AccessRules.from_settings(settings)
        self.worker = worker_name()
        self._sleep = sleep
        engine.commands.help_styles[profile.name] = profile.help
        self.accepting = True
        self._recovery: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # Native streams in progress, and scopes that refused them (``native_mode`` auto).
        self._native_in_flight: Counter[str] = Counter()
        self._native_refused: set[str] = set()
        # Recorded turns this worker is answering (watched for stop requests), and the watch.
        self._live: set[int] = set()
        self._stop_watch: asyncio.Task[None] | None = None

    # -- messages --------------------------------------------------------------------------

    async def admit(self, arrival: Arrival) -> Admission | None:
        """Route ``arrival`` and, when it is to be answered, record its turn durably.

        None when the bot stays silent or the message was already taken (a redelivery). Raises
        ``StoreUnavailableError`` when the database cannot be reached: the adapter then asks the
        platform to deliver again (Slack: 503) or retries (``receive``).
        """
        facts, key = arrival.facts, arrival.key
        received = time.monotonic()
        refusal = self.access.refusal(key.platform, key.channel, arrival.user_id, facts.direct)
        if refusal is not None:
            log.debug("%s message %s: refused (%s)", key.platform, arrival.message_id, refusal)
            if refusal == "dm":
                self.spawn(self._refuse_dm(arrival), name=f"{key.platform} DM refusal")
            return None
        store = self.engine.store
        with database_errors():
            # Looked up once: whether the bot is in the thread, and the conversation to record in.
            conversation = await store.find(key) if facts.in_thread and not facts.direct else None
            known = conversation is not None
            require_mention = self.settings.require_mention
            decision = route(facts, known=known, require_mention=require_mention)
            if not decision.answer:
                why = silence_reason(facts, known=known, require_mention=require_mention)
                log.debug("%s message %s: %s", self.profile.name, arrival.message_id, why)
                return None
            question = await arrival.question()
            # Text files go into the stored question; images go with the turn (``_run``).
            files = tuple(getattr(arrival, "attachments", ()))
            if files:
                question = await with_text_files(question, files)
            if conversation is None:
                conversation, _ = await store.get_or_create(key)
            event_key = (
                None if arrival.message_id is None else f"{key.workspace}:{arrival.message_id}"
            )
            place = arrival.place if isinstance(arrival, Placed) else None
            turn = await store.open_turn(
                conversation.id,
                platform=key.platform,
                question=question,
                worker=self.worker,
                lease_seconds=self.settings.turn_lease_seconds,
                event_key=event_key,
                user_id=arrival.user_id,
                reply_to=place,
                claim=event_key is not None,
            )
        if turn is None:
            log.info("dropped a second delivery of %s message %s", key.platform, arrival.message_id)
            return None
        return Admission(arrival, decision, question, turn.id, received, place)

    def start(self, admission: Admission) -> asyncio.Task[TurnResult]:
        """Run an admitted turn in a task kept until it ends (``drain``, ``close``)."""
        return self.spawn(
            self._run(admission), name=f"{self.profile.name} turn {admission.turn_id}"
        )

    def receive(self, arrival: Arrival) -> asyncio.Task[TurnResult | None] | None:
        """Take one message from a platform that never redelivers (None: shutting down).

        The intake is retried while the database is unreachable; when it cannot be recorded,
        a person who addressed the bot is told so in the thread.
        """
        if not self.accepting:
            return None
        return self.spawn(self._receive(arrival), name=f"{self.profile.name} turn {arrival.key}")

    async def _receive(self, arrival: Arrival) -> TurnResult | None:
        for attempt in range(INTAKE_ATTEMPTS):
            try:
                admission = await self.admit(arrival)
            except StoreUnavailableError as error:
                log.warning(
                    "%s message %s: intake failed (%s), attempt %d of %d; check DATABASE_URL",
                    self.profile.name, arrival.message_id, error, attempt + 1, INTAKE_ATTEMPTS,
                )  # fmt: skip
                if attempt + 1 < INTAKE_ATTEMPTS:
                    await self._sleep(INTAKE_RETRY_BASE_SECONDS * 2**attempt)
                continue
            return None if admission is None else await self._run(admission)
        if arrival.facts.direct or arrival.facts.mentioned:
            surface = await arrival.reply(Route(True))
            await self.answer_without_store(surface, INTAKE_FAILED_NOTE)
        return None

    async def _refuse_dm(self, arrival: Arrival) -> None:
        """Tell a person once a day (across workers: the claim is in the database) that DMs
        are off; later DMs that day get silence."""
        event_key = dm_refusal_key(arrival.user_id, datetime.now(UTC).date())
        try:
            with database_errors():
                first = await self.engine.store.claim_event(arrival.key.platform, event_key)
        except StoreUnavailableError as error:
            log.warning("DM refusal to %s not sent: %s", arrival.user_id, error)
            return
        if first:
            await self.answer_without_store(await arrival.reply(Route(True)), DM_REFUSAL)

    async def _run(self, admission: Admission) -> TurnResult:
        arrival, decision = admission.arrival, admission.route
        if decision.commands:
            typed = parse_command(admission.question)
            if typed is not None and not await self._may_run(
                typed,
                arrival.key,
                arrival.user_id,
                arrival.facts.direct,
                arrival.may_change_channel,
            ):
                refusal = self.profile.channel_rights
                await self.answer_without_store(await arrival.reply(decision), refusal)
                await self.engine.store.update_turn(
                    admission.turn_id, status="answered", note="refused: no rights to the channel"
                )
                return TurnResult("rejected", refusal)
        context = seed_context(await arrival.thread()) if decision.seed else ()
        incoming = IncomingMessage(
            arrival.key,
            admission.question,
            arrival.user_id,
            arrival.message_id,
            thread_context=context,
            allow_commands=decision.commands,
            turn_id=admission.turn_id,
            attachments=images_of(getattr(arrival, "attachments", ())),
        )
        surface = await arrival.reply(decision)
        if isinstance(surface, Placed) and surface.place != admission.place:
            # The reply went elsewhere than intake recorded (Discord: the thread it opened).
            update = self.engine.store.update_turn(admission.turn_id, reply_to=surface.place)
            self._in_background(update)
        private: bool | None = getattr(arrival, "private", None)
        return await self.answer(incoming, surface, received=admission.received, private=private)

    async def answer_without_store(self, surface: ReplySurface, text: str) -> None:
        """Post ``text`` through the streamer alone (the database is out of reach)."""
        streamer = ReplyStreamer(surface, self.budgets, log_context=self.profile.name)
        await streamer.begin()
        streamer.write(text)
        await streamer.finish()

    async def answer(
        self,
        incoming: IncomingMessage,
        surface: ReplySurface,
        *,
        resume: Sequence[str] = (),
        received: float | None = None,
        private: bool | None = None,
    ) -> TurnResult:
        """Answer ``incoming`` into ``surface``: the streamer, its budgets, native admission.

        With a recorded turn, where the reply goes and what it has posted are recorded as it
        goes, the turn's lease is renewed until it ends, and a stop asked for on another worker
        is noticed (``STOP_POLL_SECONDS``). ``resume``: messages of a reply taken over from a
        worker that died (or of an answer being regenerated), edited in place. ``received``:
        when the message arrived (``time.monotonic``), for the reply's latency figures and the
        turn's log line. ``private``: the asker is the only reader (see ``Arrival``).
        """
        turn_id = incoming.turn_id
        # Counted in flight by _native_scope when it says yes; uncounted below.
        scope = None if resume else await self._native_scope(surface, incoming.key, private)
        streamer = ReplyStreamer(
            surface,
            self.budgets,
            native=self.profile.native if scope is not None else None,
            on_native_refused=self._native_refused_by,
            on_posted=None if turn_id is None else self._recorder(turn_id),
            resume=resume,
            typing_refresh=self.profile.typing_refresh,
            log_context=str(incoming.key),
            observer=self.engine.metrics.calls(self.profile.name),
        )
        lease = None if turn_id is None else asyncio.create_task(self._hold_lease(turn_id))
        if turn_id is not None:
            self._watch_for_stop(turn_id)
        try:
            result = await self.engine.handle(incoming, streamer)
            self._report(incoming, result, streamer, received)
            if result.status == "answered" and result.reply_id is not None:
                # Only on the final text, once the answer is stored: the buttons name it.
                await self._offer_feedback(surface, result.reply_id, streamer.last_message)
            return result
        finally:
            if lease is not None:
                lease.cancel()
            if turn_id is not None:
                self._live.discard(turn_id)
            if scope is not None:
                self._native_in_flight[scope] -= 1

    async def _offer_feedback(
        self, surface: ReplySurface, reply_id: int, last: tuple[str, str] | None
    ) -> bool:
        """Add the feedback buttons to the reply's last message ``(id, shown text)``; whether
        they are there. Best effort: an answer without buttons is still an answer."""
        if last is None or not isinstance(surface, FeedbackSurface):
            return False
        scopes = surface.scopes("edit")
        for attempt in range(1, FEEDBACK_OFFER_ATTEMPTS + 1):
            # A progress call: it leaves part of the burst for final texts people wait for.
            await self.budgets.acquire(scopes, progress=True)
            try:
                await surface.offer_feedback(reply_id, *last)
            except SurfaceRateLimited as error:
                for key in [error.scope] if error.scope else [scope.key for scope in scopes]:
                    self.budgets.pause(key, error.retry_after)
            except PermanentSurfaceError as error:
                log.warning("answer %s: no feedback buttons (%s)", reply_id, error)
                return False
            except SurfaceError as error:
                log.info("answer %s: feedback buttons, attempt %d: %s", reply_id, attempt, error)
            else:
                return True
        log.warning(
            "answer %s: no feedback buttons after %d attempts", reply_id, FEEDBACK_OFFER_ATTEMPTS
        )
        return False

    def _report(
        self,
        incoming: IncomingMessage,
        result: TurnResult,
        streamer: ReplyStreamer,
        received: float | None,
    ) -> None:
        """The turn's latency figures, and its one log line (conversation, outcome, timings)."""
        timings = dict(result.timings)
        if received is not None:
            first, final = (
                None if shown is None else shown - received
                for shown in (streamer.first_text_at, streamer.final_text_at)
            )
            self.engine.metrics.reply_times(self.profile.name, first, final)
            for name, seconds in (("first_text_ms", first), ("final_text_ms", final)):
                if seconds is not None:
                    timings[name] = round(seconds * 1000)
        turn = {
            "platform": self.profile.name,
            "conversation": str(incoming.key),
            "conversation_id": result.conversation_id,
            "turn_id": incoming.turn_id,
            "message": incoming.message_id,
            "outcome": result.status,
            "calls": streamer.calls,
            "rate_limited": streamer.rate_limited,
            **timings,
        }
        shown = " ".join(f"{name}={value}" for name, value in timings.items())
        log.info(
            "%s message %s in %s: %s %s",
            self.profile.name, incoming.message_id, incoming.key, result.status, shown,
            extra={"turn": turn},
        )  # fmt: skip

    def _recorder(self, turn_id: int) -> Callable[[list[str]], None]:
        def posted(message_ids: list[str]) -> None:
            update = self.engine.store.update_turn(turn_id, reply_message_ids=message_ids)
            self._in_background(update)

        return posted

    async def _hold_lease(self, turn_id: int) -> None:
        """Renew this worker's lease on a turn while it runs (a third of the lease each time)."""
        period = self.settings.turn_lease_seconds / 3
        while True:
            await asyncio.sleep(period)
            try:
                with database_errors():
                    await self.engine.store.renew_turn(
                        turn_id, self.worker, self.settings.turn_lease_seconds
                    )
            except StoreUnavailableError as error:
                log.warning("turn %s: lease not renewed (%s)", turn_id, error)

    def _in_background(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Best-effort bookkeeping that must not hold up a reply; failures are logged."""

        async def guarded() -> None:
            try:
                await coroutine
            except Exception as error:
                log.warning("turn bookkeeping failed: %s", error)

        self.spawn(guarded(), name="turn bookkeeping")

    # -- stop and regenerate ---------------------------------------------------------------

    async def stop(self, key: ConversationKey, *, user_id: str | None = None) -> bool:
        """Stop the answer streaming in conversation ``key``; whether one was streaming there.

        This worker's answer stops at once; another worker's is asked through the turn's
        record (``turns.stop_requested_at``) and stops within about a second
        (``STOP_POLL_SECONDS``). The answer keeps the text it showed, followed by
        ``STOPPED_NOTE``, and is recorded ``stopped``. Idempotent. ``user_id``: who stopped it
        (for the log).
        """
        store = self.engine.store
        try:
            with database_errors():
                conversation = await store.find(key)
                if conversation is None:
                    return False
                if await self.engine.stop(conversation.id, STOPPED_NOTE):
                    log.info("%s: answer stopped by %s", key, user_id or "someone")
                    return True
                asked = await store.request_stop(conversation.id)
        except StoreUnavailableError as error:
            log.warning("%s: stop not passed on (%s)", key, error)
            return False
        if asked:
            log.info("%s: %s asked the worker answering to stop", key, user_id or "someone")
        return asked

    def _watch_for_stop(self, turn_id: int) -> None:
        """Watch ``turn_id`` for a stop asked for on another worker, while it runs."""
        self._live.add(turn_id)
        if self._stop_watch is None or self._stop_watch.done():
            self._stop_watch = asyncio.create_task(self._watch_stops(), name="stop requests")

    async def _watch_stops(self) -> None:
        """While this worker answers recorded turns, read every ``STOP_POLL_SECONDS`` whether
        someone asked to stop one of them (one read for all), and stop those."""
        store = self.engine.store
        while self._live:
            await asyncio.sleep(STOP_POLL_SECONDS)
            try:
                with database_errors():
                    asked = await store.stop_requests(sorted(self._live))
                    for turn_id in asked & self._live:
                        turn = await store.get_turn(turn_id)
                        stopped = await self.engine.stop(
                            turn.conversation_id, STOPPED_NOTE, turn_id=turn_id, settle=0
                        )
                        if stopped:
                            log.info("turn %s: stopped as asked on another worker", turn_id)
                            self._live.discard(turn_id)
            except StoreUnavailableError as error:
                log.warning("stop requests not read (%s)", error)
            except Exception:
                # The watch must outlive a bug or a closing store: stops are best effort.
                log.exception("stop requests not read")

    async def regenerate(
        self, key: ConversationKey, message_id: str, *, user_id: str, surface: ReplySurface
    ) -> str | None:
        """Answer again, in place, the question whose answer platform message ``message_id``
        shows (one of the stored answer's messages); None when regenerating started, else a
        one-line refusal to show ``user_id`` only.

        Only the newest answer of the conversation may be regenerated, and not while an answer
        is being written there. The old answer stays stored with status ``replaced`` (never
        sent as history again); its stored question is answered again, with the current
        settings, under a new turn record; the new answer streams into the old answer's
        messages through ``surface`` (a fresh surface for the conversation's thread or channel,
        as for any answer), surplus old messages are retracted, and the final message is
        offered the feedback buttons as for any answer.
        """
        if self.access.refusal(key.platform, key.channel, user_id, False) == "user":
            return COMMAND_REFUSALS["user"]
        store = self.engine.store
        try:
            with database_errors():
                conversation = await store.find(key)
                if conversation is None:
                    return REGENERATE_NOTHING
                if self.engine.answering(conversation.id) or await store.open_turn_count(
                    conversation.id
                ):
                    return REGENERATE_BUSY
                newest = await store.newest_answer(conversation.id)
                if newest is None:
                    return REGENERATE_NOTHING
                answer, old_turn, shown = newest
                if message_id not in shown:
                    return REGENERATE_ONLY_NEWEST
                question = None if old_turn is None else await store.turn_question(old_turn)
                if question is None:
                    # An answer no recorded turn wrote (a thread's seeded context).
                    return REGENERATE_NOTHING
                turn = await store.start_regeneration(
                    answer.id,
                    question.id,
                    conversation_id=conversation.id,
                    platform=key.platform,
                    question=question.content,
                    worker=self.worker,
                    lease_seconds=self.settings.turn_lease_seconds,
                    user_id=user_id,
                    reply_to=surface.place if isinstance(surface, Placed) else None,
                    reply_message_ids=shown,
                )
        except StoreUnavailableError as error:
            log.warning("%s: regenerate failed (%s)", key, error)
            return REGENERATE_FAILED
        if turn is None:
            # Another click got there first: its answer is being written.
            return REGENERATE_BUSY
        log.info(
            "%s: %s regenerates answer %s (turn %s -> %s)",
            key, user_id, answer.id, old_turn, turn.id,
        )  # fmt: skip
        # The question is stored already (it is the new turn's now): it is not added again.
        incoming = IncomingMessage(
            key, question.content, user_id, None, allow_commands=False, turn_id=turn.id,
            taken_over=True,
        )  # fmt: skip
        self.spawn(
            self.answer(incoming, surface, resume=shown), name=f"{key.platform} turn {turn.id}"
        )
        return None

    # -- recovery --------------------------------------------------------------------------

    def start_recovery(self) -> None:
        """Take over dead workers' turns now and every half lease from now on."""
        if self._recovery is None:
            self._recovery = asyncio.create_task(self._recover_forever(), name="turn recovery")

    async def _recover_forever(self) -> None:
        while self.accepting:
            try:
                await self.recover()
            except StoreUnavailableError as error:
                log.warning("turn recovery skipped: %s", error)
            except Exception:
                log.exception("turn recovery failed")
            await asyncio.sleep(self.settings.turn_lease_seconds / 2)

    async def recover(self) -> int:
        """Take over this platform's turns whose worker died (lease expired); each is finished
        in place in a task, or marked when too old. Returns how many were taken."""
        with database_errors():
            turns = await self.engine.store.claim_stale_turns(
                self.worker,
                lease_seconds=self.settings.turn_lease_seconds,
                platform=self.profile.name,
                grace_seconds=self.recovery_grace,
            )
        for turn in turns:
            log.info(
                "taking over turn %s of conversation %s (worker %s died)",
                turn.id, turn.conversation_id, turn.worker,
            )  # fmt: skip
            self.spawn(self._finish_taken_over(turn), name=f"recovered turn {turn.id}")
        return len(turns)

    async def _finish_taken_over(self, turn: TurnRecord) -> None:
        store = self.engine.store
        surface = None
        if self.reopen is not None and turn.reply_to:
            surface = await self.reopen(turn.reply_to)
        too_old = datetime.now(UTC) - turn.created_at > RECOVERY_MAX_AGE
        if surface is None or too_old or turn.takeovers > MAX_TAKEOVERS:
            if surface is not None and turn.reply_message_ids:
                streamer = ReplyStreamer(surface, self.budgets, resume=turn.reply_message_ids)
                await streamer.begin()
                await streamer.cancel(INTERRUPTED_NOTE)
            await store.update_turn(turn.id, status="interrupted", note=INTERRUPTED_NOTE)
            self.engine.metrics.turn_ended(self.profile.name, "interrupted")
            log.info("turn %s: marked interrupted (too old or unreachable)", turn.id)
            return
        conversation = await store.get(turn.conversation_id)
        incoming = IncomingMessage(
            conversation.key,
            turn.question,
            turn.user_id or "",
            None,
            turn_id=turn.id,
            taken_over=True,
        )
        result = await self.answer(incoming, surface, resume=turn.reply_message_ids)
        log.info("turn %s: taken over and %s", turn.id, result.status)

    async def health(self) -> str | None:
        """None when this front door can take work, else why not (for health checks)."""
        if not self.accepting:
            return "shutting down"
        problem = await self.engine.store.ping()
        return None if problem is None else f"database unreachable ({problem})"

    async def _native_scope(
        self, surface: ReplySurface, key: ConversationKey, private: bool | None
    ) -> str | None:
        """The scope this reply streams natively in (counted in flight), or None for edits.

        The mode is the profile's, unless it is ``auto`` and the channel chose one (its
        ``streaming`` setting). ``auto`` streams natively only where the reply is private (when
        the arrival says; a native stream in a channel is live only for its recipient), and
        not in scopes that refused it nor under load: beyond ``NativeStreams.per_scope`` streams
        at once, or while a start or stop would wait for its budget, in this process or in the
        budgets shared with other workers (answers of one thread would otherwise land out of
        order), replies take the edit path instead.
        """
        native = self.profile.native
        if native is None or not isinstance(surface, AppendReplySurface):
            return None
        scope = surface.native_scope
        if not scope:
            return None
        mode = await self._native_mode(key)
        if mode == "never":
            return None
        if mode == "auto" and (
            private is False
            or scope in self._native_refused
            or self._native_in_flight[scope] >= native.per_scope
        ):
            return None
        # Counted before asking the shared budgets, so concurrent replies cannot all pass.
        self._native_in_flight[scope] += 1
        if mode == "always":
            return scope
        limits = [limit for call in ("start", "stop") for limit in surface.scopes(call)]
        try:
            idle = await self.budgets.idle(limits)
        except BaseException:
            self._native_in_flight[scope] -= 1
            raise
        if not idle:
            self._native_in_flight[scope] -= 1
            return None
        return scope

    async def _native_mode(self, key: ConversationKey) -> NativeMode:
        """The profile's native mode; for ``auto``, the channel's ``streaming`` choice if any."""
        mode = self.profile.native_mode
        if mode != "auto":
            # Forced by the deployment (SLACK_STREAMING=native|update).
            return mode
        try:
            with database_errors():
                channel = await self.engine.store.channel_settings(
                    key.platform, key.workspace, key.channel
                )
        except StoreUnavailableError as error:
            log.warning("%s: channel streaming setting not read (%s)", key, error)
            return mode
        return CHANNEL_STREAMING_MODES.get(channel.streaming or "", mode)

    def _native_refused_by(self, scope: str) -> None:
        if self.profile.native_mode != "auto":
            return
        if scope not in self._native_refused:
            log.info("%s %s does not allow native streaming: using edits", self.profile.name, scope)
        self._native_refused.add(scope)

    # -- commands --------------------------------------------------------------------------

    async def command(
        self,
        command: Command,
        target: ConversationKey | ChannelTarget,
        *,
        acknowledge: Callable[[], Awaitable[None]],
        user_id: str,
        direct: bool,
        may_change_channel: ChannelRights,
    ) -> str:
        """Run ``command`` of ``user_id`` (``direct``: in a DM); the answer to show (a refusal
        outside the access rules, an apology when it failed on our side).

        A command that would change a channel's defaults asks ``may_change_channel`` unless the
        user is in ADMIN_USERS. A command still running after ``profile.command_deadline`` calls
        ``acknowledge`` first (Slack: an empty ack; Discord: a deferred "thinking"), so the
        platform's window holds.
        """
        refusal = self.access.refusal(target.platform, target.channel, user_id, direct)
        if refusal is not None:
            log.debug("%s command of %s: refused (%s)", target.platform, user_id, refusal)
            return COMMAND_REFUSALS[refusal]
        work: asyncio.Task[str] = self.spawn(
            self._command_answer(command, target, user_id, direct, may_change_channel),
            name=f"command {command.action}",
        )
        deadline = self.profile.command_deadline
        if deadline > 0:
            await asyncio.wait({work}, timeout=deadline)
        if not work.done():
            await acknowledge()
        return await work

    async def _may_run(
        self,
        command: Command,
        target: ConversationKey | ChannelTarget,
        user_id: str,
        direct: bool,
        may_change_channel: ChannelRights,
    ) -> bool:
        """Whether ``user_id`` may run ``command`` at ``target``: changing a channel's defaults
        needs ADMIN_USERS or the platform's rights (a DM's own settings need none)."""
        if direct or not changes_channel(command, target):
            return True
        return self.access.is_admin(target.platform, user_id) or await may_change_channel()

    async def _command_answer(
        self,
        command: Command,
        target: ConversationKey | ChannelTarget,
        user_id: str,
        direct: bool,
        may_change_channel: ChannelRights,
    ) -> str:
        try:
            if not await self._may_run(command, target, user_id, direct, may_change_channel):
                log.info("%s command %s of %s: no rights", target.platform, command.action, user_id)
                return self.profile.channel_rights
            return await self.engine.run_command(command, target)
        except ThreadbotError as error:
            log.warning("command %s on %s failed: %s", command.action, target, error)
            return str(error) or COMMAND_FAILED
        except Exception:
            log.exception("command %s on %s failed", command.action, target)
            return COMMAND_FAILED

    # -- tasks and shutdown ----------------------------------------------------------------

    def spawn(self, coroutine: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Run ``coroutine`` as work in flight: ``drain`` waits for it, ``close`` cancels it."""
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    @property
    def in_flight(self) -> int:
        """Turns and commands in progress."""
        return len(self._tasks)

    async def drain(self) -> None:
        """Wait until every message and command accepted so far has been answered."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def close(self, note: str = SHUTDOWN_NOTE) -> None:
        """Take no more work; end every reply in progress with ``note`` and wait for them."""
        self.accepting = False
        if self._stop_watch is not None:
            self._stop_watch.cancel()
        if self._recovery is not None:
            # Awaited: a statement cut off while the store closes can hang the interpreter's exit.
            self._recovery.cancel()
            await asyncio.wait({self._recovery})
        await self.engine.cancel_all(note)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=SHUTDOWN_WAIT_SECONDS)
        await self.budgets.aclose()
