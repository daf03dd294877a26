"""Prompt experiments: starting and stopping them, and which prompt a conversation gets.

An experiment compares system prompts (its variants) over the new conversations of a scope: the
whole deployment, or some channels (a channel id matches that channel on any platform and
workspace). One experiment runs per scope; in a channel, a channel experiment comes before a
deployment-wide one.

A conversation's variant is chosen once, by a hash of the experiment's seed and the
conversation's id (weights respected), and stored insert-if-absent: restarts, more workers or
changed weights never move a running conversation to another variant. A conversation with its
own ``system`` prompt is excluded (stored, and counted as such); so is one in a channel with its
own default, under a deployment-wide experiment. A channel experiment replaces the channel's
default while it runs: naming the channel is the operator's choice of what to test there.
Conversations that began before the experiment keep their prompt and are not counted.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from core.errors import ExperimentError
from core.store import (
    Conversation,
    ConversationStore,
    Experiment,
    ExperimentVariant,
    TurnExposure,
)

#: Experiment and variant names: short words an operator can type and a report can show.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Longest variant prompt, as for a prompt set with the ``system`` command.
MAX_PROMPT_CHARS = 8000
#: Hex digits of a prompt's version (``turns.prompt_version`` holds up to 16).
PROMPT_VERSION_CHARS = 12
#: Bytes of the assignment hash read as a number in [0, 1).
HASH_BYTES = 8
#: Hex digits of a new experiment's seed.
SEED_BYTES = 8


@dataclass(frozen=True, slots=True)
class Assignment:
    """The prompt a conversation's turn uses under an experiment, and where it comes from."""

    prompt: str
    experiment_id: int
    variant: str


def prompt_version(prompt: str) -> str:
    """A short, stable hash of a prompt's text: replies of one prompt share it."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:PROMPT_VERSION_CHARS]


def choose_variant(seed: str, conversation_id: int, variants: Sequence[ExperimentVariant]) -> str:
    """The variant a hash of ``seed`` and ``conversation_id`` picks, in proportion to weights.

    The same in every process (no per-process salt, unlike ``hash()``).
    """
    digest = hashlib.sha256(f"{seed}:{conversation_id}".encode()).digest()
    point = int.from_bytes(digest[:HASH_BYTES], "big") / 2 ** (8 * HASH_BYTES)
    total = sum(v.weight for v in variants)
    reached = 0.0
    for variant in variants:
        reached += variant.weight / total
        if point < reached:
            return variant.name
    return variants[-1].name  # rounding left the point past the last edge


def experiment_for(experiments: Sequence[Experiment], channel: str) -> Experiment | None:
    """The running experiment of a conversation's scope: its channel's, else the deployment's."""
    running = [e for e in experiments if e.running]
    for experiment in running:
        if experiment.channels is not None and channel in experiment.channels:
            return experiment
    return next((e for e in running if e.channels is None), None)


async def experiment_prompt(
    store: ConversationStore, conversation: Conversation, channel_prompt: str | None
) -> Assignment | None:
    """The variant prompt for a conversation's turn, or None when no experiment applies."""
    experiment = experiment_for(
        await store.experiments(running_only=True), conversation.key.channel
    )
    if experiment is None:
        return None
    stored = await store.assignment(experiment.id, conversation.id)
    if stored is None:
        if await store.conversation_created_at(conversation.id) < experiment.created_at:
            return None
        own = bool(conversation.system_prompt) or (
            experiment.channels is None and bool(channel_prompt)
        )
        chosen = (
            None if own else choose_variant(experiment.seed, conversation.id, experiment.variants)
        )
        stored = await store.assign(experiment.id, conversation.id, chosen, excluded=own)
    variant, excluded = stored
    if excluded or conversation.system_prompt:
        # A prompt the user set later still wins; that reply is not the experiment's.
        return None
    prompt = next((v.prompt for v in experiment.variants if v.name == variant), None)
    return None if prompt is None or variant is None else Assignment(prompt, experiment.id, variant)


def exposure(
    prompt: str, assignment: Assignment | None, first_token_ms: int | None
) -> TurnExposure:
    """What a reply made with ``prompt`` was exposed to."""
    return TurnExposure(
        experiment_id=None if assignment is None else assignment.experiment_id,
        variant=None if assignment is None else assignment.variant,
        prompt_version=prompt_version(prompt),
        first_token_ms=first_token_ms,
    )


# -- operating experiments ----------------------------------------------------------------------


def parse_variants(specs: Sequence[str], weights: str | None) -> list[ExperimentVariant]:
    """``NAME=PROMPT`` specs (split at the first ``=``) and ``50,50`` weights, checked."""
    if len(specs) < 2:
        raise ExperimentError("an experiment needs at least two --variant NAME=PROMPT")
    shares = _parse_weights(weights, len(specs))
    variants: list[ExperimentVariant] = []
    for spec, weight in zip(specs, shares, strict=True):
        name, equals, prompt = spec.partition("=")
        name, prompt = name.strip(), prompt.strip()
        if not equals or not prompt:
            raise ExperimentError(f"--variant {spec!r} is not NAME=PROMPT")
        check_name(name, "variant")
        if any(v.name == name for v in variants):
            raise ExperimentError(f"two variants are called {name!r}")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ExperimentError(
                f"variant {name!r}'s prompt is {len(prompt):,} characters; "
                f"the limit is {MAX_PROMPT_CHARS:,}"
            )
        variants.append(ExperimentVariant(name, prompt, weight))
    return variants


def _parse_weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0] * count
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != count:
        raise ExperimentError(f"--weights {text!r} has {len(parts)} weights for {count} variants")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ExperimentError(f"--weights {text!r} is not numbers such as 50,50") from None
    if any(not w > 0 or w == float("inf") for w in weights):
        raise ExperimentError(f"--weights {text!r}: every weight must be a positive number")
    return weights


def check_name(name: str, what: str) -> None:
    """Raise unless ``name`` is a short word (letters, digits, ``_ . -``)."""
    if not NAME_PATTERN.match(name):
        raise ExperimentError(f"{what} name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")


async def start(
    store: ConversationStore,
    name: str,
    variants: Sequence[ExperimentVariant],
    channels: Sequence[str],
) -> Experiment:
    """Start an experiment over ``channels`` (none: the whole deployment)."""
    check_name(name, "experiment")
    for channel in channels:
        if not channel.strip() or "," in channel:
            raise ExperimentError(f"--channel {channel!r} is not a channel id")
    scope = sorted({c.strip() for c in channels}) or None
    return await store.start_experiment(name, secrets.token_hex(SEED_BYTES), variants, scope)


async def stop(store: ConversationStore, name: str, ship: str | None) -> tuple[Experiment, int]:
    """Stop ``name`` (and ship a variant's prompt); the experiment before, and channels set.

    A stopped experiment not yet shipped may still be shipped.
    """
    experiment = await find(store, name)
    if experiment.shipped is not None:
        raise ExperimentError(f"experiment {name!r} was stopped and shipped {experiment.shipped!r}")
    if not experiment.running and ship is None:
        raise ExperimentError(f"experiment {name!r} is already stopped")
    chosen = None
    if ship is not None:
        chosen = next((v for v in experiment.variants if v.name == ship), None)
        if chosen is None:
            names = ", ".join(v.name for v in experiment.variants)
            raise ExperimentError(f"experiment {name!r} has no variant {ship!r} (it has {names})")
    channels = await store.stop_experiment(experiment.id, shipped=chosen)
    return experiment, channels


async def find(store: ConversationStore, name: str) -> Experiment:
    """The experiment called ``name``; ``ExperimentError`` when there is none."""
    experiment = await store.experiment(name)
    if experiment is None:
        raise ExperimentError(f"no experiment named {name!r}")
    return experiment
