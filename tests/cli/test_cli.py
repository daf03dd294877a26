"""The real ``threadbot chat`` process: piped input, EOF, Ctrl-C, persistence across runs."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.wire.llm_server import LLMServerProcess, answer, unauthorized

REPO = Path(__file__).resolve().parents[2]


def chat_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "ANTHROPIC_", "LLM_", "SLACK_", "DISCORD_"))
    }
    env.update(
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}",
        OFFLINE_DELAY="0",
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_chat(
    tmp_path: Path, stdin: str, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bots.main", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=chat_env(tmp_path, **env),
        cwd=tmp_path,
        timeout=60,
    )


def test_piped_question_prints_one_offline_answer_and_exits_0(tmp_path: Path) -> None:
    result = run_chat(tmp_path, "hello there\n")
    assert result.returncode == 0, result.stderr
    assert "You said: “hello there”" in result.stdout
    assert "offline" in result.stderr  # clearly labelled
    assert "Traceback" not in result.stderr


def test_history_persists_across_runs_per_conversation(tmp_path: Path) -> None:
    run_chat(tmp_path, "first\n")
    second = run_chat(tmp_path, "second\n")
    assert "I can see 1 earlier message of yours" in second.stdout
    other = run_chat(tmp_path, "elsewhere\n", "--conversation", "other")
    assert "I can see 0 earlier messages" in other.stdout
    resumed = run_chat(tmp_path, "third\n")
    assert "I can see 2 earlier messages" in resumed.stdout


def test_slash_commands_in_the_terminal(tmp_path: Path) -> None:
    script = "/system Be terse.\n/system\nremember me\n/context\n/reset\n/context\n/help\n/bogus\n/exit\nnever sent\n"
    result = run_chat(tmp_path, script)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "System prompt for this conversation set to:\n> Be terse." in out
    assert "System prompt (set for this conversation):\n> Be terse." in out
    assert "The next request sends your message after 2 messages; about" in out
    assert "Conversation reset" in out
    assert "No messages yet" not in out  # the conversation exists, it is just empty
    assert "The next request sends your message after 0 messages; about" in out
    assert "/context" in out and "/exit" in out
    assert "Unknown command /bogus" in result.stderr
    assert "never sent" not in out


def test_empty_stdin_exits_cleanly(tmp_path: Path) -> None:
    result = run_chat(tmp_path, "")
    assert result.returncode == 0
    assert result.stdout == "" and "Traceback" not in result.stderr


def test_bad_setting_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    result = run_chat(tmp_path, "hi\n", MAX_HISTORY_MESSAGES="lots")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "threadbot: MAX_HISTORY_MESSAGES must be a whole number, not 'lots'"
    ]


def _read_until(proc: subprocess.Popen[bytes], needle: bytes, timeout: float = 30) -> bytes:
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"never saw {needle!r}; got {seen!r}")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"output ended before {needle!r}; got {seen!r}")
            seen += chunk
    return seen


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_stops_the_answer_then_ctrl_c_at_the_prompt_exits_0(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bots.main", "chat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=chat_env(tmp_path, OFFLINE_DELAY="0.2"),
        cwd=tmp_path,
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"tell me a long story\n")
        proc.stdin.flush()
        _read_until(proc, b"offline demo")
        proc.send_signal(signal.SIGINT)
        _read_until(proc, b"[stopped]")
        proc.stdin.write(b"and again\n")
        proc.stdin.flush()
        _read_until(proc, b"You said: \xe2\x80\x9cand again\xe2\x80\x9d")
        time.sleep(0.5)
        _, _ = proc.stdout, proc.stderr
        # Back at the prompt (waiting for input): Ctrl-C leaves.
        proc.wait(timeout=0.01) if proc.poll() is not None else None
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            # The demo answer ends a few hundred ms later; signal until the process leaves.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                continue
        assert proc.returncode == 0
        assert proc.stderr is not None
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- against real wire protocols -------------------------------------------------------------


@pytest.fixture(scope="module")
def llm_process() -> Iterator[LLMServerProcess]:
    with LLMServerProcess.start() as server:
        yield server


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_chat_streams_from_a_compatible_server_with_history_across_runs(
    tmp_path: Path, llm_process: LLMServerProcess, api: str
) -> None:
    if api == "openai":
        env = {"OPENAI_BASE_URL": llm_process.openai_base_url}  # no key: a local server
    else:
        env = {
            "ANTHROPIC_BASE_URL": llm_process.anthropic_base_url,
            "ANTHROPIC_API_KEY": "sk-ant-x",
        }
    before = len(llm_process.requests())
    first = run_chat(tmp_path, "What is the capital of France?\n", **env)
    assert first.returncode == 0, first.stderr
    assert "You said: What is the capital of France?" in first.stdout
    llm_process.enqueue(answer(chunks=["Par", "is, ", "as I ", "said."]))
    second = run_chat(tmp_path, "Are you sure?\n", **env)
    assert second.returncode == 0, second.stderr
    assert "Paris, as I said." in second.stdout
    requests = llm_process.requests()[before:]
    assert len(requests) == 2
    body = requests[-1]["body"]
    sent = [m for m in body["messages"] if m["role"] != "system"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert "offline" not in first.stderr


def test_unreachable_server_is_a_one_line_error_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_chat(
        tmp_path, "hello?\n", OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1", MAX_RETRY_ATTEMPTS="2"
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "OPENAI_BASE_URL" in lines[0], result.stderr


def test_refused_key_is_a_one_line_error_naming_the_setting(
    tmp_path: Path, llm_process: LLMServerProcess
) -> None:
    llm_process.enqueue(unauthorized())
    result = run_chat(
        tmp_path,
        "hello?\n",
        OPENAI_BASE_URL=llm_process.openai_base_url,
        OPENAI_API_KEY="sk-wrong",
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "OPENAI_API_KEY" in lines[0], result.stderr


def test_output_closed_early_ends_quietly(tmp_path: Path) -> None:
    """``threadbot chat | head -1``: the reader leaves after one line; no traceback, status 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bots.main", "chat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=chat_env(tmp_path, OFFLINE_DELAY="0.02"),
        cwd=tmp_path,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(b"first question\nsecond question\n")
    proc.stdin.close()
    assert proc.stdout.readline()  # the first line of the answer
    proc.stdout.close()
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    errors = proc.stderr.read().decode()
    assert "Traceback" not in errors and "BrokenPipe" not in errors


# -- input that is not what we expect ------------------------------------------------------------


def run_chat_bytes(tmp_path: Path, stdin: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "bots.main", "chat", *args],
        input=stdin,
        capture_output=True,
        env=chat_env(tmp_path),
        cwd=tmp_path,
        timeout=60,
    )


def test_input_that_is_not_utf8_is_replaced_not_a_crash(tmp_path: Path) -> None:
    result = run_chat_bytes(tmp_path, b"caf\xe9 au lait\n\xff\xfe\n")
    assert result.returncode == 0, result.stderr.decode()
    assert b"Traceback" not in result.stderr
    out = result.stdout.decode("utf-8")  # and what we print is UTF-8 too
    assert "You said: “caf\ufffd au lait”" in out
    assert "You said: “\ufffd\ufffd”" in out
    # Both messages were stored: the next run sees them.
    again = run_chat(tmp_path, "and now?\n")
    assert "I can see 2 earlier messages" in again.stdout


def test_escape_sequences_in_a_line_never_reach_the_model(tmp_path: Path) -> None:
    result = run_chat_bytes(tmp_path, b"up\x1b[A and \x1b]0;title\x07bell\x07 \x1bOPkey\x7f\n")
    assert result.returncode == 0, result.stderr.decode()
    assert "You said: “up and bell key”" in result.stdout.decode()


def test_help_is_written_for_the_terminal(tmp_path: Path) -> None:
    result = run_chat(tmp_path, "/help\n/quit\nnever sent\n", "--conversation", "work")
    assert result.returncode == 0, result.stderr
    for command in ("/reset", "/system <text>", "/system clear", "/history", "/context"):
        assert command in result.stdout
    assert "/exit, /quit" in result.stdout and "Ctrl-D" in result.stdout
    assert "Ctrl-C" in result.stdout and "“work”" in result.stdout
    assert not re.search(r"\b(mention|threads?)\b", result.stdout)  # Slack's and Discord's words
    assert "never sent" not in result.stdout


def test_good_and_bad_rate_the_last_answer_also_in_a_later_run(tmp_path: Path) -> None:
    first = run_chat(tmp_path, "/good\nhello there\n")
    assert first.returncode == 0, first.stderr
    assert "There is no answer to rate yet." in first.stdout

    later = run_chat(tmp_path, "/bad it ignored my name\n/good\n")

    assert later.returncode == 0, later.stderr
    assert "Rated the last answer as bad, with your reason: “" in later.stdout
    assert "Rated the last answer as good: “" in later.stdout
    assert later.stdout.count("*(offline demo") == 2  # both quote the answer of the first run


def test_model_picks_the_model_answering_the_terminal_conversation(tmp_path: Path) -> None:
    import sqlite3

    script = "/model\n/model gpt-9\n/model Other\nhello\n/model clear\nagain\n/help\n"
    result = run_chat(tmp_path, script, MODELS="offline:scripted:vision,offline:other")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert (
        "This conversation uses scripted (the bot's default). The choices: scripted (sees images), other."
        in out
    )
    assert "I don't know the model gpt-9. The choices: scripted (sees images), other." in out
    assert "Done. This conversation uses other (set for this conversation)." in out
    assert "Back to the default. This conversation uses scripted (the bot's default)." in out
    for command in ("/model <name>", "/model clear"):
        assert command in out
    with sqlite3.connect(tmp_path / "chat.db") as db:
        models = db.execute(
            "SELECT model FROM messages WHERE role = 'assistant' ORDER BY id"
        ).fetchall()
    assert models == [
        ("offline (other: scripted demo answers, no model)",),
        ("offline (scripted demo answers, no model)",),
    ]
