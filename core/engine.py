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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from core.commands import (
    ChannelTarget,
    Command,
    CommandRunner,
    parse_command,
    system_prompt_for,
)
from core.config import Settings
from core.conversation import ConversationKey, IncomingMessage, Usage
from core.errors import (
    ProviderAuthError,
    ProviderError,
    SurfaceError,
    TransientProviderError,
)
from core.history import Window, policy_for
from core.providers import build_provider
from core.providers.base import Provider
from core.reply import ReplySink
from core.retry import RetryPolicy
from core.store import Conversation, ConversationStore
from core.store import TurnStatus as RecordStatus

log = logging.getLogger(__name__)

TurnStatus = Literal["answered", "duplicate", "command", "rejected", "failed", "cancelled"]

#: How often processed platform events older than any redelivery are forgotten (seconds).
EVENT_PRUNE_INTERVAL = 3600.0
#: A retry before any token was shown stays silent when its wait is shorter than this (seconds).
SILENT_RETRY_MAX_WAIT = 2.0

EMPTY_MESSAGE_HINT = (
    "Ask me something after the mention, for example “summarise this thread” or "
    "“how do I undo my last git commit?”. Say `help` to see the commands."
)
CANCELLED_DEFAULT = "Stopped before the answer was complete."


@dataclass(slots=True)
class TurnResult:
    """What became of one incoming message."""

    status: TurnStatus
    text: str = ""
    message_ids: list[str] = field(default_factory=list)
    conversation_id: int | None = None


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
    ) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        self.retry = retry or RetryPolicy(max_attempts=settings.max_retry_attempts)
        self._clock = clock
        # Orders turns of one conversation in this process in arrival order: taken before the
        # first await of a turn (asyncio locks are FIFO).
        self._key_locks: dict[ConversationKey, asyncio.Lock] = {}
        self._key_waiters: dict[ConversationKey, int] = {}
        self._active: dict[int, asyncio.Task[object]] = {}
        # Every turn whose reply has begun, also while it waits for the conversation's lock.
        self._begun: set[asyncio.Task[object]] = set()
        self._cancel_notes: dict[asyncio.Task[object], str] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._last_prune: float | None = None
        self.commands = CommandRunner(settings, store, self._stop_turn)

    @classmethod
    async def create(cls, settings: Settings, *, provider: Provider | None = None) -> ChatEngine:
        """Open the store named by ``DATABASE_URL`` (applying migrations) and build the provider."""
        provider = provider or build_provider(settings)
        store = await ConversationStore.open(settings.database_url)
        return cls(settings, store, provider)

    async def close(self) -> None:
        """Wait briefly for background upkeep, then release the provider and the store."""
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        for task in self._background:
            task.cancel()
        await self.provider.aclose()
        await self.store.close()

    def _stop_turn(self, conversation_id: int, note: str) -> None:
        """Cancel the turn answering in ``conversation_id`` (a reset), showing ``note``."""
        active = self._active.get(conversation_id)
        if active is not None and active is not asyncio.current_task():
            self._cancel_notes[active] = note
            active.cancel()

    async def run_command(self, command: Command, target: ConversationKey | ChannelTarget) -> str:
        """Do ``command`` (see ``core.commands.CommandRunner``); the answer to show."""
        return await self.commands.run(command, target)

    async def cancel_all(self, note: str) -> None:
        """Cancel every turn in progress (shutdown); each reply shows ``note``."""
        tasks = list(self._begun)
        for task in tasks:
            self._cancel_notes[task] = note
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- turns ---------------------------------------------------------------------------------

    async def handle(self, incoming: IncomingMessage, reply: ReplySink) -> TurnResult:
        """Answer one incoming message into ``reply``. See the module docstring."""
        key = incoming.key
        lock = self._key_locks.get(key)
        if lock is None:
            lock = self._key_locks[key] = asyncio.Lock()
        self._key_waiters[key] = self._key_waiters.get(key, 0) + 1
        try:
            async with lock:
                result = await self._handle_locked(incoming, reply)
        except asyncio.CancelledError:
            if incoming.turn_id is not None:
                # A reset stops the turn; a shutdown interrupts it (another worker may finish it
                # only if it is still open: this records that it ended here).
                await asyncio.shield(self._record_outcome(incoming.turn_id, "interrupted"))
            raise
        finally:
            self._key_waiters[key] -= 1
            if not self._key_waiters[key]:
                del self._key_waiters[key]
                del self._key_locks[key]
        if incoming.turn_id is not None and result.status != "duplicate":
            status: RecordStatus = "failed" if result.status == "failed" else "answered"
            await self._record_outcome(incoming.turn_id, status)
        return result

    async def _record_outcome(self, turn_id: int, status: RecordStatus) -> None:
        try:
            await self.store.update_turn(turn_id, status=status)
        except Exception as error:
            # The answer is out; a turn left open is finished again by recovery at worst.
            log.error("turn %s: its outcome (%s) could not be recorded: %s", turn_id, status, error)

    async def _handle_locked(self, incoming: IncomingMessage, reply: ReplySink) -> TurnResult:
        key = incoming.key
        # A recorded turn's event was claimed at intake, with the record (core.bot.admit).
        claim = incoming.message_id is not None and incoming.turn_id is None
        if claim and not await self.store.claim_event(
            key.platform, f"{key.workspace}:{incoming.message_id}"
        ):
            log.info(
                "dropped a second delivery of %s message %s", key.platform, incoming.message_id
            )
            return TurnResult("duplicate")
        if incoming.message_id is not None:
            self._prune_events_now_and_then()
        text = incoming.text.strip()
        if not text:
            await self._say(reply, EMPTY_MESSAGE_HINT)
            return TurnResult("rejected", EMPTY_MESSAGE_HINT)
        if len(text) > self.settings.max_input_chars:
            refusal = (
                f"Your message is {len(text):,} characters long; I can take at most "
                f"{self.settings.max_input_chars:,}. Please shorten it or split it into parts."
            )
            await self._say(reply, refusal)
            return TurnResult("rejected", refusal)
        if incoming.allow_commands:
            command = parse_command(text)
            if command is not None:
                answer = await self.run_command(command, key)
                await self._say(reply, answer)
                return TurnResult("command", answer)

        await reply.begin()
        task = asyncio.current_task()
        if task is not None:
            self._begun.add(task)  # type: ignore[arg-type]
        try:
            conversation, _ = await self.store.get_or_create(key, seed=incoming.thread_context)
            async with self.store.conversation_lock(conversation.id):
                if task is not None:
                    self._active[conversation.id] = task  # type: ignore[assignment]
                try:
                    return await self._turn(conversation, incoming, text, reply)
                finally:
                    if self._active.get(conversation.id) is task:
                        del self._active[conversation.id]
        except asyncio.CancelledError:
            # Also while queued behind another turn: the reply already shows that it is working.
            note = self._cancel_notes.pop(task, CANCELLED_DEFAULT) if task else CANCELLED_DEFAULT
            with contextlib.suppress(Exception):
                await asyncio.shield(reply.cancel(note))
            raise
        finally:
            if task is not None:
                self._cancel_notes.pop(task, None)
                self._begun.discard(task)  # type: ignore[arg-type]

    async def _turn(
        self, conversation: Conversation, incoming: IncomingMessage, text: str, reply: ReplySink
    ) -> TurnResult:
        # Re-read: a reset or a new system prompt may have landed while we waited for the lock.
        conversation = await self.store.get(conversation.id)
        key = conversation.key
        channel = await self.store.channel_settings(key.platform, key.workspace, key.channel)
        system, variant = system_prompt_for(self.settings, conversation, channel.system_prompt)
        stored = (
            set() if incoming.turn_id is None else await self.store.turn_messages(incoming.turn_id)
        )
        if "user" not in stored:
            # A turn taken over from a worker that died may have stored its question already.
            await self.store.append(
                conversation,
                "user",
                text,
                user_id=incoming.user_id,
                platform_message_ids=[incoming.message_id] if incoming.message_id else (),
                turn_id=incoming.turn_id,
            )
        if incoming.turn_id is not None:
            await self.store.update_turn(incoming.turn_id, status="answering")
        policy = policy_for(self.settings, channel)
        window = await policy.load(self.store, conversation, system=system)

        started = self._clock()
        first_token_at: float | None = None
        usage = Usage()
        parts: list[str] = []

        async def on_retry(attempt: int, wait: float, error: TransientProviderError) -> None:
            log.warning(
                "conversation %s: provider attempt %d failed (%s); retrying in %.1fs",
                conversation.id,
                attempt,
                error,
                wait,
            )
            if parts or wait >= SILENT_RETRY_MAX_WAIT:
                await reply.retrying(_retry_notice(attempt, self.retry.max_attempts, wait, error))

        try:
            async for attempt in self.retry.attempts(on_retry):
                with attempt:
                    parts.clear()
                    usage = Usage()
                    async for delta in self.provider.stream(
                        window.messages,
                        system=window.system,
                        max_tokens=self.settings.max_reply_tokens,
                        usage=usage,
                    ):
                        if first_token_at is None:
                            first_token_at = self._clock()
                        parts.append(delta)
                        reply.write(delta)
        except ProviderError as error:
            message = self._failure_message(error, conversation)
            await reply.fail(message)
            return TurnResult("failed", message, conversation_id=conversation.id)
        except Exception:
            log.exception("conversation %s: the turn failed unexpectedly", conversation.id)
            message = "Something went wrong on my side while answering. Please try again."
            await reply.fail(message)
            return TurnResult("failed", message, conversation_id=conversation.id)

        answer = "".join(parts)
        if not answer.strip():
            message = "The model returned an empty answer. Try rephrasing your question."
            await reply.fail(message)
            return TurnResult("failed", message, conversation_id=conversation.id)
        message_ids: list[str] = []
        try:
            message_ids = await reply.finish()
        except SurfaceError as error:
            # The platform stayed down; the answer is still kept so the conversation goes on.
            log.error(
                "conversation %s: the final text could not be shown: %s", conversation.id, error
            )
        finished = self._clock()
        await self.store.append(
            conversation,
            "assistant",
            answer,
            platform_message_ids=message_ids,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            first_token_ms=None
            if first_token_at is None
            else round((first_token_at - started) * 1000),
            duration_ms=round((finished - started) * 1000),
            model=self.provider.label[:200],
            prompt_variant=variant,
            turn_id=incoming.turn_id,
        )
        self._in_background(policy.after_turn(self.store, conversation, self.provider))
        return TurnResult("answered", answer, message_ids, conversation.id)

    def _failure_message(self, error: ProviderError, conversation: Conversation) -> str:
        if isinstance(error, ProviderAuthError):
            log.error(
                "conversation %s: %s: the provider refused the key; check %s",
                conversation.id,
                error,
                error.setting,
            )
            return (
                "I can't reach the language model: it refused the bot's credentials. "
                f"An administrator needs to check the {error.setting} setting."
            )
        if isinstance(error, TransientProviderError):
            log.error(
                "conversation %s: provider still failing after %d attempts: %s",
                conversation.id,
                self.retry.max_attempts,
                error,
            )
            return (
                f"The language model is not answering right now ({_plain_reason(error)}); "
                f"I tried {self.retry.max_attempts} times. Please try again in a minute."
            )
        log.error("conversation %s: the provider refused the request: %s", conversation.id, error)
        return f"The language model could not answer this: {error}"

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
        system, _ = system_prompt_for(self.settings, conversation, channel.system_prompt)
        return await policy_for(self.settings, channel).load(
            self.store, conversation, system=system
        )


def _plain_reason(error: TransientProviderError) -> str:
    if error.status == 429:
        return "it is rate-limiting us"
    if error.status in (529, 503):
        return "it is overloaded"
    if error.status is not None and error.status >= 500:
        return f"it answered with a server error {error.status}"
    return str(error) or "the connection to it keeps failing"


def _in_seconds(wait: float) -> str:
    return "in a moment" if wait < 1.5 else f"in {wait:.0f} s"


def _retry_notice(
    attempt: int, max_attempts: int, wait: float, error: TransientProviderError
) -> str:
    return (
        f"_The model stopped answering ({_plain_reason(error)}). "
        f"Retrying {_in_seconds(wait)} (attempt {attempt + 1} of {max_attempts})…_"
    )
