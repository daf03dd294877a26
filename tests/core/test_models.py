"""Model choice: MODELS, which model answers a turn, the model and streaming commands, and each
model reaching its own API (the real SDKs against the fake model server)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select

from core.bot import FrontDoor, PlatformProfile
from core.commands import (
    ChannelTarget,
    Command,
    HelpStyle,
    changes_channel,
    help_text,
    parse_command,
)
from core.config import Settings
from core.conversation import ConversationKey, IncomingMessage
from core.engine import ChatEngine
from core.errors import ConfigError
from core.models import (
    DEFAULT_MODELS,
    ModelChoice,
    default_choice,
    find_model,
    model_names,
    parse_models,
    resolve_model,
)
from core.providers import build_provider
from core.providers.offline import OfflineProvider
from core.ratelimit import Budgets
from core.reply import CollectingSink
from core.store import ConversationStore, MessageRow, TurnRow
from tests.wire.llm_server import ANTHROPIC_MESSAGES_PATH, OPENAI_CHAT_PATH, FakeLLMServer

EXAMPLE = "openai:gpt-4.1-mini:vision,anthropic:claude-haiku-4-5:vision,openai:gpt-3.5-turbo"
KEYS = {"OPENAI_API_KEY": "sk-test", "ANTHROPIC_API_KEY": "sk-ant-test"}
THREAD = ConversationKey("slack", "T1", "C1", "100.000")
OTHER_THREAD = ConversationKey("slack", "T1", "C1", "200.000")
CHANNEL = ChannelTarget("slack", "T1", "C1")


# -- MODELS ----------------------------------------------------------------------------------


def test_models_parse_into_choices_with_their_vision_flag() -> None:
    settings = Settings.from_mapping({**KEYS, "MODELS": EXAMPLE})
    assert settings.models == (
        ModelChoice("openai", "gpt-4.1-mini", True),
        ModelChoice("anthropic", "claude-haiku-4-5", True),
        ModelChoice("openai", "gpt-3.5-turbo", False),
    )
    assert settings.max_images == 4 and settings.max_image_bytes == 5 * 1024 * 1024


def test_a_model_name_may_hold_colons_and_only_a_last_vision_is_the_flag() -> None:
    assert parse_models(" openai:llama3.1:8b , openai:llava:13b:VISION ,") == (
        ModelChoice("openai", "llama3.1:8b", False),
        ModelChoice("openai", "llava:13b", True),
    )


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("mistral:large", "'mistral', which is not one of openai, anthropic, offline"),
        ("openai:", "is not provider:model[:vision]"),
        ("openai::vision", "is not provider:model[:vision]"),
        ("gpt-4.1-mini", "is not provider:model[:vision]"),
        ("openai:gpt-4.1-mini,openai:GPT-4.1-mini:vision", "lists the model 'GPT-4.1-mini' twice"),
        ("anthropic:claude-haiku-4-5,openai:gpt-4.1-mini", None),
    ],
)
def test_bad_models_are_one_line_startup_errors(value: str, said: str | None) -> None:
    if said is None:
        # Both providers have their keys: fine.
        assert len(Settings.from_mapping({**KEYS, "MODELS": value}).models) == 2
        return
    with pytest.raises(ConfigError) as caught:
        Settings.from_mapping({**KEYS, "MODELS": value})
    assert said in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.setting == "MODELS"


def test_a_model_whose_provider_has_no_key_is_a_startup_error() -> None:
    with pytest.raises(ConfigError, match="anthropic:claude-haiku-4-5, but ANTHROPIC_API_KEY"):
        Settings.from_mapping({"OPENAI_API_KEY": "sk", "MODELS": EXAMPLE})


@pytest.mark.parametrize(("name", "value"), [("MAX_IMAGES", "-1"), ("MAX_IMAGE_BYTES", "0")])
def test_image_limits_are_checked(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_mapping({name: value})
    assert Settings.from_mapping({"MAX_IMAGES": "2", "MAX_IMAGE_BYTES": "1000"}).max_images == 2


def test_without_models_the_deployment_model_is_the_only_choice() -> None:
    settings = Settings.from_mapping({"ANTHROPIC_API_KEY": "k"})
    assert model_names(settings) == ["claude-haiku-4-5"]
    assert default_choice(settings) == ModelChoice("anthropic", "claude-haiku-4-5", False)
    settings = Settings.from_mapping({"OPENAI_API_KEY": "k", "LLM_MODEL": "gpt-4o"})
    assert model_names(settings) == ["gpt-4o"]


def test_the_default_is_a_choice_first_and_takes_its_vision_from_models() -> None:
    settings = Settings.from_mapping({**KEYS, "LLM_PROVIDER": "openai", "MODELS": EXAMPLE})
    assert model_names(settings) == ["gpt-4.1-mini", "claude-haiku-4-5", "gpt-3.5-turbo"]
    assert default_choice(settings).vision
    settings = settings.with_overrides(llm_model="o3")
    assert model_names(settings)[0] == "o3" and not default_choice(settings).vision


def test_names_are_found_case_insensitively_and_as_provider_model() -> None:
    settings = Settings.from_mapping({**KEYS, "MODELS": EXAMPLE})
    haiku = ModelChoice("anthropic", "claude-haiku-4-5", True)
    assert find_model(settings, "Claude-Haiku-4-5") == haiku
    assert find_model(settings, "anthropic:claude-haiku-4-5") == haiku
    assert find_model(settings, "openai:claude-haiku-4-5") is None
    assert find_model(settings, "gpt-5") is None


def test_provider_defaults_match_the_providers() -> None:
    for name, model in DEFAULT_MODELS.items():
        provider_settings = Settings().with_overrides(
            llm_provider=name, openai_api_key="k", anthropic_api_key="k"
        )
        assert build_provider(provider_settings).model == model


def test_resolution_goes_conversation_then_channel_then_default() -> None:
    settings = Settings.from_mapping({**KEYS, "LLM_PROVIDER": "openai", "MODELS": EXAMPLE})
    assert resolve_model(settings, "gpt-3.5-turbo", "claude-haiku-4-5")[0].model == (
        "gpt-3.5-turbo"
    )
    assert resolve_model(settings, "gpt-3.5-turbo", None)[1] == "conversation"
    assert resolve_model(settings, None, "claude-haiku-4-5") == (
        ModelChoice("anthropic", "claude-haiku-4-5", True),
        "channel",
    )
    assert resolve_model(settings, None, None) == (default_choice(settings), "default")


def test_a_name_no_longer_offered_falls_back_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings.from_mapping({**KEYS, "LLM_PROVIDER": "openai", "MODELS": EXAMPLE})
    choice, source = resolve_model(settings, "gpt-4-retired", "claude-haiku-4-5")
    assert (choice.model, source) == ("claude-haiku-4-5", "channel")
    assert "'gpt-4-retired' is not in MODELS any more" in caplog.text
    choice, source = resolve_model(settings, None, "gone-too")
    assert source == "default" and choice == default_choice(settings)


# -- commands --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model", Command("model_show")),
        ("/model show", Command("model_show")),
        ("model gpt-3.5-turbo", Command("model_set", "gpt-3.5-turbo")),
        ("/model clear", Command("model_clear")),
        ("model the data for me please", None),
        ("streaming", Command("streaming_show")),
        ("streaming native", Command("streaming_set", "native")),
        ("/streaming UPDATE", Command("streaming_set", "update")),
        ("streaming auto", Command("streaming_set", "auto")),
        ("streaming clear", Command("streaming_clear")),
        ("streaming is it fast", None),
    ],
)
def test_model_and_streaming_commands_parse(text: str, expected: Command | None) -> None:
    assert parse_command(text) == expected


def test_an_unknown_streaming_mode_is_explained() -> None:
    command = parse_command("streaming fast")
    assert command is not None and command.action == "help"
    assert "native" in command.problem and "update" in command.problem


def test_channel_targets_of_model_and_streaming_need_channel_rights() -> None:
    assert changes_channel(Command("model_set", "x"), CHANNEL)
    assert changes_channel(Command("model_clear"), CHANNEL)
    assert not changes_channel(Command("model_set", "x"), THREAD)
    assert not changes_channel(Command("model_show"), CHANNEL)
    # Streaming belongs to the channel, even when asked from a thread.
    assert changes_channel(Command("streaming_set", "native"), THREAD)
    assert not changes_channel(Command("streaming_show"), CHANNEL)


def test_help_lists_model_and_streaming_only_where_streams_exist() -> None:
    plain = help_text(HelpStyle(prefix="/chatbot "))
    assert "/chatbot model <name>" in plain and "streaming" not in plain
    native = help_text(HelpStyle(prefix="/chatbot ", native_streams=True))
    assert "/chatbot streaming native|update|auto" in native


@pytest.fixture
def models_settings(settings: Settings) -> Settings:
    return settings.with_overrides(
        llm_provider="offline",
        models=(
            ModelChoice("offline", "scripted", True),
            ModelChoice("offline", "blind", False),
        ),
    )


@pytest.fixture
async def models_engine(
    models_settings: Settings, store: ConversationStore, provider: OfflineProvider
) -> AsyncIterator[ChatEngine]:
    engine = ChatEngine(models_settings, store, provider)
    yield engine


async def test_model_commands_on_a_conversation(
    models_engine: ChatEngine, provider: OfflineProvider
) -> None:
    run = models_engine.run_command
    shown = await run(Command("model_show"), THREAD)
    assert "uses `scripted` (the bot's default)" in shown
    assert "`scripted` (sees images), `blind`" in shown
    refused = await run(Command("model_set", "gpt-9"), THREAD)
    assert refused.startswith("I don't know the model `gpt-9`") and "`blind`" in refused
    assert "uses `blind` (set for this conversation)" in await run(
        Command("model_set", "BLIND"), THREAD
    )
    provider.enqueue(["one"], ["two"])
    await models_engine.handle(IncomingMessage(THREAD, "hi", "U1"), CollectingSink())
    await models_engine.handle(IncomingMessage(OTHER_THREAD, "hi", "U1"), CollectingSink())
    assert [r.model for r in provider.requests] == ["blind", "scripted"]
    assert "Back to the default. This conversation uses `scripted`" in await run(
        Command("model_clear"), THREAD
    )


async def test_model_commands_on_a_channel_set_its_default(
    models_engine: ChatEngine, provider: OfflineProvider, store: ConversationStore
) -> None:
    run = models_engine.run_command
    assert "New conversations in this channel use `scripted` (the bot's default)" in await run(
        Command("model_show"), CHANNEL
    )
    assert "use `blind` (this channel's default)" in await run(
        Command("model_set", "blind"), CHANNEL
    )
    assert (await store.channel_settings("slack", "T1", "C1")).model == "blind"
    assert "uses `blind` (this channel's default)" in await run(Command("model_show"), THREAD)
    # The conversation's own choice wins over the channel's.
    await run(Command("model_set", "scripted"), OTHER_THREAD)
    provider.enqueue(["a"], ["b"])
    await models_engine.handle(IncomingMessage(THREAD, "hi", "U1"), CollectingSink())
    await models_engine.handle(IncomingMessage(OTHER_THREAD, "hi", "U1"), CollectingSink())
    assert [r.model for r in provider.requests] == ["blind", "scripted"]
    await run(Command("model_clear"), CHANNEL)
    assert (await store.channel_settings("slack", "T1", "C1")).model is None


async def test_streaming_commands_where_the_platform_has_native_streams(
    models_engine: ChatEngine, store: ConversationStore
) -> None:
    run = models_engine.run_command
    plain = await run(Command("streaming_set", "native"), CHANNEL)
    assert "no native streams" in plain
    assert (await store.channel_settings("slack", "T1", "C1")).streaming is None
    models_engine.commands.help_styles["slack"] = HelpStyle(native_streams=True)
    assert "(`auto`, the bot's default)" in await run(Command("streaming_show"), CHANNEL)
    done = await run(Command("streaming_set", "update"), THREAD)
    assert done.startswith("Done.") and "(`update`, this channel's setting)" in done
    assert (await store.channel_settings("slack", "T1", "C1")).streaming == "update"
    await run(Command("streaming_clear"), CHANNEL)
    assert (await store.channel_settings("slack", "T1", "C1")).streaming is None


async def test_a_channel_model_command_without_rights_is_refused(
    models_engine: ChatEngine, store: ConversationStore
) -> None:
    profile = PlatformProfile(name="slack", help=HelpStyle(), command_deadline=1.0)
    door = FrontDoor(models_engine.settings, models_engine, profile, budgets=Budgets())

    async def acknowledge() -> None:
        return None

    async def no_rights() -> bool:
        return False

    async def rights() -> bool:
        return True

    for may, expected in ((no_rights, None), (rights, "blind")):
        answer = await door.command(
            Command("model_set", "blind"),
            CHANNEL,
            acknowledge=acknowledge,
            user_id="U1",
            direct=False,
            may_change_channel=may,
        )
        assert (await store.channel_settings("slack", "T1", "C1")).model == expected
        if expected is None:
            assert answer == profile.channel_rights


# -- each model answered by its own API ------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer() as running:
        yield running


async def test_each_conversation_reaches_the_api_of_its_model(
    settings: Settings, store: ConversationStore, server: FakeLLMServer
) -> None:
    wired = Settings.from_mapping(
        {
            **KEYS,
            "DATABASE_URL": settings.database_url,
            "LLM_PROVIDER": "openai",
            "OPENAI_BASE_URL": server.openai_base_url,
            "ANTHROPIC_BASE_URL": server.anthropic_base_url,
            "MODELS": EXAMPLE,
        }
    )
    engine = ChatEngine(wired, store, build_provider(wired))
    try:
        await engine.run_command(Command("model_set", "claude-haiku-4-5"), THREAD)
        for key in (THREAD, OTHER_THREAD, THREAD):
            result = await engine.handle(
                IncomingMessage(key, "hello there", "U1"), CollectingSink()
            )
            assert result.status == "answered"
        paths = [(r.path, r.body["model"]) for r in server.chat_requests()]
        assert paths == [
            (ANTHROPIC_MESSAGES_PATH, "claude-haiku-4-5"),
            (OPENAI_CHAT_PATH, "gpt-4.1-mini"),
            (ANTHROPIC_MESSAGES_PATH, "claude-haiku-4-5"),
        ]
        # One Anthropic provider, built on first use and kept.
        assert list(engine._providers) == ["anthropic"]
        async with store.engine.connect() as conn:
            answers = await conn.execute(
                select(MessageRow.model)
                .where(MessageRow.role == "assistant")
                .order_by(MessageRow.id)
            )
            assert [m for (m,) in answers] == [
                f"anthropic (claude-haiku-4-5 at {server.anthropic_base_url})",
                f"openai-compatible (gpt-4.1-mini at {server.openai_base_url})",
                f"anthropic (claude-haiku-4-5 at {server.anthropic_base_url})",
            ]
            turns = await conn.execute(select(TurnRow.model).order_by(TurnRow.id))
            assert [m for (m,) in turns] == ["claude-haiku-4-5", "gpt-4.1-mini", "claude-haiku-4-5"]
    finally:
        await engine.close()
