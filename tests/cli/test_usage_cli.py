"""The real ``threadbot usage`` process, reading what real ``threadbot chat`` turns stored."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core.usage import GPT_4_1_MINI_PRICE
from tests.cli.test_cli import chat_env, run_chat
from tests.wire.llm_server import LLMServerProcess, answer

#: What the fake server reports for each scripted answer (input, output tokens).
REPORTED = ((1200, 300), (800, 150))


@pytest.fixture(scope="module")
def llm_process() -> Iterator[LLMServerProcess]:
    with LLMServerProcess.start() as server:
        yield server


def run_usage(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bots.main", "usage", *args],
        capture_output=True,
        text=True,
        env=chat_env(tmp_path),
        cwd=tmp_path,
        timeout=60,
    )


def test_usage_totals_match_what_the_model_server_reported(
    tmp_path: Path, llm_process: LLMServerProcess
) -> None:
    env = {"OPENAI_BASE_URL": llm_process.openai_base_url}  # gpt-4.1-mini, a listed price
    for (reported_in, reported_out), question in zip(REPORTED, ("first?", "second?"), strict=True):
        llm_process.enqueue(
            answer("An answer.", input_tokens=reported_in, output_tokens=reported_out)
        )
        chat = run_chat(tmp_path, f"{question}\n", **env)
        assert chat.returncode == 0, chat.stderr
        assert "An answer." in chat.stdout

    result = run_usage(tmp_path, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    total_in = sum(i for i, _ in REPORTED)
    total_out = sum(o for _, o in REPORTED)
    price_in, price_out = GPT_4_1_MINI_PRICE
    assert rows == [
        {
            "day": datetime.now(UTC).date().isoformat(),
            "turns": 2,
            "input_tokens": total_in,
            "output_tokens": total_out,
            "cost": pytest.approx((total_in * price_in + total_out * price_out) / 1_000_000),
        }
    ]

    table = run_usage(tmp_path, "--by", "model", "--since", "1h")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["model", "turns", "input", "tokens", "output", "tokens", "cost"]
    assert lines[2].split()[:4] == ["gpt-4.1-mini", "2", f"{total_in:,}", f"{total_out:,}"]
    assert lines[-1].split()[:4] == ["total", "2", f"{total_in:,}", f"{total_out:,}"]
    print(table.stdout)


def test_a_bad_since_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_usage(tmp_path, "--since", "7x")
    assert result.returncode == 2
    assert "--since" in result.stderr and "Nh, Nd or Nw" in result.stderr


def test_a_malformed_price_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bots.main", "usage"],
        capture_output=True,
        text=True,
        env=chat_env(tmp_path, MODEL_PRICES="gpt-4.1-mini=cheap"),
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "MODEL_PRICES" in result.stderr
