"""Who may use the bot on Discord, end to end: the real discord.py client against the fake
gateway and REST API; app commands carry the member's permissions bitfield as Discord sends it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bots.discord.client import MANAGE_CHANNELS_NEEDED
from core.access import CHANNEL_REFUSAL, DM_REFUSAL, USER_REFUSAL
from tests.wire.discord.harness import RunningBot, running_bot
from tests.wire.discord.server import FakeDiscord

MANAGE_CHANNELS = 1 << 4  # discord-api-docs "Permissions": MANAGE_CHANNELS
#: View Channel, Send Messages, Read Message History, Create Public Threads, Send Messages in
#: Threads (discord-api-docs "Permissions": bits 10, 11, 16, 35, 38).
EVERYDAY_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 16) | (1 << 35) | (1 << 38)


@asynccontextmanager
async def bot_with(tmp_path: Path, fake: FakeDiscord, **env: str) -> AsyncIterator[RunningBot]:
    """The bot with access settings that name the fake's ids (known only once it exists)."""
    try:
        async with running_bot(tmp_path, fake=fake, env=env) as bot:
            yield bot
    finally:
        await fake.close()


async def started_fake() -> FakeDiscord:
    fake = FakeDiscord()
    await fake.start()
    return fake


async def _answer(fake: FakeDiscord, token: str) -> str:
    await fake.wait_for(lambda: bool(fake.original_edits[token]))
    return fake.original_edits[token][-1]


async def answered_mention(bot: RunningBot, channel: int, answer: str) -> None:
    """A mention that is answered: every gateway event before it has been handled by then."""
    bot.provider.enqueue([answer])
    question = await bot.fake.send_message(channel, "marker")
    await bot.answered(int(question["id"]), answer)


async def test_a_blocked_user_gets_silence_and_others_an_answer(tmp_path: Path) -> None:
    fake = await started_fake()
    mallory = fake.make_user("mallory")
    async with bot_with(tmp_path, fake, BLOCKED_USERS=mallory["id"]) as bot:
        ignored = await fake.send_message(fake.text_channel, "hello", author=mallory)
        dm = fake.add_dm()
        await fake.send_message(dm, "hello", author=mallory, mention=False)
        await answered_mention(bot, fake.text_channel, "Hello owner.")
        assert fake.bot_messages_in(int(ignored["id"])) == [] and fake.bot_messages_in(dm) == []
        assert fake.thread_starts[int(ignored["id"])] == 0
        assert len(bot.provider.requests) == 1


async def test_a_channel_outside_allowed_channels_gets_silence(tmp_path: Path) -> None:
    fake = await started_fake()
    other = fake.add_text_channel("random")
    async with bot_with(tmp_path, fake, ALLOWED_CHANNELS=str(fake.text_channel)) as bot:
        ignored = await fake.send_message(other, "hello")
        await answered_mention(bot, fake.text_channel, "Here.")
        # A thread's channel is its parent: the answer's thread goes on without a mention.
        thread = max(c for c in fake.channels if fake.channels[c].get("parent_id"))
        bot.provider.enqueue(["Still here."])
        await fake.send_message(thread, "and then?", mention=False)
        await bot.answered(thread, "Still here.")
        assert fake.bot_messages_in(other) == [] and fake.bot_messages_in(int(ignored["id"])) == []

        token = await fake.send_interaction("help", other)
        assert await _answer(fake, token) == CHANNEL_REFUSAL


async def test_dms_off_get_one_polite_refusal_a_day(tmp_path: Path) -> None:
    fake = await started_fake()
    async with bot_with(tmp_path, fake, ALLOW_DMS="false") as bot:
        dm = fake.add_dm()
        await fake.send_message(dm, "hello", mention=False)
        await fake.wait_for(lambda: bool(fake.bot_messages_in(dm)))
        await bot.settle()
        await fake.send_message(dm, "anyone there?", mention=False)
        await answered_mention(bot, fake.text_channel, "Channels work.")
        assert [m.content for m in fake.bot_messages_in(dm)] == [DM_REFUSAL]
        assert len(bot.provider.requests) == 1

        token = await fake.send_interaction("reset", dm)
        assert await _answer(fake, token) == DM_REFUSAL


async def test_a_blocked_users_command_gets_a_short_refusal(tmp_path: Path) -> None:
    fake = await started_fake()
    mallory = fake.make_user("mallory")
    async with bot_with(tmp_path, fake, BLOCKED_USERS=mallory["id"]):
        token = await fake.send_interaction("help", fake.text_channel, user=mallory)
        assert await _answer(fake, token) == USER_REFUSAL
        token = await fake.send_interaction("help", fake.text_channel)
        assert "/reset" in await _answer(fake, token)


async def test_admin_users_may_change_a_channel_default_without_manage_channels(
    tmp_path: Path,
) -> None:
    fake = await started_fake()
    helper = fake.make_user("helper")
    async with bot_with(tmp_path, fake, ADMIN_USERS=helper["id"]) as bot:
        channel = fake.text_channel
        text = {"text": "Be terse."}
        token = await fake.send_interaction("system", channel, subcommand="set", options=text)
        assert await _answer(fake, token) == MANAGE_CHANNELS_NEEDED
        token = await fake.send_interaction(
            "system", channel, subcommand="set", options=text, user=helper
        )
        assert "Be terse." in await _answer(fake, token)
        # Manage Channels still works as before.
        token = await fake.send_interaction(
            "system", channel, subcommand="clear", permissions=MANAGE_CHANNELS
        )
        assert "cleared" in await _answer(fake, token)
        settings = await bot.engine.store.channel_settings(
            "discord", str(fake.guild_id), str(channel)
        )
        assert settings.system_prompt is None


async def test_a_typed_history_command_in_a_thread_asks_the_members_permissions(
    tmp_path: Path,
) -> None:
    fake = await started_fake()
    # Members may talk and start threads, not manage channels; the guild's owner may do anything.
    fake.everyone_permissions = EVERYDAY_PERMISSIONS
    member = fake.make_user("member")
    async with bot_with(tmp_path, fake) as bot:
        bot.provider.enqueue(["First."])
        question = await fake.send_message(fake.text_channel, "hello")
        thread = int(question["id"])
        await bot.answered(thread, "First.")

        await fake.send_message(thread, "history count 3", author=member)
        await fake.wait_for(lambda: len(fake.bot_messages_in(thread)) == 2)
        await bot.settle()
        assert fake.bot_messages_in(thread)[-1].content == MANAGE_CHANNELS_NEEDED
        settings = await bot.engine.store.channel_settings(
            "discord", str(fake.guild_id), str(fake.text_channel)
        )
        assert settings.max_history_messages is None

        await fake.send_message(thread, "history count 3")
        await fake.wait_for(lambda: len(fake.bot_messages_in(thread)) == 3)
        await bot.settle()
        assert "newest 3 messages" in fake.bot_messages_in(thread)[-1].content
