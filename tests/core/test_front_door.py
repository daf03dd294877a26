"""The front door proves itself on a platform written here: a toy in-memory chat.

The toy adapter below is what a new platform adds: a surface (post and edit a message), a
translation of its messages (``ToyArrival``) and a profile. Mentions, follow-ups, a command, a 429
and a shutdown all go through ``FrontDoor`` with no change to ``core/``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

from core.bot import SHUTDOWN_NOTE, Facts, FrontDoor, PlatformProfile, Route, ThreadLine
from core.commands import Command, HelpStyle
from core.conversation import ConversationKey
from core.engine import ChatEngine
from core.errors import SurfaceRateLimited
from core.providers.offline import OfflineProvider
from core.ratelimit import Budgets, RateScope

# ---- the toy platform's adapter: the whole of it ------------------------------------------


class ToyChat:
    """An in-memory chat: messages by id, each thread a list of message ids."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}
        self.threads: dict[str, list[str]] = {}
        self.ids = itertools.count(1)
        self.rate_limit_next_edit = False
        self.rate_limited = 0


class ToySurface:
    max_chars = 200

    def __init__(self, chat: ToyChat, thread: str) -> None:
        self.chat, self.thread = chat, thread
        self.place = thread  # where a worker taking over the turn finds the reply

    def render(self, text: str) -> str:
        return text

    def scopes(self, call: str) -> tuple[RateScope, ...]:
        return (RateScope(f"toy:{call}", per_second=100.0, burst=10),)

    async def post(self, text: str) -> str:
        message_id = str(next(self.chat.ids))
        self.chat.texts[message_id] = text
        self.chat.threads.setdefault(self.thread, []).append(message_id)
        return message_id

    async def edit(self, message_id: str, text: str) -> None:
        if self.chat.rate_limit_next_edit:
            self.chat.rate_limit_next_edit = False
            self.chat.rate_limited += 1
            raise SurfaceRateLimited("toy: slow down", retry_after=0.05, scope="toy:edit")
        self.chat.texts[message_id] = text

    async def show_typing(self) -> bool:
        return False


class ToyArrival:
    def __init__(self, chat: ToyChat, thread: str, text: str, *, mentioned: bool) -> None:
        self.chat, self.text = chat, text
        self.message_id: str | None = str(next(chat.ids))
        self.user_id = "alice"
        self.key = ConversationKey("toy", "home", "general", thread)
        known_thread = thread in chat.threads
        self.facts = Facts(direct=False, mentioned=mentioned, in_thread=known_thread)
        self.place = thread

    async def question(self) -> str:
        return self.text

    async def thread(self) -> Sequence[ThreadLine]:
        return []

    async def reply(self, route: Route) -> ToySurface:
        return ToySurface(self.chat, self.key.thread)


TOY = PlatformProfile(name="toy", help=HelpStyle(prefix="!"), command_deadline=1.0)

# ---- the test ------------------------------------------------------------------------------


def shown(chat: ToyChat, thread: str) -> str:
    return "".join(chat.texts[i] for i in chat.threads.get(thread, []))


async def test_a_platform_written_in_the_test_runs_through_the_front_door(
    engine: ChatEngine, provider: OfflineProvider
) -> None:
    chat = ToyChat()
    door = FrontDoor(engine.settings, engine, TOY, budgets=Budgets())
    provider.enqueue(["Hello ", "there."], ["Still ", "here."])

    door.receive(ToyArrival(chat, "t1", "hi bot", mentioned=True))
    await door.drain()
    assert shown(chat, "t1") == "Hello there."
    door.receive(ToyArrival(chat, "t1", "and now?", mentioned=False))  # a follow-up
    door.receive(ToyArrival(chat, "t2", "not for you", mentioned=False))  # not addressed
    await door.drain()
    assert shown(chat, "t1") == "Hello there.Still here." and "t2" not in chat.threads

    acks: list[str] = []

    async def ack() -> None:
        acks.append("ack")

    answer = await door.command(
        Command("reset"), ToyArrival(chat, "t1", "", mentioned=True).key, acknowledge=ack
    )
    assert answer.startswith("Conversation reset") and acks == []
    assert "!reset" in await door.command(
        Command("help"), ToyArrival(chat, "x", "", mentioned=True).key, acknowledge=ack
    )

    chat.rate_limit_next_edit = True
    provider.enqueue(["After ", "a 429."])
    door.receive(ToyArrival(chat, "t3", "again", mentioned=True))
    await door.drain()
    assert chat.rate_limited == 1 and shown(chat, "t3") == "After a 429."

    provider.delay = 0.01
    provider.enqueue([f"w{n} " for n in range(500)])
    door.receive(ToyArrival(chat, "t4", "a long one", mentioned=True))
    async with asyncio.timeout(30):
        while "w3" not in shown(chat, "t4"):
            await asyncio.sleep(0.01)
    await door.close()
    assert shown(chat, "t4").startswith("w0 w1 w2 w3") and shown(chat, "t4").endswith(SHUTDOWN_NOTE)
    assert door.receive(ToyArrival(chat, "t5", "too late", mentioned=True)) is None


async def test_a_turn_whose_worker_died_after_intake_is_answered_by_another(
    engine: ChatEngine, provider: OfflineProvider
) -> None:
    chat = ToyChat()
    settings = engine.settings.with_overrides(turn_lease_seconds=1.0)

    async def reopen(place: str) -> ToySurface:
        return ToySurface(chat, place)

    dead = FrontDoor(settings, engine, TOY, budgets=Budgets())
    admitted = await dead.admit(ToyArrival(chat, "t1", "are you there?", mentioned=True))
    assert admitted is not None  # recorded, then its worker died before answering
    alive = FrontDoor(settings, engine, TOY, budgets=Budgets(), reopen=reopen)
    assert await alive.recover() == 0  # its lease still runs
    await asyncio.sleep(1.1)
    provider.enqueue(["Yes, ", "here."])
    assert await alive.recover() == 1
    await alive.drain()
    assert shown(chat, "t1") == "Yes, here."
    assert (await engine.store.get_turn(admitted.turn_id)).status == "answered"
    assert await alive.recover() == 0  # exactly once
