"""Turns that outlive their worker or cross workers, on one PostgreSQL database: a dead worker's
reply is finished by exactly one live worker, and a follow-up that reaches another worker than
the thread's first question is answered after it, in order. Also the log line of a message the
front door leaves unanswered.

The dead worker is a real ``python -m bots.slack`` killed with SIGKILL; the live workers are
``SlackBot``s in this process (``running_bot``), all against one ``FakeSlack``. The PostgreSQL
database lives for the whole session, so each test talks in a channel of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time
import uuid
from collections.abc import Callable

import aiohttp
import pytest
from sqlalchemy import select

from core.conversation import ChatMessage, ConversationKey
from core.providers.offline import OfflineProvider, demo_answer
from core.store import ConversationStore, TurnRecord, TurnRow
from core.streaming import STREAMING_INDICATOR, THINKING_TEXT
from tests.slack.test_slack_process import BotProcess, http_env, signed_sender
from tests.wire.slack import FakeSlack
from tests.wire.slack.harness import Harness, demo, running_bot, until

#: The turn lease every worker of these tests uses: a dead worker's turn expires this soon.
LEASE_SECONDS = 2.0


def fresh_channel() -> str:
    """A channel no other test of the session used (the PostgreSQL database is shared)."""
    return "C" + uuid.uuid4().hex[:10].upper()


def answer_to(*conversation: str) -> str:
    """The offline demo's answer to the last of ``conversation`` (user and bot alternating)."""
    roles = ("user", "assistant")
    return "".join(demo_answer([ChatMessage(roles[i % 2], t) for i, t in enumerate(conversation)]))


def asked(provider: OfflineProvider, question: str) -> int:
    """How many requests ``provider`` received with ``question`` in them."""
    return sum(1 for r in provider.requests if any(m.content == question for m in r.messages))


async def turns_of(store: ConversationStore, key: ConversationKey) -> list[TurnRecord]:
    conversation = await store.find(key)
    assert conversation is not None
    async with store.engine.connect() as conn:
        ids = (
            await conn.execute(
                select(TurnRow.id)
                .where(TurnRow.conversation_id == conversation.id)
                .order_by(TurnRow.id)
            )
        ).scalars()
        return [await store.get_turn(turn_id) for turn_id in list(ids)]


def shown(state: str) -> str:
    """A message state without the streaming cursor."""
    return state.removesuffix(STREAMING_INDICATOR)


async def test_two_live_workers_finish_a_dead_workers_reply_exactly_once(
    postgres_url: str,
    bot_process: Callable[..., BotProcess],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="core.bot")
    channel = fresh_channel()
    question = f"tell me everything about {channel}"
    expected = demo(question)
    # The live workers stream the answer over a few seconds, so it takes several edits.
    live = {"turn_lease_seconds": LEASE_SECONDS, "provider_delay": 0.05}
    async with (
        FakeSlack(rate_scale=10.0) as fake,
        aiohttp.ClientSession() as session,
        # Both live workers run recovery from their start: every half lease from now on.
        running_bot(postgres_url, fake=fake, **live) as a,
        running_bot(postgres_url, fake=fake, **live) as b,
    ):
        env = http_env(
            fake,
            DATABASE_URL=postgres_url,
            OFFLINE_DELAY="0.1",
            TURN_LEASE_SECONDS=str(LEASE_SECONDS),
            SLACK_STREAMING="update",
        )
        doomed = bot_process(**env)
        await doomed.healthy(session)
        ts = fake.next_ts()
        await signed_sender(doomed, fake, session).mention(question, channel=channel, ts=ts)
        await until(lambda: fake.thread_text(channel, ts).startswith("*(offline"), within=30)
        # With the thread's status showing, the first post is the answer's first text; the crash
        # comes once the turn has recorded it (a crash before that leaves nothing to resume).
        key = ConversationKey("slack", fake.team.team_id, channel, ts)
        [turn] = await turns_of(a.engine.store, key)
        for _ in range(300):
            if (await a.engine.store.get_turn(turn.id)).reply_message_ids:
                break
            await asyncio.sleep(0.01)
        doomed.process.send_signal(signal.SIGKILL)  # a crash: no note, no cleanup, no release
        await asyncio.to_thread(doomed.process.wait, 10)
        [reply] = fake.bot_messages(channel, ts)
        cut = len(reply.states)
        assert reply.visible().endswith(STREAMING_INDICATOR), reply.visible()

        crashed_at = time.monotonic()
        # Besides both background loops, both workers race for the turn as its lease expires.
        while (await a.engine.store.get_turn(turn.id)).takeovers == 0:
            await asyncio.gather(a.bot.door.recover(), b.bot.door.recover())
            await asyncio.sleep(0.05)
        await until(lambda: fake.thread_text(channel, ts) == expected, within=60)
        finished_after = time.monotonic() - crashed_at
        await a.settle()
        await b.settle()

        # Once: one worker asked the model, one takeover, one message edited in one sequence.
        assert asked(a.provider, question) + asked(b.provider, question) == 1
        taken = await a.engine.store.get_turn(turn.id)
        assert (taken.status, taken.takeovers) == ("answered", 1)
        workers: dict[str | None, Harness] = {a.bot.door.worker: a, b.bot.door.worker: b}
        assert taken.worker in workers
        assert asked(workers[taken.worker].provider, question) == 1
        takeovers = [r for r in caplog.records if f"taking over turn {turn.id} " in r.message]
        assert len(takeovers) == 1
        assert [m.ts for m in fake.bot_messages(channel, ts)] == [reply.ts]
        # After the crash, the message goes from thinking to ever longer text, never back: two
        # workers answering at once would interleave shorter and longer texts.
        after = [shown(s) for s in reply.states[cut:] if shown(s) != THINKING_TEXT]
        assert after and after[-1] == expected
        assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(after))
        name = "A" if workers[taken.worker] is a else "B"
        print(
            f"taken over by worker {name} ({taken.worker}); crash to complete answer: "
            f"{finished_after:.1f} s; {len(after)} edits after the crash"
        )


async def test_a_follow_up_at_another_worker_is_answered_after_the_first_question(
    postgres_url: str,
) -> None:
    channel = fresh_channel()
    question, follow_up = "what is a lease?", "and who renews it?"
    first_answer = answer_to(question)
    second_answer = answer_to(question, first_answer, follow_up)
    async with (
        FakeSlack(rate_scale=10.0) as fake,
        # A answers slowly (about 2.5 s), so the follow-up arrives while it streams.
        running_bot(postgres_url, fake=fake, provider_delay=0.05) as a,
        running_bot(postgres_url, fake=fake) as b,
    ):
        ts = fake.next_ts()
        answers = await a.sender.mention(question, channel=channel, ts=ts)
        # Acknowledged only once the turn and its conversation are recorded...
        assert [answer.status for answer in answers] == [200, 200]
        # ...so the follow-up, without a mention, at once to the other worker, is for the bot.
        follow = fake.next_ts()
        answer = await b.sender.message(follow_up, channel=channel, ts=follow, thread_ts=ts)
        assert answer.status == 200
        await until(lambda: len(fake.bot_messages(channel, ts)) == 2, within=30)
        await a.settle()
        await b.settle()

        replies = sorted(m.visible() for m in fake.bot_messages(channel, ts))
        assert replies == sorted([first_answer, second_answer])
        # In order: B asked the model once the first answer was stored, with it as context.
        [request] = b.provider.requests
        assert [m.content for m in request.messages] == [question, first_answer, follow_up]
        conversation = await b.engine.store.find(ConversationKey("slack", "T0001", channel, ts))
        assert conversation is not None
        history = await b.engine.store.history(conversation, limit=None)
        assert [m.content for m in history] == [question, first_answer, follow_up, second_answer]
        turns = await turns_of(b.engine.store, conversation.key)
        assert [t.status for t in turns] == ["answered", "answered"]
        assert [t.worker for t in turns] == [a.bot.door.worker, b.bot.door.worker]


async def test_a_message_left_unanswered_is_logged_with_its_id_and_why(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="core.bot")
    async with running_bot(sqlite_url) as h:
        # A reply in a thread the bot has no conversation in (say its question is not recorded
        # yet): not for the bot, unless it mentions it.
        thread, ts = h.new_ts(), h.new_ts()
        answer = await h.sender.message("and another thing", ts=ts, thread_ts=thread)
        assert answer.status == 200
        await h.settle()
        assert h.fake.bot_messages() == []
        assert h.provider.requests == []
    [line] = [r.message for r in caplog.records if f"C0001:{ts}" in r.message]
    assert line == (
        f"slack message C0001:{ts}: not addressed "
        "(no mention, and the bot has no conversation in this thread)"
    )
