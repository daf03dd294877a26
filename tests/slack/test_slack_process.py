"""The Slack bot as an operator runs it: ``python -m bots.slack`` as a real process in HTTP mode
(and in Socket Mode), configured by environment variables only, against the fake Slack started
here on 127.0.0.1; signed events over HTTP; SIGTERM ends it. Also what the HTTP endpoint answers
while the bot is shutting down (in this process, where the moment can be chosen exactly)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from bots.slack.app import EVENTS_PATH, HEALTH_PATH
from core.bot import SHUTDOWN_NOTE
from tests.wire.slack import FakeSlack, SlackSender, SocketModeSender, SocketModeSlack
from tests.wire.slack.harness import SIGNING_SECRET, demo, free_port, running_bot, until

CHANNEL = "C0001"
#: Variables of the developer's environment that would change what the process does.
OWN_VARIABLES = (
    "SLACK_",
    "DATABASE_",
    "LLM_",
    "OPENAI_",
    "ANTHROPIC_",
    "OFFLINE_",
    "REDIS_",
    "RATE_",
    "PORT",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
)


class BotProcess:
    """``python -m bots.slack`` in ``cwd`` with ``env`` on top of a clean environment."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith(OWN_VARIABLES)}
        clean.update(
            PORT=str(self.port),
            DATABASE_URL=f"sqlite+aiosqlite:///{cwd / 'bot.db'}",
            LOG_LEVEL="INFO",
        )
        clean.update(env)
        self.stderr_path = cwd / "stderr.log"
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bots.slack", "--host", "127.0.0.1"],
                cwd=cwd,
                env=clean,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def healthy(self, session: aiohttp.ClientSession, within: float = 60.0) -> None:
        """Wait until ``GET /healthz`` answers 200; fail at once if the process ended."""
        deadline = time.monotonic() + within
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"exited {self.process.returncode}:\n{self.stderr}")
            try:
                async with session.get(self.base_url + HEALTH_PATH) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass  # Not listening yet.
            if time.monotonic() > deadline:
                raise AssertionError(f"/healthz not 200 within {within} s:\n{self.stderr}")
            await asyncio.sleep(0.05)

    async def terminate(self, within: float = 30.0) -> int:
        """SIGTERM, as a platform stops a process; its exit status."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.process.wait, within)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running {within} s after SIGTERM:\n{self.stderr}"
            ) from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def http_env(fake: FakeSlack, **env: str) -> dict[str, str]:
    """What an operator sets for HTTP mode."""
    return {
        "SLACK_BOT_TOKEN": fake.team.token,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_API_URL": fake.url,
        **env,
    }


def signed_sender(
    process: BotProcess, fake: FakeSlack, session: aiohttp.ClientSession
) -> SlackSender:
    return SlackSender(
        process.base_url + EVENTS_PATH,
        SIGNING_SECRET,
        session,
        team_id=fake.team.team_id,
        bot_user_id=fake.team.bot_user_id,
    )


async def test_http_process_answers_a_mention_in_its_thread_and_exits_0_on_sigterm(
    bot_process: Callable[..., BotProcess],
) -> None:
    async with FakeSlack() as fake, aiohttp.ClientSession() as session:
        bot = bot_process(**http_env(fake, OFFLINE_DELAY="0"))
        await bot.healthy(session)
        ts = fake.next_ts()
        answers = await signed_sender(bot, fake, session).mention("hello from a process", ts=ts)
        assert [a.status for a in answers] == [200, 200]
        expected = demo("hello from a process")
        await until(lambda: fake.thread_text(CHANNEL, ts) == expected)
        # Once: the app_mention and message twins are one turn.
        [reply] = fake.bot_messages(CHANNEL, ts)
        assert reply.thread_ts == ts

        assert await bot.terminate() == 0
        assert "Traceback" not in bot.stderr
        assert f"listening on :{bot.port}" in bot.stderr


async def test_http_process_sigterm_ends_the_reply_in_progress_with_the_note(
    bot_process: Callable[..., BotProcess],
) -> None:
    async with FakeSlack() as fake, aiohttp.ClientSession() as session:
        # 0.5 s a chunk: the answer would take half a minute, so it is in progress at SIGTERM.
        bot = bot_process(**http_env(fake, OFFLINE_DELAY="0.5"))
        await bot.healthy(session)
        ts = fake.next_ts()
        await signed_sender(bot, fake, session).mention("tell me everything", ts=ts)
        await until(lambda: fake.thread_text(CHANNEL, ts).startswith("*(offline"))

        assert await bot.terminate() == 0
        [reply] = fake.bot_messages(CHANNEL, ts)
        assert reply.visible().startswith("*(offline")
        assert reply.visible().endswith(SHUTDOWN_NOTE)
        assert "Traceback" not in bot.stderr


async def test_socket_mode_process_answers_and_exits_0_on_sigterm(
    bot_process: Callable[..., BotProcess],
) -> None:
    async with SocketModeSlack() as fake, aiohttp.ClientSession() as session:
        # Socket Mode: the app-level token and no signing secret.
        bot = bot_process(
            SLACK_BOT_TOKEN=fake.team.token,
            SLACK_APP_TOKEN=fake.app_token,
            SLACK_API_URL=fake.url,
            OFFLINE_DELAY="0",
        )
        await bot.healthy(session)
        await fake.connected()
        ts = fake.next_ts()
        answers = await SocketModeSender(fake, session).mention("hello over the socket", ts=ts)
        assert [a.status for a in answers] == [200, 200]
        expected = demo("hello over the socket")
        await until(lambda: fake.thread_text(CHANNEL, ts) == expected)

        assert await bot.terminate() == 0
        assert all(c.closed for c in fake.connections)
        assert "Traceback" not in bot.stderr
        assert "connected over Socket Mode" in bot.stderr


async def test_events_while_shutting_down_get_503_and_slack_redelivers_after_restart(
    sqlite_url: str,
) -> None:
    async with FakeSlack(rate_scale=10.0) as fake:
        async with running_bot(sqlite_url, fake=fake, provider_delay=0.05) as h:
            h.provider.enqueue(["Partial "] + ["words "] * 200)
            busy = h.new_ts()
            await h.sender.mention("tell me everything", ts=busy)
            await until(lambda: "Partial" in fake.thread_text(CHANNEL, busy))
            closing = asyncio.create_task(h.bot.close())
            await until(lambda: not h.bot.ready)
            # Arrives while the reply in progress is being ended.
            late = h.new_ts()
            answers = await h.sender.mention("are you there?", ts=late)
            command = await h.sender.command("/chatbot", "help")
            await asyncio.wait_for(closing, timeout=30)
            # Not acked, so Slack delivers it again later; no turn started meanwhile.
            assert [a.status for a in answers] == [503, 503]
            assert command.status == 503
            assert fake.bot_messages(CHANNEL, late) == []
            assert len(h.provider.requests) == 1
            assert fake.thread_text(CHANNEL, busy).endswith(SHUTDOWN_NOTE)
        # The restarted bot gets Slack's redelivery and answers it.
        async with running_bot(sqlite_url, fake=fake) as restarted:
            restarted.provider.enqueue(["Yes, back."])
            await restarted.sender.mention(
                "are you there?", ts=late, retry_num=1, retry_reason="http_error"
            )
            await restarted.settle()
            assert fake.thread_text(CHANNEL, late) == "Yes, back."


async def test_unreachable_slack_api_is_one_line_naming_slack_api_url(
    bot_process: Callable[..., BotProcess],
) -> None:
    nothing_listens = f"http://127.0.0.1:{free_port()}/api/"
    bot = bot_process(
        SLACK_BOT_TOKEN="xoxb-1", SLACK_SIGNING_SECRET=SIGNING_SECRET, SLACK_API_URL=nothing_listens
    )
    assert await asyncio.to_thread(bot.process.wait, 60) == 2
    [line] = bot.stderr.splitlines()
    assert line.startswith(f"threadbot slack: cannot reach the Slack Web API at {nothing_listens}")
    assert "SLACK_API_URL" in line


async def test_start_up_says_what_runs_in_one_line_without_library_noise(
    bot_process: Callable[..., BotProcess],
) -> None:
    async with FakeSlack() as fake, aiohttp.ClientSession() as session:
        bot = bot_process(**http_env(fake))
        await bot.healthy(session)
        assert await bot.terminate() == 0
    lines = bot.stderr.splitlines()
    # Only threadbot's own loggers speak at INFO: no Alembic, Bolt or aiohttp lines.
    assert all(" INFO bots." in line for line in lines), lines
    [running] = [line for line in lines if "listening on" in line]
    assert f"HTTP mode, listening on :{bot.port}" in running
    assert "model offline" in running and "database sqlite+aiosqlite:///" in running


async def test_log_level_debug_lets_the_libraries_speak(
    bot_process: Callable[..., BotProcess],
) -> None:
    async with FakeSlack() as fake, aiohttp.ClientSession() as session:
        bot = bot_process(**http_env(fake, LOG_LEVEL="debug"))
        await bot.healthy(session)
        assert await bot.terminate() == 0
    assert " alembic.runtime.migration: " in bot.stderr


async def test_a_reply_cut_by_a_crash_is_finished_in_place_by_the_next_process(
    bot_process: Callable[..., BotProcess], tmp_path: Path
) -> None:
    async with FakeSlack() as fake, aiohttp.ClientSession() as session:
        shared = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"}
        env = http_env(
            fake, OFFLINE_DELAY="0.1", TURN_LEASE_SECONDS="2", SLACK_STREAMING="update", **shared
        )
        first = bot_process(**env)
        await first.healthy(session)
        ts = fake.next_ts()
        await signed_sender(first, fake, session).mention("tell me everything", ts=ts)
        await until(lambda: fake.thread_text(CHANNEL, ts).startswith("*(offline"))
        # With the thread's status showing, the first post is the answer's first text: the crash
        # comes once the turn has recorded that message (before, there is nothing to resume).
        await until(lambda: _reply_recorded(tmp_path / "shared.db"))
        first.process.send_signal(signal.SIGKILL)  # a crash: no shutdown note, no cleanup
        await asyncio.to_thread(first.process.wait, 10)
        [reply] = fake.bot_messages(CHANNEL, ts)
        assert reply.visible().endswith(" \u258d")  # left half-written, with the cursor

        crashed_at = time.monotonic()
        second = bot_process(**env)
        await second.healthy(session)
        expected = demo("tell me everything")
        await until(lambda: fake.thread_text(CHANNEL, ts) == expected, within=60)
        finished_after = time.monotonic() - crashed_at
        # The same message, finished in place: no second reply, no cursor.
        assert [m.ts for m in fake.bot_messages(CHANNEL, ts)] == [reply.ts]
        assert "taking over turn" in second.stderr
        assert await second.terminate() == 0, second.stderr
        print(f"crash to complete answer: {finished_after:.1f} s")


def _reply_recorded(database: Path) -> bool:
    """Whether the one turn in ``database`` has recorded its reply's message."""
    with contextlib.closing(sqlite3.connect(database)) as connection:
        row = connection.execute("SELECT reply_message_ids FROM turns").fetchone()
    return row is not None and bool(row[0])


async def test_a_second_process_on_one_sqlite_file_is_refused_in_one_line(
    bot_process: Callable[..., BotProcess], tmp_path: Path
) -> None:
    async with FakeSlack() as fake, aiohttp.ClientSession() as session:
        shared = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"}
        first = bot_process(**http_env(fake, **shared))
        await first.healthy(session)
        second = bot_process(**http_env(fake, **shared))
        assert await asyncio.to_thread(second.process.wait, 60) == 2
        [line] = second.stderr.splitlines()
        assert "another threadbot slack process" in line and "DATABASE_URL" in line
        assert await first.terminate() == 0
