"""ChatEngine: the one turn pipeline every adapter calls.

``handle(incoming, reply)``: dedupe the platform message, serialise turns of one conversation,
store the user message, build the window under the history policy, stream the provider's answer
under the retry policy into the reply, store the assistant message. ``run_command`` does the
platform-neutral commands through ``core.commands.CommandRunner``. The front door (``core.bot``)
hands it each message with a ``ReplyStreamer`` over the platform's surface; the terminal hands
it its own ``ReplySink``. Nothing here knows a platform.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

from core.attachments import images_refused_note, load_images
from core.commands import (
    CANCELLED_BY_RESET,
    HISTORY_TOKENS_RANGE,
    ChannelTarget,
    Command,
    CommandRunner,
    HelpStyle,
    parse_command,
    system_prompt_for,
)
from core.config import Settings
from core.conversation import ChatMessage, ConversationKey, ImagePart, IncomingMessage, Usage
from core.errors import (
    ConfigError,
    ContextOverflowError,
    ImagesRefusedError,
    ProviderAuthError,
    ProviderError,
    SurfaceError,
    TransientProviderError,
)
from core.experiments import Assignment, experiment_prompt, exposure
from core.history import (
    HistoryPolicy,
    SummaryPolicy,
    TokenBudgetPolicy,
    Window,
    policy_for,
    raw_estimate,
)
from core.metrics import Metrics
from core.models import ModelChoice, default_choice, resolve_model
from core.outcomes import (
    EMPTY_ANSWER,
    UNEXPECTED_FAILURE,
    UNSAVED_ANSWER_NOTE,
    UNSAVED_QUESTION,
    WAITING_NOTICE,
    cut_note,
    failure_message,
    overflow_failure,
    plain_reason,
)
from core.providers import build_provider
from core.providers.base import Provider
from core.reply import ReplySink
from core.retry import RetryPolicy
from core.store import (
    DEPLOYMENT_SYSTEM_PROMPT,
    Conversation,
    ConversationStore,
    MessageStatus,
    StoredMessage,
    TurnStatus,
    retry_write,
)
from core.tokens import counter_for
from core.usage import Limits, Tally

log = logging.getLogger(__name__)

_T = TypeVar("_T")

ResultStatus = Literal["answered", "duplicate", "command", "rejected", "failed", "cancelled"]

#: A turn's outcome that could not be saved is tried again this often, for this long: the
#: database came back before its lease lapsed, or another worker answers the turn again.
OUTCOME_RETRY_INTERVAL_SECONDS = 0.25
OUTCOME_RETRY_SECONDS = 600.0
#: How often processed platform events older than any redelivery are forgotten (seconds).
EVENT_PRUNE_INTERVAL = 3600.0
#: A retry before any token was shown stays silent when its wait is shorter than this (seconds).
SILENT_RETRY_MAX_WAIT = 2.0
#: A reset waits at most this long for the answer it stops to record what it showed (seconds),
#: so the stopped answer is stored before the conversation starts over.
STOP_SETTLE_SECONDS = 5.0
#: Tokens kept free when fitting a request to the model's context: our count is an estimate
#: (see core/tokens.py), off by up to a tenth for some texts ...
CONTEXT_MARGIN_SHARE = 0.1
#: ... and never fewer than this.
MIN_CONTEXT_MARGIN_TOKENS = 32
#: The smallest figure the ``history`` command takes for tokens.
HISTORY_TOKENS_MIN = HISTORY_TOKENS_RANGE[0]
#: A turn record's note keeps at most this much of an error's text.
MAX_TURN_NOTE_CHARS = 500

EMPTY_MESSAGE_HINT = (
    "Ask me something after the mention, for example “summarise this thread” or "
    "“how do I undo my last git commit?”. Say `help` to see the commands."
)
CANCELLED_DEFAULT = "Stopped before the answer was complete."


@dataclass(slots=True)
class TurnResult:
    """What became of one incoming message."""

    status: ResultStatus
    text: str = ""
    message_ids: list[str] = field(default_factory=list)
    conversation_id: int | None = None
    #: Milliseconds and tokens of the turn, for its log line (``queued_ms``, ``model_ms``, ...).
    timings: dict[str, int] = field(default_factory=dict)
    #: The stored assistant message of an answered turn (None: it could not be saved), which
    #: feedback on the reply names.
    reply_id: int | None = None


@dataclass(slots=True)
class _Progress:
    """How far one turn got: what its failure or cancellation must record."""

    turn_id: int | None
    platform: str = ""
    conversation_id: int | None = None
    conversation: Conversation | None = None
    question: StoredMessage | None = None
    # The text of the current attempt, as the reply shows it.
    parts: list[str] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    # Every attempt's tokens, stored with the turn when it ends.
    tally: Tally = field(default_factory=Tally)
    first_token_at: float | None = None
    # When the model work began (the clock), the system prompt sent and its experiment variant:
    # the reply's exposure, stored with its usage.
    started_at: float | None = None
    system: str | None = None
    assignment: Assignment | None = None
    # Set once the turn records its own outcome (answer stored, or failure): a cancel then
    # records nothing more.
    closing: bool = False
    # The answer's final save (answer and outcome in one step), which a cancel waits for.
    keeping: asyncio.Future[None] | None = None
    # Set when the turn's outcome is recorded (a reset waits for it).
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    # When the turn took its place in line (the queued time runs to its conversation's lock).
    lined_up_at: float = 0.0
    # Milliseconds and tokens of the turn (``TurnResult.timings``).
    timings: dict[str, int] = field(default_factory=dict)
    # The provider and model answering (None: the engine's own, the deployment's default), the
    # images sent with the question, and what to say after the answer about files not sent.
    provider: Provider | None = None
    model: str | None = None
    images: tuple[ImagePart, ...] = ()
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Request:
    """What one request sends: the window and the room for the answer."""

    window: Window
    max_tokens: int
    # The model's context window it was fitted to, when known.
    context_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A complete answer and how it was made."""

    answer: str
    request: _Request
    started: float
    variant: str


class _Place:
    """A turn's place in its conversation's line: it waits for the turn before it."""

    def __init__(self, before: asyncio.Future[None] | None, done: Callable[[], None]) -> None:
        self._before = before
        self._done = done

    @property
    def busy(self) -> bool:
        """Whether another turn of the conversation is still ahead of this one."""
        return self._before is not None and not self._before.done()

    async def wait(self) -> None:
        """Wait for the turn ahead (never cancelling it)."""
        if self._before is not None:
            await asyncio.wait((self._before,))

    def leave(self) -> None:
        """Give the place up; the next turn goes once the one ahead of this one is done too."""
        before = self._before
        if before is None or before.done():
            self._done()
        else:
            before.add_done_callback(lambda _: self._done())


class ChatEngine:
    """Turns, commands and conversations, over a store and a provider."""

    def __init__(
        self,
        settings: Settings,
        store: ConversationStore,
        provider: Provider,
        *,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        # Providers of other APIs that MODELS names, built on first use and kept (by name).
        self._providers: dict[str, Provider] = {}
        self.metrics = metrics or Metrics()
        self.retry = retry or RetryPolicy(max_attempts=settings.max_retry_attempts)
        self._clock = clock
        # Waits between attempts of a write that matters (core.store.retry_write).
        self._sleep = sleep
        # Orders turns of one conversation in this process in arrival order: the last turn in
        # each conversation's line, resolved when it is done (see ``_line_up``).
        self._tails: dict[ConversationKey, asyncio.Future[None]] = {}
        self._active: dict[int, asyncio.Task[object]] = {}
        self._progress: dict[asyncio.Task[object], _Progress] = {}
        # Turns cancelled by a shutdown: their outcome is ``interrupted``, not ``stopped``.
        self._interrupting: set[asyncio.Task[object]] = set()
        # Turns a person stopped (``stop``): they end with a result instead of a cancellation.
        self._stopping: set[asyncio.Task[object]] = set()
        # The context size the model's server stated in an overflow error.
        self._learned_context: int | None = None
        # Every turn whose reply has begun, also while it waits for the conversation's lock.
        self._begun: set[asyncio.Task[object]] = set()
        self._cancel_notes: dict[asyncio.Task[object], str] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._last_prune: float | None = None
        self.commands = CommandRunner(settings, store, self._stop_turn)
        self.limits = Limits(settings, store)

    @classmethod
    async def create(cls, settings: Settings, *, provider: Provider | None = None) -> ChatEngine:
        """Open the store named by ``DATABASE_URL`` (applying migrations) and build the provider."""
        provider = provider or build_provider(settings)
        store = await ConversationStore.open(settings.database_url)
        return cls(settings, store, provider, metrics=Metrics.from_settings(settings))

    async def close(self) -> None:
        """Wait briefly for background upkeep, then release the provider and the store."""
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        for task in self._background:
            task.cancel()
        await self.provider.aclose()
        for other in self._providers.values():
            await other.aclose()
        await self.store.close()
        await self.metrics.close()

    def _stop_turn(self, conversation_id: int, note: str) -> None:
        """Cancel the turn answering in ``conversation_id`` (a reset), showing ``note``."""
        active = self._active.get(conversation_id)
        if active is not None and active is not asyncio.current_task():
            self._cancel_notes[active] = note
            active.cancel()

    async def run_command(self, command: Command, target: ConversationKey | ChannelTarget) -> str:
        """Do ``command`` (see ``core.commands.CommandRunner``); the answer to show."""
        if command.action == "reset" and isinstance(target, ConversationKey):
            await self._stop_and_settle(target)
        return await self.commands.run(command, target)

    async def _stop_and_settle(self, key: ConversationKey) -> None:
        """Stop the answer in progress at ``key`` and let it store what it showed, so that lands
        in the conversation before a reset starts it over."""
        conversation = await self.store.find(key)
        active = None if conversation is None else self._active.get(conversation.id)
        if conversation is None or active is None or active is asyncio.current_task():
            return
        progress = self._progress.get(active)
        self._stop_turn(conversation.id, CANCELLED_BY_RESET)
        if progress is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.settled.wait(), STOP_SETTLE_SECONDS)

    async def cancel_all(self, note: str) -> None:
        """Cancel every turn in progress (shutdown); each reply shows ``note``."""
        tasks = list(self._begun)
        for task in tasks:
            self._cancel_notes[task] = note
            self._interrupting.add(task)
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- turns ---------------------------------------------------------------------------------

    async def handle(self, incoming: IncomingMessage, reply: ReplySink) -> TurnResult:
        """Answer one incoming message into ``reply``. See the module docstring."""
        # The place in line is taken before the first await, so turns keep arrival order.
        place = self._line_up(incoming.key)
        key = incoming.key
        try:
            with self.metrics.turn_span(key.platform, str(key)) as span:
                result = await self._handle_in_line(incoming, reply, place)
                if span is not None:
                    span.set_attributes({"threadbot.outcome": result.status, **result.timings})
                return result
        finally:
            place.leave()

    def _line_up(self, key: ConversationKey) -> _Place:
        """Take the next place in ``key``'s line (no await: arrival order is kept)."""
        before = self._tails.get(key)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails[key] = mine

        def done() -> None:
            if not mine.done():
                mine.set_result(None)
            if self._tails.get(key) is mine:
                del self._tails[key]

        return _Place(before, done)

    async def _handle_in_line(
        self, incoming: IncomingMessage, reply: ReplySink, place: _Place
    ) -> TurnResult:
        key = incoming.key
        # A recorded turn's event was claimed at intake, with the record (core.bot.admit).
        claim = incoming.message_id is not None and incoming.turn_id is None
        if claim and not await self.store.claim_event(
            key.platform, f"{key.workspace}:{incoming.message_id}"
        ):
            log.info(
                "dropped a second delivery of %s message %s", key.platform, incoming.message_id
            )
            await self._settle_turn(incoming.turn_id, "failed", note="a second delivery")
            return TurnResult("duplicate")
        if incoming.message_id is not None:
            self._prune_events_now_and_then()
        text = incoming.text.strip()
        refusal = self._refusal(text)
        if refusal is not None:
            await self._say(reply, refusal)
            await self._settle_turn(incoming.turn_id, "answered", note="refused: " + refusal)
            return TurnResult("rejected", refusal)
        command = parse_command(text) if incoming.allow_commands else None
        if command is None:
            incoming, refused = await self._metered(incoming, reply)
            if refused is not None:
                return refused

        await reply.begin()
        task = asyncio.current_task()
        progress = _Progress(incoming.turn_id, key.platform, lined_up_at=self._clock())
        if task is not None:
            self._begun.add(task)
            self._progress[task] = progress
        try:
            if place.busy:
                # A sign of life at once, not only when the answer before this one ends.
                await reply.waiting(WAITING_NOTICE)
                await place.wait()
                await reply.waiting(None)
            if command is not None:
                answer = await self.run_command(command, key)
                reply.write(answer)
                await reply.finish()
                await self._settle_turn(incoming.turn_id, "answered", note="a command")
                return TurnResult("command", answer)
            return await self._answer(incoming, text, reply, progress)
        except asyncio.CancelledError:
            # Also while queued behind another turn: the reply already shows that it is working.
            note = self._cancel_notes.pop(task, CANCELLED_DEFAULT) if task else CANCELLED_DEFAULT
            interrupted = task in self._interrupting
            with contextlib.suppress(Exception):
                await asyncio.shield(self._record_stop(progress, note, interrupted=interrupted))
            progress.settled.set()
            with contextlib.suppress(Exception):
                await asyncio.shield(reply.cancel(note))
            if (
                task is not None
                and task in self._stopping
                and not interrupted
                and task.uncancel() == 0
            ):
                # Stopped by a person (``stop``): the turn ended, nothing is being torn down.
                return TurnResult(
                    "cancelled",
                    "".join(progress.parts),
                    conversation_id=progress.conversation_id,
                    timings=progress.timings,
                )
            raise
        finally:
            progress.settled.set()
            await asyncio.shield(self._record_usage(progress))
            if task is not None:
                self._cancel_notes.pop(task, None)
                self._interrupting.discard(task)
                self._stopping.discard(task)
                self._progress.pop(task, None)
                self._begun.discard(task)

    async def _metered(
        self, incoming: IncomingMessage, reply: ReplySink
    ) -> tuple[IncomingMessage, TurnResult | None]:
        """A question under the usage limits: the turn's record (one is opened for a turn that
        came without, as the terminal's do, so its usage is stored too), and the answer when a
        limit turns it away (the model is not called)."""
        local = incoming.turn_id is None
        if local:
            incoming = replace(incoming, turn_id=await self._local_turn(incoming))
        try:
            refusal = await self.limits.refusal(
                incoming.key, incoming.user_id, incoming.turn_id, paced=not local
            )
        except Exception as error:
            # The limits cannot be read: answering beats refusing everybody during a blip.
            log.warning("usage limits not checked (%s); answering", error)
            return incoming, None
        if refusal is None:
            return incoming, None
        log.info("%s: user %s refused (%s)", incoming.key, incoming.user_id, refusal.limit)
        await self._say(reply, refusal.message)
        turn_id = incoming.turn_id
        if turn_id is not None:
            await self._quietly(
                "the refusal", lambda: self.store.refuse_turn(turn_id, refusal.limit)
            )
        await self._settle_turn(turn_id, "failed", note="refused: " + refusal.message)
        return incoming, TurnResult("rejected", refusal.message)

    async def _local_turn(self, incoming: IncomingMessage) -> int | None:
        """A record for a turn no front door recorded (None when it cannot be written)."""
        try:
            conversation, _ = await self.store.get_or_create(
                incoming.key, seed=incoming.thread_context
            )
            # Nobody recovers a local turn (no front door serves its platform): the lease only
            # keeps the record's shape.
            turn = await self.store.open_turn(
                conversation.id,
                platform=incoming.key.platform,
                question=incoming.text,
                worker=f"local:{os.getpid()}",
                lease_seconds=self.settings.turn_lease_seconds,
                user_id=incoming.user_id,
            )
        except Exception as error:
            log.warning("%s: the turn could not be recorded (%s)", incoming.key, error)
            return None
        return None if turn is None else turn.id

    async def _record_usage(self, progress: _Progress) -> None:
        """Store what the turn's requests used and cost, and its reply's exposure (experiment,
        variant, prompt version, time to first token), when it called the model."""
        turn_id, tally = progress.turn_id, progress.tally
        if turn_id is None or not tally.called:
            return
        provider, model = self._answering(progress)
        usage = tally.usage(self.settings, provider.name, model)
        seen = None
        if progress.system is not None:
            first, started = progress.first_token_at, progress.started_at
            first_ms = None if first is None or started is None else _ms(first - started)
            seen = exposure(progress.system, progress.assignment, first_ms)
        await self._quietly(
            "the turn's usage", lambda: self.store.record_turn_usage(turn_id, usage, seen)
        )

    def _refusal(self, text: str) -> str | None:
        """What to say instead of answering ``text`` (empty or too long), or None."""
        if not text:
            return EMPTY_MESSAGE_HINT
        if len(text) > self.settings.max_input_chars:
            return (
                f"Your message is {len(text):,} characters long; I can take at most "
                f"{self.settings.max_input_chars:,}. Please shorten it or split it into parts."
            )
        return None

    async def _answer(
        self, incoming: IncomingMessage, text: str, reply: ReplySink, progress: _Progress
    ) -> TurnResult:
        conversation, _ = await self.store.get_or_create(incoming.key, seed=incoming.thread_context)
        task = asyncio.current_task()
        async with self.store.conversation_lock(conversation.id):
            self._queued(progress)
            if task is not None:
                self._active[conversation.id] = task
            try:
                return await self._turn(conversation, incoming, text, reply, progress)
            finally:
                if self._active.get(conversation.id) is task:
                    del self._active[conversation.id]

    def _queued(self, progress: _Progress) -> None:
        """Report how long the turn waited behind others of its conversation (to its lock)."""
        waited = self._clock() - progress.lined_up_at
        progress.timings["queued_ms"] = _ms(waited)
        self.metrics.queued(progress.platform, waited)

    def _ended(self, progress: _Progress, outcome: TurnStatus) -> None:
        """Report a model turn's outcome (answered, failed, stopped, interrupted)."""
        self.metrics.turn_ended(progress.platform, outcome)

    def _model_call(
        self, progress: _Progress, started: float, first: float | None, error: Exception | None
    ) -> None:
        """Report one model call (an attempt) that ended now, with ``error`` when it failed."""
        ended = self._clock()
        first_token = None if first is None else first - started
        usage = progress.usage
        provider, model = self._answering(progress)
        self.metrics.model_call(
            provider.name,
            model,
            ended - started,
            first_token=first_token,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            error=None if error is None else type(error).__name__,
        )
        timings = progress.timings
        timings["model_ms"] = _ms(ended - started)
        if first_token is not None:
            timings["first_token_ms"] = _ms(first_token)
        for name, tokens in (
            ("input_tokens", usage.input_tokens),
            ("output_tokens", usage.output_tokens),
        ):
            if tokens is not None:
                timings[name] = tokens

    async def _turn(
        self,
        conversation: Conversation,
        incoming: IncomingMessage,
        text: str,
        reply: ReplySink,
        progress: _Progress,
    ) -> TurnResult:
        # Re-read: a reset or a new system prompt may have landed while we waited for the lock.
        conversation = await self.store.get(conversation.id)
        progress.conversation_id = conversation.id
        key = conversation.key
        channel = await self.store.channel_settings(key.platform, key.workspace, key.channel)
        system, variant = await self._system_prompt(conversation, channel.system_prompt, progress)
        choice, _ = resolve_model(self.settings, conversation.model, channel.model)
        try:
            progress.provider, progress.model = self._provider_for(choice)
        except ConfigError as error:
            log.error("conversation %s: model %s: %s", conversation.id, choice.qualified, error)
            message = f"The model {choice.name} is not set up here: {error}"
            return await self._failed(progress, reply, message, str(error))
        progress.images, progress.notes = await load_images(
            incoming.attachments,
            choice,
            max_images=self.settings.max_images,
            max_bytes=self.settings.max_image_bytes,
        )
        # A turn taken over from a worker that died may have stored its question already.
        stored = (
            await self.store.turn_question(progress.turn_id)
            if incoming.taken_over and progress.turn_id is not None
            else None
        )
        try:
            question = stored or await self._write(
                "the question",
                lambda: self.store.append(
                    conversation,
                    "user",
                    text,
                    user_id=incoming.user_id,
                    platform_message_ids=[incoming.message_id] if incoming.message_id else (),
                    turn_id=incoming.turn_id,
                ),
            )
        except Exception:
            log.exception("conversation %s: the question could not be saved", conversation.id)
            return await self._failed(progress, reply, UNSAVED_QUESTION, "question not saved")
        progress.question = question
        progress.conversation = conversation
        await self._settle_turn(incoming.turn_id, "answering")
        policy = policy_for(self.settings, channel)
        started = progress.started_at = self._clock()
        try:
            request = await self._generate(policy, conversation, system, reply, progress)
        except ContextOverflowError as error:
            log.error("conversation %s: %s", conversation.id, error)
            prefix = self.commands.help_styles.get(key.platform, HelpStyle()).prefix
            limit = error.limit or self._context_tokens()
            message = overflow_failure(
                limit, command_prefix=prefix, suggest=_suggested_tokens(limit)
            )
            return await self._failed(progress, reply, message, str(error))
        except ProviderError as error:
            message = self._failure_message(error, conversation)
            return await self._failed(progress, reply, message, str(error))
        except Exception as error:
            log.exception("conversation %s: the turn failed unexpectedly", conversation.id)
            return await self._failed(progress, reply, UNEXPECTED_FAILURE, repr(error))
        answer = "".join(progress.parts)
        if not answer.strip():
            return await self._failed(progress, reply, EMPTY_ANSWER, "empty answer")
        outcome = _Outcome(answer, request, started, variant)
        return await self._deliver(conversation, reply, progress, outcome, policy)

    async def _system_prompt(
        self, conversation: Conversation, channel_prompt: str | None, progress: _Progress
    ) -> tuple[str, str]:
        """The turn's system prompt and its source (or experiment variant), kept in
        ``progress`` for the reply's exposure."""
        default = await self.store.deployment_setting(DEPLOYMENT_SYSTEM_PROMPT)
        system, source = system_prompt_for(self.settings, conversation, channel_prompt, default)
        assignment = await experiment_prompt(self.store, conversation, channel_prompt)
        if assignment is not None:
            system, source = assignment.prompt, assignment.variant
        progress.system, progress.assignment = system, assignment
        return system, source

    async def _generate(
        self,
        policy: HistoryPolicy,
        conversation: Conversation,
        system: str,
        reply: ReplySink,
        progress: _Progress,
    ) -> _Request:
        """Stream an answer into ``reply``; once more with a window that fits on an overflow."""
        request = await self._request(policy, conversation, system, self._context_tokens())
        try:
            await self._stream(request, reply, progress, conversation.id)
            return request
        except ContextOverflowError as error:
            limit = error.limit or self._context_tokens()
            if limit is None:
                raise
            if error.limit is not None and error.limit != self._learned_context:
                # Later turns fit from the start instead of failing once each.
                self._learned_context = error.limit
                log.warning(
                    "the model's context is %d tokens (its server says so); set "
                    "MODEL_CONTEXT_TOKENS=%d to keep requests within it from the start",
                    error.limit,
                    error.limit,
                )
            if error.requested is not None:
                # The server counted the request: our estimate learns from it.
                sent = request.window
                policy.counter.observe(raw_estimate(sent.system, sent.messages), error.requested)
            fitted = await self._request(policy, conversation, system, limit, force=True)
            log.info(
                "conversation %s: the request did not fit a %d-token context; retrying with %s",
                conversation.id,
                limit,
                fitted.window.describe(),
            )
            await self._stream(fitted, reply, progress, conversation.id)
            return fitted

    async def _request(
        self,
        policy: HistoryPolicy,
        conversation: Conversation,
        system: str,
        context_tokens: int | None,
        *,
        force: bool = False,
    ) -> _Request:
        """The window and reply limit to send: within ``context_tokens`` when it is known."""
        window = await policy.load(self.store, conversation, system=system)
        max_reply = self.settings.max_reply_tokens
        if context_tokens is None:
            return _Request(window, max_reply)
        room = context_tokens - _context_margin(context_tokens)
        reserve = min(max_reply, room // 2)
        if force or window.tokens > room - reserve:
            window = await _fitting(policy, room, reserve).load(
                self.store, conversation, system=system
            )
        # A server that counts the answer's room against the context too (OpenAI) must be asked
        # for no more than is left.
        return _Request(window, max(1, min(max_reply, room - window.tokens)), context_tokens)

    async def _stream(
        self, request: _Request, reply: ReplySink, progress: _Progress, conversation_id: int
    ) -> None:
        """One request under the retry policy; the text goes to ``reply`` and ``progress``."""
        try:
            await self._stream_once(request, reply, progress, conversation_id)
        except ImagesRefusedError as error:
            if not progress.images:
                raise
            # The model cannot see (a MODELS entry marked :vision that is not): answer the
            # question without its images, and say so after the answer.
            log.warning("conversation %s: %s; asking again without images", conversation_id, error)
            names = [image.name for image in progress.images]
            _, model = self._answering(progress)
            progress.notes.append(images_refused_note(names, model))
            progress.images = ()
            await self._stream_once(request, reply, progress, conversation_id)

    async def _stream_once(
        self, request: _Request, reply: ReplySink, progress: _Progress, conversation_id: int
    ) -> None:
        """One request with the turn's images (if any) under the retry policy."""
        parts = progress.parts
        provider, model = self._answering(progress)
        messages = _with_images(request.window.messages, progress.images)

        async def on_retry(attempt: int, wait: float, error: TransientProviderError) -> None:
            self.metrics.provider_retry(error)
            log.warning(
                "conversation %s: provider attempt %d failed (%s); retrying in %.1fs",
                conversation_id,
                attempt,
                error,
                wait,
            )
            shown = bool(parts)
            # The reply drops the partial text now: a stop while waiting keeps nothing of it.
            parts.clear()
            if shown or wait >= SILENT_RETRY_MAX_WAIT:
                await reply.retrying(_retry_notice(attempt, self.retry.max_attempts, wait, error))

        async for attempt in self.retry.attempts(on_retry):
            with attempt:
                parts.clear()
                progress.usage = Usage()
                started = self._clock()
                # This attempt's first token (``progress.first_token_at`` is the turn's first).
                first: float | None = None
                try:
                    async for delta in provider.stream(
                        messages,
                        system=request.window.system,
                        max_tokens=request.max_tokens,
                        usage=progress.usage,
                        model=model,
                    ):
                        if first is None:
                            first = self._clock()
                            progress.first_token_at = progress.first_token_at or first
                        parts.append(delta)
                        reply.write(delta)
                except Exception as error:
                    self._model_call(progress, started, first, error)
                    raise
                else:
                    self._model_call(progress, started, first, None)
                finally:
                    # A failed or stopped attempt used tokens too.
                    progress.tally.add(
                        progress.usage,
                        sent_tokens=request.window.tokens,
                        shown="".join(parts),
                        counter=counter_for(self.settings),
                    )

    async def _deliver(
        self,
        conversation: Conversation,
        reply: ReplySink,
        progress: _Progress,
        outcome: _Outcome,
        policy: HistoryPolicy,
    ) -> TurnResult:
        """Land the final text (with a note when it was cut) and store the answer."""
        usage = progress.usage
        cut = usage.cut_at_limit
        notes = list(progress.notes)
        if cut:
            notes.insert(
                0,
                cut_note(
                    outcome.request.max_tokens,
                    setting_limit=self.settings.max_reply_tokens,
                    context_tokens=outcome.request.context_tokens,
                ),
            )
        note = "\n".join(notes) or None
        message_ids: list[str] = []
        try:
            message_ids = await reply.finish(note)
        except SurfaceError as error:
            # The platform stayed down; the answer is still kept so the conversation goes on.
            log.error(
                "conversation %s: the final text could not be shown: %s", conversation.id, error
            )
        finished = self._clock()
        first = progress.first_token_at
        progress.closing = True

        stored: StoredMessage | None = None

        async def keep() -> None:
            nonlocal stored
            note: str | None
            # The answer and the turn's outcome, stored as one step that a cancellation (a
            # shutdown just after the final edit) cannot split: else the next start would take
            # the finished turn over and answer it again.
            try:
                stored = await self._write(
                    "the answer",
                    lambda: self.store.append(
                        conversation,
                        "assistant",
                        outcome.answer,
                        platform_message_ids=message_ids,
                        input_tokens=usage.input_tokens,
                        output_tokens=usage.output_tokens,
                        first_token_ms=None if first is None else _ms(first - outcome.started),
                        duration_ms=_ms(finished - outcome.started),
                        model=self._label(progress)[:200],
                        prompt_variant=outcome.variant,
                        status="cut" if cut else None,
                        finish_reason=usage.finish_reason,
                        turn_id=progress.turn_id,
                    ),
                )
            except Exception:
                log.exception(
                    "conversation %s: the answer was shown but could not be saved", conversation.id
                )
                with contextlib.suppress(SurfaceError):
                    await reply.amend(UNSAVED_ANSWER_NOTE)
                note = "the answer could not be saved"
            else:
                note = "cut at the reply limit" if cut else None
            await self._settle_turn(
                progress.turn_id, "answered", finish_reason=usage.finish_reason, note=note
            )

        progress.keeping = asyncio.ensure_future(keep())
        await asyncio.shield(progress.keeping)
        self._ended(progress, "answered")
        self._in_background(policy.after_turn(self.store, conversation, self.provider))
        return TurnResult(
            "answered",
            outcome.answer,
            message_ids,
            conversation.id,
            progress.timings,
            reply_id=None if stored is None else stored.id,
        )

    async def _failed(
        self, progress: _Progress, reply: ReplySink, message: str, detail: str
    ) -> TurnResult:
        """End a failed turn: its question is never sent again, and the user reads ``message``."""
        progress.closing = True
        question = progress.question
        if question is not None:
            await self._quietly(
                "the failed question's status",
                lambda: self.store.set_message_status(question.id, "failed"),
            )
        await reply.fail(message)
        await self._settle_turn(progress.turn_id, "failed", note=detail)
        self._ended(progress, "failed")
        return TurnResult(
            "failed", message, conversation_id=progress.conversation_id, timings=progress.timings
        )

    async def _record_stop(self, progress: _Progress, note: str, *, interrupted: bool) -> None:
        """A cancelled turn keeps what it showed, so roles alternate and nothing is asked twice."""
        if progress.closing:
            # The turn's outcome was being recorded when it was cancelled: let it land.
            if progress.keeping is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(progress.keeping)
            return
        question, conversation = progress.question, progress.conversation
        if question is not None and conversation is not None:
            shown = "".join(progress.parts)
            status: MessageStatus = "interrupted" if interrupted else "stopped"
            if shown.strip():
                usage = progress.usage
                await self._quietly(
                    "the stopped answer",
                    lambda: self.store.append(
                        conversation,
                        "assistant",
                        shown,
                        output_tokens=usage.output_tokens,
                        model=self._label(progress)[:200],
                        status=status,
                        turn_id=progress.turn_id,
                    ),
                )
            else:
                await self._quietly(
                    "the stopped question's status",
                    lambda: self.store.set_message_status(question.id, "failed"),
                )
        outcome: TurnStatus = "interrupted" if interrupted else "stopped"
        self._ended(progress, outcome)
        await self._settle_turn(progress.turn_id, outcome, note=note)

    async def _write(self, what: str, write: Callable[[], Awaitable[_T]]) -> _T:
        """A write that matters, retried briefly when the database fails in passing."""
        return await retry_write(write, what=what, sleep=self._sleep)

    async def _quietly(self, what: str, write: Callable[[], Awaitable[object]]) -> None:
        """A write that matters, retried; if it still fails the turn goes on (logged)."""
        try:
            await self._write(what, write)
        except Exception:
            log.exception("could not save %s", what)

    async def _settle_turn(
        self,
        turn_id: int | None,
        status: TurnStatus,
        *,
        finish_reason: str | None = None,
        note: str | None = None,
    ) -> None:
        """Record a turn's progress or outcome on its durable record, when it has one."""
        if turn_id is None:
            return

        def record() -> Awaitable[None]:
            return self.store.update_turn(
                turn_id,
                status=status,
                finish_reason=finish_reason,
                note=None if note is None else note[:MAX_TURN_NOTE_CHARS],
            )

        try:
            await self._write(f"turn {turn_id}'s status", record)
        except Exception as error:
            if status in ("received", "answering"):
                log.error("could not save turn %s's status %s: %s", turn_id, status, error)
                return
            # The outcome must land before the turn's lease lapses, or a live worker would take
            # the finished turn over and answer it again: keep trying while the database is down.
            log.error("turn %s's outcome (%s) not saved yet (%s); retrying", turn_id, status, error)
            self._in_background(self._settle_later(turn_id, record))

    async def _settle_later(self, turn_id: int, record: Callable[[], Awaitable[None]]) -> None:
        """Record a turn's outcome once the database answers again (bounded, then logged)."""
        deadline = self._clock() + OUTCOME_RETRY_SECONDS
        while self._clock() < deadline:
            await asyncio.sleep(OUTCOME_RETRY_INTERVAL_SECONDS)
            try:
                await record()
            except Exception:
                continue
            log.info("turn %s's outcome saved after the database came back", turn_id)
            return
        log.error("turn %s's outcome could not be saved; recovery may answer it again", turn_id)

    def _provider_for(self, choice: ModelChoice) -> tuple[Provider, str]:
        """The provider that answers with ``choice`` and the model to ask it for: the engine's
        own for the deployment's default; else one per provider, built once and kept."""
        if choice == default_choice(self.settings):
            return self.provider, self.provider.model
        if choice.provider == self.provider.name:
            return self.provider, choice.model
        provider = self._providers.get(choice.provider)
        if provider is None:
            provider = build_provider(self.settings.with_overrides(llm_provider=choice.provider))
            self._providers[choice.provider] = provider
        return provider, choice.model

    def _answering(self, progress: _Progress) -> tuple[Provider, str]:
        """The provider and model of ``progress``'s turn (the default until it is resolved)."""
        if progress.provider is None or progress.model is None:
            return self.provider, self.provider.model
        return progress.provider, progress.model

    def _label(self, progress: _Progress) -> str:
        """What the turn's answer is recorded as coming from (``openai (gpt-4.1-mini)``)."""
        provider, model = self._answering(progress)
        return provider.label_for(model)

    def _context_tokens(self) -> int | None:
        """The model's context window: the setting, else what its server said before."""
        return self.settings.model_context_tokens or self._learned_context

    def _failure_message(self, error: ProviderError, conversation: Conversation) -> str:
        if isinstance(error, ProviderAuthError):
            log.error(
                "conversation %s: %s: the provider refused the key; check %s",
                conversation.id,
                error,
                error.setting,
            )
        elif isinstance(error, TransientProviderError):
            log.error(
                "conversation %s: provider still failing after %d attempts: %s",
                conversation.id,
                self.retry.max_attempts,
                error,
            )
        else:
            log.error(
                "conversation %s: the provider refused the request: %s", conversation.id, error
            )
        return failure_message(error, self.retry.max_attempts)

    def _prune_events_now_and_then(self) -> None:
        # The dedupe table would otherwise grow by a row per message for ever.
        now = self._clock()
        if self._last_prune is None or now - self._last_prune >= EVENT_PRUNE_INTERVAL:
            self._last_prune = now
            self._in_background(self.store.prune_events())

    def _in_background(self, coroutine: object) -> None:
        async def guarded() -> None:
            try:
                await coroutine  # type: ignore[misc]
            except Exception:
                log.exception("background upkeep failed")

        task = asyncio.create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _say(self, reply: ReplySink, text: str) -> None:
        """A whole reply at once (a hint, a refusal)."""
        await reply.begin()
        reply.write(text)
        await reply.finish()

    # -- conversations and commands ------------------------------------------------------------

    async def knows(self, key: ConversationKey) -> bool:
        """Whether the bot has a conversation at ``key`` (so a thread continues without a mention)."""
        return await self.store.find(key) is not None

    async def context(self, key: ConversationKey) -> Window | None:
        """The window the next request at ``key`` would start from (without a new message)."""
        conversation = await self.store.find(key)
        if conversation is None:
            return None
        channel = await self.store.channel_settings(key.platform, key.workspace, key.channel)
        default = await self.store.deployment_setting(DEPLOYMENT_SYSTEM_PROMPT)
        system, _ = system_prompt_for(self.settings, conversation, channel.system_prompt, default)
        return await policy_for(self.settings, channel).load(
            self.store, conversation, system=system
        )

    # -- stop ------------------------------------------------------------------------------------

    def answering(self, conversation_id: int) -> bool:
        """Whether this process is answering in ``conversation_id`` now (its turn has begun
        the model's work, holding the conversation)."""
        return conversation_id in self._active

    async def stop(
        self,
        conversation_id: int,
        note: str,
        *,
        turn_id: int | None = None,
        settle: float = STOP_SETTLE_SECONDS,
    ) -> bool:
        """Stop the answer this process is streaming in ``conversation_id`` (only if it is
        turn ``turn_id``, when given): the reply keeps what it showed, with ``note`` after it,
        and the answer is stored as shown with status ``stopped`` (the turn's outcome too).

        Waits up to ``settle`` seconds for that to be recorded. True when an answer was
        streaming (also while a stop of it is under way); False when none was, or it was
        already complete (being saved). The turn's ``handle`` then returns a ``cancelled``
        result rather than raising.
        """
        task = self._active.get(conversation_id)
        progress = None if task is None else self._progress.get(task)
        if task is None or progress is None or task is asyncio.current_task():
            return False
        if progress.closing or (turn_id is not None and progress.turn_id != turn_id):
            return False
        if task not in self._stopping:
            self._stopping.add(task)
            self._cancel_notes[task] = note
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(progress.settled.wait(), settle)
        return True


def _with_images(messages: list[ChatMessage], images: tuple[ImagePart, ...]) -> list[ChatMessage]:
    """``messages`` with ``images`` on the last one (the turn's question) when there are any."""
    if not images or not messages or messages[-1].role != "user":
        return messages
    last = messages[-1]
    return [*messages[:-1], ChatMessage(last.role, last.content, last.images + images)]


def _context_margin(context_tokens: int) -> int:
    return max(MIN_CONTEXT_MARGIN_TOKENS, int(context_tokens * CONTEXT_MARGIN_SHARE))


def _fitting(policy: HistoryPolicy, room: int, reserve: int) -> HistoryPolicy:
    """``policy``'s kind of window (a summary stays in), within ``room`` less ``reserve``."""
    if isinstance(policy, SummaryPolicy):
        return SummaryPolicy(room, reserve, policy.counter)
    return TokenBudgetPolicy(room, reserve, policy.counter)


def _suggested_tokens(context_tokens: int | None) -> int:
    """A ``history tokens`` / ``history summary`` figure that fits the context (0: unknown)."""
    if context_tokens is None:
        return 0
    room = context_tokens - _context_margin(context_tokens)
    return max(HISTORY_TOKENS_MIN, room // 100 * 100)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _in_seconds(wait: float) -> str:
    return "in a moment" if wait < 1.5 else f"in {wait:.0f} s"


def _retry_notice(
    attempt: int, max_attempts: int, wait: float, error: TransientProviderError
) -> str:
    return (
        f"_The model stopped answering ({plain_reason(error)}). "
        f"Retrying {_in_seconds(wait)} (attempt {attempt + 1} of {max_attempts})…_"
    )
