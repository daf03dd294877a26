"""Discord point 8, bad input: empty mention, 100 KB from attachments, provider outage, and no
permission to open threads."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from core.attachments import MAX_ATTACHMENT_BYTES
from core.engine import EMPTY_MESSAGE_HINT
from core.errors import TransientProviderError
from tests.wire.discord.harness import running_bot
from tests.wire.discord.server import FakeDiscord

HUNDRED_KB = 100 * 1024


async def test_empty_mention_gets_usage_hint_as_a_reply(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        question = await fake.send_message(fake.text_channel, "")
        await bot.answered(fake.text_channel, EMPTY_MESSAGE_HINT)
        (reply,) = fake.bot_messages_in(fake.text_channel)
        assert reply.reference == int(question["id"])
        assert fake.requests["POST thread"] == 0
        assert bot.provider.requests == []


async def test_100_kb_attachment_is_refused_clearly(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        attachment = fake.add_attachment("log.txt", b"x" * HUNDRED_KB, "text/plain; charset=utf-8")
        question = await fake.send_message(
            fake.text_channel, "what is wrong here?", attachments=[attachment]
        )
        thread_id = int(question["id"])
        await fake.wait_for(lambda: bool(fake.bot_messages_in(thread_id)))
        await bot.settle()
        (reply,) = fake.bot_messages_in(thread_id)
        assert "characters long" in reply.content
        assert f"{bot.settings.max_input_chars:,}" in reply.content
        assert bot.provider.requests == []


async def test_100_kb_attachment_within_budget_is_read_and_answered(tmp_path: Path) -> None:
    async with running_bot(tmp_path, env={"MAX_INPUT_CHARS": "200000"}) as bot:
        fake = bot.fake
        body = ("line of the log\n" * (HUNDRED_KB // 16)).encode()
        attachment = fake.add_attachment("build.log", body, "text/plain")
        binary = fake.add_attachment("core.bin", b"\x00\x01", "application/octet-stream")
        huge = fake.add_attachment("dump.txt", b"y" * (MAX_ATTACHMENT_BYTES + 1), "text/plain")
        bot.provider.enqueue(["It builds fine."])
        question = await fake.send_message(
            fake.text_channel, "summarise", attachments=[attachment, binary, huge]
        )
        await bot.answered(int(question["id"]), "It builds fine.")
        sent = bot.provider.requests[0].messages[-1].content
        assert sent.startswith("summarise")
        assert "--- build.log ---" in sent
        assert sent.count("line of the log") == HUNDRED_KB // 16
        assert "core.bin not read" in sent
        assert "dump.txt not read" in sent
        assert "yyyy" not in sent


async def test_provider_outage_shows_plain_words_in_the_thread(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        down = TransientProviderError("503 Service Unavailable", status=503)
        bot.provider.enqueue([down], [down])  # MAX_RETRY_ATTEMPTS=2 in the harness
        question = await fake.send_message(fake.text_channel, "are you there?")
        thread_id = int(question["id"])
        await fake.wait_for(
            lambda: any("not answering" in m.content for m in fake.bot_messages_in(thread_id))
        )
        await bot.settle()
        (reply,) = fake.bot_messages_in(thread_id)
        assert "try again" in reply.content.lower()
        assert "Traceback" not in reply.content


async def test_no_thread_permission_answers_in_channel_and_logs_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeDiscord()
    await fake.start()
    fake.no_thread_permission.add(fake.text_channel)
    try:
        async with running_bot(tmp_path, fake=fake) as bot:
            bot.provider.enqueue(["Answered here."])
            with caplog.at_level(logging.WARNING, logger="bots.discord.client"):
                question = await fake.send_message(fake.text_channel, "threads are off here")
                await bot.answered(fake.text_channel, "Answered here.")
            (reply,) = fake.bot_messages_in(fake.text_channel)
            assert reply.reference == int(question["id"])
            assert fake.thread_starts[int(question["id"])] == 1
            warning = " ".join(r.getMessage() for r in caplog.records)
            assert "Create Public Threads" in warning
            assert "Send Messages In Threads" in warning or "Send Messages in Threads" in warning
    finally:
        await fake.close()
