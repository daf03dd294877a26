"""Issue 10 item 2 on Discord: PostgreSQL out of reach, through a TCP proxy the tests cut.

Discord never delivers a message again, so the front door retries the intake (``INTAKE_ATTEMPTS``
with backoff) and, when the database stays away, tells the person in the channel instead of
leaving the question unanswered. A cut shorter than the retries goes unnoticed. Figures are
printed (``-s``), never asserted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from core.bot import INTAKE_ATTEMPTS, INTAKE_FAILED_NOTE
from tests.wire.discord.harness import GIVE_UP_AFTER, RunningBot, running_bot
from tests.wire.tcp_proxy import CutMode, TcpProxy

pytestmark = pytest.mark.postgres

#: A dead network costs each intake attempt the connect timeout: give the note time to come.
NOTE_WITHIN = 60.0


async def _until(condition: Callable[[], bool]) -> None:
    """Poll ``condition()`` (log records do not wake the fake's waiters)."""
    async with asyncio.timeout(GIVE_UP_AFTER):
        while not condition():
            await asyncio.sleep(0.01)


def _intake_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "intake failed" in r.getMessage()]


def _turn_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Turns whose task ended in an exception (the front door logs each)."""
    return [r.getMessage() for r in caplog.records if r.name == "core.bot" and r.exc_info]


async def _still_answers(bot: RunningBot) -> None:
    """The bot took the outage in its stride: a new question is answered in its thread."""
    bot.provider.enqueue(["Still here."])
    question = await bot.fake.send_message(bot.fake.text_channel, "after the outage?")
    await bot.answered(int(question["id"]), "Still here.")


@pytest.mark.parametrize("mode", ["refuse", "hang"])
async def test_a_mention_while_the_database_stays_away_gets_the_note_after_the_retries(
    tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture, mode: CutMode
) -> None:
    caplog.set_level(logging.WARNING, logger="core.bot")
    async with TcpProxy.to_database(postgres_url) as proxy:
        env = {"DATABASE_URL": proxy.database_url(postgres_url)}
        async with running_bot(tmp_path, env=env) as bot:
            fake, channel = bot.fake, bot.fake.text_channel
            proxy.cut(mode)
            asked_at = time.monotonic()
            await fake.send_message(channel, "is anyone there?")
            await fake.wait_for(
                lambda: any(m.content == INTAKE_FAILED_NOTE for m in fake.bot_messages_in(channel)),
                NOTE_WITHIN,
            )
            noted_after = time.monotonic() - asked_at
            await bot.settle()

            # Told once, in the channel where they asked; the question never reached the model.
            assert [m.content for m in fake.bot_messages_in(channel)] == [INTAKE_FAILED_NOTE]
            assert bot.provider.requests == []
            assert len(_intake_failures(caplog)) == INTAKE_ATTEMPTS
            assert _turn_failures(caplog) == []

            proxy.restore()
            restored_at = time.monotonic()
            await _still_answers(bot)
            print(
                f"\n[{mode}] the note after {noted_after:.2f} s ({INTAKE_ATTEMPTS} attempts); "
                f"after restore a new question was answered in "
                f"{time.monotonic() - restored_at:.2f} s"
            )


async def test_a_cut_shorter_than_the_retries_is_answered_as_usual(
    tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="core.bot")
    async with TcpProxy.to_database(postgres_url) as proxy:
        env = {"DATABASE_URL": proxy.database_url(postgres_url)}
        async with running_bot(tmp_path, env=env) as bot:
            fake = bot.fake
            bot.provider.enqueue(["Yes, ", "here."])
            proxy.cut("refuse")
            asked_at = time.monotonic()
            question = await fake.send_message(fake.text_channel, "is anyone there?")
            # The database comes back about a second in, while the intake waits to try again.
            await _until(lambda: bool(_intake_failures(caplog)))
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - asked_at)))
            proxy.restore()
            restored_after = time.monotonic() - asked_at
            thread_id = int(question["id"])
            await bot.answered(thread_id, "Yes, here.")
            answered_after = time.monotonic() - asked_at

            # Answered in its thread, as without the cut; nothing about the outage was shown.
            assert [m.content for m in fake.bot_messages_in(thread_id)] == ["Yes, here."]
            assert fake.bot_messages_in(fake.text_channel) == []
            assert len(bot.provider.requests) == 1
            failures = len(_intake_failures(caplog))
            assert 1 <= failures < INTAKE_ATTEMPTS
            assert _turn_failures(caplog) == []
            print(
                f"\ncut restored after {restored_after:.2f} s ({failures} failed intake "
                f"attempt(s)): answered {answered_after:.2f} s after the question"
            )
