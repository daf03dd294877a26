"""Discord points 6, 7 and 9: exactly once across a gateway RESUME, silence where expected, and
set-up (invite URL with the exact permissions, a clear exit when an intent is refused)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import discord
import pytest

from bots.discord.__main__ import EXIT_CONFIG
from bots.discord.client import BOT_PERMISSIONS, invite_url
from tests.wire.discord.harness import running_bot
from tests.wire.discord.server import BOT_TOKEN, MESSAGE_CONTENT_INTENT, FakeDiscord

#: View Channel + Send Messages + Read Message History + Create Public Threads + Send Messages in
#: Threads (discord-api-docs "Permissions": 1<<10, 1<<11, 1<<16, 1<<35, 1<<38).
EXPECTED_PERMISSIONS = 309_237_713_920


async def test_message_replayed_after_resume_is_answered_once(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        bot.provider.enqueue(["First answer."], ["Missed answer."])
        first = fake.user_message(fake.text_channel, "first question")
        first_seq = await fake.dispatch("MESSAGE_CREATE", first)
        first_thread = int(first["id"])
        await bot.answered(first_thread, "First answer.")

        missed = fake.user_message(fake.text_channel, "sent while disconnected")
        assert fake.session is not None
        # The RESUME replays the missed message and, again, everything since the first one.
        await fake.force_reconnect(missed=[missed], replay_last=fake.session.seq - first_seq + 1)
        await bot.answered(int(missed["id"]), "Missed answer.")
        await bot.marker()

        assert fake.resumes == 1 and fake.identifies == 1
        # The replayed message reached the bot but was dropped at intake (its turn was already
        # recorded), before any platform call: no second thread start, no second answer.
        assert fake.thread_starts[first_thread] == 1
        assert [m.content for m in fake.bot_messages_in(first_thread)] == ["First answer."]
        asked = [r.messages[-1].content for r in bot.provider.requests]
        assert asked.count("first question") == 1
        assert asked.count("sent while disconnected") == 1


async def test_silence_for_bots_webhooks_itself_edits_and_system_messages(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        channel = fake.text_channel
        other_bot = fake.make_user("otherbot", bot=True)
        await fake.send_message(channel, "from another bot", author=other_bot)
        await fake.send_message(channel, "from a webhook", webhook_id=fake.snowflake())
        own = await fake.send_message(channel, "my own words", author=fake.bot)
        # A member-join system message (type 7) that happens to mention the bot.
        await fake.send_message(channel, "joined", message_type=7)
        # An edit of a message into a mention.
        edited = fake.user_message(channel, "now a question", mention=True)
        await fake.dispatch("MESSAGE_UPDATE", {**edited, "edited_timestamp": edited["timestamp"]})
        await bot.marker()

        assert [m.id for m in fake.bot_messages_in(channel)] == [int(own["id"])]
        assert fake.requests["POST message"] == 1  # the marker's answer only
        assert fake.requests["POST thread"] == 0
        assert [r.messages[-1].content for r in bot.provider.requests] == ["marker"]


async def test_invite_url_is_printed_with_exact_permissions(tmp_path: Path) -> None:
    assert BOT_PERMISSIONS.value == EXPECTED_PERMISSIONS
    async with running_bot(tmp_path) as bot:
        url = invite_url(bot.fake.app_id)
        assert any(url in line for line in bot.announced)
        assert f"client_id={bot.fake.app_id}" in url
        assert f"permissions={EXPECTED_PERMISSIONS}" in url
        assert "scope=bot+applications.commands" in url


async def test_gateway_url_comes_from_gateway_bot(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        assert bot.fake.requests["GET gateway/bot"] == 1
        assert bot.fake.identifies == 1


async def test_refused_intent_raises_privileged_intents_required(tmp_path: Path) -> None:
    fake = FakeDiscord(refuse_intents=MESSAGE_CONTENT_INTENT)
    await fake.start()
    try:
        with pytest.raises(discord.PrivilegedIntentsRequired):
            async with running_bot(tmp_path, fake=fake):
                pass
    finally:
        await fake.close()


async def test_command_exits_with_portal_instructions_when_intent_refused(tmp_path: Path) -> None:
    fake = FakeDiscord(refuse_intents=MESSAGE_CONTENT_INTENT)
    await fake.start()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DISCORD_BOT_TOKEN": BOT_TOKEN,
        "DISCORD_API_URL": fake.api_url,
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}",
        "LLM_PROVIDER": "offline",
    }
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bots.discord",
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            stdout, stderr = await process.communicate()
    finally:
        await fake.close()
    assert process.returncode == EXIT_CONFIG
    err = stderr.decode()
    assert "4014" in err
    assert "MESSAGE CONTENT INTENT" in err
    assert "Privileged Gateway Intents" in err
    # The invite URL was printed before the gateway refused.
    assert f"permissions={EXPECTED_PERMISSIONS}" in stdout.decode()


async def test_command_names_missing_token(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bots.discord",
        env=env,
        cwd=tmp_path,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _, stderr = await process.communicate()
    assert process.returncode == EXIT_CONFIG
    assert "DISCORD_BOT_TOKEN" in stderr.decode()
