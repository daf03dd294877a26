"""``/model`` on Discord through the fake: autocomplete from MODELS (prefix, at most 25), show,
set and clear in a thread (its conversation) and in a channel (its defaults, Manage Channels),
an unknown name refused with the choices; and files on a question: an image reaches the model
server as an image part through the real OpenAI SDK, a text file is inlined once."""

from __future__ import annotations

import base64
from pathlib import Path

from bots.discord.client import MANAGE_CHANNELS_NEEDED
from core.conversation import ConversationKey
from tests.wire.discord.harness import GIVE_UP_AFTER, RunningBot, running_bot
from tests.wire.discord.server import FakeDiscord
from tests.wire.llm_server import FakeLLMServer, answer

MODELS = "openai:gpt-4.1-mini:vision,anthropic:claude-haiku-4-5:vision,openai:gpt-3.5-turbo"
#: The deployment's own model stays the offline one; the keys only let MODELS name the APIs.
ENV = {
    "MODELS": MODELS,
    "LLM_PROVIDER": "offline",
    "OPENAI_API_KEY": "sk-test",
    "ANTHROPIC_API_KEY": "sk-ant-test",
}
MANAGE_CHANNELS = 1 << 4
#: A 1x1 PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


async def typed(fake: FakeDiscord, channel: int, text: str) -> list[str]:
    """The autocomplete choices offered while ``text`` is typed in ``/model name``."""
    token = await fake.autocomplete("model", channel, focused="name", options={"name": text})
    await fake.wait_for(lambda: fake.choices(token) is not None, GIVE_UP_AFTER)
    choices = fake.choices(token) or []
    assert all(choice["name"] == choice["value"] for choice in choices)
    return [str(choice["value"]) for choice in choices]


async def model_command(
    fake: FakeDiscord, channel: int, name: str | None = None, *, permissions: int = 0
) -> str:
    """Run ``/model [name]`` in ``channel``; what only the invoker is told."""
    options: dict[str, str | int] = {} if name is None else {"name": name}
    token = await fake.send_interaction("model", channel, options=options, permissions=permissions)
    await fake.wait_for(lambda: bool(fake.original_edits[token]), GIVE_UP_AFTER)
    [answered] = fake.original_edits[token]
    [callback] = fake.responses(token)
    assert callback["data"]["flags"] & 64  # ephemeral
    return answered


async def test_autocomplete_offers_the_models_that_start_with_what_is_typed(
    tmp_path: Path,
) -> None:
    async with running_bot(tmp_path, env=ENV) as bot:
        fake = bot.fake
        assert {c["name"] for c in fake.global_commands} >= {"model", "Regenerate"}

        assert await typed(fake, fake.text_channel, "GPT") == ["gpt-4.1-mini", "gpt-3.5-turbo"]
        assert await typed(fake, fake.text_channel, "cl") == ["claude-haiku-4-5", "clear"]
        assert await typed(fake, fake.text_channel, "x") == []
        everything = await typed(fake, fake.text_channel, "")
        assert everything[-1] == "clear"
        assert set(everything) >= {"gpt-4.1-mini", "claude-haiku-4-5", "gpt-3.5-turbo"}


async def test_autocomplete_offers_at_most_25(tmp_path: Path) -> None:
    many = ",".join(f"openai:model-{i:02}" for i in range(40))
    async with running_bot(tmp_path, env={**ENV, "MODELS": many}) as bot:
        offered = await typed(bot.fake, bot.fake.text_channel, "model-")
        assert offered == [f"model-{i:02}" for i in range(25)]


async def conversation_model(bot: RunningBot, key: ConversationKey) -> str | None:
    conversation = await bot.engine.store.find(key)
    assert conversation is not None
    return conversation.model


async def test_model_in_a_thread_sets_its_conversation_and_refuses_unknown_names(
    tmp_path: Path,
) -> None:
    async with running_bot(tmp_path, env=ENV) as bot:
        fake = bot.fake
        question = await fake.send_message(fake.text_channel, "hello")
        thread = int(question["id"])
        await fake.wait_for(lambda: bool(fake.bot_messages_in(thread)), GIVE_UP_AFTER)
        await bot.settle()
        key = ConversationKey("discord", str(fake.guild_id), str(fake.text_channel), str(thread))

        refused = await model_command(fake, thread, "gpt-5-ultra")
        assert "gpt-5-ultra" in refused and "gpt-3.5-turbo" in refused
        assert await conversation_model(bot, key) is None

        assert "gpt-3.5-turbo" in await model_command(fake, thread, "gpt-3.5-turbo")
        assert await conversation_model(bot, key) == "gpt-3.5-turbo"
        assert "gpt-3.5-turbo" in await model_command(fake, thread)

        await model_command(fake, thread, "clear")
        assert await conversation_model(bot, key) is None


async def test_model_in_a_channel_sets_its_default_with_manage_channels(tmp_path: Path) -> None:
    async with running_bot(tmp_path, env=ENV) as bot:
        fake = bot.fake
        store = bot.engine.store
        where = ("discord", str(fake.guild_id), str(fake.text_channel))

        assert await model_command(fake, fake.text_channel, "gpt-3.5-turbo") == (
            MANAGE_CHANNELS_NEEDED
        )
        assert (await store.channel_settings(*where)).model is None

        await model_command(fake, fake.text_channel, "gpt-3.5-turbo", permissions=MANAGE_CHANNELS)
        assert (await store.channel_settings(*where)).model == "gpt-3.5-turbo"


async def test_an_image_reaches_the_model_as_an_image_part_and_a_text_file_is_inlined_once(
    tmp_path: Path,
) -> None:
    async with FakeLLMServer() as llm:
        env = {**ENV, "OPENAI_BASE_URL": llm.openai_base_url}
        async with running_bot(tmp_path, env=env) as bot:
            fake = bot.fake
            dm = fake.add_dm()
            await model_command(fake, dm, "gpt-4.1-mini")
            picture = fake.add_attachment("cat.png", PNG, "image/png")
            notes = fake.add_attachment(
                "notes.txt", b"the cat is grey", "text/plain; charset=utf-8"
            )
            llm.enqueue(answer("A grey cat."))

            await fake.send_message(
                dm, "what is this?", mention=False, attachments=[picture, notes]
            )
            await bot.answered(dm, "A grey cat.")

        [request] = llm.chat_requests()
        assert request.body["model"] == "gpt-4.1-mini"
        content = request.body["messages"][-1]["content"]
        texts = [part["text"] for part in content if part["type"] == "text"]
        images = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
        assert images == [f"data:image/png;base64,{base64.b64encode(PNG).decode()}"]
        [text] = texts
        assert text.startswith("what is this?")
        assert text.count("the cat is grey") == 1
        assert text.count("--- notes.txt ---") == 1
        assert fake.downloads[picture["url"].split(str(fake.port), 1)[1]] == 1
        assert bot.provider.requests == []
