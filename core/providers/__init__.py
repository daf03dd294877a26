"""Provider registry: built-in providers register the same way a third-party one would."""

from __future__ import annotations

from core.config import Settings
from core.errors import ConfigError
from core.providers.base import Provider

_REGISTRY: dict[str, type[Provider]] = {}


def register(cls: type[Provider]) -> type[Provider]:
    """Make ``cls`` selectable by ``LLM_PROVIDER=<cls.name>``. Usable as a class decorator."""
    _REGISTRY[cls.name] = cls
    return cls


def provider_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def build_provider(settings: Settings) -> Provider:
    """The provider ``settings.llm_provider`` names, constructed."""
    _load_builtins()
    try:
        cls = _REGISTRY[settings.llm_provider]
    except KeyError:
        raise ConfigError(
            f"LLM_PROVIDER={settings.llm_provider!r} is not one of {', '.join(sorted(_REGISTRY))}",
            setting="LLM_PROVIDER",
        ) from None
    return cls(settings)


def _load_builtins() -> None:
    # Imported here so that importing the registry does not import every SDK.
    from core.providers import anthropic, offline, openai  # noqa: F401


__all__ = ["Provider", "build_provider", "provider_names", "register"]
