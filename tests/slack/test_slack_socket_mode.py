"""The Slack bot in Socket Mode over a real websocket: the entry point's own ``serve()`` (what
``python -m bots.slack`` runs with SLACK_APP_TOKEN set and no signing secret), Bolt's
``AsyncSocketModeHandler`` and slack_sdk's aiohttp ``SocketModeClient`` against the fake's
``apps.connections.open`` and ``/link/`` websocket, replies through the fake Web API, the offline
provider's deterministic demo answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from bots.slack.__main__ import serve
from bots.slack.app import EVENTS_PATH
from core.bot import SHUTDOWN_NOTE
from core.config import Settings
from core.errors import ConfigError
from core.streaming import STREAMING_INDICATOR, THINKING_TEXT
from tests.wire.slack import SocketModeSender, SocketModeSlack
from tests.wire.slack.harness import Served, demo, free_port, serving, until

CHANNEL = "C0001"


def socket_settings(fake: SocketModeSlack, tmp_path: Path, **env: str) -> Settings:
    """What an operator sets for Socket Mode: both tokens, no signing secret."""
    return Settings.from_mapping(
        {
            "SLACK_BOT_TOKEN": fake.team.token,
            "SLACK_APP_TOKEN": fake.app_token,
            "SLACK_API_URL": fake.url,
            "PORT": str(free_port()),
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}",
            "OFFLINE_DELAY": "0",
            **env,
        }
    )


@pytest.fixture
async def fake() -> AsyncIterator[SocketModeSlack]:
    async with SocketModeSlack() as fake:
        yield fake


@asynccontextmanager
async def socket_bot(
    fake: SocketModeSlack, tmp_path: Path, **env: str
) -> AsyncIterator[tuple[Served, SocketModeSender]]:
    """``serve()`` in Socket Mode, healthy and connected, and a sender of envelopes to it."""
    async with serving(socket_settings(fake, tmp_path, **env)) as served:
        await served.healthy()
        await fake.connected()
        yield served, SocketModeSender(fake, served.session)


def final(fake: SocketModeSlack, thread_ts: str, expected: str) -> Callable[[], bool]:
    return lambda: fake.thread_text(CHANNEL, thread_ts) == expected


async def test_mention_is_acked_at_once_and_streamed_into_the_thread(
    fake: SocketModeSlack, tmp_path: Path
) -> None:
    # About 55 chunks 20 ms apart: the turn outlasts the ack by far.
    async with socket_bot(fake, tmp_path, OFFLINE_DELAY="0.02") as (_, sender):
        ts = fake.next_ts()
        answers = await sender.mention("what is socket mode?", ts=ts)
        # Both deliveries (app_mention and message) acked, with no payload: events take none.
        assert [(a.status, a.body) for a in answers] == [(200, ""), (200, "")]
        expected = demo("what is socket mode?")
        await until(final(fake, ts, expected))

        [reply] = fake.bot_messages(CHANNEL, ts)
        assert reply.visible() == expected
        # Streamed: the text grew through partial states, each a beginning of the final one.
        shown = [
            s.removesuffix(STREAMING_INDICATOR)
            for s in reply.states
            if s not in ("", THINKING_TEXT)
        ]
        assert len(shown) >= 2
        assert all(expected.startswith(s) for s in shown)
        # Acked before the turn ended, not after it.
        acks = [fake.acks[e] for e in sender.envelope_ids]
        assert max(a.at for a in acks) < reply.times[-1]
        assert all(a.payload is None and a.connection == 1 for a in acks)
        assert fake.unexpected == []
        # slack_sdk pinged on connecting and got its pong (else it would reconnect).
        assert fake.connections[0].pings >= 1


async def test_healthz_answers_200_and_no_events_endpoint_is_served(
    fake: SocketModeSlack, tmp_path: Path
) -> None:
    async with socket_bot(fake, tmp_path) as (served, _):
        status, body = await served.health()
        assert (status, body["ok"]) == (200, True)
        # Requests come over the websocket; nothing listens for unsigned HTTP events.
        async with served.session.post(served.base_url + EVENTS_PATH, data=b"{}") as response:
            assert response.status == 404
        assert fake.opens == [None]


async def test_slash_command_is_answered_in_the_ack_payload(
    fake: SocketModeSlack, tmp_path: Path
) -> None:
    fake.users["U_ALICE"] = {"id": "U_ALICE", "is_owner": True}
    async with socket_bot(fake, tmp_path) as (_, sender):
        set_answer = await sender.command(
            "/chatbot", "system Answer in French.", response_url=fake.response_url("set")
        )
        show_answer = await sender.command(
            "/chatbot", "system", response_url=fake.response_url("show")
        )
        assert set_answer.json["response_type"] == "ephemeral"
        assert show_answer.json["response_type"] == "ephemeral"
        assert "Answer in French." in show_answer.json["text"]
        # Answered in the ack itself: no response_url call, no ephemeral message.
        assert fake.responded == []
        assert fake.counts["chat.postEphemeral"] == 0
        [set_envelope, _] = fake.envelopes
        assert set_envelope["type"] == "slash_commands"
        assert set_envelope["accepts_response_payload"] is True


async def test_redelivered_envelope_is_answered_once(fake: SocketModeSlack, tmp_path: Path) -> None:
    async with socket_bot(fake, tmp_path) as (served, sender):
        ts = fake.next_ts()
        await sender.mention("hello once", ts=ts, both=False)
        await until(final(fake, ts, demo("hello once")))
        # Slack did not see the ack in time and delivers the same event again.
        [again] = await sender.mention(
            "hello once", ts=ts, both=False, retry_num=1, retry_reason="timeout"
        )
        assert again.status == 200
        assert fake.envelopes[-1]["retry_attempt"] == 1
        # A later message in the same thread queues behind any turn of that conversation, so by
        # its answer a second turn for the redelivery would have shown.
        follow_up = fake.next_ts()
        await sender.message("and again", ts=follow_up, thread_ts=ts)
        expected = demo("hello once") + demo("hello once", "and again")
        await until(final(fake, ts, expected))
        # The follow-up's turn still stores its answer after the text landed: wait for it.
        deadline = time.monotonic() + 20
        while (await served.health())[1]["turns_in_progress"]:
            assert time.monotonic() < deadline, "turns still in progress"
            await asyncio.sleep(0.01)
        assert len(fake.bot_messages(CHANNEL, ts)) == 2
        assert "1 earlier message of yours" in fake.bot_messages(CHANNEL, ts)[1].visible()


async def test_after_a_disconnect_the_bot_reconnects_and_keeps_answering(
    fake: SocketModeSlack, tmp_path: Path
) -> None:
    async with socket_bot(fake, tmp_path) as (_, sender):
        before = fake.next_ts()
        await sender.mention("before the refresh", ts=before, both=False)
        await until(final(fake, before, demo("before the refresh")))

        first = await fake.disconnect("refresh_requested")
        second = await fake.connected(count=2)
        assert second.number == 2
        # A fresh URL was asked with the app token for the new connection.
        assert fake.opens == [None, None]
        assert second.ticket != first.ticket
        # slack_sdk closes the old socket itself once the new one is open.
        await fake.until(lambda: first.closed)

        after = fake.next_ts()
        await sender.mention("after the refresh", ts=after, both=False)
        await until(final(fake, after, demo("after the refresh")))
        assert fake.acks[sender.envelope_ids[-1]].connection == 2
        assert fake.unexpected == []


async def test_shutdown_closes_the_socket_then_ends_replies_with_a_note(
    fake: SocketModeSlack, tmp_path: Path
) -> None:
    # 0.5 s a chunk: the reply is still streaming when the stop comes.
    async with socket_bot(fake, tmp_path, OFFLINE_DELAY="0.5") as (served, sender):
        ts = fake.next_ts()
        await sender.mention("tell me a long story", ts=ts, both=False)
        await until(lambda: "offline" in fake.thread_text(CHANNEL, ts))
        await served.stopped()

        [reply] = fake.bot_messages(CHANNEL, ts)
        assert reply.visible().startswith("*(offline")
        assert reply.visible().endswith(SHUTDOWN_NOTE)
        [connection] = fake.connections
        assert connection.closed_at is not None
        # The socket was closed (no more envelopes taken) before the note was written.
        noted_at = next(
            t for s, t in zip(reply.states, reply.times, strict=True) if SHUTDOWN_NOTE in s
        )
        assert connection.closed_at <= noted_at


@pytest.mark.parametrize(
    ("app_token", "code"),
    [("xoxb-test-token", "not_allowed_token_type"), ("xapp-1-A0001-1-revoked", "invalid_auth")],
)
async def test_refused_app_token_is_a_config_error_naming_it(
    fake: SocketModeSlack, tmp_path: Path, app_token: str, code: str
) -> None:
    settings = socket_settings(fake, tmp_path).with_overrides(slack_app_token=app_token)
    with pytest.raises(ConfigError) as raised:
        await asyncio.wait_for(serve(settings, asyncio.Event(), host="127.0.0.1"), timeout=30)
    assert raised.value.setting == "SLACK_APP_TOKEN"
    assert code in str(raised.value)
    # Asked once, not retried every 10 seconds; no websocket was opened.
    assert fake.opens == [code]
    assert fake.connections == []


async def test_stop_ends_serve_while_the_socket_cannot_connect(
    fake: SocketModeSlack, tmp_path: Path
) -> None:
    fake.socket_unavailable = 503
    async with serving(socket_settings(fake, tmp_path)) as served:
        await served.healthy()
        # The URL was issued; the websocket itself is refused, and slack_sdk retries it.
        await fake.until(lambda: fake.refused >= 1)
        await served.stopped()
    assert fake.opens == [None]
    assert fake.connections == []
