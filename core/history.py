"""History policies: which stored messages are sent with the next request.

``policy_for(settings, channel)`` picks the strategy (``HISTORY_STRATEGY``, overridable per
channel):

- ``count``: the newest ``MAX_HISTORY_MESSAGES`` messages.
- ``tokens``: the newest messages that fit ``MAX_HISTORY_TOKENS`` together with the system prompt
  and ``REPLY_RESERVE_TOKENS`` for the answer. A message that does not fit whole is cut in the
  middle with a visible marker (the newest one always, an older one when enough room is left).
- ``summary``: the same window, after a running summary of the older messages, kept in the
  database and sent at the end of the system prompt. When the messages not yet summarised
  outgrow the budget, ``after_turn`` folds the oldest of them into the summary with one short,
  non-streamed request to the provider; the request carries the stored summary and only the
  messages being folded, so each fold extends the summary rather than re-summarising everything.
  Folds only ever look at the rows a window could hold: a long conversation switched to
  ``summary`` starts its summary from its recent messages, not from its very first one.

A policy's ``build`` is a pure function of the stored messages plus settings; ``load`` reads from
the store only the rows ``build`` can use (never a whole long conversation); ``after_turn`` does
slow upkeep and is run by the engine in the background, so it never delays or breaks a reply.

When the budget cannot hold even the system prompt (a long prompt, a small ``MAX_HISTORY_TOKENS``):
the system prompt is sent whole (it is the operator's instruction, and cutting it would change the
bot's behaviour unpredictably) with only the newest user message, cut to at most
``MIN_NEWEST_MESSAGE_TOKENS``; the window is marked ``over_budget`` and a warning names the
settings to change. The request then exceeds ``MAX_HISTORY_TOKENS``, but it can still be answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from core.config import HISTORY_STRATEGIES, Settings
from core.conversation import ChatMessage, Usage
from core.errors import ProviderError
from core.store import ChannelSettings, Conversation, StoredMessage
from core.tokens import (
    MESSAGE_OVERHEAD_TOKENS,
    TokenCounter,
    counter_for,
    estimate_tokens,
    without_cut_markers,
)

if TYPE_CHECKING:
    from core.providers.base import Provider
    from core.store import ConversationStore

log = logging.getLogger(__name__)

#: The newest message is never cut below this many tokens: a question cut shorter is useless.
MIN_NEWEST_MESSAGE_TOKENS = 256
#: An older message that does not fit is sent cut only when at least this much of it fits.
MIN_TRUNCATED_TOKENS = 64
#: Rows read by the first history query of a budgeted window; most windows fit in it. When they
#: all fit and more exist, the next query reads 4 times as many, up to what the budget can hold.
FIRST_FETCH_ROWS = 64

#: Fold when the messages not yet summarised fill this share of their budget ...
FOLD_HIGH_WATER = 0.75
#: ... and fold the oldest until the rest fill at most this share (so folds are not every turn).
FOLD_LOW_WATER = 0.4
#: The newest messages never folded: the last exchange stays word for word.
KEEP_RECENT_MESSAGES = 2
#: A running summary takes at most this share of MAX_HISTORY_TOKENS ...
SUMMARY_BUDGET_SHARE = 1 / 8
#: ... within these bounds, in tokens.
SUMMARY_MIN_TOKENS = 64
SUMMARY_MAX_TOKENS = 1024
#: A fold request carries at most this share of MAX_HISTORY_TOKENS of messages; what is left over
#: is folded on later turns, so one fold never becomes a huge request.
FOLD_INPUT_SHARE = 1.0
#: A fold slower than this is abandoned (the turn already trimmed; it is tried again next turn).
FOLD_TIMEOUT_SECONDS = 45.0
#: When REPLY_RESERVE_TOKENS does not fit in MAX_HISTORY_TOKENS, the reply gets this share of it.
MAX_RESERVE_SHARE = 0.5

# (max_tokens, reply_reserve) pairs already warned about: policies are built every turn.
_reserve_warned: set[tuple[int, int]] = set()

SUMMARY_HEADING = "Summary of the earlier conversation (those messages are not repeated below):"
SUMMARISER_SYSTEM = (
    "You keep a running summary of a chat conversation between a user and an assistant, so "
    "the assistant can continue it without the old messages. Keep facts, names, numbers, "
    "decisions, open questions and what the user wants; drop pleasantries. Write plain prose "
    "or short bullet points, in the conversation's language. Reply with the summary only."
)


@dataclass(frozen=True, slots=True)
class Window:
    """What one request sends: the system prompt (with any summary) and the messages.

    ``tokens`` counts what is sent (system prompt and messages, framing included); ``budget`` is
    what it may use (``MAX_HISTORY_TOKENS`` less the reply reserve; None for ``count``).
    """

    system: str
    messages: list[ChatMessage]
    tokens: int
    summary_included: bool = False
    # Messages loaded but left out, oldest first (what a summary could fold).
    dropped: list[StoredMessage] = field(default_factory=list)
    strategy: str = "count"
    budget: int | None = None
    # How many of ``messages`` were cut to fit, with a visible marker.
    truncated: int = 0
    # The system prompt alone leaves no room: the request exceeds the budget (see module docs).
    over_budget: bool = False
    counted_with: str = "estimate"

    def describe(self) -> str:
        """One line for people: what this window sends."""
        parts = [
            f"{len(self.messages)} message{'' if len(self.messages) == 1 else 's'}",
            f"about {self.tokens:,} tokens"
            + (f" of a {max(0, self.budget):,}-token budget" if self.budget is not None else ""),
            "a summary of older messages included" if self.summary_included else "no summary",
        ]
        if self.truncated:
            parts.append(f"{self.truncated} cut to fit")
        if self.over_budget:
            parts.append("over budget: the system prompt alone leaves no room")
        return f"{'; '.join(parts)} ({self.strategy} strategy, {self.counted_with})"


def _drop_leading_assistant(messages: Sequence[StoredMessage]) -> int:
    # Anthropic rejects a conversation that starts with the assistant.
    start = 0
    while start < len(messages) and messages[start].role == "assistant":
        start += 1
    return start


def raw_estimate(system: str, messages: Sequence[ChatMessage]) -> int:
    """The uncalibrated estimate of a request, to compare with the usage a provider reports."""
    return estimate_tokens(system) + sum(
        estimate_tokens(m.content) + MESSAGE_OVERHEAD_TOKENS for m in messages
    )


@dataclass(frozen=True, slots=True)
class Fit:
    """The newest messages that fit a token budget (see ``fit_newest``)."""

    messages: list[ChatMessage]
    # Index of the first stored message used: ``messages[:start]`` were left out.
    start: int
    tokens: int
    truncated: int


def fit_newest(messages: Sequence[StoredMessage], budget: int, counter: TokenCounter) -> Fit:
    """The newest ``messages`` that fit ``budget`` tokens, oldest first; never led by the assistant.

    The newest message is always kept, cut to fit (never below ``MIN_NEWEST_MESSAGE_TOKENS``); an
    older message that does not fit whole is kept cut when ``MIN_TRUNCATED_TOKENS`` of it fit,
    and nothing older than it is kept.
    """
    kept: list[tuple[int, ChatMessage, bool]] = []  # newest first: (index, message, was cut)
    used = 0
    for index in range(len(messages) - 1, -1, -1):
        stored = messages[index]
        cost = counter.message(stored.content)
        if used + cost <= budget:
            kept.append((index, stored.as_chat(), False))
            used += cost
            continue
        room = budget - used - MESSAGE_OVERHEAD_TOKENS
        if not kept:
            room = max(room, MIN_NEWEST_MESSAGE_TOKENS)
        elif room < MIN_TRUNCATED_TOKENS:
            break
        content = counter.truncate(stored.content, room)
        kept.append((index, ChatMessage(stored.role, content), True))
        used += counter.message(content)
        break
    kept.reverse()
    while kept and kept[0][1].role == "assistant":
        used -= counter.message(kept[0][1].content)
        kept.pop(0)
    start = kept[0][0] if kept else len(messages)
    return Fit(
        messages=[m for _, m, _ in kept],
        start=start,
        tokens=used,
        truncated=sum(1 for _, _, cut in kept if cut),
    )


def plan_fold(
    messages: Sequence[StoredMessage], budget: int, counter: TokenCounter
) -> list[StoredMessage]:
    """The oldest ``messages`` to fold into the summary now (none while they fit comfortably).

    Folds once the messages fill ``FOLD_HIGH_WATER`` of ``budget``, until the rest fill at most
    ``FOLD_LOW_WATER`` of it; the ``KEEP_RECENT_MESSAGES`` newest are never folded and what
    remains starts with a user message.
    """
    if budget <= 0 or len(messages) <= KEEP_RECENT_MESSAGES:
        return []
    costs = [counter.message(m.content) for m in messages]
    if sum(costs) <= budget * FOLD_HIGH_WATER:
        return []
    keep_from = len(messages)
    kept = 0
    while keep_from > 0:
        cost = costs[keep_from - 1]
        recent = len(messages) - keep_from < KEEP_RECENT_MESSAGES
        if not recent and kept + cost > budget * FOLD_LOW_WATER:
            break
        kept += cost
        keep_from -= 1
    # Fold the assistant's answers with the question they answered.
    last_foldable = len(messages) - KEEP_RECENT_MESSAGES
    while keep_from < last_foldable and messages[keep_from].role == "assistant":
        keep_from += 1
    return list(messages[:keep_from])


def fitted_reserve(max_tokens: int, reply_reserve: int) -> int:
    """The reply reserve, shrunk to ``MAX_RESERVE_SHARE`` of ``max_tokens`` when it leaves no room.

    ``REPLY_RESERVE_TOKENS=9000`` with ``MAX_HISTORY_TOKENS=8000`` (or 600 with the default 1024)
    would leave a negative budget; the reply then gets half and one log line names both settings.
    """
    if reply_reserve < max_tokens:
        return reply_reserve
    fitted = int(max_tokens * MAX_RESERVE_SHARE)
    if (max_tokens, reply_reserve) not in _reserve_warned:
        _reserve_warned.add((max_tokens, reply_reserve))
        log.warning(
            "REPLY_RESERVE_TOKENS=%d leaves no room within MAX_HISTORY_TOKENS=%d: reserving %d "
            "tokens for the reply instead; raise MAX_HISTORY_TOKENS or lower REPLY_RESERVE_TOKENS",
            reply_reserve,
            max_tokens,
            fitted,
        )
    return fitted


class HistoryPolicy:
    """Base of the strategies. Subclasses override ``fetch_limit`` and ``build``.

    Contract: ``build`` is pure (stored messages in, ``Window`` out); ``load`` reads a bounded
    number of rows and calls ``build``; ``after_turn`` never raises (it logs) and may be slow.
    The engine makes one policy per turn and calls ``load`` then ``after_turn`` on it.
    """

    name = "base"
    counter: TokenCounter
    # The window ``load`` built: what ``after_turn`` compares with the reported usage.
    _sent: Window | None = None

    def fetch_limit(self) -> int | None:
        """How many of the newest messages ``build`` may use (None: all of them)."""
        return None

    def build(
        self, messages: Sequence[StoredMessage], *, system: str, summary: str | None = None
    ) -> Window:
        raise NotImplementedError

    async def load(
        self, store: ConversationStore, conversation: Conversation, *, system: str
    ) -> Window:
        """Read the rows the window needs and build it."""
        messages = await store.history(
            conversation, limit=self.fetch_limit(), after_id=conversation.summary_upto_id
        )
        window = self.build(messages, system=system, summary=conversation.summary)
        self._sent = window
        return window

    async def after_turn(
        self, store: ConversationStore, conversation: Conversation, provider: Provider
    ) -> None:
        """Learn the provider's token counting from the usage it reported for this turn."""
        try:
            await self._calibrate(store, conversation)
        except Exception:
            log.warning("conversation %s: token calibration failed", conversation.id, exc_info=True)

    async def _calibrate(self, store: ConversationStore, conversation: Conversation) -> None:
        sent = self._sent
        if sent is None or self.counter.exact:
            return
        newest = await store.history(conversation, limit=1)
        if not newest or newest[0].role != "assistant" or not newest[0].input_tokens:
            return
        self.counter.observe(raw_estimate(sent.system, sent.messages), newest[0].input_tokens)


class CountPolicy(HistoryPolicy):
    """The newest ``max_messages`` messages; the oldest are trimmed."""

    name = "count"

    def __init__(self, max_messages: int, counter: TokenCounter | None = None) -> None:
        self.max_messages = max_messages
        self.counter = counter or TokenCounter()

    def fetch_limit(self) -> int | None:
        return self.max_messages

    def build(
        self, messages: Sequence[StoredMessage], *, system: str, summary: str | None = None
    ) -> Window:
        keep = list(messages[-self.max_messages :])
        start = _drop_leading_assistant(keep)
        dropped = list(messages[: len(messages) - len(keep)]) + keep[:start]
        chat = [m.as_chat() for m in keep[start:]]
        tokens = self.counter.count(system) + sum(self.counter.message(m.content) for m in chat)
        return Window(
            system=system,
            messages=chat,
            tokens=tokens,
            dropped=dropped,
            strategy=self.name,
            counted_with=self.counter.name,
        )


class TokenBudgetPolicy(HistoryPolicy):
    """The newest messages that fit ``max_tokens`` with the system prompt and the reply reserve."""

    name = "tokens"

    def __init__(
        self, max_tokens: int, reply_reserve: int, counter: TokenCounter | None = None
    ) -> None:
        self.max_tokens = max_tokens
        self.reply_reserve = fitted_reserve(max_tokens, reply_reserve)
        self.counter = counter or TokenCounter()

    @property
    def budget(self) -> int:
        """Tokens a request may use: ``MAX_HISTORY_TOKENS`` less the room kept for the reply."""
        return self.max_tokens - self.reply_reserve

    def fetch_limit(self) -> int | None:
        # Every message costs at least its framing, so no more than this many can fit (the +1 is
        # a message cut to fit).
        return max(1, self.budget // MESSAGE_OVERHEAD_TOKENS + 1)

    def compose_system(self, system: str, summary: str | None) -> str:
        """The system prompt as sent (this strategy ignores summaries)."""
        return system

    def build(
        self, messages: Sequence[StoredMessage], *, system: str, summary: str | None = None
    ) -> Window:
        full_system = self.compose_system(system, summary)
        system_tokens = self.counter.count(full_system)
        fit = fit_newest(messages, self.budget - system_tokens, self.counter)
        tokens = system_tokens + fit.tokens
        over = tokens > self.budget
        if over:
            log.warning(
                "the system prompt (%d tokens) leaves no room within MAX_HISTORY_TOKENS=%d less "
                "REPLY_RESERVE_TOKENS=%d: sending it with only the newest message; raise "
                "MAX_HISTORY_TOKENS or shorten the system prompt",
                system_tokens,
                self.max_tokens,
                self.reply_reserve,
            )
        return Window(
            system=full_system,
            messages=fit.messages,
            tokens=tokens,
            summary_included=full_system != system,
            dropped=list(messages[: fit.start]),
            strategy=self.name,
            budget=self.budget,
            truncated=fit.truncated,
            over_budget=over,
            counted_with=self.counter.name,
        )

    async def load(
        self, store: ConversationStore, conversation: Conversation, *, system: str
    ) -> Window:
        """Read the newest rows, a page at a time, until the budget is filled or none are left."""
        messages = await self._newest(store, conversation)
        window = self.build(messages, system=system, summary=conversation.summary)
        self._sent = window
        return window

    async def _newest(
        self, store: ConversationStore, conversation: Conversation
    ) -> list[StoredMessage]:
        bound = self.fetch_limit() or 1
        limit = min(bound, FIRST_FETCH_ROWS)
        while True:
            rows = await store.history(
                conversation, limit=limit, after_id=conversation.summary_upto_id
            )
            if len(rows) < limit or limit >= bound:
                return rows
            if sum(self.counter.message(m.content) for m in rows) > self.budget:
                return rows
            limit = min(bound, limit * 4)


class SummaryPolicy(TokenBudgetPolicy):
    """A running summary of the older messages, then the newest that fit (see module docs)."""

    name = "summary"

    #: Conversations with a fold running in this process: a second one waits for a later turn.
    _folding: ClassVar[set[int]] = set()

    def __init__(
        self,
        max_tokens: int,
        reply_reserve: int,
        counter: TokenCounter | None = None,
        *,
        fold_timeout: float = FOLD_TIMEOUT_SECONDS,
    ) -> None:
        super().__init__(max_tokens, reply_reserve, counter)
        self.fold_timeout = fold_timeout
        self._system = ""

    @property
    def summary_tokens(self) -> int:
        """The most tokens a stored summary may take."""
        share = int(self.max_tokens * SUMMARY_BUDGET_SHARE)
        return max(SUMMARY_MIN_TOKENS, min(SUMMARY_MAX_TOKENS, share))

    def compose_system(self, system: str, summary: str | None) -> str:
        # The summary goes after the operator's prompt rather than in a leading message: a user
        # message would put the bot's own notes in the user's mouth and, followed by the user's
        # real message, break the alternation Anthropic expects; at the end of the system
        # prompt, the prompt's unchanged start stays cacheable by the provider.
        if not summary:
            return system
        return f"{system}\n\n{SUMMARY_HEADING}\n{summary}"

    async def load(
        self, store: ConversationStore, conversation: Conversation, *, system: str
    ) -> Window:
        self._system = system
        return await super().load(store, conversation, system=system)

    def fold_budget(self, system: str) -> int:
        """Tokens the unsummarised messages may take once the summary is at its largest."""
        with_summary = self.counter.count(self.compose_system(system, "x")) + self.summary_tokens
        return self.budget - with_summary

    async def after_turn(
        self, store: ConversationStore, conversation: Conversation, provider: Provider
    ) -> None:
        """Fold the oldest messages into the summary when they outgrow the budget; never raises."""
        await super().after_turn(store, conversation, provider)
        if conversation.id in self._folding:
            return
        self._folding.add(conversation.id)
        try:
            await self._fold(store, conversation.id, provider)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            log.warning(
                "conversation %s: the summary took over %.0fs; trimming instead, will retry",
                conversation.id,
                self.fold_timeout,
            )
        except Exception as error:
            log.warning(
                "conversation %s: the summary failed (%s); trimming instead, will retry",
                conversation.id,
                error,
                exc_info=not isinstance(error, ProviderError),
            )
        finally:
            self._folding.discard(conversation.id)

    async def _fold(
        self, store: ConversationStore, conversation_id: int, provider: Provider
    ) -> None:
        # Fresh: a reset or another fold may have landed since the turn began.
        conversation = await store.get(conversation_id)
        messages = await self._newest(store, conversation)
        folded = plan_fold(messages, self.fold_budget(self._system), self.counter)
        if not folded:
            return
        folded = self._cap_fold(folded)
        usage = Usage()
        summary = await asyncio.wait_for(
            provider.complete(
                [ChatMessage("user", self._fold_request(conversation.summary, folded))],
                system=SUMMARISER_SYSTEM,
                max_tokens=self.summary_tokens,
                usage=usage,
            ),
            timeout=self.fold_timeout,
        )
        if usage.cut_at_limit:
            # A summary cut mid-sentence would be stored as if whole, and the messages it
            # covers dropped for good.
            log.warning(
                "conversation %s: the summary was cut at %d tokens; not stored, will retry",
                conversation.id,
                self.summary_tokens,
            )
            return
        # The model may echo a cut marker from the transcript: it is not part of a summary.
        summary = without_cut_markers(summary)
        if not summary:
            log.warning("conversation %s: the summary came back empty; will retry", conversation.id)
            return
        summary = self.counter.clip(summary, self.summary_tokens)
        if not summary:
            log.warning("conversation %s: the summary did not fit; will retry", conversation.id)
            return
        stored = await store.replace_summary(
            conversation.id,
            generation=conversation.generation,
            previous_upto_id=conversation.summary_upto_id,
            summary=summary,
            upto_id=folded[-1].id,
        )
        if stored:
            log.info(
                "conversation %s: folded %d messages into the summary (now %d tokens)",
                conversation.id,
                len(folded),
                self.counter.count(summary),
            )
        else:
            log.info(
                "conversation %s: reset or summarised meanwhile; fold dropped", conversation.id
            )

    def _cap_fold(self, folded: list[StoredMessage]) -> list[StoredMessage]:
        limit = int(self.max_tokens * FOLD_INPUT_SHARE)
        total = 0
        for index, message in enumerate(folded):
            total += self.counter.message(message.content)
            if total > limit and index > 0:
                return folded[:index]
        return folded

    def _fold_request(self, summary: str | None, folded: Sequence[StoredMessage]) -> str:
        # One message larger than a fold's share is cut like any other over-long message.
        share = int(self.max_tokens * FOLD_INPUT_SHARE)
        lines = [
            f"{'User' if m.role == 'user' else 'Assistant'}: {self.counter.truncate(m.content, share)}"
            for m in folded
        ]
        transcript = "\n\n".join(lines)
        words = max(30, int(self.summary_tokens * 0.6))
        return (
            f"Summary so far:\n{summary or '(none yet)'}\n\n"
            f"Messages that follow it:\n{transcript}\n\n"
            f"Write the updated summary, covering both, in at most {words} words."
        )


@dataclass(frozen=True, slots=True)
class HistorySetting:
    """A channel's effective history setting: its own choices over the deployment's defaults.

    ``own`` says whether the channel chose its strategy (else the deployment's applies).
    """

    strategy: str
    max_messages: int
    max_tokens: int
    own: bool

    def describe(self) -> str:
        """What each request sends, in words."""
        if self.strategy == "count":
            return f"the newest {self.max_messages} messages"
        if self.strategy == "tokens":
            return f"the newest messages that fit {self.max_tokens:,} tokens"
        return (
            "a running summary of older messages plus the newest that fit "
            f"{self.max_tokens:,} tokens"
        )


def effective_history(settings: Settings, channel: ChannelSettings | None = None) -> HistorySetting:
    """The history setting in force in ``channel`` (the one home of that rule)."""
    channel = channel or ChannelSettings()
    strategy = channel.history_strategy or settings.history_strategy
    if strategy not in HISTORY_STRATEGIES:
        log.warning(
            "channel history strategy %r is not one of %s; using HISTORY_STRATEGY=%s",
            strategy,
            ", ".join(HISTORY_STRATEGIES),
            settings.history_strategy,
        )
        strategy = settings.history_strategy
    return HistorySetting(
        strategy,
        channel.max_history_messages or settings.max_history_messages,
        channel.max_history_tokens or settings.max_history_tokens,
        own=channel.history_strategy is not None,
    )


def policy_for(settings: Settings, channel: ChannelSettings | None = None) -> HistoryPolicy:
    """The history policy for a conversation, from deployment settings and channel overrides."""
    setting = effective_history(settings, channel)
    counter = counter_for(settings)
    if setting.strategy == "count":
        return CountPolicy(setting.max_messages, counter)
    if setting.strategy == "tokens":
        return TokenBudgetPolicy(setting.max_tokens, settings.reply_reserve_tokens, counter)
    return SummaryPolicy(setting.max_tokens, settings.reply_reserve_tokens, counter)
