"""Settings: loaded once from the environment and .env, with errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import DEFAULT_DATABASE_URL, Settings
from core.errors import ConfigError


def test_embedded_defaults_are_sqlite_and_the_offline_provider() -> None:
    settings = Settings.load(environ={}, env_file=None)
    assert settings.llm_provider == "offline"
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert (settings.history_strategy, settings.max_history_messages) == ("count", 20)
    assert (settings.max_history_tokens, settings.max_retry_attempts) == (8000, 4)
    assert (settings.slack_command, settings.port) == ("/chatbot", 3000)


@pytest.mark.parametrize(
    ("environ", "provider"),
    [
        ({"ANTHROPIC_API_KEY": "a", "OPENAI_API_KEY": "o"}, "anthropic"),
        ({"OPENAI_API_KEY": "o"}, "openai"),
        ({"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1"}, "openai"),
        ({"ANTHROPIC_API_KEY": "a", "LLM_PROVIDER": "offline"}, "offline"),
        ({"OPENAI_API_KEY": "  "}, "offline"),
    ],
)
def test_the_provider_follows_the_keys_unless_named(environ: dict[str, str], provider: str) -> None:
    assert Settings.load(environ=environ, env_file=None).llm_provider == provider


def test_the_environment_wins_over_the_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("MAX_HISTORY_MESSAGES=7\nSYSTEM_PROMPT=from the file\n")
    settings = Settings.load(environ={"MAX_HISTORY_MESSAGES": "9"}, env_file=env_file)
    assert settings.max_history_messages == 9
    assert settings.system_prompt == "from the file"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_HISTORY_MESSAGES", "twenty"),
        ("MAX_HISTORY_MESSAGES", "0"),
        ("MAX_RETRY_ATTEMPTS", "0"),
        ("HISTORY_STRATEGY", "everything"),
        ("LLM_PROVIDER", "gemini"),
        ("LLM_TIMEOUT", "-1"),
        ("SLACK_STREAMING", "sometimes"),
    ],
)
def test_a_bad_value_is_an_error_naming_its_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.load(environ={name: value}, env_file=None)
    assert raised.value.setting == name and name in str(raised.value)


def test_lists_and_flags() -> None:
    settings = Settings.load(
        environ={"DISCORD_COMMAND_GUILDS": " 1, 2 ,,3", "REQUIRE_MENTION": "yes"}, env_file=None
    )
    assert settings.discord_command_guilds == ("1", "2", "3")
    assert settings.require_mention is True
