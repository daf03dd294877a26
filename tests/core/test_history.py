"""History policies: count, token budget and running summary, pure and against a real store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import core.history as history_module
from core.config import Settings
from core.conversation import ChatMessage, ConversationKey, Role, Usage
from core.errors import TransientProviderError
from core.history import (
    FIRST_FETCH_ROWS,
    FOLD_LOW_WATER,
    KEEP_RECENT_MESSAGES,
    MIN_NEWEST_MESSAGE_TOKENS,
    SUMMARY_HEADING,
    CountPolicy,
    SummaryPolicy,
    TokenBudgetPolicy,
    Window,
    plan_fold,
    policy_for,
    raw_estimate,
)
from core.providers.base import Provider
from core.providers.offline import OfflineProvider
from core.providers.openai import OpenAIProvider
from core.store import Conversation, ConversationStore, StoredMessage
from core.tokens import MESSAGE_OVERHEAD_TOKENS, TRUNCATION_MARKER, TokenCounter
from tests.wire.llm_server import FakeLLMServer, answer, cut_at_limit

SYSTEM = "You are a helpful assistant."
KEY = ConversationKey("test", "w", "c", "t")
# 360 letters: 100 estimated tokens, 104 as a message (also as "m12 " and the rest of it: the
# space is free and the digits count as letters).
FILLER = ("loremipsumdolorsitamet" * 17)[:360]


def stored(*turns: tuple[Role, str]) -> list[StoredMessage]:
    now = datetime.now(UTC)
    return [StoredMessage(i + 1, role, text, now) for i, (role, text) in enumerate(turns)]


def alternating(count: int, text: str = FILLER) -> list[StoredMessage]:
    roles: tuple[Role, Role] = ("user", "assistant")
    return stored(*((roles[i % 2], f"m{i} {text}"[: len(text)]) for i in range(count)))


def tokens_policy(max_tokens: int = 2000, reserve: int = 500) -> TokenBudgetPolicy:
    return TokenBudgetPolicy(max_tokens, reserve, TokenCounter())


# -- count -------------------------------------------------------------------------------------


def test_count_keeps_the_newest_and_never_starts_with_the_assistant() -> None:
    policy = CountPolicy(3, TokenCounter())
    window = policy.build(alternating(6), system=SYSTEM)
    assert [m.content[:3] for m in window.messages] == ["m4 ", "m5 "]
    assert [m.id for m in window.dropped] == [1, 2, 3, 4]
    assert window.tokens == TokenCounter().count(SYSTEM) + 2 * 104


def test_count_with_no_history_sends_only_the_system_prompt() -> None:
    window = CountPolicy(20, TokenCounter()).build([], system=SYSTEM)
    assert window.messages == []
    assert window.tokens == TokenCounter().count(SYSTEM)
    assert not window.summary_included


# -- tokens ------------------------------------------------------------------------------------


def test_tokens_with_no_history_sends_only_the_system_prompt() -> None:
    window = tokens_policy().build([], system=SYSTEM)
    assert window.messages == []
    assert window.tokens == TokenCounter().count(SYSTEM)
    assert not window.over_budget
    assert window.budget == 1500


def test_tokens_keeps_the_newest_messages_that_fit_with_the_reply_reserve() -> None:
    messages = alternating(40)
    window = tokens_policy(2000, 500).build(messages, system=SYSTEM)
    # 1500 - 8 (system) leaves room for 14 whole messages of 104 tokens, and 36 for no cut one.
    assert len(window.messages) == 14
    assert [m.content for m in window.messages] == [m.content for m in messages[-14:]]
    assert window.tokens + 500 <= 2000
    assert window.truncated == 0
    assert window.messages[0].role == "user"
    assert [m.id for m in window.dropped] == list(range(1, 27))


def test_tokens_cuts_one_huge_newest_message_instead_of_dropping_or_sending_it() -> None:
    huge = "BEGIN " + "word " * 20_000 + "what do you think?"
    window = tokens_policy(2000, 500).build(
        stored(("user", "hi"), ("assistant", "hello"), ("user", huge)), system=SYSTEM
    )
    assert len(window.messages) == 1
    sent = window.messages[0].content
    assert sent.startswith("BEGIN")
    assert sent.endswith("what do you think?")
    assert "characters cut here to fit the history token budget" in sent
    assert window.truncated == 1
    assert window.tokens <= 1500
    assert not window.over_budget


def test_tokens_cuts_an_older_huge_message_to_the_room_left() -> None:
    huge = "PASTE " + "data " * 5000
    window = tokens_policy(2000, 500).build(
        stored(("user", huge), ("assistant", "That is a log."), ("user", "Why did it fail?")),
        system=SYSTEM,
    )
    assert [m.role for m in window.messages] == ["user", "assistant", "user"]
    assert window.messages[0].content.startswith("PASTE")
    assert "characters cut here" in window.messages[0].content
    assert window.truncated == 1
    assert 1400 < window.tokens <= 1500


def test_tokens_drops_an_older_message_when_too_little_of_it_would_fit() -> None:
    messages = alternating(16)  # 14 fit whole; 1500 - 8 - 14*104 = 36 left: under the minimum
    window = tokens_policy(2000, 500).build(messages, system=SYSTEM)
    assert window.truncated == 0
    assert len(window.messages) == 14


def test_tokens_budget_smaller_than_the_system_prompt() -> None:
    system = "Always answer in formal English. " * 400  # ~3,772 tokens, budget is 1,500
    question = "Q " + "please explain " * 400
    window = tokens_policy(2000, 500).build(
        stored(("user", "earlier"), ("assistant", "answer"), ("user", question)), system=system
    )
    assert window.system == system  # the operator's prompt is never cut
    assert len(window.messages) == 1
    assert window.messages[0].content.startswith("Q ")
    assert "characters cut here" in window.messages[0].content
    counter = TokenCounter()
    assert counter.message(window.messages[0].content) <= (
        MIN_NEWEST_MESSAGE_TOKENS + MESSAGE_OVERHEAD_TOKENS
    )
    assert window.over_budget
    assert "over budget" in window.describe()


@pytest.mark.parametrize(("max_tokens", "reserve"), [(600, 1024), (8000, 9000), (500, 500)])
def test_a_reserve_that_leaves_no_room_shrinks_to_half_with_one_warning(
    max_tokens: int, reserve: int, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Warned once a process: start from a process that has not warned yet.
    monkeypatch.setattr(history_module, "_reserve_warned", set())
    caplog.set_level(logging.WARNING, logger="core.history")
    for _ in range(3):  # a policy is built every turn; the warning is said once
        policy = tokens_policy(max_tokens, reserve)
        window = policy.build(stored(("user", "hi there")), system=SYSTEM)
    assert policy.reply_reserve == max_tokens // 2
    assert window.budget == max_tokens - max_tokens // 2
    assert [m.content for m in window.messages] == ["hi there"]
    assert not window.over_budget
    assert f"of a {window.budget:,}-token budget" in window.describe()
    warnings = [r.getMessage() for r in caplog.records if "REPLY_RESERVE_TOKENS" in r.getMessage()]
    assert len(warnings) == 1
    assert f"REPLY_RESERVE_TOKENS={reserve}" in warnings[0]
    assert f"MAX_HISTORY_TOKENS={max_tokens}" in warnings[0]
    assert "system prompt" not in warnings[0]


def test_a_reserve_that_fits_is_kept() -> None:
    assert tokens_policy(2000, 1999).reply_reserve == 1999


def test_tokens_never_starts_with_the_assistant() -> None:
    window = tokens_policy().build(
        stored(("assistant", "I can help."), ("user", "ok")), system=SYSTEM
    )
    assert [m.role for m in window.messages] == ["user"]


@hypothesis_settings(max_examples=150, deadline=None)
@given(
    turns=st.lists(
        st.tuples(st.sampled_from(["user", "assistant"]), st.integers(0, 12_000)), max_size=40
    ),
    max_tokens=st.integers(300, 6000),
    reserve=st.integers(0, 1000),
)
def test_tokens_window_properties(
    turns: list[tuple[Role, int]], max_tokens: int, reserve: int
) -> None:
    messages = stored(*((role, f"{i}:" + "w" * size) for i, (role, size) in enumerate(turns)))
    policy = tokens_policy(max_tokens, reserve)
    window = policy.build(messages, system=SYSTEM)
    counter = TokenCounter()
    assert window.tokens == counter.count(SYSTEM) + sum(
        counter.message(m.content) for m in window.messages
    )
    assert window.budget is not None and window.budget > 0
    if not window.over_budget:
        assert window.tokens <= max_tokens - policy.reply_reserve
    if window.messages:
        assert window.messages[0].role == "user"
        # A suffix of the stored messages; only the oldest one sent may have been cut.
        tail = messages[len(messages) - len(window.messages) :]
        assert [m.content for m in window.messages[1:]] == [m.content for m in tail[1:]]
        assert window.messages[0].content.split(":")[0] == tail[0].content.split(":")[0]
        assert window.messages[-1].content.split(":")[0] == tail[-1].content.split(":")[0]
    if messages and messages[-1].role == "user":
        assert window.messages, "the newest user message is always sent"


# -- summary (pure) ----------------------------------------------------------------------------


def test_summary_is_sent_at_the_end_of_the_system_prompt() -> None:
    policy = SummaryPolicy(2000, 500, TokenCounter())
    window = policy.build(alternating(4), system=SYSTEM, summary="They chose PostgreSQL.")
    assert window.system == f"{SYSTEM}\n\n{SUMMARY_HEADING}\nThey chose PostgreSQL."
    assert window.summary_included
    assert window.tokens == TokenCounter().count(window.system) + 4 * 104
    assert "a summary of older messages included" in window.describe()
    plain = policy.build(alternating(4), system=SYSTEM, summary=None)
    assert plain.system == SYSTEM
    assert not plain.summary_included


def test_summary_window_trims_around_the_summary() -> None:
    policy = SummaryPolicy(2000, 500, TokenCounter())
    summary = "s " * 300  # 172 tokens
    window = policy.build(alternating(40), system=SYSTEM, summary=summary)
    assert window.tokens <= 1500
    assert len(window.messages) < 14
    assert window.summary_included


def test_plan_fold_waits_until_the_messages_fill_the_high_water_mark() -> None:
    counter = TokenCounter()
    assert plan_fold(alternating(7), 1000, counter) == []  # 728 tokens < 750
    assert plan_fold([], 1000, counter) == []
    assert plan_fold(alternating(40), 0, counter) == []


def test_plan_fold_folds_the_oldest_down_to_the_low_water_mark() -> None:
    counter = TokenCounter()
    messages = alternating(8)  # 832 tokens > 750
    folded = plan_fold(messages, 1000, counter)
    rest = messages[len(folded) :]
    assert folded == messages[: len(folded)]
    assert sum(counter.message(m.content) for m in rest) <= 1000 * FOLD_LOW_WATER
    assert rest[0].role == "user"
    assert len(rest) >= KEEP_RECENT_MESSAGES


def test_plan_fold_never_folds_the_last_exchange() -> None:
    counter = TokenCounter()
    messages = stored(("user", "x" * 4000), ("assistant", "y" * 4000), ("user", "z" * 4000))
    folded = plan_fold(messages, 1000, counter)
    assert [m.id for m in folded] == [1]


# -- choosing a policy -------------------------------------------------------------------------


def test_policy_for_follows_settings_and_channel_overrides() -> None:
    from core.store import ChannelSettings

    base = Settings().with_overrides(max_history_messages=7, max_history_tokens=3000)
    count = policy_for(base)
    assert isinstance(count, CountPolicy) and count.max_messages == 7
    tokens = policy_for(base.with_overrides(history_strategy="tokens"))
    assert type(tokens) is TokenBudgetPolicy and tokens.max_tokens == 3000
    assert tokens.reply_reserve == base.reply_reserve_tokens
    summary = policy_for(base, ChannelSettings(history_strategy="summary", max_history_tokens=900))
    assert isinstance(summary, SummaryPolicy) and summary.max_tokens == 900
    channel_count = policy_for(
        base.with_overrides(history_strategy="tokens"),
        ChannelSettings(history_strategy="count", max_history_messages=3),
    )
    assert isinstance(channel_count, CountPolicy) and channel_count.max_messages == 3
    fallback = policy_for(base, ChannelSettings(history_strategy="everything"))
    assert isinstance(fallback, CountPolicy)


# -- against a real store ----------------------------------------------------------------------


class CountingStore(ConversationStore):
    """The real store, remembering how many rows each history query returned."""

    reads: list[int]

    async def history(
        self, conversation: Conversation, *, limit: int | None, after_id: int | None = None
    ) -> list[StoredMessage]:
        rows = await super().history(conversation, limit=limit, after_id=after_id)
        self.reads.append(len(rows))
        return rows


@pytest.fixture
async def counting_store(settings: Settings) -> AsyncIterator[CountingStore]:
    store = await CountingStore.open(settings.database_url)
    store.reads = []
    yield store
    await store.close()


async def test_tokens_load_reads_a_page_when_it_fills_the_budget(
    counting_store: CountingStore,
) -> None:
    text = FILLER * 2  # 204 tokens a message: the first page holds more than the budget
    seed = [ChatMessage("user" if i % 2 else "assistant", f"{i} {text}") for i in range(10_000)]
    conversation, _ = await counting_store.get_or_create(KEY, seed=seed)
    window = await tokens_policy(8000, 1000).load(counting_store, conversation, system=SYSTEM)
    assert counting_store.reads == [FIRST_FETCH_ROWS]
    assert window.messages[-1].content.startswith("9999 ")
    assert window.tokens <= 7000


async def test_tokens_load_is_bounded_by_what_the_budget_can_hold(
    counting_store: CountingStore,
) -> None:
    seed = [ChatMessage("user" if i % 2 == 0 else "assistant", "") for i in range(10_000)]
    conversation, _ = await counting_store.get_or_create(KEY, seed=seed)
    policy = tokens_policy(8000, 1000)
    window = await policy.load(counting_store, conversation, system=SYSTEM)
    bound = policy.fetch_limit()
    assert bound == 7000 // MESSAGE_OVERHEAD_TOKENS + 1
    assert max(counting_store.reads) == bound
    assert sum(counting_store.reads) < 2 * bound
    assert len(window.messages) == (7000 - TokenCounter().count(SYSTEM)) // MESSAGE_OVERHEAD_TOKENS


@pytest.fixture
async def any_store(database_url: str) -> AsyncIterator[ConversationStore]:
    """The store on SQLite and, when one is reachable, PostgreSQL."""
    store = await ConversationStore.open(database_url)
    yield store
    await store.close()


class GatedProvider(OfflineProvider):
    """Answers a summary request only once ``gate`` is set."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, delay=0)
        self.gate = asyncio.Event()
        self.arrived = asyncio.Event()

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        system: str,
        max_tokens: int,
        usage: Usage | None = None,
    ) -> str:
        self.arrived.set()
        await self.gate.wait()
        return await super().complete(messages, system=system, max_tokens=max_tokens, usage=usage)


class Chat:
    """Turns of one conversation as the engine runs them: append, load, answer, upkeep."""

    def __init__(
        self,
        store: ConversationStore,
        conversation: Conversation,
        *,
        max_tokens: int = 1500,
        reserve: int = 300,
        fold_timeout: float = 30.0,
    ) -> None:
        self.store = store
        self.conversation = conversation
        self.counter = TokenCounter()
        self.max_tokens = max_tokens
        self.reserve = reserve
        self.fold_timeout = fold_timeout
        self.windows: list[Window] = []
        self.turns = 0

    def policy(self) -> SummaryPolicy:
        return SummaryPolicy(
            self.max_tokens, self.reserve, self.counter, fold_timeout=self.fold_timeout
        )

    async def turn(self, provider: Provider, *, upkeep: bool = True) -> SummaryPolicy:
        self.conversation = await self.store.get(self.conversation.id)
        n = self.turns
        self.turns += 1
        await self.store.append(self.conversation, "user", f"question {n} {FILLER}")
        policy = self.policy()
        window = await policy.load(self.store, self.conversation, system=SYSTEM)
        self.windows.append(window)
        await self.store.append(self.conversation, "assistant", f"answer {n} {FILLER}")
        if upkeep:
            await policy.after_turn(self.store, self.conversation, provider)
        return policy


async def test_summary_folds_old_messages_and_later_folds_extend_the_summary(
    any_store: ConversationStore, provider: OfflineProvider
) -> None:
    store = any_store
    conversation, _ = await store.get_or_create(KEY)
    chat = Chat(store, conversation)
    provider.enqueue(*([f"SUMMARY-{i}"] for i in range(50)))
    for _ in range(30):
        await chat.turn(provider)
    conversation = await store.get(conversation.id)
    assert conversation.summary is not None and conversation.summary.startswith("SUMMARY-")
    assert conversation.summary_upto_id is not None
    assert all(w.tokens <= 1200 for w in chat.windows)
    assert any(w.summary_included for w in chat.windows)
    folds = provider.requests
    assert len(folds) >= 2
    first, second = folds[0].messages[0].content, folds[1].messages[0].content
    assert "(none yet)" in first and "question 0 " in first
    # The second fold extends the first summary with the newer messages only.
    assert "SUMMARY-0" in second
    assert "question 0 " not in second
    assert folds[0].max_tokens == SummaryPolicy(1500, 300).summary_tokens
    # What was folded is not sent again; the summary is.
    final = await chat.policy().load(store, conversation, system=SYSTEM)
    assert conversation.summary in final.system
    assert all("question 0 " not in m.content for m in final.messages)


async def test_a_failed_summary_falls_back_to_trimming_and_is_retried_later(
    store: ConversationStore, provider: OfflineProvider
) -> None:
    conversation, _ = await store.get_or_create(KEY)
    chat = Chat(store, conversation)
    for _ in range(5):  # 10 messages, 1,040 tokens: over the fold mark
        await chat.turn(provider, upkeep=False)
    provider.enqueue([TransientProviderError("overloaded", status=529)], ["RECOVERED"])
    policy = chat.policy()
    await policy.load(store, await store.get(conversation.id), system=SYSTEM)
    await policy.after_turn(store, conversation, provider)  # fails inside, never raises
    assert (await store.get(conversation.id)).summary is None
    await chat.turn(provider)  # the next turn still fits, trimmed, then folds
    assert chat.windows[-1].tokens <= 1200
    assert not chat.windows[-1].summary_included
    conversation = await store.get(conversation.id)
    assert conversation.summary == "RECOVERED"
    assert len(provider.requests) == 2


async def test_an_empty_summary_is_not_stored(
    store: ConversationStore, provider: OfflineProvider
) -> None:
    conversation, _ = await store.get_or_create(KEY)
    chat = Chat(store, conversation)
    for _ in range(5):
        await chat.turn(provider, upkeep=False)
    provider.enqueue(["   "])
    await chat.turn(provider)
    assert (await store.get(conversation.id)).summary is None


async def test_a_summary_cut_at_its_token_limit_is_not_stored(
    store: ConversationStore, settings: Settings
) -> None:
    conversation, _ = await store.get_or_create(KEY)
    chat = Chat(store, conversation)
    async with FakeLLMServer() as server:
        provider = OpenAIProvider(
            settings.with_overrides(llm_provider="openai", openai_base_url=server.openai_base_url)
        )
        try:
            for _ in range(5):
                await chat.turn(provider, upkeep=False)
            server.enqueue(cut_at_limit("They chose PostgreSQL and then"))
            await chat.turn(provider)
            assert (await store.get(conversation.id)).summary is None
            server.enqueue(answer("They chose PostgreSQL."))
            await chat.turn(provider)
        finally:
            await provider.aclose()
    assert (await store.get(conversation.id)).summary == "They chose PostgreSQL."


async def test_a_cut_marker_echoed_into_a_summary_is_not_stored(
    store: ConversationStore, provider: OfflineProvider
) -> None:
    conversation, _ = await store.get_or_create(KEY)
    chat = Chat(store, conversation)
    for _ in range(5):
        await chat.turn(provider, upkeep=False)
    provider.enqueue(
        [f"They pasted a log.{TRUNCATION_MARKER.format(cut=12_345)}It ended in an error."]
    )
    await chat.turn(provider)
    summary = (await store.get(conversation.id)).summary
    assert summary == "They pasted a log.\n\nIt ended in an error."


async def test_a_slow_summary_is_abandoned(store: ConversationStore, settings: Settings) -> None:
    slow = OfflineProvider(settings, delay=3600)
    slow.enqueue(["never arrives"])
    conversation, _ = await store.get_or_create(KEY)
    chat = Chat(store, conversation, fold_timeout=0.01)
    for _ in range(5):
        await chat.turn(slow, upkeep=False)
    await chat.turn(slow)
    assert len(slow.requests) == 1
    assert (await store.get(conversation.id)).summary is None


async def test_reset_clears_the_summary(
    store: ConversationStore, provider: OfflineProvider
) -> None:
    conversation, _ = await store.get_or_create(KEY)
    chat = Chat(store, conversation)
    provider.enqueue(*([f"SUMMARY-{i}"] for i in range(10)))
    for _ in range(8):
        await chat.turn(provider)
    assert (await store.get(conversation.id)).summary is not None
    await store.reset(conversation.id)
    conversation = await store.get(conversation.id)
    assert conversation.summary is None and conversation.summary_upto_id is None
    window = await chat.policy().load(store, conversation, system=SYSTEM)
    assert window.messages == [] and window.system == SYSTEM and not window.summary_included
    await chat.turn(provider)
    assert [m.content.split()[:2] for m in chat.windows[-1].messages] == [["question", "8"]]


async def test_a_fold_finishing_after_a_reset_is_dropped(
    any_store: ConversationStore, settings: Settings
) -> None:
    store = any_store
    gated = GatedProvider(settings)
    gated.enqueue(["STALE SUMMARY"])
    conversation, _ = await store.get_or_create(KEY)
    chat = Chat(store, conversation)
    for _ in range(5):
        await chat.turn(gated, upkeep=False)
    policy = await chat.turn(gated, upkeep=False)
    fold = asyncio.create_task(policy.after_turn(store, conversation, gated))
    await gated.arrived.wait()
    await store.reset(conversation.id)
    gated.gate.set()
    await fold
    assert (await store.get(conversation.id)).summary is None


async def test_one_fold_at_a_time_per_conversation(
    store: ConversationStore, settings: Settings
) -> None:
    gated = GatedProvider(settings)
    gated.enqueue(["ONLY SUMMARY"], ["SECOND"])
    conversation, _ = await store.get_or_create(KEY)
    chat = Chat(store, conversation)
    for _ in range(5):
        await chat.turn(gated, upkeep=False)
    first = await chat.turn(gated, upkeep=False)
    second = chat.policy()
    await second.load(store, await store.get(conversation.id), system=SYSTEM)
    fold = asyncio.create_task(first.after_turn(store, conversation, gated))
    await gated.arrived.wait()
    await second.after_turn(store, conversation, gated)  # returns at once: a fold is running
    gated.gate.set()
    await fold
    assert len(gated.requests) == 1
    assert (await store.get(conversation.id)).summary == "ONLY SUMMARY"


async def test_channel_override_selects_the_summary_strategy(
    store: ConversationStore, settings: Settings
) -> None:
    await store.update_channel_settings(
        "test", "w", "c", history_strategy="summary", max_history_tokens=1200
    )
    here = policy_for(settings, await store.channel_settings("test", "w", "c"))
    elsewhere = policy_for(settings, await store.channel_settings("test", "w", "other"))
    assert isinstance(here, SummaryPolicy) and here.max_tokens == 1200
    assert isinstance(elsewhere, CountPolicy)
    assert elsewhere.max_messages == settings.max_history_messages


async def test_reported_usage_calibrates_the_estimate(
    store: ConversationStore, provider: OfflineProvider
) -> None:
    conversation, _ = await store.get_or_create(KEY)
    counter = TokenCounter()
    for n in range(4):
        await store.append(conversation, "user", f"question {n} {FILLER}")
        policy = TokenBudgetPolicy(8000, 1000, counter)
        window = await policy.load(store, conversation, system=SYSTEM)
        usage = Usage()
        parts = [
            d
            async for d in provider.stream(
                window.messages, system=window.system, max_tokens=100, usage=usage
            )
        ]
        assert usage.input_tokens is not None
        # A provider whose tokenizer counts twice what the estimate does.
        await store.append(
            conversation,
            "assistant",
            "".join(parts),
            input_tokens=2 * raw_estimate(window.system, window.messages),
        )
        await policy.after_turn(store, conversation, provider)
    assert counter.calibration.samples == 4
    assert counter.calibration.factor == pytest.approx(2 * 1.05, rel=0.01)


async def test_the_count_strategy_calibrates_from_reported_usage_too(
    store: ConversationStore, provider: OfflineProvider
) -> None:
    conversation, _ = await store.get_or_create(KEY)
    counter = TokenCounter()
    for n in range(3):
        await store.append(conversation, "user", f"question {n} {FILLER}")
        policy = CountPolicy(20, counter)
        window = await policy.load(store, conversation, system=SYSTEM)
        # A small model's tokenizer that counts two thirds of what the estimate does.
        reported = 2 * raw_estimate(window.system, window.messages) // 3
        await store.append(conversation, "assistant", "ok", input_tokens=reported)
        await policy.after_turn(store, conversation, provider)
    assert counter.calibration.samples == 3
    assert counter.calibration.factor == pytest.approx(2 / 3 * 1.05, rel=0.02)
    window = await CountPolicy(20, counter).load(store, conversation, system=SYSTEM)
    assert "calibrated" in window.counted_with
