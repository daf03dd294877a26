"""Settings: one frozen object loaded once from the environment (and a ``.env`` file)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from dotenv import dotenv_values

from core.errors import ConfigError
from core.models import ModelChoice, parse_models

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant in a team chat. Answer clearly and concisely; "
    "use Markdown for code and lists."
)
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///threadbot.db"
HISTORY_STRATEGIES = ("count", "tokens", "summary")
PROVIDERS = ("openai", "anthropic", "offline")
SLACK_STREAMING_MODES = ("auto", "native", "update")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
#: The smallest MODEL_CONTEXT_TOKENS accepted: below it no question and answer fit at all.
MIN_CONTEXT_TOKENS = 256
#: ``MAX_IMAGE_BYTES`` when unset: 5 MB, the most Anthropic's API takes per image.
DEFAULT_MAX_IMAGE_BYTES = 5 * 1024 * 1024
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
# Hosts (Heroku, Render, Railway, Fly) hand out plain libpq URLs; SQLAlchemy's asyncio extension
# needs the async driver named in the scheme.
ASYNC_URL_SCHEMES = {
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
}


@dataclass(frozen=True)
class Settings:
    """Every setting threadbot reads. Built by ``Settings.load()``; never read os.environ elsewhere."""

    llm_provider: str = "offline"
    llm_model: str | None = None
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    anthropic_api_key: str | None = None
    anthropic_base_url: str | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    database_url: str = DEFAULT_DATABASE_URL
    history_strategy: str = "count"
    max_history_messages: int = 20
    max_history_tokens: int = 8000
    # Tokens kept free for the model's answer inside MAX_HISTORY_TOKENS.
    reply_reserve_tokens: int = 1024
    max_reply_tokens: int = 2048
    # The model's context window in tokens, when known: requests are kept within it (None: the
    # server's own context-overflow error says it, and the turn is retried to fit).
    model_context_tokens: int | None = None
    max_retry_attempts: int = 4
    # Longest user message accepted, in characters; longer ones get a clear refusal.
    max_input_chars: int = 40_000
    # Provider request timeout in seconds (connect + between chunks).
    llm_timeout: float = 60.0
    # Offline provider: seconds between streamed words (0 streams at full speed).
    offline_delay: float = 0.02
    # Seconds a worker holds a turn it answers; a turn whose worker died is taken over once its
    # lease expires (renewed every third of it while the answer runs).
    turn_lease_seconds: float = 30.0
    require_mention: bool = False
    slack_bot_token: str | None = None
    slack_signing_secret: str | None = None
    slack_app_token: str | None = None
    slack_api_url: str = "https://slack.com/api/"
    slack_command: str = "/chatbot"
    slack_streaming: str = "auto"
    port: int = 3000
    discord_bot_token: str | None = None
    discord_api_url: str | None = None
    discord_gateway_url: str | None = None
    discord_command_guilds: tuple[str, ...] = ()
    redis_url: str | None = None
    # Rate-limit overrides: scope-key pattern -> (calls per second, burst); see RATE_LIMITS.
    rate_limits: tuple[tuple[str, float, int], ...] = ()
    # None: not set, each entry point keeps its own default (the terminal stays quiet).
    log_level: str | None = None
    # Metrics and logs (core/metrics.py, core/logs.py): a /metrics port for processes without an
    # HTTP server (None: off), one JSON object per log line, OpenTelemetry's OTLP/HTTP endpoint,
    # prometheus-client's shared directory for pre-forked workers on one port.
    metrics_port: int | None = None
    log_format: str = "text"
    otel_exporter_otlp_endpoint: str | None = None
    prometheus_multiproc_dir: str | None = None
    # Access (core/access.py): platform ids; None for an allow-list means not set (no limit).
    allowed_channels: tuple[str, ...] | None = None
    allowed_users: tuple[str, ...] | None = None
    blocked_users: tuple[str, ...] = ()
    allow_dms: bool = True
    admin_users: tuple[str, ...] = ()
    # Dollars per million tokens, input and output, by model: over the built-in list prices.
    model_prices: tuple[tuple[str, float, float], ...] = ()
    # Tokens (input and output) a user, or a channel, may spend per UTC day (None: no limit).
    user_daily_tokens: int | None = None
    channel_daily_tokens: int | None = None
    # Questions a user may ask per minute; more are told to wait (0: no limit).
    user_messages_per_minute: int = 10
    # Models users may pick (``MODELS``, core/models.py); empty: only LLM_PROVIDER/LLM_MODEL.
    models: tuple[ModelChoice, ...] = ()
    # Images sent with one question to a model that sees them, and the largest one, in bytes.
    max_images: int = 4
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    @classmethod
    def load(
        cls, environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
    ) -> Settings:
        """Read settings from ``environ`` (default: the process environment) over ``env_file``."""
        values: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        values.update(os.environ if environ is None else environ)
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from a mapping of environment variable names to values."""

        def get(name: str) -> str | None:
            value = env.get(name)
            return value.strip() if value is not None and value.strip() else None

        def get_int(name: str, default: int, minimum: int = 0) -> int:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(
                    f"{name} must be a whole number, not {raw!r}", setting=name
                ) from None
            if value < minimum:
                raise ConfigError(f"{name} must be at least {minimum}, not {value}", setting=name)
            return value

        def get_optional_int(name: str, minimum: int) -> int | None:
            return None if get(name) is None else get_int(name, 0, minimum=minimum)

        def get_float(name: str, default: float) -> float:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"{name} must be a number, not {raw!r}", setting=name) from None
            if value < 0:
                raise ConfigError(f"{name} must not be negative", setting=name)
            return value

        def get_bool(name: str, default: bool) -> bool:
            raw = get(name)
            if raw is None:
                return default
            word = raw.lower()
            if word not in TRUE_WORDS + FALSE_WORDS:
                raise ConfigError(
                    f"{name} must be one of {'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}, "
                    f"not {raw!r}",
                    setting=name,
                )
            return word in TRUE_WORDS

        def get_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
            value = (get(name) or default).lower()
            if value not in choices:
                raise ConfigError(
                    f"{name} must be one of {', '.join(choices)}, not {value!r}", setting=name
                )
            return value

        def get_lease() -> float:
            lease = get_float("TURN_LEASE_SECONDS", 30.0)
            if lease < 1:
                raise ConfigError(
                    f"TURN_LEASE_SECONDS must be at least 1, not {lease:g}",
                    setting="TURN_LEASE_SECONDS",
                )
            return lease

        anthropic_key = get("ANTHROPIC_API_KEY")
        openai_key = get("OPENAI_API_KEY")
        openai_url = get("OPENAI_BASE_URL")
        if anthropic_key:
            default_provider = "anthropic"
        elif openai_key or openai_url:
            default_provider = "openai"
        else:
            default_provider = "offline"
        models = parse_models(get("MODELS") or "")
        _check_model_keys(
            models, anthropic_key or get("ANTHROPIC_BASE_URL"), openai_key or openai_url
        )
        guilds = tuple(
            g.strip() for g in (get("DISCORD_COMMAND_GUILDS") or "").split(",") if g.strip()
        )
        return cls(
            llm_provider=get_choice("LLM_PROVIDER", default_provider, PROVIDERS),
            llm_model=get("LLM_MODEL"),
            openai_api_key=openai_key,
            openai_base_url=openai_url,
            anthropic_api_key=anthropic_key,
            anthropic_base_url=get("ANTHROPIC_BASE_URL"),
            system_prompt=get("SYSTEM_PROMPT") or DEFAULT_SYSTEM_PROMPT,
            database_url=async_database_url(get("DATABASE_URL") or DEFAULT_DATABASE_URL),
            history_strategy=get_choice("HISTORY_STRATEGY", "count", HISTORY_STRATEGIES),
            max_history_messages=get_int("MAX_HISTORY_MESSAGES", 20, minimum=1),
            max_history_tokens=get_int("MAX_HISTORY_TOKENS", 8000, minimum=1),
            reply_reserve_tokens=get_int("REPLY_RESERVE_TOKENS", 1024),
            max_reply_tokens=get_int("MAX_REPLY_TOKENS", 2048, minimum=1),
            model_context_tokens=get_optional_int("MODEL_CONTEXT_TOKENS", MIN_CONTEXT_TOKENS),
            max_retry_attempts=get_int("MAX_RETRY_ATTEMPTS", 4, minimum=1),
            max_input_chars=get_int("MAX_INPUT_CHARS", 40_000, minimum=1),
            llm_timeout=get_float("LLM_TIMEOUT", 60.0),
            offline_delay=get_float("OFFLINE_DELAY", 0.02),
            turn_lease_seconds=get_lease(),
            require_mention=get_bool("REQUIRE_MENTION", False),
            slack_bot_token=get("SLACK_BOT_TOKEN"),
            slack_signing_secret=get("SLACK_SIGNING_SECRET"),
            slack_app_token=get("SLACK_APP_TOKEN"),
            slack_api_url=get("SLACK_API_URL") or "https://slack.com/api/",
            slack_command=get("SLACK_COMMAND") or "/chatbot",
            slack_streaming=get_choice("SLACK_STREAMING", "auto", SLACK_STREAMING_MODES),
            port=get_int("PORT", 3000, minimum=1),
            discord_bot_token=get("DISCORD_BOT_TOKEN"),
            discord_api_url=get("DISCORD_API_URL"),
            discord_gateway_url=get("DISCORD_GATEWAY_URL"),
            discord_command_guilds=guilds,
            redis_url=get("REDIS_URL"),
            rate_limits=parse_rate_limits(get("RATE_LIMITS") or ""),
            log_level=parse_log_level(get("LOG_LEVEL")),
            metrics_port=get_optional_int("METRICS_PORT", 1),
            log_format=get_choice("LOG_FORMAT", "text", LOG_FORMATS),
            otel_exporter_otlp_endpoint=parse_otlp_endpoint(get("OTEL_EXPORTER_OTLP_ENDPOINT")),
            prometheus_multiproc_dir=get("PROMETHEUS_MULTIPROC_DIR"),
            allowed_channels=parse_ids("ALLOWED_CHANNELS", get("ALLOWED_CHANNELS")),
            allowed_users=parse_ids("ALLOWED_USERS", get("ALLOWED_USERS")),
            blocked_users=parse_ids("BLOCKED_USERS", get("BLOCKED_USERS")) or (),
            allow_dms=get_bool("ALLOW_DMS", True),
            admin_users=parse_ids("ADMIN_USERS", get("ADMIN_USERS")) or (),
            model_prices=parse_model_prices(get("MODEL_PRICES") or ""),
            user_daily_tokens=get_optional_int("USER_DAILY_TOKENS", 1),
            channel_daily_tokens=get_optional_int("CHANNEL_DAILY_TOKENS", 1),
            user_messages_per_minute=get_int("USER_MESSAGES_PER_MINUTE", 10),
            models=models,
            max_images=get_int("MAX_IMAGES", 4),
            max_image_bytes=get_int("MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES, minimum=1),
        )

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests, per-channel overrides)."""
        names = {f.name for f in fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        return replace(self, **changes)


def _check_model_keys(
    models: tuple[ModelChoice, ...], anthropic_access: str | None, openai_access: str | None
) -> None:
    """A ``MODELS`` entry whose provider cannot be reached is a start-up error, not a turn's."""
    for choice in models:
        if choice.provider == "openai" and openai_access is None:
            missing = "OPENAI_API_KEY (or OPENAI_BASE_URL)"
        elif choice.provider == "anthropic" and anthropic_access is None:
            missing = "ANTHROPIC_API_KEY (or ANTHROPIC_BASE_URL)"
        else:
            continue
        raise ConfigError(
            f"MODELS lists {choice.qualified}, but {missing} is not set", setting="MODELS"
        )


def parse_log_level(raw: str | None) -> str | None:
    """``LOG_LEVEL`` upper-cased (``WARN`` means WARNING), or None when not set."""
    if raw is None:
        return None
    level = "WARNING" if raw.upper() == "WARN" else raw.upper()
    if level not in LOG_LEVELS:
        raise ConfigError(
            f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {raw!r}", setting="LOG_LEVEL"
        )
    return level


def parse_otlp_endpoint(raw: str | None) -> str | None:
    """``OTEL_EXPORTER_OTLP_ENDPOINT`` without a trailing slash; ConfigError unless http(s)."""
    if raw is None:
        return None
    if not raw.startswith(("http://", "https://")):
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_ENDPOINT must be an http:// or https:// URL (OTLP/HTTP), "
            f"not {raw!r}",
            setting="OTEL_EXPORTER_OTLP_ENDPOINT",
        )
    return raw.rstrip("/")


def parse_ids(name: str, raw: str | None) -> tuple[str, ...] | None:
    """A comma-separated list of platform ids (``C0123ABCD``, ``slack:U0123``), None when unset.

    Names (``#general``, ``@alice``) and ids run together with spaces are refused: they would
    match nobody, and an allow-list that matches nobody silences the bot.
    """
    if raw is None:
        return None
    ids = tuple(part.strip() for part in raw.split(",") if part.strip())
    for id_ in ids:
        if id_[0] in "#@<" or any(c.isspace() for c in id_):
            raise ConfigError(
                f"{name} takes ids separated by commas (C0123ABCD, U0123ABCD or a Discord id), "
                f"not {id_!r}",
                setting=name,
            )
    return ids or None


def async_database_url(raw: str) -> str:
    """``DATABASE_URL`` as SQLAlchemy's asyncio extension wants it; ConfigError when unusable.

    ``postgres://`` and ``postgresql://`` (as hosts give them) become ``postgresql+asyncpg://``,
    ``sqlite://`` becomes ``sqlite+aiosqlite://``; libpq's ``sslmode`` becomes asyncpg's ``ssl``.
    """
    scheme, sep, rest = raw.partition("://")
    driver = ASYNC_URL_SCHEMES.get(scheme.lower()) if sep else None
    if driver is None:
        raise ConfigError(
            f"DATABASE_URL must start with postgres://, postgresql://, postgresql+asyncpg://, "
            f"sqlite:// or sqlite+aiosqlite://, not {hide_password(raw)!r}",
            setting="DATABASE_URL",
        )
    url = f"{driver}://{rest}"
    if driver.startswith("postgresql"):
        url = _asyncpg_query(url)
    return url


def _asyncpg_query(url: str) -> str:
    """Rename libpq's ``sslmode`` to asyncpg's ``ssl``, which takes the same values."""
    base, sep, query = url.partition("?")
    if not sep:
        return url
    pairs = parse_qsl(query, keep_blank_values=True)
    renamed = [("ssl" if key == "sslmode" else key, value) for key, value in pairs]
    return f"{base}?{urlencode(renamed)}"


def hide_password(url: str) -> str:
    """``url`` with the password of ``user:password@host`` replaced by ``***``."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def parse_rate_limits(text: str) -> tuple[tuple[str, float, int], ...]:
    """Parse ``RATE_LIMITS``: comma-separated ``pattern=calls/seconds[/burst]``.

    ``pattern`` is a rate-limit scope key, a prefix of one or a glob
    (``slack:*:chat.update=40/60/2``: 40 calls a minute, bursts of 2, in every workspace).
    """
    limits: list[tuple[str, float, int]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        pattern, _, rate = item.partition("=")
        fields = rate.split("/")
        try:
            calls, seconds = float(fields[0]), float(fields[1])
            burst = int(fields[2]) if len(fields) > 2 else 1
            if not pattern.strip() or len(fields) > 3 or calls <= 0 or seconds <= 0 or burst < 1:
                raise ValueError
        except (ValueError, IndexError):
            raise ConfigError(
                f"RATE_LIMITS entry {item!r} is not pattern=calls/seconds[/burst], "
                "e.g. slack:*:chat.update=40/60/2",
                setting="RATE_LIMITS",
            ) from None
        limits.append((pattern.strip(), calls / seconds, burst))
    return tuple(limits)


def parse_model_prices(text: str) -> tuple[tuple[str, float, float], ...]:
    """Parse ``MODEL_PRICES``: comma-separated ``model=input/output`` in dollars per million
    tokens (``gpt-4.1-mini=0.4/1.6``)."""
    prices: list[tuple[str, float, float]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        model, _, rate = item.partition("=")
        fields = rate.split("/")
        try:
            if not model.strip() or len(fields) != 2:
                raise ValueError
            paid_in, paid_out = float(fields[0]), float(fields[1])
            if not (0 <= paid_in < float("inf") and 0 <= paid_out < float("inf")):
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"MODEL_PRICES entry {item!r} is not model=input/output in dollars per million "
                "tokens, e.g. gpt-4.1-mini=0.4/1.6",
                setting="MODEL_PRICES",
            ) from None
        prices.append((model.strip(), paid_in, paid_out))
    return tuple(prices)
