"""Discord point 4: /reset, /system show|set|clear, /help as ephemeral app commands acting on the
thread's conversation, the channel's defaults or the DM; command sync on start."""

from __future__ import annotations

from pathlib import Path

from bots.discord.client import MANAGE_CHANNELS_NEEDED
from core.config import DEFAULT_SYSTEM_PROMPT
from tests.wire.discord.harness import running_bot
from tests.wire.discord.server import FakeDiscord

MANAGE_CHANNELS = 1 << 4  # discord-api-docs "Permissions": MANAGE_CHANNELS
EPHEMERAL = 1 << 6  # discord-api-docs "Message Flags": EPHEMERAL


async def _answer(fake: FakeDiscord, token: str) -> str:
    await fake.wait_for(lambda: bool(fake.original_edits[token]))
    return fake.original_edits[token][-1]


async def test_help_is_ephemeral_and_answered_at_once(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        token = await fake.send_interaction("help", fake.text_channel)
        answer = await _answer(fake, token)
        assert "/reset" in answer and "/system" in answer
        callback = fake.callbacks[-1]
        assert callback["type"] == 4  # answered directly, no defer needed
        assert callback["data"]["flags"] & EPHEMERAL


async def test_system_set_in_thread_changes_only_that_conversation(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        bot.provider.enqueue(["One."], ["Two."], ["Three."])
        first = await fake.send_message(fake.text_channel, "first question")
        thread_id = int(first["id"])
        await bot.answered(thread_id, "One.")

        token = await fake.send_interaction(
            "system", thread_id, subcommand="set", options={"text": "Answer like a pirate."}
        )
        assert "Answer like a pirate." in await _answer(fake, token)
        await fake.send_message(thread_id, "again", mention=False)
        await bot.answered(thread_id, "Two.")
        assert bot.provider.requests[-1].system.startswith("Answer like a pirate.")

        other = await fake.send_message(fake.text_channel, "unrelated question")
        await bot.answered(int(other["id"]), "Three.")
        assert bot.provider.requests[-1].system.startswith(DEFAULT_SYSTEM_PROMPT)

        token = await fake.send_interaction("system", thread_id, subcommand="show")
        assert "pirate" in await _answer(fake, token)
        assert all(c["data"]["flags"] & EPHEMERAL for c in fake.callbacks)


async def test_channel_default_needs_manage_channels(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        channel = fake.text_channel
        token = await fake.send_interaction(
            "system", channel, subcommand="set", options={"text": "Be terse."}, permissions=0
        )
        assert await _answer(fake, token) == MANAGE_CHANNELS_NEEDED

        token = await fake.send_interaction(
            "system",
            channel,
            subcommand="set",
            options={"text": "Be terse."},
            permissions=MANAGE_CHANNELS,
        )
        assert "Be terse." in await _answer(fake, token)
        bot.provider.enqueue(["Ok."])
        question = await fake.send_message(channel, "new thread please")
        await bot.answered(int(question["id"]), "Ok.")
        assert bot.provider.requests[-1].system.startswith("Be terse.")

        # Showing needs no permission; clearing does.
        token = await fake.send_interaction("system", channel, subcommand="show")
        assert "Be terse." in await _answer(fake, token)
        token = await fake.send_interaction("system", channel, subcommand="clear")
        assert await _answer(fake, token) == MANAGE_CHANNELS_NEEDED
        token = await fake.send_interaction(
            "system", channel, subcommand="clear", permissions=MANAGE_CHANNELS
        )
        assert "cleared" in await _answer(fake, token)


async def test_reset_in_thread_forgets_the_conversation(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        bot.provider.enqueue(["Noted: blue."], ["I don't know."])
        first = await fake.send_message(fake.text_channel, "my favourite colour is blue")
        thread_id = int(first["id"])
        await bot.answered(thread_id, "Noted: blue.")
        token = await fake.send_interaction("reset", thread_id)
        assert "reset" in (await _answer(fake, token)).lower()
        await fake.send_message(thread_id, "what is my favourite colour?", mention=False)
        await bot.answered(thread_id, "I don't know.")
        assert [m.content for m in bot.provider.requests[-1].messages] == [
            "what is my favourite colour?"
        ]


async def test_commands_in_dm_act_on_the_dm(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        dm = fake.add_dm()
        token = await fake.send_interaction(
            "system", dm, subcommand="set", options={"text": "Reply in French."}
        )
        assert "Reply in French." in await _answer(fake, token)
        bot.provider.enqueue(["Bonjour."])
        await fake.send_message(dm, "hello", mention=False)
        await bot.answered(dm, "Bonjour.")
        assert bot.provider.requests[-1].system.startswith("Reply in French.")


async def test_slow_command_is_deferred_then_edited(tmp_path: Path) -> None:
    async with running_bot(tmp_path, defer_after=0) as bot:
        fake = bot.fake
        token = await fake.send_interaction("help", fake.text_channel)
        await fake.wait_for(lambda: fake.requests["PATCH @original"] == 1)
        callback = fake.callbacks[-1]
        assert callback["type"] == 5  # deferred "thinking"
        assert callback["data"]["flags"] & EPHEMERAL
        assert "/reset" in fake.original_edits[token][-1]


async def test_commands_sync_globally_once_then_not_again(tmp_path: Path) -> None:
    fake = FakeDiscord()
    await fake.start()
    try:
        async with running_bot(tmp_path, fake=fake) as bot:
            assert bot.client.commands_synced is True
        assert fake.requests["PUT commands"] == 1
        names = {c["name"] for c in fake.global_commands}
        assert names == {"reset", "help", "system", "history", "model", "Regenerate"}
        # "Regenerate" is a message context-menu command (type 3); /model autocompletes.
        types = {c["name"]: c.get("type", 1) for c in fake.global_commands}
        assert types["Regenerate"] == 3 and types["model"] == 1
        model = next(c for c in fake.global_commands if c["name"] == "model")
        [name] = model["options"]
        assert (name["name"], name["autocomplete"], name.get("required", False)) == (
            "name",
            True,
            False,
        )
        system = next(c for c in fake.global_commands if c["name"] == "system")
        assert {o["name"] for o in system["options"]} == {"show", "set", "clear"}
        history = next(c for c in fake.global_commands if c["name"] == "history")
        set_ = next(o for o in history["options"] if o["name"] == "set")
        strategy, limit = set_["options"]
        assert [c["value"] for c in strategy["choices"]] == ["count", "tokens", "summary"]
        assert (limit["type"], limit["min_value"], limit.get("required", False)) == (4, 1, False)

        async with running_bot(tmp_path, fake=fake) as bot:
            assert bot.client.commands_synced is False
        assert fake.requests["PUT commands"] == 1
        assert fake.requests["GET commands"] == 2
    finally:
        await fake.close()


async def test_commands_sync_to_configured_guilds(tmp_path: Path) -> None:
    fake = FakeDiscord()
    await fake.start()
    try:
        env = {"DISCORD_COMMAND_GUILDS": str(fake.guild_id)}
        async with running_bot(tmp_path, fake=fake, env=env) as bot:
            assert bot.client.commands_synced is True
            # Commands registered in the guild are invoked like global ones.
            token = await fake.send_interaction("help", fake.text_channel)
            assert "/reset" in await _answer(fake, token)
        assert {c["name"] for c in fake.guild_commands[fake.guild_id]} == {
            "reset",
            "help",
            "system",
            "history",
            "model",
            "Regenerate",
        }
        assert fake.global_commands == []
        async with running_bot(tmp_path, fake=fake, env=env) as bot:
            assert bot.client.commands_synced is False
        assert fake.requests["PUT commands"] == 1
    finally:
        await fake.close()


async def test_history_app_command_sets_the_channel_strategy_with_manage_channels(
    tmp_path: Path,
) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        channel = fake.text_channel
        token = await fake.send_interaction("history", channel, subcommand="show")
        assert "newest 20 messages" in await _answer(fake, token)
        options: dict[str, str | int] = {"strategy": "count", "limit": 2}
        token = await fake.send_interaction("history", channel, subcommand="set", options=options)
        assert await _answer(fake, token) == MANAGE_CHANNELS_NEEDED
        token = await fake.send_interaction(
            "history", channel, subcommand="set", options=options, permissions=MANAGE_CHANNELS
        )
        assert "newest 2 messages" in await _answer(fake, token)
        # The channel's setting reaches the next conversations' requests.
        bot.provider.enqueue(["one"], ["two"], ["three"])
        first = await fake.send_message(channel, "q1")
        thread_id = int(first["id"])
        await bot.answered(thread_id, "one")
        await fake.send_message(thread_id, "q2", mention=False)
        await bot.answered(thread_id, "two")
        await fake.send_message(thread_id, "q3", mention=False)
        await bot.answered(thread_id, "three")
        assert [m.content for m in bot.provider.requests[-1].messages] == ["q3"]
        too_big = {"strategy": "count", "limit": 5000}
        token = await fake.send_interaction(
            "history", channel, subcommand="set", options=too_big, permissions=MANAGE_CHANNELS
        )
        assert "between 1 and 500" in await _answer(fake, token)
