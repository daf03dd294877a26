"""Several workers on one database: each message answered once, turns of a conversation ordered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from core.config import Settings
from core.conversation import ConversationKey, IncomingMessage
from core.engine import CANCELLED_DEFAULT, ChatEngine
from core.providers.offline import OfflineProvider
from core.reply import CollectingSink
from core.store import ConversationStore

KEY = ConversationKey("slack", "T1", "C1", "42.000")


@pytest.fixture
async def workers(
    database_url: str,
) -> AsyncIterator[tuple[tuple[ChatEngine, OfflineProvider], tuple[ChatEngine, OfflineProvider]]]:
    """Two engines, each with its own store (its own connection pool), like two processes."""
    settings = Settings.from_mapping({"DATABASE_URL": database_url})
    pairs = []
    for _ in range(2):
        store = await ConversationStore.open(database_url)
        provider = OfflineProvider(settings, delay=0.01)
        pairs.append((ChatEngine(settings, store, provider), provider))
    yield pairs[0], pairs[1]
    for engine, _ in pairs:
        await engine.store.close()


async def test_the_same_delivery_to_two_workers_is_answered_once(workers: tuple) -> None:
    (a, pa), (b, pb) = workers
    pa.enqueue(["from a"])
    pb.enqueue(["from b"])
    incoming = IncomingMessage(key=KEY, text="hello", user_id="U1", message_id="C1:42.000")
    results = await asyncio.gather(
        a.handle(incoming, CollectingSink()), b.handle(incoming, CollectingSink())
    )
    assert sorted(r.status for r in results) == ["answered", "duplicate"]
    conversation = await a.store.find(KEY)
    assert conversation is not None
    assert await a.store.count_messages(conversation) == 2


async def test_turns_of_one_conversation_on_two_workers_do_not_interleave(workers: tuple) -> None:
    (a, pa), (b, pb) = workers
    await a.store.get_or_create(KEY)
    pa.enqueue(["alpha ", "answer"])
    pb.enqueue(["beta ", "answer"])
    first = IncomingMessage(key=KEY, text="one", user_id="U1", message_id="m1")
    second = IncomingMessage(key=KEY, text="two", user_id="U1", message_id="m2")
    await asyncio.gather(a.handle(first, CollectingSink()), b.handle(second, CollectingSink()))
    conversation = await a.store.find(KEY)
    assert conversation is not None
    history = [(m.role, m.content) for m in await a.store.history(conversation, limit=None)]
    assert len(history) == 4
    if a.store.is_postgres:
        # With the advisory lock a turn runs whole: user, its answer, then the next user message.
        roles = [role for role, _ in history]
        assert roles == ["user", "assistant", "user", "assistant"]
        later = pb.requests if history[2][1] == "two" else pa.requests
        assert [m.content for m in later[0].messages][:2] == [history[0][1], history[1][1]]


@pytest.mark.parametrize("shutdown", [False, True], ids=["cancelled", "shutdown"])
async def test_a_turn_cancelled_while_another_worker_holds_the_conversation_ends_its_reply(
    postgres_url: str, shutdown: bool
) -> None:
    """Queued on the advisory lock, the reply already shows it is working: a cancel must say so."""
    settings = Settings.from_mapping({"DATABASE_URL": postgres_url})
    stores = [await ConversationStore.open(postgres_url) for _ in range(2)]
    try:
        busy, waiting = (OfflineProvider(settings, delay=0.05) for _ in range(2))
        a = ChatEngine(settings, stores[0], busy)
        b = ChatEngine(settings, stores[1], waiting)
        # The PostgreSQL database lives for the session: keys and ids unique to this case.
        case = "shutdown" if shutdown else "cancel"
        key = ConversationKey("slack", "T1", "C1", f"{case}.000")
        busy.enqueue(["word "] * 40)
        first_sink, queued_sink = CollectingSink(), CollectingSink()
        first = asyncio.create_task(
            a.handle(
                IncomingMessage(key=key, text="one", user_id="U", message_id=f"{case}1"),
                first_sink,
            )
        )
        async with asyncio.timeout(20):  # only a broken test waits this long
            while not first_sink.text:
                await asyncio.sleep(0.01)
        queued = asyncio.create_task(
            b.handle(
                IncomingMessage(key=key, text="two", user_id="U", message_id=f"{case}2"),
                queued_sink,
            )
        )
        async with asyncio.timeout(20):
            while not queued_sink.begun:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # now waiting for the other worker's advisory lock
        if shutdown:
            await b.cancel_all("Restarting, ask again in a moment.")
        else:
            queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        expected = "Restarting, ask again in a moment." if shutdown else CANCELLED_DEFAULT
        assert queued_sink.cancelled == expected
        assert waiting.requests == []
        await first
    finally:
        for store in stores:
            await store.close()
