"""Usage and cost per turn, MODEL_PRICES, the daily token limits and the per-user message rate."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from core.config import Settings
from core.conversation import ConversationKey, IncomingMessage
from core.engine import ChatEngine
from core.errors import ConfigError
from core.providers import build_provider
from core.reply import CollectingSink
from core.retry import RetryPolicy
from core.store import ConversationStore, TurnRow
from core.usage import CLAUDE_HAIKU_4_5_PRICE, GPT_4_1_MINI_PRICE, price_for
from tests.conftest import RecordedSleep
from tests.wire.llm_server import FakeLLMServer, answer, cut

ALICE = ConversationKey("slack", "T1", "C1", "1.000")
ALICE_AGAIN = ConversationKey("slack", "T1", "C1", "2.000")
BOB = ConversationKey("slack", "T1", "C1", "3.000")


@pytest.fixture
async def wire() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer() as server:
        yield server


def wired(server: FakeLLMServer, database_url: str, **extra: str) -> Settings:
    return Settings.from_mapping(
        {
            "DATABASE_URL": database_url,
            "LLM_PROVIDER": "openai",
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": server.openai_base_url,
            **extra,
        }
    )


async def engine_for(settings: Settings) -> ChatEngine:
    """A worker: its own store (its own pool) and provider, as a separate process has."""
    store = await ConversationStore.open(settings.database_url)
    retry = RetryPolicy(max_attempts=settings.max_retry_attempts, sleep=RecordedSleep())
    return ChatEngine(settings, store, build_provider(settings), retry=retry)


async def ask(
    engine: ChatEngine, key: ConversationKey, text: str, user: str = "U1"
) -> tuple[str, str]:
    """Ask as the front door does: the turn is recorded at intake, then answered."""
    conversation, _ = await engine.store.get_or_create(key)
    turn = await engine.store.open_turn(
        conversation.id,
        platform=key.platform,
        question=text,
        worker="w",
        lease_seconds=30,
        user_id=user,
    )
    assert turn is not None
    sink = CollectingSink()
    incoming = IncomingMessage(key, text, user, turn_id=turn.id)
    result = await engine.handle(incoming, sink)
    return result.status, sink.text


async def turn_rows(store: ConversationStore) -> list[TurnRow]:
    async with store._sessions() as session:
        return list(await session.scalars(select(TurnRow).order_by(TurnRow.id)))


# -- prices ----------------------------------------------------------------------------------


def test_model_prices_override_the_list_prices_and_price_dated_snapshots() -> None:
    settings = Settings.from_mapping({"MODEL_PRICES": "gpt-4.1-mini=0.5/2, my-llama = 0/0.25"})
    assert settings.model_prices == (("gpt-4.1-mini", 0.5, 2.0), ("my-llama", 0.0, 0.25))
    assert price_for(settings, "openai", "gpt-4.1-mini") == (0.5, 2.0)
    assert price_for(settings, "openai", "my-llama") == (0.0, 0.25)
    assert price_for(settings, "anthropic", "claude-haiku-4-5-20251001") == CLAUDE_HAIKU_4_5_PRICE
    assert price_for(Settings(), "openai", "gpt-4.1-mini") == GPT_4_1_MINI_PRICE
    assert price_for(settings, "openai", "qwen2.5") is None
    assert price_for(settings, "offline", "scripted") == (0.0, 0.0)


@pytest.mark.parametrize(
    "value", ["gpt-4.1-mini", "gpt-4.1-mini=0.4", "=1/2", "m=1/2/3", "m=a/2", "m=-1/2", "m=nan/1"]
)
def test_a_malformed_model_price_is_one_line_naming_the_setting(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_mapping({"MODEL_PRICES": f"ok=1/2,{value}"})
    assert raised.value.setting == "MODEL_PRICES"
    assert "MODEL_PRICES" in str(raised.value) and "\n" not in str(raised.value)


# -- usage per turn --------------------------------------------------------------------------


async def test_reported_usage_and_its_cost_are_stored_with_the_turn(
    wire: FakeLLMServer, sqlite_url: str
) -> None:
    engine = await engine_for(wired(wire, sqlite_url))
    wire.enqueue(answer("Paris.", input_tokens=1200, output_tokens=300))
    assert (await ask(engine, ALICE, "capital of France?"))[0] == "answered"
    [row] = await turn_rows(engine.store)
    assert (row.model, row.input_tokens, row.output_tokens) == ("gpt-4.1-mini", 1200, 300)
    assert row.tokens_estimated is False
    assert row.cost_usd == pytest.approx((1200 * 0.40 + 300 * 1.60) / 1_000_000)
    await engine.close()


async def test_a_failed_turn_counts_the_tokens_it_used_as_estimated(
    wire: FakeLLMServer, sqlite_url: str
) -> None:
    engine = await engine_for(wired(wire, sqlite_url, MAX_RETRY_ATTEMPTS="1"))
    wire.enqueue(cut(after=3, text="one two three four five six"))
    assert (await ask(engine, ALICE, "count for me"))[0] == "failed"
    [row] = await turn_rows(engine.store)
    assert row.status == "failed"
    assert row.tokens_estimated is True
    assert row.input_tokens is not None and row.input_tokens > 0
    assert row.output_tokens is not None and row.output_tokens > 0
    assert row.cost_usd is not None and row.cost_usd > 0
    await engine.close()


# -- daily limits ----------------------------------------------------------------------------


async def test_two_workers_share_the_daily_user_limit(
    wire: FakeLLMServer, database_url: str
) -> None:
    settings = wired(wire, database_url, USER_DAILY_TOKENS="1000")
    first, second = await engine_for(settings), await engine_for(settings)
    wire.enqueue(answer("A long answer.", input_tokens=700, output_tokens=400))
    assert (await ask(first, ALICE, "tell me everything"))[0] == "answered"
    requests = len(wire.chat_requests())
    status, text = await ask(second, ALICE_AGAIN, "and more?")
    assert status == "rejected"
    assert re.fullmatch(
        r"You've used your 1,000 tokens for today; the limit resets at 00:00 UTC "
        r"\(in (\d+ h )?\d+ min\)\.",
        text,
    ), text
    assert len(wire.chat_requests()) == requests  # the model was not called
    # Another user of the same channel is still answered, by either worker.
    assert (await ask(second, BOB, "my turn", user="U2"))[0] == "answered"
    rows = await turn_rows(second.store)
    refused = [r for r in rows if r.refused]
    assert [(r.refused, r.status, r.input_tokens) for r in refused] == [
        ("user_daily", "failed", None)
    ]
    for engine in (first, second):
        await engine.close()


async def test_the_channel_limit_counts_every_user_of_the_channel(
    wire: FakeLLMServer, sqlite_url: str
) -> None:
    engine = await engine_for(wired(wire, sqlite_url, CHANNEL_DAILY_TOKENS="500"))
    wire.enqueue(answer("Sure.", input_tokens=450, output_tokens=50))
    assert (await ask(engine, ALICE, "hello"))[0] == "answered"
    status, text = await ask(engine, BOB, "me too", user="U2")
    assert status == "rejected"
    assert text.startswith("This channel has used its 500 tokens for today;")
    # Another channel is not held back.
    elsewhere = ConversationKey("slack", "T1", "C2", "9.000")
    assert (await ask(engine, elsewhere, "hi", user="U2"))[0] == "answered"
    await engine.close()


# -- message rate ----------------------------------------------------------------------------


async def test_a_burst_beyond_the_message_rate_is_told_to_wait(
    wire: FakeLLMServer, sqlite_url: str
) -> None:
    engine = await engine_for(wired(wire, sqlite_url, USER_MESSAGES_PER_MINUTE="2"))
    assert (await ask(engine, ALICE, "one"))[0] == "answered"
    assert (await ask(engine, ALICE_AGAIN, "two"))[0] == "answered"
    status, text = await ask(engine, ALICE, "three")
    assert status == "rejected"
    match = re.fullmatch(
        r"You're sending messages faster than I can answer \(2 a minute\)\. "
        r"Please wait (\d+) seconds? and ask again\.",
        text,
    )
    assert match is not None, text
    assert 1 <= int(match.group(1)) <= 60
    assert len(wire.chat_requests()) == 2
    # Someone else is answered meanwhile; refused questions do not count against the rate.
    assert (await ask(engine, BOB, "hi", user="U2"))[0] == "answered"
    rows = await turn_rows(engine.store)
    assert [r.refused for r in rows] == [None, None, "rate", None]
    await engine.close()


async def test_the_terminal_has_no_message_rate(sqlite_url: str) -> None:
    settings = Settings.from_mapping(
        {"DATABASE_URL": sqlite_url, "OFFLINE_DELAY": "0", "USER_MESSAGES_PER_MINUTE": "1"}
    )
    engine = await ChatEngine.create(settings)
    key = ConversationKey("cli", "local", "me")
    for text in ("one", "two", "three"):
        result = await engine.handle(IncomingMessage(key, text, "me"), CollectingSink())
        assert result.status == "answered"
    rows = await turn_rows(engine.store)
    assert [r.status for r in rows] == ["answered"] * 3
    assert all(r.input_tokens for r in rows)
    assert rows[0].created_at.date() <= datetime.now(UTC).date()
    await engine.close()
