"""Stop, regenerate and the per-reply native choice, through the front door on the toy platform
of tests/core/test_front_door.py (and two workers on one database for a stop from another)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from sqlalchemy import select

from core.bot import FrontDoor, PlatformProfile
from core.commands import HelpStyle
from core.config import Settings
from core.conversation import ConversationKey
from core.engine import ChatEngine
from core.outcomes import (
    REGENERATE_BUSY,
    REGENERATE_NOTHING,
    REGENERATE_ONLY_NEWEST,
    STOPPED_NOTE,
)
from core.providers.offline import OfflineProvider
from core.ratelimit import Budgets, RateScope
from core.store import ConversationStore, MessageRow, TurnRow
from core.streaming import RETRACTED_TEXT, NativeStreams
from tests.core.test_front_door import TOY, ToyArrival, ToyChat, ToySurface, shown

LONG_ANSWER = [f"w{n} " for n in range(500)]


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(20):  # only a broken test waits this long
        while not condition():
            await asyncio.sleep(0.01)


async def messages_of(
    store: ConversationStore, key: ConversationKey
) -> list[tuple[str, str, str | None]]:
    """Every stored message of the conversation with its status (history leaves some out)."""
    conversation = await store.find(key)
    assert conversation is not None
    query = (
        select(MessageRow.role, MessageRow.content, MessageRow.status)
        .where(MessageRow.conversation_id == conversation.id)
        .order_by(MessageRow.id)
    )
    async with store.engine.connect() as conn:
        return [(row.role, row.content, row.status) for row in await conn.execute(query)]


async def turns_of(store: ConversationStore, key: ConversationKey) -> list[tuple[int, str]]:
    conversation = await store.find(key)
    assert conversation is not None
    query = select(TurnRow.id, TurnRow.status).where(TurnRow.conversation_id == conversation.id)
    async with store.engine.connect() as conn:
        return [(row.id, row.status) for row in await conn.execute(query.order_by(TurnRow.id))]


class FeedbackToySurface(ToySurface):
    """A toy surface that shows feedback buttons (``FeedbackSurface``)."""

    def __init__(self, chat: ToyChat, thread: str) -> None:
        super().__init__(chat, thread)
        self.offered: list[tuple[int, str, str]] = []

    async def offer_feedback(self, reply_id: int, message_id: str, shown: str) -> None:
        self.offered.append((reply_id, message_id, shown))


# ---- stop ------------------------------------------------------------------------------------


async def test_stop_keeps_the_answer_as_shown_with_a_note_and_records_it_stopped(
    engine: ChatEngine, provider: OfflineProvider
) -> None:
    chat = ToyChat()
    door = FrontDoor(engine.settings, engine, TOY, budgets=Budgets())
    provider.delay = 0.01
    provider.enqueue(LONG_ANSWER)
    arrival = ToyArrival(chat, "t1", "talk a lot", mentioned=True)
    task = door.receive(arrival)
    assert task is not None
    await until(lambda: "w3 " in shown(chat, "t1"))

    # Two clicks at once: the answer stops once. The second click sees it streaming (True)
    # or, when its look-up comes after the stop has landed, nothing left to stop (False).
    stops = await asyncio.gather(door.stop(arrival.key, user_id="alice"), door.stop(arrival.key))
    assert True in stops
    result = await task
    assert result is not None and result.status == "cancelled"
    text = shown(chat, "t1")
    assert text.endswith(STOPPED_NOTE) and text.count(STOPPED_NOTE) == 1 and "w499" not in text
    [question, answer] = await messages_of(engine.store, arrival.key)
    assert question == ("user", "talk a lot", None)
    assert answer[0] == "assistant" and answer[2] == "stopped"
    assert answer[1].startswith("w0 w1 w2 w3 ") and "w499" not in answer[1]
    assert [status for _, status in await turns_of(engine.store, arrival.key)] == ["stopped"]
    # Nothing streams there any more.
    assert not await door.stop(arrival.key)
    assert shown(chat, "t1") == text


async def test_stop_where_nothing_streams_is_false(
    engine: ChatEngine, provider: OfflineProvider
) -> None:
    chat = ToyChat()
    door = FrontDoor(engine.settings, engine, TOY, budgets=Budgets())
    arrival = ToyArrival(chat, "t1", "hi", mentioned=True)
    assert not await door.stop(arrival.key)  # no conversation at all
    provider.enqueue(["Done."])
    door.receive(arrival)
    await door.drain()
    assert not await door.stop(arrival.key)
    assert shown(chat, "t1") == "Done."


@pytest.fixture
async def two_workers(
    database_url: str,
) -> AsyncIterator[tuple[FrontDoor, OfflineProvider, FrontDoor]]:
    """Two front doors, each with its engine and store (its own pool), on one database."""
    settings = Settings.from_mapping({"DATABASE_URL": database_url})
    doors: list[FrontDoor] = []
    providers: list[OfflineProvider] = []
    for _ in range(2):
        store = await ConversationStore.open(database_url)
        provider = OfflineProvider(settings, delay=0.01)
        engine = ChatEngine(settings, store, provider)
        doors.append(FrontDoor(settings, engine, TOY, budgets=Budgets()))
        providers.append(provider)
    yield doors[0], providers[0], doors[1]
    for door in doors:
        await door.close()
        await door.engine.store.close()


async def test_a_stop_on_another_worker_stops_the_answer_within_its_poll(
    two_workers: tuple[FrontDoor, OfflineProvider, FrontDoor],
) -> None:
    answering, provider, other = two_workers
    chat = ToyChat()
    provider.enqueue(LONG_ANSWER)
    arrival = ToyArrival(chat, "t1", "talk a lot", mentioned=True)
    task = answering.receive(arrival)
    assert task is not None
    await until(lambda: "w3 " in shown(chat, "t1"))

    assert await other.stop(arrival.key, user_id="alice")  # asked through the turn's record
    result = await task
    assert result is not None and result.status == "cancelled"
    text = shown(chat, "t1")
    assert text.endswith(STOPPED_NOTE) and "w499" not in text
    store = answering.engine.store
    [_, answer] = await messages_of(store, arrival.key)
    assert answer[2] == "stopped" and "w499" not in answer[1]
    assert [status for _, status in await turns_of(store, arrival.key)] == ["stopped"]
    assert not await other.stop(arrival.key)


# ---- regenerate ------------------------------------------------------------------------------


async def test_regenerate_answers_the_same_question_again_in_place(
    engine: ChatEngine, provider: OfflineProvider
) -> None:
    chat = ToyChat()
    door = FrontDoor(engine.settings, engine, TOY, budgets=Budgets())
    provider.enqueue(["First ", "answer."], ["Second ", "answer."])
    arrival = ToyArrival(chat, "t1", "what is it?", mentioned=True)
    door.receive(arrival)
    await door.drain()
    old_ids = list(chat.threads["t1"])
    assert shown(chat, "t1") == "First answer."

    surface = FeedbackToySurface(chat, "t1")
    assert await door.regenerate(arrival.key, old_ids[-1], user_id="bob", surface=surface) is None
    await door.drain()

    assert chat.threads["t1"] == old_ids  # the new answer went into the old messages
    assert shown(chat, "t1") == "Second answer."
    assert await messages_of(engine.store, arrival.key) == [
        ("user", "what is it?", None),
        ("assistant", "First answer.", "replaced"),
        ("assistant", "Second answer.", None),
    ]
    # The same question was asked again, without the replaced answer.
    [_, again] = provider.requests
    assert [(m.role, m.content) for m in again.messages] == [("user", "what is it?")]
    turns = await turns_of(engine.store, arrival.key)
    assert [status for _, status in turns] == ["answered", "answered"]
    assert turns[0][0] != turns[1][0]
    conversation = await engine.store.find(arrival.key)
    assert conversation is not None
    window = await engine.store.history(conversation, limit=None)
    assert [(m.role, m.content) for m in window] == [
        ("user", "what is it?"),
        ("assistant", "Second answer."),
    ]
    [(reply_id, message_id, text)] = surface.offered
    assert (message_id, text) == (old_ids[-1], "Second answer.")
    assert reply_id == window[-1].id


async def test_regenerate_retracts_old_messages_the_new_answer_does_not_need(
    engine: ChatEngine, provider: OfflineProvider
) -> None:
    chat = ToyChat()
    door = FrontDoor(engine.settings, engine, TOY, budgets=Budgets())
    provider.enqueue([f"w{n} " for n in range(80)], ["Short."])  # 350 characters: two messages
    arrival = ToyArrival(chat, "t1", "long then short", mentioned=True)
    door.receive(arrival)
    await door.drain()
    old_ids = list(chat.threads["t1"])
    assert len(old_ids) == 2

    surface = ToySurface(chat, "t1")
    assert await door.regenerate(arrival.key, old_ids[0], user_id="alice", surface=surface) is None
    await door.drain()
    assert chat.threads["t1"] == old_ids
    assert [chat.texts[i] for i in old_ids] == ["Short.", RETRACTED_TEXT]


async def test_regenerate_refuses_in_one_line_what_it_cannot_do(
    engine: ChatEngine, provider: OfflineProvider
) -> None:
    chat = ToyChat()
    door = FrontDoor(engine.settings, engine, TOY, budgets=Budgets())
    key = ToyArrival(chat, "t1", "", mentioned=True).key
    surface = ToySurface(chat, "t1")
    assert await door.regenerate(key, "1", user_id="alice", surface=surface) == REGENERATE_NOTHING

    provider.enqueue(["One."], ["Two."])
    door.receive(ToyArrival(chat, "t1", "first", mentioned=True))
    await door.drain()
    first_ids = list(chat.threads["t1"])
    door.receive(ToyArrival(chat, "t1", "second", mentioned=False))
    await door.drain()
    older = await door.regenerate(key, first_ids[0], user_id="alice", surface=surface)
    assert older == REGENERATE_ONLY_NEWEST

    provider.delay = 0.01
    provider.enqueue(LONG_ANSWER)
    door.receive(ToyArrival(chat, "t1", "third", mentioned=False))
    await until(lambda: "w3 " in shown(chat, "t1"))
    newest = chat.threads["t1"][-1]
    busy = await door.regenerate(key, newest, user_id="alice", surface=surface)
    assert busy == REGENERATE_BUSY
    assert all(line.count("\n") == 0 for line in (older, busy, REGENERATE_NOTHING))
    assert "w499" not in shown(chat, "t1")  # the refusal changed nothing

    # A stopped answer is an answer too: it can be regenerated once it stopped.
    assert await door.stop(key)
    await door.drain()
    provider.delay = 0
    provider.enqueue(["Third, again."])
    stopped_ids = [i for i in chat.threads["t1"] if i not in first_ids][-1:]
    assert await door.regenerate(key, stopped_ids[0], user_id="alice", surface=surface) is None
    await door.drain()
    assert chat.texts[stopped_ids[0]] == "Third, again."
    statuses = [(role, status) for role, _, status in await messages_of(engine.store, key)]
    assert statuses[-2:] == [("assistant", "replaced"), ("assistant", None)]


# ---- native streaming, per reply -------------------------------------------------------------


class ToyStreamSurface(ToySurface):
    """A toy surface with native (append-style) streams, as Slack's."""

    native_scope = "home"

    def __init__(self, chat: ToyChat, thread: str) -> None:
        super().__init__(chat, thread)
        self.starts = 0

    def scopes(self, call: str) -> tuple[RateScope, ...]:
        return (RateScope(f"toy:{call}", per_second=100.0, burst=10),)

    async def start(self, text: str) -> str:
        self.starts += 1
        return await self.post(text or "…")

    async def append(self, message_id: str, delta: str) -> None:
        self.chat.texts[message_id] += delta

    async def stop(self, message_id: str, delta: str) -> None:
        self.chat.texts[message_id] += delta


class PrivateArrival(ToyArrival):
    """A toy arrival that says whether the asker is the only reader (None: it does not say)."""

    def __init__(self, chat: ToyChat, thread: str, private: bool | None) -> None:
        super().__init__(chat, thread, "hello", mentioned=True)
        if private is not None:
            self.private = private
        self.surface = ToyStreamSurface(chat, thread)

    async def reply(self, route: object) -> ToyStreamSurface:
        return self.surface


NATIVE = NativeStreams(frozenset({"not_allowed"}), "stream_ended", 270.0, per_scope=5)


@pytest.mark.parametrize(
    ("mode", "private", "channel", "native"),
    [
        ("auto", True, None, True),
        ("auto", False, None, False),
        ("auto", None, None, True),  # the adapter does not say: admission alone decides
        ("auto", False, "native", True),
        ("auto", True, "update", False),
        ("auto", False, "auto", False),
        ("never", True, "native", False),  # the deployment forces edits
        ("always", False, "update", True),  # ... or native streams
    ],
)
async def test_each_reply_streams_natively_only_where_its_mode_and_reader_allow(
    engine: ChatEngine,
    provider: OfflineProvider,
    mode: str,
    private: bool | None,
    channel: str | None,
    native: bool,
) -> None:
    chat = ToyChat()
    profile = PlatformProfile(
        name="toy",
        help=HelpStyle(prefix="!"),
        command_deadline=1.0,
        native=NATIVE,
        native_mode=mode,  # type: ignore[arg-type]
    )
    door = FrontDoor(engine.settings, engine, profile, budgets=Budgets())
    if channel is not None:  # what the ``streaming`` command stores
        await engine.store.update_channel_settings("toy", "home", "general", streaming=channel)
    provider.enqueue(["Streamed ", "or ", "edited."])
    arrival = PrivateArrival(chat, "t1", private)
    door.receive(arrival)
    await door.drain()
    assert shown(chat, "t1") == "Streamed or edited."
    assert arrival.surface.starts == (1 if native else 0)
