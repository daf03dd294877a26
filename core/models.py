"""Model choice: the models a deployment offers (``MODELS``) and which one answers a turn.

``MODELS=provider:model[:vision],…`` lists the models users may pick (``model <name>``) for a
conversation or as a channel's default; ``:vision`` marks a model that can see images. The
deployment's own model (``LLM_PROVIDER``/``LLM_MODEL``) is always a choice and the default: a
turn uses the conversation's model, else its channel's default, else the deployment's. A stored
name no longer offered falls back to the default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.errors import ConfigError

if TYPE_CHECKING:
    from core.config import Settings

log = logging.getLogger(__name__)

#: Providers a ``MODELS`` entry may name (``core/providers``), and their default models.
MODEL_PROVIDERS = ("openai", "anthropic", "offline")
DEFAULT_MODELS = {"openai": "gpt-4.1-mini", "anthropic": "claude-haiku-4-5", "offline": "scripted"}
VISION_FLAG = "vision"
#: What a model choice came from (``resolve_model``): the conversation, the channel, the default.
SOURCES = ("conversation", "channel", "default")


@dataclass(frozen=True)
class ModelChoice:
    """One model users may pick: which provider answers with it, and whether it sees images."""

    provider: str
    model: str
    vision: bool = False

    @property
    def name(self) -> str:
        """The name users type (``provider:model`` is accepted too)."""
        return self.model

    @property
    def qualified(self) -> str:
        """``provider:model``."""
        return f"{self.provider}:{self.model}"


def parse_models(text: str) -> tuple[ModelChoice, ...]:
    """Parse ``MODELS``: comma-separated ``provider:model[:vision]``; ConfigError when unusable.

    The model part may itself hold colons (``openai:llama3.1:8b``, an Ollama tag): only a last
    part ``vision`` is the flag.
    """
    choices: list[ModelChoice] = []
    seen: set[str] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        provider, sep, rest = item.partition(":")
        provider = provider.strip().lower()
        vision = False
        model = rest.strip()
        head, flag_sep, flag = model.rpartition(":")
        if flag_sep and flag.strip().lower() == VISION_FLAG:
            model, vision = head.strip(), True
        if not sep or not model:
            raise ConfigError(
                f"MODELS entry {item!r} is not provider:model[:vision], "
                "e.g. openai:gpt-4.1-mini:vision",
                setting="MODELS",
            )
        if provider not in MODEL_PROVIDERS:
            raise ConfigError(
                f"MODELS entry {item!r} names the provider {provider!r}, which is not one of "
                f"{', '.join(MODEL_PROVIDERS)}",
                setting="MODELS",
            )
        if model.lower() in seen:
            raise ConfigError(
                f"MODELS lists the model {model!r} twice: each name must be unique",
                setting="MODELS",
            )
        seen.add(model.lower())
        choices.append(ModelChoice(provider, model, vision))
    return tuple(choices)


def default_choice(settings: Settings) -> ModelChoice:
    """The deployment's model (``LLM_PROVIDER``/``LLM_MODEL``); sees images when ``MODELS``
    lists it with ``:vision``."""
    provider = settings.llm_provider
    model = settings.llm_model or DEFAULT_MODELS.get(provider, "")
    for choice in settings.models:
        if choice.provider == provider and choice.model == model:
            return choice
    return ModelChoice(provider, model, False)


def model_choices(settings: Settings) -> list[ModelChoice]:
    """Every model users may pick: the deployment's first, then ``MODELS`` in order."""
    default = default_choice(settings)
    return [default] + [c for c in settings.models if c != default]


def model_names(settings: Settings) -> list[str]:
    """Every name a user may pick (for autocomplete), the default first."""
    return [choice.name for choice in model_choices(settings)]


def find_model(settings: Settings, name: str) -> ModelChoice | None:
    """The choice ``name`` (or ``provider:model``) picks, case-insensitively; None if none."""
    wanted = name.strip().lower()
    if not wanted:
        return None
    for choice in model_choices(settings):
        if wanted in (choice.name.lower(), choice.qualified.lower()):
            return choice
    return None


def resolve_model(
    settings: Settings, conversation_model: str | None, channel_model: str | None
) -> tuple[ModelChoice, str]:
    """The model that answers and where the choice comes from (one of ``SOURCES``).

    The conversation's model, else the channel's default, else the deployment's; a stored name
    that is no longer offered is skipped (logged).
    """
    for stored, source in ((conversation_model, "conversation"), (channel_model, "channel")):
        if not stored:
            continue
        choice = find_model(settings, stored)
        if choice is not None:
            return choice, source
        log.warning(
            "the %s's model %r is not in MODELS any more; using the next choice", source, stored
        )
    return default_choice(settings), "default"


def describe_choices(settings: Settings) -> str:
    """The choices for people: ``gpt-4.1-mini`` (sees images), ``gpt-3.5-turbo``, ..."""
    return ", ".join(
        f"`{c.name}`" + (" (sees images)" if c.vision else "") for c in model_choices(settings)
    )


__all__ = [
    "DEFAULT_MODELS",
    "MODEL_PROVIDERS",
    "SOURCES",
    "ModelChoice",
    "default_choice",
    "describe_choices",
    "find_model",
    "model_choices",
    "model_names",
    "parse_models",
    "resolve_model",
]
