"""Start-up as a user meets it on a fresh clone: every entry point, as a real process.

A bad setting or a failed start is one line on stderr naming the setting, exit status 2, and no
traceback unless asked for (``-v`` or ``LOG_LEVEL=DEBUG``). Two processes starting together on a
fresh SQLite file both start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import IO

import pytest

from core.config import Settings
from tests.wire.slack.harness import free_port

REPO = Path(__file__).resolve().parents[2]
#: The console script installed next to this interpreter by ``pip install -e .``.
THREADBOT = str(Path(sys.executable).parent / "threadbot")
#: Every way to start threadbot that the README and the Procfile name.
ENTRY_POINTS = {
    "threadbot chat": [THREADBOT, "chat"],
    "threadbot slack": [THREADBOT, "slack"],
    "threadbot discord": [THREADBOT, "discord"],
    "threadbot db upgrade": [THREADBOT, "db", "upgrade"],
    "python -m bots.slack": [sys.executable, "-m", "bots.slack"],
    "python -m bots.discord": [sys.executable, "-m", "bots.discord"],
    "python -m bots.cli": [sys.executable, "-m", "bots.cli"],
}
#: Enough for the bots to get past their own token checks to the setting under test.
TOKENS = {
    "SLACK_BOT_TOKEN": "xoxb-not-checked",
    "SLACK_SIGNING_SECRET": "not-checked",
    "DISCORD_BOT_TOKEN": "not-checked",
}
#: Every variable Settings reads: none of the developer's own may leak into the process.
OPERATOR_SETTINGS = frozenset(f.name.upper() for f in fields(Settings))
FOREIGN_PREFIXES = ("DISCORD_", "SLACK_", "LLM_", "OPENAI_", "ANTHROPIC_", "DATABASE_")
#: Processes starting at once on one fresh SQLite file (without the lock most runs fail).
RACERS = 4
#: ``threadbot db upgrade`` once its imports are done and a line arrives on stdin: imports take
#: a second or more, so processes started together would otherwise reach the database apart.
AT_THE_SIGNAL = (
    "import sys, bots.main, core.store; sys.stdin.readline(); "
    "sys.exit(bots.main.main(['db', 'upgrade']))"
)


def environment(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The inherited environment without threadbot settings, plus ``settings``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in OPERATOR_SETTINGS and not name.startswith(FOREIGN_PREFIXES)
    }
    env.update(
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'threadbot.db'}",
        OFFLINE_DELAY="0",
        PYTHONPATH=str(REPO),
    )
    env.update(settings)
    return env


def start(
    command: list[str], tmp_path: Path, *args: str, **settings: str
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` to its end with empty stdin (the terminal chat then exits at once)."""
    return subprocess.run(
        [*command, *args],
        input="",
        capture_output=True,
        text=True,
        env=environment(tmp_path, **settings),
        cwd=tmp_path,
        timeout=120,
    )


def assert_one_line_naming(result: subprocess.CompletedProcess[str], setting: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert setting in line


#: Refused values of each kind (choice, flag, URL), spread over the entry points: parsing is
#: shared, what differs per entry point is how the refusal is reported.
BAD_SETTINGS = [
    ("LOG_LEVEL", "LOUD"),
    ("REQUIRE_MENTION", "maybe"),
    ("DATABASE_URL", "mysql://root:secret@127.0.0.1/threadbot"),
]


@pytest.mark.parametrize(
    ("entry", "setting", "value"),
    [(entry, *BAD_SETTINGS[i % len(BAD_SETTINGS)]) for i, entry in enumerate(ENTRY_POINTS)],
)
def test_a_bad_setting_is_one_line_naming_it_at_every_entry_point(
    entry: str, setting: str, value: str, tmp_path: Path
) -> None:
    result = start(ENTRY_POINTS[entry], tmp_path, **TOKENS, **{setting: value})
    assert_one_line_naming(result, setting)
    assert "secret" not in result.stderr


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_unreachable_database_is_one_line_naming_database_url(
    entry: str, tmp_path: Path
) -> None:
    # A host's plain URL, mapped to asyncpg, pointing where nothing listens.
    url = f"postgres://threadbot:secret@127.0.0.1:{free_port()}/threadbot"
    result = start(ENTRY_POINTS[entry], tmp_path, **TOKENS, DATABASE_URL=url)
    assert_one_line_naming(result, "DATABASE_URL")
    assert "secret" not in result.stderr


@pytest.mark.parametrize("how", [{"LOG_LEVEL": "DEBUG"}, {"-v": ""}])
def test_debug_or_verbose_shows_the_traceback_before_the_line(
    how: dict[str, str], tmp_path: Path
) -> None:
    url = f"postgres://threadbot@127.0.0.1:{free_port()}/threadbot"
    args = [flag for flag in how if flag.startswith("-")]
    settings = {k: v for k, v in how.items() if not k.startswith("-")}
    result = start(
        ENTRY_POINTS["threadbot slack"], tmp_path, *args, **TOKENS, DATABASE_URL=url, **settings
    )
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("threadbot slack: cannot open the database")


def test_a_hosts_plain_sqlite_url_works(tmp_path: Path) -> None:
    result = start(
        ENTRY_POINTS["threadbot db upgrade"], tmp_path, DATABASE_URL="sqlite:///plain.db"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "database is up to date: sqlite+aiosqlite:///plain.db\n"
    assert (tmp_path / "plain.db").is_file()


def test_processes_starting_together_on_a_fresh_sqlite_file_all_migrate(tmp_path: Path) -> None:
    env = environment(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path / 'fresh.db'}")
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", AT_THE_SIGNAL],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(RACERS)
    ]
    for racer in racers:
        assert racer.stdin is not None
        racer.stdin.write("go\n")
        racer.stdin.close()
    outcomes = [(racer.wait(timeout=120), _read(racer.stderr)) for racer in racers]
    assert outcomes == [(0, "")] * RACERS


def _read(stream: IO[str] | None) -> str:
    assert stream is not None
    with stream:
        return stream.read()
