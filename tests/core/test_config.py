"""Settings: loaded once from the environment and .env, with errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import DEFAULT_DATABASE_URL, LOG_LEVELS, Settings
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
        ("LOG_LEVEL", "LOUD"),
        ("REQUIRE_MENTION", "maybe"),
        ("DATABASE_URL", "mysql://root@127.0.0.1/threadbot"),
        ("DATABASE_URL", "threadbot.db"),
    ],
)
def test_a_bad_value_is_an_error_naming_its_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.load(environ={name: value}, env_file=None)
    assert raised.value.setting == name and name in str(raised.value)
    assert "\n" not in str(raised.value)


def test_lists_and_flags() -> None:
    settings = Settings.load(
        environ={"DISCORD_COMMAND_GUILDS": " 1, 2 ,,3", "REQUIRE_MENTION": "yes"}, env_file=None
    )
    assert settings.discord_command_guilds == ("1", "2", "3")
    assert settings.require_mention is True


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("On", True),
        ("YES", True),
        ("1", True),
        ("false", False),
        ("off", False),
        ("No", False),
        ("0", False),
        ("", False),
    ],
)
def test_booleans_take_the_usual_words_in_any_case(value: str, expected: bool) -> None:
    settings = Settings.load(environ={"REQUIRE_MENTION": value}, env_file=None)
    assert settings.require_mention is expected


def test_a_bad_log_level_names_the_allowed_values() -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.load(environ={"LOG_LEVEL": "LOUD"}, env_file=None)
    assert all(level in str(raised.value) for level in LOG_LEVELS)


def test_log_level_is_unset_unless_given_and_case_free() -> None:
    assert Settings.load(environ={}, env_file=None).log_level is None
    assert Settings.load(environ={"LOG_LEVEL": "debug"}, env_file=None).log_level == "DEBUG"
    assert Settings.load(environ={"LOG_LEVEL": "warn"}, env_file=None).log_level == "WARNING"


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgres://u:p@db.example:5432/app", "postgresql+asyncpg://u:p@db.example:5432/app"),
        ("postgresql://u:p@db.example/app", "postgresql+asyncpg://u:p@db.example/app"),
        (
            "postgres://u:p@db.example/app?sslmode=require",
            "postgresql+asyncpg://u:p@db.example/app?ssl=require",
        ),
        (
            "postgresql+asyncpg://u@h/app?sslmode=verify-full&application_name=bot",
            "postgresql+asyncpg://u@h/app?ssl=verify-full&application_name=bot",
        ),
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("SQLite:////var/lib/threadbot.db", "sqlite+aiosqlite:////var/lib/threadbot.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
    ],
)
def test_hosts_plain_database_urls_map_to_the_async_drivers(given: str, used: str) -> None:
    assert Settings.load(environ={"DATABASE_URL": given}, env_file=None).database_url == used


def test_a_refused_database_url_hides_its_password() -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.load(environ={"DATABASE_URL": "mysql://root:hunter2@db/app"}, env_file=None)
    assert "hunter2" not in str(raised.value) and "root:***@db" in str(raised.value)
