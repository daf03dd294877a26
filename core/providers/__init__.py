"""Provider registry: built-in providers register the same way a third-party one would."""

from __future__ import annotations

import importlib

from core.config import Settings
from core.errors import ConfigError
from core.providers.base import Provider

_REGISTRY: dict[str, type[Provider]] = {}
# Built-ins are imported only when named, so the terminal chat does not load every SDK at start.
_BUILTIN_MODULES = {
    "openai": "core.providers.openai",
    "anthropic": "core.providers.anthropic",
    "offline": "core.providers.offline",
}


def register(cls: type[Provider]) -> type[Provider]:
    """Make ``cls`` selectable by ``LLM_PROVIDER=<cls.name>``. Usable as a class decorator."""
    _REGISTRY[cls.name] = cls
    return cls


def provider_names() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def build_provider(settings: Settings) -> Provider:
    """The provider ``settings.llm_provider`` names, constructed."""
    name = settings.llm_provider
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"LLM_PROVIDER={name!r} is not one of {', '.join(provider_names())}",
            setting="LLM_PROVIDER",
        ) from None
    return cls(settings)


__all__ = ["Provider", "build_provider", "provider_names", "register"]
