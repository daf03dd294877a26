"""Issue 10 item 2 on Slack: PostgreSQL out of reach, through a TCP proxy the tests cut.

While the database cannot be reached a question is not acknowledged: Slack gets 503 for every
delivery and ``/healthz`` says why, so Slack delivers the event again; the redelivery after the
database is back is answered, once. A cut while an answer streams does not lose it: its save is
retried, and when the database stays down the reply says it could not be saved.

The proxy's two cuts are a server that is down (``refuse``: connections closed at once) and a dead
network (``hang``: connections never answered, so the 2 s intake deadline answers). Figures are
printed (``-s``), never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text

from bots.slack.app import HEALTH_PATH
from bots.slack.surface import message_id
from core.conversation import ConversationKey
from core.outcomes import UNSAVED_ANSWER_NOTE
from tests.slack.test_slack_process import BotProcess, http_env, signed_sender
from tests.wire.slack import FakeSlack
from tests.wire.slack.harness import Harness, demo, running_bot, until
from tests.wire.tcp_proxy import CutMode, TcpProxy

pytestmark = pytest.mark.postgres


@pytest.fixture
def channel() -> str:
    """A channel of its own: the session's database outlives each test's fake Slack, whose
    timestamps start over, so a shared channel would make one test's message another's replay."""
    return f"C{uuid.uuid4().hex[:10].upper()}"


#: How long the process test keeps the database out of reach (the issue's outage).
OUTAGE_SECONDS = 10.0


async def turn_row(h: Harness, channel: str, ts: str) -> dict[str, Any]:
    """The durable turn of the message at ``ts`` (status, note), read straight from the table."""
    event_key = f"{h.fake.team.team_id}:{message_id(channel, ts)}"
    async with h.engine.store.engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT id, status, note FROM turns WHERE event_key = :k"), {"k": event_key}
            )
        ).all()
    [row] = rows
    return dict(row._mapping)


async def stored_roles(h: Harness, channel: str, ts: str) -> list[tuple[str, str]]:
    """The conversation of the thread at ``ts`` as stored: (role, content) oldest first."""
    key = ConversationKey("slack", h.fake.team.team_id, channel, ts)  # the thread it opened
    conversation = await h.engine.store.find(key)
    assert conversation is not None
    return [(m.role, m.content) for m in await h.engine.store.history(conversation, limit=None)]


@pytest.mark.parametrize("mode", ["refuse", "hang"])
async def test_a_mention_while_the_database_is_cut_gets_503_and_its_redelivery_is_answered_once(
    postgres_url: str, channel: str, mode: CutMode
) -> None:
    async with (
        TcpProxy.to_database(postgres_url) as proxy,
        running_bot(proxy.database_url(postgres_url)) as h,
    ):
        assert (await h.get(HEALTH_PATH))[0] == 200
        proxy.cut(mode)
        ts = h.new_ts()
        started = time.monotonic()
        first = await h.sender.event(_mention_event(h, channel, ts, "app_mention"))
        first_took = time.monotonic() - started
        second = await h.sender.event(_mention_event(h, channel, ts, "message"))
        both_took = time.monotonic() - started
        health_started = time.monotonic()
        health_status, health = await h.get(HEALTH_PATH)
        health_took = time.monotonic() - health_started

        # Not acknowledged: Slack delivers the event again. Nothing was posted or asked meanwhile.
        assert (first.status, second.status) == (503, 503)
        assert health_status == 503
        assert health["ok"] is False
        assert health["status"].startswith("database unreachable (")
        if mode == "hang":
            assert health["status"] == "database unreachable (no answer within 2 s)"
        assert h.fake.bot_messages(channel) == []
        assert h.provider.requests == []
        # The cut was the one the test asked for (a hang is no refusal).
        assert (proxy.refused > 0, proxy.hung > 0) == (mode == "refuse", mode == "hang")

        proxy.restore()
        again = await h.sender.mention("are you there?", channel=channel, ts=ts, retry_num=1)
        await h.settle()
        assert [a.status for a in again] == [200, 200]
        # Answered exactly once: one reply, one request to the model, one stored turn.
        [reply] = h.fake.bot_messages(channel, ts)
        assert reply.visible() == demo("are you there?")
        assert len(h.provider.requests) == 1
        assert (await turn_row(h, channel, ts))["status"] == "answered"
        assert (await h.get(HEALTH_PATH))[0] == 200
        print(
            f"\n[{mode}] 503 to app_mention after {first_took:.2f} s, to both deliveries after "
            f"{both_took:.2f} s; /healthz 503 after {health_took:.2f} s: {health['status']!r}"
        )


def _mention_event(h: Harness, channel: str, ts: str, kind: str) -> dict[str, Any]:
    """One of the two deliveries Slack makes of a channel mention."""
    event: dict[str, Any] = {
        "type": kind,
        "user": "U_ALICE",
        "text": f"<@{h.fake.team.bot_user_id}> are you there?",
        "ts": ts,
        "channel": channel,
        "team": h.fake.team.team_id,
        "event_ts": ts,
    }
    if kind == "message":
        event["channel_type"] = "channel"
    return event


# -- the real process ----------------------------------------------------------------------------


@pytest.fixture
def bot_process(tmp_path: Path) -> Iterator[Callable[..., BotProcess]]:
    """Start ``python -m bots.slack`` with these variables; killed at the end if still running."""
    started: list[BotProcess] = []

    def start(**env: str) -> BotProcess:
        started.append(BotProcess(tmp_path, env))
        return started[-1]

    yield start
    for process in started:
        process.kill()


async def test_the_process_stays_up_through_a_ten_second_outage_and_answers_the_redelivery(
    postgres_url: str, channel: str, bot_process: Callable[..., BotProcess]
) -> None:
    async with (
        TcpProxy.to_database(postgres_url) as proxy,
        FakeSlack() as fake,
        aiohttp.ClientSession() as session,
    ):
        bot = bot_process(
            **http_env(fake, OFFLINE_DELAY="0", DATABASE_URL=proxy.database_url(postgres_url))
        )
        await bot.healthy(session)
        sender = signed_sender(bot, fake, session)
        # A dead network: the worst case, where only our own deadlines answer.
        proxy.cut("hang")
        cut_at = time.monotonic()
        await asyncio.sleep(1.0)  # the question arrives a second into the outage
        ts = fake.next_ts()
        asked_at = time.monotonic()
        during = await sender.mention("still there?", channel=channel, ts=ts)
        answered_503_after = time.monotonic() - asked_at
        async with session.get(bot.base_url + HEALTH_PATH) as response:
            health_status, health = response.status, await response.json()
        await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - cut_at)))
        assert bot.process.poll() is None, bot.stderr
        assert [a.status for a in during] == [503, 503]
        assert health_status == 503 and health["status"].startswith("database unreachable")
        assert fake.bot_messages(channel, ts) == []

        proxy.restore()
        restored_at = time.monotonic()
        redelivered = await sender.mention("still there?", channel=channel, ts=ts, retry_num=1)
        expected = demo("still there?")
        await until(lambda: fake.thread_text(channel, ts) == expected, within=30)
        answered_after = time.monotonic() - restored_at
        await bot.healthy(session)
        healthy_after = time.monotonic() - restored_at

        assert [a.status for a in redelivered] == [200, 200]
        [reply] = fake.bot_messages(channel, ts)
        assert reply.visible() == expected
        assert await bot.terminate() == 0
        assert "Traceback" not in bot.stderr, bot.stderr
        print(
            f"\nprocess, {OUTAGE_SECONDS:.0f} s outage (hang): both deliveries 503 after "
            f"{answered_503_after:.2f} s; /healthz said {health['status']!r}; after restore the "
            f"redelivery was answered in {answered_after:.2f} s, /healthz 200 in "
            f"{healthy_after:.2f} s"
        )


# -- a cut while the answer streams ----------------------------------------------------------------


async def _cut_while_streaming(h: Harness, proxy: TcpProxy, channel: str, ts: str) -> float:
    """Ask a long question, cut the database once its answer shows; the time of the cut."""
    h.provider.enqueue(["Partial "] + ["words "] * 40)
    answers = await h.sender.mention("tell me everything", channel=channel, ts=ts)
    assert [a.status for a in answers] == [200, 200]
    await until(lambda: "Partial" in h.fake.thread_text(channel, ts))
    proxy.cut("refuse")
    return time.monotonic()


def _turn_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Turns whose task ended in an exception (the front door logs each)."""
    return [r.getMessage() for r in caplog.records if r.name == "core.bot" and r.exc_info]


def _save_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("saving the answer failed")
    ]


async def test_a_cut_while_the_answer_streams_is_ridden_out_by_retrying_its_save(
    postgres_url: str, channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="core.store")
    async with (
        TcpProxy.to_database(postgres_url) as proxy,
        running_bot(proxy.database_url(postgres_url), provider_delay=0.02) as h,
    ):
        ts = h.new_ts()
        cut_at = await _cut_while_streaming(h, proxy, channel, ts)
        # The database comes back while the save waits to be tried again.
        await until(lambda: bool(_save_failures(caplog)), within=30)
        proxy.restore()
        restored_after = time.monotonic() - cut_at
        await h.settle()

        answer = "Partial " + "words " * 40
        [reply] = h.fake.bot_messages(channel, ts)
        assert reply.visible() == answer
        assert UNSAVED_ANSWER_NOTE not in reply.visible()
        assert await stored_roles(h, channel, ts) == [
            ("user", "tell me everything"),
            ("assistant", answer),
        ]
        assert (await turn_row(h, channel, ts))["status"] == "answered"
        # The turn ended cleanly, though the connection holding its conversation's lock dropped.
        assert _turn_failures(caplog) == []
        print(
            f"\ncut mid-answer, restored {restored_after:.2f} s later: "
            f"{len(_save_failures(caplog))} failed save attempt(s), then saved"
        )


async def test_an_answer_that_cannot_be_saved_ends_with_the_note_and_the_turn_is_not_lost(
    postgres_url: str, channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="core.store")
    # A short lease, so a worker takes the unfinished turn over soon after the database is back.
    async with (
        TcpProxy.to_database(postgres_url) as proxy,
        running_bot(
            proxy.database_url(postgres_url), provider_delay=0.02, turn_lease_seconds=1.0
        ) as h,
    ):
        ts = h.new_ts()
        cut_at = await _cut_while_streaming(h, proxy, channel, ts)
        shown_first = "Partial " + "words " * 40
        noted = shown_first + "\n\n" + UNSAVED_ANSWER_NOTE
        await until(lambda: h.fake.thread_text(channel, ts) == noted, within=30)
        noted_after = time.monotonic() - cut_at
        await h.settle()
        attempts = len(_save_failures(caplog))
        assert attempts >= 2  # tried again before giving up
        assert _turn_failures(caplog) == []

        # The outcome could not be recorded either; once the database is back, the worker that
        # answered saves it (the reply the user read stays as it is, not answered again).
        h.provider.enqueue(["A second, ", "saved answer."])
        proxy.restore()
        restored_at = time.monotonic()
        turn = await _settled_turn(h, channel, ts)
        settled_after = time.monotonic() - restored_at
        await h.settle()
        [reply] = h.fake.bot_messages(channel, ts)
        shown = reply.visible()
        stored = await stored_roles(h, channel, ts)
        assert shown == noted
        assert stored == [("user", "tell me everything")]
        assert (turn["status"], turn["note"]) == ("answered", "the answer could not be saved")
        print(
            f"\ncut mid-answer, database kept down: the note after {noted_after:.2f} s "
            f"({attempts} failed save attempts); {settled_after:.2f} s after restore the turn is "
            f"{turn['status']!r} ({turn['note']!r}) and the reply shows {shown!r:.80}"
        )


async def _settled_turn(h: Harness, channel: str, ts: str, within: float = 30.0) -> dict[str, Any]:
    """The turn at ``ts`` once it has an outcome (no longer received or answering)."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(Exception):  # the pool may still hold connections cut earlier
            turn = await turn_row(h, channel, ts)
            if turn["status"] not in ("received", "answering"):
                return turn
        if time.monotonic() > deadline:
            raise AssertionError("the turn has no outcome")
        await asyncio.sleep(0.05)
