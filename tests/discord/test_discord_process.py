"""The operator's path with the real process: ``python -m bots.discord`` against ``FakeDiscord``.

Only what an operator sets: a token, ``DISCORD_API_URL`` (so the bot must ask the fake's
``GET /gateway/bot`` for the gateway), a SQLite file and no LLM key (the offline demo). stdout is a
pipe, as under a process manager, so it is block-buffered unless the bot flushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import update

from core.bot import INTERRUPTED_NOTE, RECOVERY_MAX_AGE, SHUTDOWN_NOTE
from core.config import Settings
from core.conversation import ChatMessage
from core.providers.offline import demo_answer
from core.store import OPEN_TURN_STATUSES, ConversationStore, TurnRecord, TurnRow
from core.streaming import STREAMING_INDICATOR, THINKING_TEXT
from tests.wire.discord.server import BOT_TOKEN, PUBLIC_THREAD, FakeDiscord, FakeMessage

#: View Channel + Send Messages + Read Message History + Create Public Threads + Send Messages in
#: Threads (discord-api-docs "Permissions": 1<<10, 1<<11, 1<<16, 1<<35, 1<<38).
EXPECTED_PERMISSIONS = 309_237_713_920
#: How long a broken test may hang before failing; never a timing assertion. Generous because a
#: loaded 2-core CI machine takes seconds to import discord.py and SQLAlchemy.
GIVE_UP_AFTER = 30.0
#: How often the test looks at the fake's records and the process's output.
POLL_EVERY = 0.02
#: Every variable Settings reads, and the families of other deployments' keys: none of the
#: developer's or CI's own configuration may leak into the process.
OPERATOR_SETTINGS = frozenset(f.name.upper() for f in fields(Settings))
FOREIGN_PREFIXES = ("DISCORD_", "SLACK_", "LLM_", "OPENAI_", "ANTHROPIC_")
#: Seconds between demo words while a reply is interrupted: the demo's 49 words would take
#: ~25 s, far longer than the test takes to send SIGTERM once the first word shows.
SLOW_OFFLINE_DELAY = "0.5"
#: What Python, asyncio, aiohttp and logging write on stderr when something went wrong.
SIGNS_OF_TROUBLE = ("Traceback", " ERROR ", "Unclosed", "was destroyed but it is pending")


def bot_environment(fake: FakeDiscord, database: Path, **settings: str) -> dict[str, str]:
    """The inherited environment without threadbot settings, plus the operator's few."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in OPERATOR_SETTINGS and not name.startswith(FOREIGN_PREFIXES)
    }
    # Output as under a process manager: a pipe, buffered unless the bot flushes.
    env.pop("PYTHONUNBUFFERED", None)
    env.update(
        DISCORD_BOT_TOKEN=BOT_TOKEN,
        DISCORD_API_URL=fake.api_url,
        DATABASE_URL=f"sqlite+aiosqlite:///{database}",
        OFFLINE_DELAY="0",
    )
    env.update(settings)
    return env


@dataclass
class BotProcess:
    """One ``python -m bots.discord`` and the lines it has written so far."""

    process: asyncio.subprocess.Process
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    async def until(self, what: str, predicate: Callable[[], bool]) -> None:
        """Poll ``predicate`` until it holds; fail at once if the process exits meanwhile."""
        try:
            async with asyncio.timeout(GIVE_UP_AFTER):
                while not predicate():
                    if self.process.returncode is not None:
                        raise AssertionError(
                            f"the bot exited ({self.process.returncode}) before {what}:\n"
                            + "".join(self.stderr[-40:])
                        )
                    await asyncio.sleep(POLL_EVERY)
        except TimeoutError:
            raise AssertionError(
                f"gave up waiting for {what}; stdout: {self.stdout!r}\n"
                + "".join(self.stderr[-40:])
            ) from None

    async def terminate(self) -> int:
        """SIGTERM, as a process manager stops a worker; return the exit status."""
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(GIVE_UP_AFTER):
            return await self.process.wait()

    async def crash(self) -> None:
        """SIGKILL: the process dies at once, with no shutdown note, no cleanup, no gateway
        close (the kernel closes its sockets)."""
        self.process.send_signal(signal.SIGKILL)
        async with asyncio.timeout(GIVE_UP_AFTER):
            await self.process.wait()

    def assert_quiet(self) -> None:
        """No error, traceback or leaked resource was logged from start to exit."""
        log = "".join(self.stderr)
        for sign in SIGNS_OF_TROUBLE:
            assert sign not in log, log


async def _collect(stream: asyncio.StreamReader | None, lines: list[str]) -> None:
    assert stream is not None
    while line := await stream.readline():
        lines.append(line.decode())


@contextlib.asynccontextmanager
async def bot_process(
    fake: FakeDiscord, tmp_path: Path, **settings: str
) -> AsyncIterator[BotProcess]:
    """Run the bot against ``fake`` until it has been greeted on the gateway; kill it if left."""
    greeted = fake.greeted
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bots.discord",
        env=bot_environment(fake, tmp_path / "threadbot.db", **settings),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    bot = BotProcess(process)
    readers = [
        asyncio.create_task(_collect(process.stdout, bot.stdout)),
        asyncio.create_task(_collect(process.stderr, bot.stderr)),
    ]
    try:
        await bot.until("the gateway's READY and GUILD_CREATE", lambda: fake.greeted > greeted)
        yield bot
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await asyncio.gather(*readers)


@contextlib.asynccontextmanager
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def demo_text(*conversation: str) -> str:
    """The offline demo's answer to the last of ``conversation`` (user and bot turns alternating)."""
    roles = ("user", "assistant")
    messages = [ChatMessage(roles[i % 2], text) for i, text in enumerate(conversation)]
    return "".join(demo_answer(messages))


async def test_operator_starts_the_bot_it_answers_in_a_thread_and_restarts(
    tmp_path: Path,
) -> None:
    question, follow_up = "What can you do?", "And after a restart?"
    answer = demo_text(question)
    async with fake_discord() as fake:
        async with bot_process(fake, tmp_path) as bot:
            # Printed for the operator while the bot runs, not only when it stops.
            await bot.until("the invite URL on stdout", lambda: bool(bot.stdout))
            [line] = bot.stdout
            invite = line.split()[-1]
            assert line == f"Invite the bot to a server: {invite}\n"
            assert f"permissions={EXPECTED_PERMISSIONS}" in invite
            url = urlsplit(invite)
            assert (url.scheme, url.netloc, url.path) == (
                "https",
                "discord.com",
                "/oauth2/authorize",
            )
            assert parse_qs(url.query) == {
                "client_id": [str(fake.app_id)],
                "scope": ["bot applications.commands"],
                "permissions": [str(EXPECTED_PERMISSIONS)],
            }
            assert fake.requests["GET gateway/bot"] == 1
            assert fake.requests["PUT commands"] == 1
            assert {c["name"] for c in fake.global_commands} == {
                "reset", "help", "system", "history", "model", "Regenerate"
            }  # fmt: skip

            message = await fake.send_message(fake.text_channel, question)
            thread = int(message["id"])
            await bot.until(
                "the answer in the thread",
                lambda: [m.content for m in fake.bot_messages_in(thread)] == [answer],
            )
            assert fake.thread_starts[thread] == 1
            assert fake.channels[thread]["type"] == PUBLIC_THREAD
            assert fake.channels[thread]["parent_id"] == str(fake.text_channel)
            assert fake.channels[thread]["name"] == question
            assert fake.bot_messages_in(fake.text_channel) == []
            assert await bot.terminate() == 0
        bot.assert_quiet()

        # Same fake, same database: the commands are up to date and the thread is remembered.
        async with bot_process(fake, tmp_path) as again:
            assert fake.requests["GET commands"] == 2
            assert fake.requests["PUT commands"] == 1
            assert fake.requests["GET gateway/bot"] == 2
            await fake.send_message(thread, follow_up, mention=False)
            second = demo_text(question, answer, follow_up)
            await again.until(
                "the follow-up's answer",
                lambda: [m.content for m in fake.bot_messages_in(thread)] == [answer, second],
            )
            assert "1 earlier message " in second
            assert await again.terminate() == 0
        again.assert_quiet()
        assert fake.requests["PUT commands"] == 1
        assert fake.identifies == 2


async def test_sigterm_ends_a_reply_in_progress_with_the_shutdown_note(tmp_path: Path) -> None:
    question = "Tell me everything"
    answer = demo_text(question)
    async with fake_discord() as fake:
        async with bot_process(fake, tmp_path, OFFLINE_DELAY=SLOW_OFFLINE_DELAY) as bot:
            message = await fake.send_message(fake.text_channel, question)
            thread = int(message["id"])

            first_word = answer.split(" ")[0]

            def streaming() -> bool:
                replies = fake.bot_messages_in(thread)
                return bool(replies) and replies[0].content.startswith(first_word)

            await bot.until("the first words of the answer", streaming)
            assert await bot.terminate() == 0
        bot.assert_quiet()

        [reply] = fake.bot_messages_in(thread)
        partial, separator, note = reply.content.rpartition("\n\n")
        assert (separator, note) == ("\n\n", SHUTDOWN_NOTE), reply.content
        assert partial and answer.startswith(partial) and partial != answer
        assert THINKING_TEXT not in reply.content


async def run_to_exit(fake: FakeDiscord, tmp_path: Path, **settings: str) -> tuple[int, str]:
    """Run ``python -m bots.discord`` until it exits by itself; its status and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bots.discord",
        env=bot_environment(fake, tmp_path / "threadbot.db", **settings),
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(GIVE_UP_AFTER):
            _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stderr.decode()


def _nothing_listens() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_unreachable_api_is_one_line_naming_discord_api_url(tmp_path: Path) -> None:
    async with fake_discord() as fake:
        api = f"http://127.0.0.1:{_nothing_listens()}/api/v10"
        status, stderr = await run_to_exit(fake, tmp_path, DISCORD_API_URL=api)
    assert status == 2
    [line] = stderr.splitlines()
    assert line.startswith(f"threadbot discord: cannot reach Discord's API at {api}")
    assert "DISCORD_API_URL" in line


async def test_unreachable_gateway_is_one_line_naming_discord_gateway_url(tmp_path: Path) -> None:
    async with fake_discord() as fake:
        gateway = f"ws://127.0.0.1:{_nothing_listens()}/gateway"
        status, stderr = await run_to_exit(fake, tmp_path, DISCORD_GATEWAY_URL=gateway)
        assert fake.identifies == 0
    assert status == 2 and "Traceback" not in stderr
    # Login went well, so its INFO line (commands synced) comes first; then the one failure.
    *before, line = stderr.splitlines()
    assert all(" INFO bots." in earlier for earlier in before), before
    assert line.startswith(f"threadbot discord: cannot reach Discord's gateway at {gateway}")
    assert "DISCORD_GATEWAY_URL" in line


async def test_start_up_says_what_runs_without_library_noise(tmp_path: Path) -> None:
    async with fake_discord() as fake, bot_process(fake, tmp_path, LOG_LEVEL="INFO") as bot:
        assert await bot.terminate() == 0
    lines = "".join(bot.stderr).splitlines()
    # Only threadbot's own loggers speak at INFO: no discord.py, Alembic or aiohttp lines.
    assert all(" INFO bots." in line or " INFO threadbot." in line for line in lines), lines
    [running] = [line for line in lines if "connecting to the gateway" in line]
    assert f"at {fake.gateway_url}; model offline" in running
    assert "database sqlite+aiosqlite:///" in running


#: Seconds of lease the crash tests give a turn: the next process takes over this soon after
#: the crash instead of after the default 30 s (a lease is renewed every third of it).
SHORT_LEASE = "2"


async def _answer_cut_by_a_crash(
    fake: FakeDiscord, tmp_path: Path, question: str
) -> tuple[int, FakeMessage]:
    """Ask in a new thread, SIGKILL the bot while the answer streams; the thread and the partial
    reply, which ends in the streaming cursor."""
    answer = demo_text(question)
    env = {"OFFLINE_DELAY": SLOW_OFFLINE_DELAY, "TURN_LEASE_SECONDS": SHORT_LEASE}
    async with bot_process(fake, tmp_path, **env) as first:
        message = await fake.send_message(fake.text_channel, question)
        thread = int(message["id"])
        first_words = " ".join(answer.split(" ")[:3])

        def streaming() -> bool:
            replies = fake.bot_messages_in(thread)
            return bool(replies) and replies[0].content.startswith(first_words)

        await first.until("the first words of the answer", streaming)
        await first.crash()
    [reply] = fake.bot_messages_in(thread)
    partial = reply.content.removesuffix(STREAMING_INDICATOR)
    assert reply.content.endswith(STREAMING_INDICATOR), reply.content
    assert answer.startswith(partial) and partial != answer, reply.content
    return thread, reply


async def _turn(tmp_path: Path) -> TurnRecord:
    """The one turn in the bots' database (read from the test, as a third process would)."""
    store = await ConversationStore.open(f"sqlite+aiosqlite:///{tmp_path / 'threadbot.db'}")
    try:
        async with store.engine.connect() as conn:
            [turn_id] = (await conn.execute(TurnRow.__table__.select())).scalars().all()
        return await store.get_turn(turn_id)
    finally:
        await store.close()


async def _settled_turn(tmp_path: Path) -> TurnRecord:
    """The one turn, once its outcome is recorded (no longer received or answering)."""
    async with asyncio.timeout(GIVE_UP_AFTER):
        while (turn := await _turn(tmp_path)).status in OPEN_TURN_STATUSES:
            await asyncio.sleep(POLL_EVERY)
    return turn


async def test_a_reply_cut_by_a_crash_is_finished_in_place_by_the_next_process(
    tmp_path: Path,
) -> None:
    question = "Tell me everything"
    answer = demo_text(question)
    async with fake_discord() as fake:
        thread, reply = await _answer_cut_by_a_crash(fake, tmp_path, question)
        crashed_at = time.monotonic()
        env = {"TURN_LEASE_SECONDS": SHORT_LEASE, "LOG_LEVEL": "INFO"}
        async with bot_process(fake, tmp_path, **env) as second:
            await second.until("the complete answer", lambda: reply.content == answer)
            finished_after = time.monotonic() - crashed_at
            # The same message, finished in place: no second reply in the thread.
            assert [m.id for m in fake.bot_messages_in(thread)] == [reply.id]
            # Stopped only once the outcome is stored: a SIGTERM between the last edit and that
            # write is another story (it can leave the turn open).
            turn = await _settled_turn(tmp_path)
            assert await second.terminate() == 0
        second.assert_quiet()
        assert "taking over turn" in "".join(second.stderr)
        assert (turn.status, turn.takeovers, turn.reply_message_ids) == (
            "answered", 1, (str(reply.id),)
        )  # fmt: skip
        print(f"Discord: crash to complete answer: {finished_after:.1f} s")


async def test_a_reply_cut_by_a_crash_too_long_ago_is_marked_interrupted(tmp_path: Path) -> None:
    async with fake_discord() as fake:
        thread, reply = await _answer_cut_by_a_crash(fake, tmp_path, "Tell me everything")
        # The question was asked longer ago than recovery redoes answers (the bot stayed down).
        store = await ConversationStore.open(f"sqlite+aiosqlite:///{tmp_path / 'threadbot.db'}")
        try:
            async with store.engine.begin() as conn:
                asked = datetime.now(UTC) - RECOVERY_MAX_AGE - timedelta(minutes=1)
                await conn.execute(update(TurnRow).values(created_at=asked))
        finally:
            await store.close()
        env = {"TURN_LEASE_SECONDS": SHORT_LEASE}
        async with bot_process(fake, tmp_path, **env) as second:
            await second.until(
                "the interrupted note", lambda: reply.content.endswith(INTERRUPTED_NOTE)
            )
            assert [m.id for m in fake.bot_messages_in(thread)] == [reply.id]
            assert STREAMING_INDICATOR.strip() not in reply.content
            turn = await _settled_turn(tmp_path)
            assert await second.terminate() == 0
        second.assert_quiet()
        assert turn.status == "interrupted"
        print(f"Discord: the partial reply now reads {reply.content!r}")


async def test_a_second_process_on_one_sqlite_file_is_refused_in_one_line(tmp_path: Path) -> None:
    async with fake_discord() as fake, bot_process(fake, tmp_path) as first:
        status, stderr = await run_to_exit(fake, tmp_path)
        assert status == 2
        [line] = stderr.splitlines()
        assert "another threadbot discord process" in line and "DATABASE_URL" in line
        assert await first.terminate() == 0
    first.assert_quiet()
