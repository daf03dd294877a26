"""Fixtures of the Slack tests: the real ``python -m bots.slack`` process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.slack.test_slack_process import BotProcess


@pytest.fixture
def bot_process(tmp_path: Path) -> Iterator[Callable[..., BotProcess]]:
    """Start ``python -m bots.slack`` with these variables; killed at the end if still running."""
    started: list[BotProcess] = []

    def start(**env: str) -> BotProcess:
        directory = tmp_path / f"run{len(started)}"
        directory.mkdir()
        started.append(BotProcess(directory, env))
        return started[-1]

    yield start
    for process in started:
        process.kill()
