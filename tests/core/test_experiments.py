"""Experiments: assignment (hashed, weighted, stored, sticky), scopes, exclusions, exposure."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select

from core import experiments
from core.commands import Command
from core.conversation import ConversationKey, IncomingMessage
from core.engine import ChatEngine
from core.errors import ExperimentError, PermanentProviderError
from core.experiment_report import build_report
from core.experiments import choose_variant, experiment_prompt, prompt_version
from core.providers.offline import OfflineProvider
from core.reply import CollectingSink
from core.store import (
    ConversationStore,
    ExperimentVariant,
    FeedbackRow,
    MessageRow,
    TurnRow,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[ConversationStore]:
    """The store on SQLite and, when reachable, on PostgreSQL."""
    store = await ConversationStore.open(database_url)
    yield store
    await store.close()


HALVES = (ExperimentVariant("a", "Prompt A.", 1), ExperimentVariant("b", "Prompt B.", 1))
IDS = range(1, 10_001)


def test_assignment_is_balanced_to_the_weights_over_10000_conversations() -> None:
    for weights in ((50, 50), (20, 80), (1, 1, 2)):
        variants = [ExperimentVariant(f"v{i}", "p", w) for i, w in enumerate(weights)]
        counts = {v.name: 0 for v in variants}
        for conversation_id in IDS:
            counts[choose_variant("seed-1", conversation_id, variants)] += 1
        for variant in variants:
            share = variant.weight / sum(weights)
            assert counts[variant.name] / len(IDS) == pytest.approx(share, abs=0.02)


def test_assignment_is_the_same_in_another_process() -> None:
    here = [choose_variant("s", i, HALVES) for i in range(200)]
    program = (
        "import json; from core.experiments import choose_variant; "
        "from core.store import ExperimentVariant as V; "
        "vs = (V('a', 'Prompt A.', 1), V('b', 'Prompt B.', 1)); "
        "print(json.dumps([choose_variant('s', i, vs) for i in range(200)]))"
    )
    there = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert json.loads(there.stdout) == here
    assert set(here) == {"a", "b"}
    # Another seed shuffles conversations differently.
    assert here != [choose_variant("t", i, HALVES) for i in range(200)]


async def new_conversation(store: ConversationStore, channel: str, thread: str = "1") -> int:
    conversation, _ = await store.get_or_create(ConversationKey("slack", "T1", channel, thread))
    return conversation.id


async def test_a_stored_assignment_survives_a_weight_change(db: ConversationStore) -> None:
    store = db
    experiment = await store.start_experiment("tone", "seed", HALVES, None)
    first: dict[int, str] = {}
    for thread in range(40):
        conversation = await store.get(await new_conversation(store, "C1", str(thread)))
        assignment = await experiment_prompt(store, conversation, None)
        assert assignment is not None
        first[conversation.id] = assignment.variant
    assert set(first.values()) == {"a", "b"}
    # Everything to "a" now: running conversations keep their variant; new ones follow.
    skewed = replace(
        experiment, variants=(replace(HALVES[0], weight=1), replace(HALVES[1], weight=1e-9))
    )
    for conversation_id, variant in first.items():
        stored = await store.assignment(experiment.id, conversation_id)
        assert stored == (variant, False)
        assert choose_variant(skewed.seed, conversation_id, skewed.variants) == "a"
    again = await store.assign(experiment.id, next(iter(first)), "a", excluded=False)
    assert again == (first[next(iter(first))], False)  # insert-if-absent: the first choice stands


async def test_own_prompts_are_excluded_and_counted(store: ConversationStore) -> None:
    experiment = await store.start_experiment("tone", "seed", HALVES, None)
    own = await new_conversation(store, "C1", "own")
    await store.set_system_prompt(own, "my rules")
    assert await experiment_prompt(store, await store.get(own), None) is None
    in_channel = await store.get(await new_conversation(store, "C2"))
    assert await experiment_prompt(store, in_channel, "channel rules") is None
    plain = await store.get(await new_conversation(store, "C3"))
    assert await experiment_prompt(store, plain, None) is not None
    counts = await store.assignment_counts(experiment.id)
    assert counts.excluded == 2 and sum(counts.per_variant.values()) == 1
    # Excluded is sticky: clearing the prompt later does not enter the conversation.
    await store.set_system_prompt(own, None)
    assert await experiment_prompt(store, await store.get(own), None) is None


async def test_one_experiment_per_scope_and_channel_first(db: ConversationStore) -> None:
    store = db
    deployment = await experiments.start(store, "everywhere", HALVES, [])
    with pytest.raises(ExperimentError, match="whole deployment"):
        await experiments.start(store, "again", HALVES, [])
    channel_variants = (ExperimentVariant("x", "X.", 1), ExperimentVariant("y", "Y.", 1))
    local = await experiments.start(store, "here", channel_variants, ["C7", "C8"])
    with pytest.raises(ExperimentError, match="channel C8"):
        await experiments.start(store, "there", HALVES, ["C8"])
    with pytest.raises(ExperimentError, match="already exists"):
        await experiments.start(store, "here", HALVES, ["C9"])
    in_c7 = await experiment_prompt(
        store, await store.get(await new_conversation(store, "C7")), None
    )
    elsewhere = await experiment_prompt(
        store, await store.get(await new_conversation(store, "C1")), None
    )
    assert in_c7 is not None and in_c7.experiment_id == local.id and in_c7.variant in "xy"
    assert elsewhere is not None and elsewhere.experiment_id == deployment.id
    # A channel experiment replaces the channel's own default while it runs.
    in_c8 = await store.get(await new_conversation(store, "C8"))
    assert await experiment_prompt(store, in_c8, "channel rules") is not None


async def test_conversations_older_than_the_experiment_keep_their_prompt(
    store: ConversationStore,
) -> None:
    before = await store.get(await new_conversation(store, "C1"))
    experiment = await store.start_experiment("tone", "seed", HALVES, None)
    assert await experiment_prompt(store, before, None) is None
    counts = await store.assignment_counts(experiment.id)
    assert counts.per_variant == {} and counts.excluded == 0


async def test_stop_ends_it_everywhere_and_ship_sets_the_scopes_default(
    engine: ChatEngine, store: ConversationStore, provider: OfflineProvider
) -> None:
    await experiments.start(store, "tone", HALVES, [])
    key = ConversationKey("slack", "T1", "C1", "9")
    provider.enqueue(["one"], ["two"], ["three"])
    await engine.handle(IncomingMessage(key=key, text="hi", user_id="U1"), CollectingSink())
    assert provider.requests[-1].system in ("Prompt A.", "Prompt B.")
    with pytest.raises(ExperimentError, match="no variant 'c'"):
        await experiments.stop(store, "tone", "c")
    await experiments.stop(store, "tone", None)
    await engine.handle(IncomingMessage(key=key, text="and?", user_id="U1"), CollectingSink())
    assert provider.requests[-1].system == engine.settings.system_prompt
    with pytest.raises(ExperimentError, match="already stopped"):
        await experiments.stop(store, "tone", None)
    await experiments.stop(store, "tone", "b")  # stopped, not yet shipped: may still ship
    await engine.handle(IncomingMessage(key=key, text="now?", user_id="U1"), CollectingSink())
    assert provider.requests[-1].system == "Prompt B."
    shown = await engine.run_command(Command("system_show"), key)
    assert "Prompt B." in shown and "the bot's default" in shown
    with pytest.raises(ExperimentError, match="shipped 'b'"):
        await experiments.stop(store, "tone", "a")


async def test_shipping_a_channel_experiment_sets_that_channel_everywhere(
    store: ConversationStore,
) -> None:
    await experiments.start(store, "local", HALVES, ["C5"])
    await new_conversation(store, "C5")
    await store.update_channel_settings("discord", "G1", "C5", history_strategy="count")
    _, channels = await experiments.stop(store, "local", "a")
    assert channels == 2
    assert (await store.channel_settings("slack", "T1", "C5")).system_prompt == "Prompt A."
    assert (await store.channel_settings("discord", "G1", "C5")).system_prompt == "Prompt A."
    assert await store.deployment_setting("system_prompt") is None


async def test_every_reply_records_its_exposure_and_the_report_reads_ratings(
    engine: ChatEngine, store: ConversationStore, provider: OfflineProvider
) -> None:
    experiment = await store.start_experiment("tone", "seed", HALVES, None)
    for thread in ("1", "2", "3", "4"):
        key = ConversationKey("slack", "T1", "C1", thread)
        for question in ("q1", "q2"):
            provider.enqueue(["an answer"])
            await engine.handle(
                IncomingMessage(key=key, text=question, user_id="U1"), CollectingSink()
            )
    async with store.engine.connect() as conn:
        turns = (await conn.execute(select(TurnRow).order_by(TurnRow.id))).all()
        answers = (
            await conn.execute(select(MessageRow).where(MessageRow.role == "assistant"))
        ).all()
    assert len(turns) == 8
    for turn in turns:
        assert turn.experiment_id == experiment.id and turn.variant in ("a", "b")
        prompt = HALVES[0].prompt if turn.variant == "a" else HALVES[1].prompt
        assert turn.prompt_version == prompt_version(prompt)
        assert turn.first_token_ms is not None and turn.input_tokens and turn.model
    # One user clicks twice on the first answer (the latest counts), another clicks once.
    first = answers[0]
    async with store.engine.begin() as conn:
        for user, value in (("U1", 1), ("U1", -1), ("U2", 1)):
            await conn.execute(
                FeedbackRow.__table__.insert().values(
                    message_id=first.id,
                    conversation_id=first.conversation_id,
                    platform="slack",
                    user_id=user,
                    value=value,
                )
            )
    replies = await store.experiment_replies(experiment.id)
    rated = [r for r in replies if r.rated]
    assert [(r.rated, r.positive) for r in rated] == [(2, 1)]
    report = build_report(experiment, await store.assignment_counts(experiment.id), replies)
    assert sum(v.replies for v in report.variants) == 8
    assert sum(v.conversations for v in report.variants) == 4
    assert report.verdict == "not enough ratings yet: 2 of about 200 needed"


async def test_a_failed_reply_is_exposed_and_counted_as_an_error(
    engine: ChatEngine, store: ConversationStore, provider: OfflineProvider
) -> None:
    experiment = await store.start_experiment("tone", "seed", HALVES, None)
    key = ConversationKey("slack", "T1", "C1", "5")
    provider.enqueue([PermanentProviderError("bad request")], ["fine"])
    for question in ("first", "second"):
        await engine.handle(IncomingMessage(key=key, text=question, user_id="U1"), CollectingSink())
    report = build_report(
        experiment,
        await store.assignment_counts(experiment.id),
        await store.experiment_replies(experiment.id),
    )
    [used] = [v for v in report.variants if v.conversations]
    assert (used.replies, used.errors) == (2, 1)
