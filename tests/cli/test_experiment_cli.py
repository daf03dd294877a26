"""The real ``threadbot experiment`` process, with real ``threadbot chat`` conversations."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import select

from core.store import ConversationRow, ConversationStore, TurnRow
from tests.cli.test_cli import chat_env, run_chat

#: Conversations of the end-to-end run, and the questions each asks.
CONVERSATIONS = 60
QUESTIONS = ("How do I undo a commit?", "And keep the changes?", "Thanks. Push?", "Done?")
#: The planted thumbs-up shares: of every 5 conversations of a variant, this many rate up.
PLANTED_UP_OF_FIVE = {"concise": 4, "detailed": 2}
#: Chat processes run side by side (two cores).
PARALLEL_CHATS = 2


def run_experiment(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bots.main", "experiment", *args],
        capture_output=True,
        text=True,
        env=chat_env(tmp_path),
        cwd=tmp_path,
        timeout=60,
    )


def started(tmp_path: Path, *args: str) -> None:
    result = run_experiment(tmp_path, "start", *args)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["tone", "--variant", "a=x"], "at least two --variant"),
        (["tone", "--variant", "a", "--variant", "b=y"], "--variant 'a' is not NAME=PROMPT"),
        (["tone", "--variant", "a=", "--variant", "b=y"], "--variant 'a=' is not NAME=PROMPT"),
        (["tone", "--variant", "a=x", "--variant", "a=y"], "two variants are called 'a'"),
        (["tone", "--variant", "a=x", "--variant", "b=y", "--weights", "50"], "1 weights for 2"),
        (["tone", "--variant", "a=x", "--variant", "b=y", "--weights", "5,x"], "not numbers"),
        (["tone", "--variant", "a=x", "--variant", "b=y", "--weights", "0,1"], "positive"),
        (["to ne", "--variant", "a=x", "--variant", "b=y"], "experiment name 'to ne'"),
        (["tone", "--variant", "a b=x", "--variant", "b=y"], "variant name 'a b'"),
        ([], "required: name"),
    ],
)
def test_bad_start_input_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], error: str
) -> None:
    result = run_experiment(tmp_path, "start", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and error in result.stderr, result.stderr
    assert result.stderr.startswith("threadbot experiment: ")


def test_start_list_scopes_and_stop_errors(tmp_path: Path) -> None:
    # The prompt is split at the first "=": prompts may contain "=".
    started(
        tmp_path,
        "tone",
        "--variant",
        "short=Answer in a line; x = y is fine.",
        "--variant",
        "long=Explain.",
    )
    second = run_experiment(tmp_path, "start", "tone2", "--variant", "a=x", "--variant", "b=y")
    assert (
        second.returncode == 2
        and "'tone' is already running for the whole deployment" in second.stderr
    )
    started(
        tmp_path,
        "local",
        "--variant",
        "a=x",
        "--variant",
        "b=y",
        "--channel",
        "C7",
        "--weights",
        "20,80",
    )
    clash = run_experiment(
        tmp_path, "start", "local2", "--variant", "a=x", "--variant", "b=y", "--channel", "C7"
    )
    assert clash.returncode == 2 and "'local' is already running in channel C7" in clash.stderr
    same = run_experiment(
        tmp_path, "start", "tone", "--variant", "a=x", "--variant", "b=y", "--channel", "C9"
    )
    assert same.returncode == 2 and "named 'tone' already exists" in same.stderr

    listed = run_experiment(tmp_path, "list")
    assert listed.returncode == 0, listed.stderr
    tone, local = listed.stdout.splitlines()
    assert tone.split()[:4] == ["tone", "running", "whole", "deployment"]
    assert "short 50%, long 50%" in tone
    assert local.split()[:4] == ["local", "running", "channels", "C7"] and "a 20%, b 80%" in local

    for args, error in (
        (["nothing"], "no experiment named 'nothing'"),
        (["tone", "--ship", "medium"], "has no variant 'medium' (it has short, long)"),
    ):
        result = run_experiment(tmp_path, "stop", *args)
        assert result.returncode == 2 and error in result.stderr
    assert run_experiment(tmp_path, "stop", "local").returncode == 0
    again = run_experiment(tmp_path, "stop", "local")
    assert again.returncode == 2 and "already stopped" in again.stderr
    assert "local  stopped" in run_experiment(tmp_path, "list").stdout


def test_shipping_makes_the_variant_the_deployments_default(tmp_path: Path) -> None:
    started(
        tmp_path, "tone", "--variant", "short=Answer in one line.", "--variant", "long=Explain."
    )
    shipped = run_experiment(tmp_path, "stop", "tone", "--ship", "short")
    assert shipped.returncode == 0, shipped.stderr
    assert "shipped short as the deployment's default prompt" in shipped.stdout
    chat = run_chat(tmp_path, "/system\n", "--conversation", "later")
    assert "System prompt (the bot's default):\n> Answer in one line." in chat.stdout
    # It takes precedence over SYSTEM_PROMPT.
    chat = run_chat(tmp_path, "/system\n", "--conversation", "later", SYSTEM_PROMPT="Be kind.")
    assert "> Answer in one line." in chat.stdout
    listed = run_experiment(tmp_path, "list")
    assert "tone  stopped, shipped short" in listed.stdout


def chat_in(tmp_path: Path, conversation: str, lines: Sequence[str]) -> None:
    result = run_chat(
        tmp_path, "".join(f"{line}\n" for line in lines), "--conversation", conversation
    )
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower(), result.stderr


async def variants_of(database: str) -> dict[str, str]:
    """Each terminal conversation's variant, as the experiment assigned it."""
    store = await ConversationStore.open(database)
    try:
        async with store.engine.begin() as conn:
            rows = (
                await conn.execute(
                    select(ConversationRow.channel, TurnRow.variant)
                    .join(TurnRow, TurnRow.conversation_id == ConversationRow.id)
                    .where(TurnRow.variant.is_not(None))
                    .distinct()
                )
            ).all()
        return {conversation: variant for conversation, variant in rows}
    finally:
        await store.close()


def planted_ratings(variants: dict[str, str]) -> dict[str, str]:
    """How each conversation's user feels: up in 4 of 5 "concise" conversations and in 2 of 5
    "detailed" ones, every answer of a conversation alike (``/good`` or ``/bad``)."""
    ratings: dict[str, str] = {}
    for variant in ("concise", "detailed"):
        mine = sorted((c for c, v in variants.items() if v == variant), key=lambda c: int(c[1:]))
        for index, conversation in enumerate(mine):
            up = index % 5 < PLANTED_UP_OF_FIVE[variant]
            ratings[conversation] = "/good" if up else "/bad too long"
    return ratings


def test_sixty_rated_conversations_reveal_the_planted_difference(tmp_path: Path) -> None:
    started(
        tmp_path,
        "tone",
        "--variant",
        "detailed=Explain each step with its reasons.",
        "--variant",
        "concise=Answer in as few words as will do.",
    )
    names = [f"c{n}" for n in range(1, CONVERSATIONS + 1)]
    with ThreadPoolExecutor(PARALLEL_CHATS) as pool:
        # The first question assigns each conversation its variant...
        list(pool.map(lambda name: chat_in(tmp_path, name, QUESTIONS[:1]), names))
        variants = asyncio.run(variants_of(chat_env(tmp_path)["DATABASE_URL"]))
        ratings = planted_ratings(variants)
        # ...then, in a later run, its user rates that answer and each of the next ones, as
        # people do: /good or /bad after every answer.
        list(
            pool.map(
                lambda name: chat_in(
                    tmp_path,
                    name,
                    [ratings[name]] + [line for q in QUESTIONS[1:] for line in (q, ratings[name])],
                ),
                names,
            )
        )
    per_variant = {v: sum(1 for x in variants.values() if x == v) for v in set(variants.values())}

    page = tmp_path / "report.html"
    result = run_experiment(tmp_path, "report", "tone", "--json", "--html", str(page))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {
        "experiment", "status", "excluded", "variants", "difference", "srm_p", "verdict"
    }  # fmt: skip
    detailed, concise = report["variants"]
    assert [detailed["name"], concise["name"]] == ["detailed", "concise"]
    for variant in (detailed, concise):
        assert variant["conversations"] == per_variant[variant["name"]]
        assert variant["replies"] == variant["rated"] == len(QUESTIONS) * variant["conversations"]
        assert variant["errors"] == 0 and variant["ttft_p50"] is not None
        assert variant["ci_low"] < variant["rate"] < variant["ci_high"]
    assert sum(per_variant.values()) == CONVERSATIONS and report["excluded"] == 0
    assert concise["rate"] == pytest.approx(0.8, abs=0.07)
    assert detailed["rate"] == pytest.approx(0.4, abs=0.07)
    difference = report["difference"]
    assert (difference["from"], difference["to"]) == ("detailed", "concise")
    assert 0 < difference["ci_low"] < difference["estimate"] < difference["ci_high"]
    assert difference["estimate"] == pytest.approx(concise["rate"] - detailed["rate"])
    assert report["srm_p"] > 0.001
    low, high = round(difference["ci_low"] * 100), round(difference["ci_high"] * 100)
    assert report["verdict"] == f"concise is better by {low} to {high} points"

    html = page.read_text()
    assert "<svg" in html and "concise" in html and report["verdict"] in html
    assert "http" not in html.replace("http://www.w3.org/2000/svg", "")  # no external assets

    text = run_experiment(tmp_path, "report", "tone")
    assert text.returncode == 0 and f"verdict: {report['verdict']}" in text.stdout
    print(text.stdout)
