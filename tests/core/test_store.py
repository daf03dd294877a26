"""ConversationStore on SQLite and (when reachable) PostgreSQL."""

from __future__ import annotations

import asyncio
import fcntl
from datetime import UTC, datetime

import pytest

from core.config import Settings
from core.conversation import ChatMessage, ConversationKey
from core.errors import ConfigError
from core.store import ConversationStore

KEY = ConversationKey("slack", "T1", "C1", "1700000000.000100")


@pytest.fixture
async def db(database_url: str) -> ConversationStore:
    store = await ConversationStore.open(database_url)
    yield store  # type: ignore[misc]
    await store.close()


async def test_migrations_apply_once_and_reopen_cleanly(database_url: str) -> None:
    first = await ConversationStore.open(database_url)
    conversation, _ = await first.get_or_create(KEY)
    await first.append(conversation, "user", "kept across restarts")
    await first.close()
    second = await ConversationStore.open(database_url)
    again, created = await second.get_or_create(KEY)
    assert not created and again.id == conversation.id
    assert [m.content for m in await second.history(again, limit=10)] == ["kept across restarts"]
    await second.close()


async def test_get_or_create_is_unique_under_concurrency(db: ConversationStore) -> None:
    results = await asyncio.gather(*(db.get_or_create(KEY) for _ in range(10)))
    assert len({conversation.id for conversation, _ in results}) == 1
    assert sum(created for _, created in results) == 1


async def test_seed_messages_start_a_new_conversation(db: ConversationStore) -> None:
    seed = (ChatMessage("user", "earlier question"), ChatMessage("assistant", "earlier answer"))
    conversation, created = await db.get_or_create(KEY, seed=seed)
    assert created
    history = await db.history(conversation, limit=None)
    assert [(m.role, m.content) for m in history] == [
        ("user", "earlier question"),
        ("assistant", "earlier answer"),
    ]
    _, created_again = await db.get_or_create(KEY, seed=seed)
    assert not created_again
    assert len(await db.history(conversation, limit=None)) == 2


async def test_history_returns_newest_messages_oldest_first(db: ConversationStore) -> None:
    conversation, _ = await db.get_or_create(KEY)
    for i in range(30):
        await db.append(conversation, "user" if i % 2 == 0 else "assistant", f"m{i}")
    window = await db.history(conversation, limit=5)
    assert [m.content for m in window] == ["m25", "m26", "m27", "m28", "m29"]
    after = await db.history(conversation, limit=None, after_id=window[2].id)
    assert [m.content for m in after] == ["m28", "m29"]


async def test_append_keeps_usage_timings_and_platform_ids(db: ConversationStore) -> None:
    conversation, _ = await db.get_or_create(KEY)
    stored = await db.append(
        conversation,
        "assistant",
        "answer",
        platform_message_ids=["1.1", "1.2"],
        input_tokens=12,
        output_tokens=34,
        first_token_ms=150,
        duration_ms=900,
        model="openai (gpt-4o-mini)",
        prompt_variant="default",
    )
    assert (stored.input_tokens, stored.output_tokens) == (12, 34)
    [loaded] = await db.history(conversation, limit=1)
    assert loaded.id == stored.id and loaded.output_tokens == 34


async def test_reset_hides_messages_but_keeps_them(db: ConversationStore) -> None:
    conversation, _ = await db.get_or_create(KEY)
    await db.append(conversation, "user", "before reset")
    await db.set_summary(conversation.id, "a summary", 1)
    await db.reset(conversation.id)
    fresh = await db.get(conversation.id)
    assert fresh.generation == conversation.generation + 1
    assert fresh.summary is None and fresh.summary_upto_id is None
    assert await db.history(fresh, limit=10) == []
    await db.append(fresh, "user", "after reset")
    assert [m.content for m in await db.history(fresh, limit=10)] == ["after reset"]
    assert await db.count_messages(fresh, all_generations=True) == 2


async def test_claim_event_accepts_each_event_once_even_when_raced(db: ConversationStore) -> None:
    claims = await asyncio.gather(*(db.claim_event("slack", "T1:C1:1.000") for _ in range(8)))
    assert claims.count(True) == 1
    assert await db.claim_event("discord", "T1:C1:1.000")
    assert await db.prune_events() == 0


async def test_system_prompts_per_conversation_and_channel(db: ConversationStore) -> None:
    conversation, _ = await db.get_or_create(KEY)
    await db.set_system_prompt(conversation.id, "be brief")
    assert (await db.get(conversation.id)).system_prompt == "be brief"
    assert (await db.channel_settings("slack", "T1", "C1")).system_prompt is None
    await db.update_channel_settings("slack", "T1", "C1", system_prompt="channel prompt")
    await db.update_channel_settings("slack", "T1", "C1", max_history_messages=6)
    settings = await db.channel_settings("slack", "T1", "C1")
    assert settings.system_prompt == "channel prompt" and settings.max_history_messages == 6
    with pytest.raises(TypeError):
        await db.update_channel_settings("slack", "T1", "C1", colour="blue")


async def test_conversation_lock_serialises_across_store_instances(database_url: str) -> None:
    """Two stores stand for two worker processes: the lock orders their turns."""
    first = await ConversationStore.open(database_url)
    second = await ConversationStore.open(database_url, migrate=False)
    conversation, _ = await first.get_or_create(KEY)
    events: list[str] = []

    async def turn(store: ConversationStore, name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        async with store.conversation_lock(conversation.id):
            events.append(f"{name} start")
            await asyncio.sleep(0.05)
            events.append(f"{name} end")

    await asyncio.gather(turn(first, "a", 0), turn(second, "b", 0.01))
    await first.close()
    await second.close()
    if first.is_postgres:
        assert events == ["a start", "a end", "b start", "b end"]
    else:
        # SQLite serves one process: only the in-process lock applies, per store.
        assert sorted(events) == ["a end", "a start", "b end", "b start"]


async def test_window_of_a_long_conversation_reads_only_its_rows(db: ConversationStore) -> None:
    conversation, _ = await db.get_or_create(KEY)
    async with db.engine.begin() as conn:
        from core.store import MessageRow

        await conn.execute(
            MessageRow.__table__.insert(),
            [
                {
                    "conversation_id": conversation.id,
                    "generation": 0,
                    "role": "user" if i % 2 == 0 else "assistant",
                    "content": f"message {i}",
                    "created_at": datetime.now(UTC),
                }
                for i in range(10_000)
            ],
        )
    window = await db.history(conversation, limit=20)
    assert len(window) == 20
    assert window[-1].content == "message 9999" and window[0].content == "message 9980"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+asyncpg://postgres@127.0.0.1:1/nothing_listens_here",
        "sqlite+aiosqlite:////dev/null/cannot/be/a/folder.db",
    ],
)
async def test_an_unusable_database_is_a_config_error_naming_the_setting(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        await ConversationStore.open(url)
    assert raised.value.setting == "DATABASE_URL"
    assert "check DATABASE_URL" in str(raised.value) and "\n" not in str(raised.value)


async def test_a_hosts_plain_url_opens_the_store_through_settings(database_url: str) -> None:
    # What Heroku or Render put in DATABASE_URL: no driver named (postgres:// or sqlite://).
    plain = database_url.replace("postgresql+asyncpg://", "postgres://").replace(
        "sqlite+aiosqlite://", "sqlite://"
    )
    settings = Settings.load(environ={"DATABASE_URL": plain}, env_file=None)
    store = await ConversationStore.open(settings.database_url)
    conversation, created = await store.get_or_create(KEY)
    assert created and conversation.key == KEY
    await store.close()


@pytest.mark.parametrize(
    "url", ["sqlite:///sync-driver.db", "postgresql+psycopg2://u@h/db", "no url at all"]
)
async def test_a_url_without_an_async_driver_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        await ConversationStore.open(url)
    assert raised.value.setting == "DATABASE_URL" and "\n" not in str(raised.value)


async def test_the_sqlite_migration_lock_is_left_free_after_start(sqlite_url: str) -> None:
    store = await ConversationStore.open(sqlite_url)
    await store.close()
    lock = sqlite_url.removeprefix("sqlite+aiosqlite:///") + ".lock"
    with open(lock, "rb+") as held:
        # Would raise BlockingIOError if open() had kept the lock.
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)


# -- turns and message outcomes ---------------------------------------------------------------


async def test_a_turn_is_recorded_then_its_progress_and_outcome(db: ConversationStore) -> None:
    conversation, _ = await db.get_or_create(KEY)
    turn = await db.open_turn(
        conversation.id,
        platform="slack",
        question="why?",
        worker="w1",
        lease_seconds=30,
        event_key="C1:1.0",
        user_id="U1",
        reply_to='{"channel": "C1"}',
    )
    assert (turn.status, turn.worker, turn.reply_message_ids) == ("received", "w1", ())
    assert turn.lease_until is not None and turn.lease_until > datetime.now(UTC)
    await db.update_turn(turn.id, status="answering", reply_message_ids=["C1:2.0", "C1:3.0"])
    assert await db.renew_turn(turn.id, "w1", 30)
    assert not await db.renew_turn(turn.id, "w2", 30)  # not its turn
    await db.update_turn(turn.id, status="answered", finish_reason="stop")
    done = await db.get_turn(turn.id)
    assert (done.status, done.reply_message_ids, done.lease_until) == (
        "answered",
        ("C1:2.0", "C1:3.0"),
        None,
    )
    assert not await db.renew_turn(turn.id, "w1", 30)  # closed turns hold no lease


async def test_an_expired_turn_is_taken_over_by_exactly_one_worker(database_url: str) -> None:
    first = await ConversationStore.open(database_url)
    second = await ConversationStore.open(database_url)
    try:
        conversation, _ = await first.get_or_create(KEY)
        dead = await first.open_turn(
            conversation.id, platform="slack", question="q", worker="dead", lease_seconds=-1
        )
        alive = await first.open_turn(
            conversation.id, platform="slack", question="q", worker="w0", lease_seconds=60
        )
        claims = await asyncio.gather(
            *(
                store.claim_stale_turns(f"w{n}", lease_seconds=60)
                for n, store in enumerate((first, second, first, second))
            )
        )
        claimed = [turn for batch in claims for turn in batch]
        assert [turn.id for turn in claimed] == [dead.id]
        assert claimed[0].takeovers == 1 and claimed[0].worker != "dead"
        assert all(turn.id != alive.id for turn in claimed)
        assert await first.claim_stale_turns("w9", lease_seconds=60) == []
    finally:
        await first.close()
        await second.close()


async def test_failed_questions_and_replaced_answers_leave_the_history(
    db: ConversationStore,
) -> None:
    conversation, _ = await db.get_or_create(KEY)
    asked = await db.append(conversation, "user", "a question that failed")
    await db.set_message_status(asked.id, "failed")
    await db.append(conversation, "user", "hello")
    await db.append(conversation, "assistant", "Hel", status="stopped", finish_reason=None)
    await db.append(conversation, "assistant", "old answer", status="replaced")
    window = await db.history(conversation, limit=None)
    assert [(m.content, m.status) for m in window] == [("hello", None), ("Hel", "stopped")]
