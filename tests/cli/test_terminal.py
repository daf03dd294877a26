"""The real ``threadbot chat`` process on a pseudo-terminal: editing, history, typing, Markdown."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_cli import chat_env, run_chat
from tests.wire.llm_server import LLMServerProcess, answer, slow

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX pseudo-terminals")

ROWS, COLUMNS = 40, 200
PROMPT = "you › "
UP, LEFT = b"\x1b[A", b"\x1b[D"
CTRL_C, CTRL_D = b"\x03", b"\x04"
# What a terminal emulator would interpret rather than show: CSI and OSC sequences, bare CRs.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[=>]|\r")


def visible(raw: bytes) -> str:
    """What a reader sees of the raw output, near enough: text without escape sequences."""
    return _CONTROL.sub("", raw.decode("utf-8", "replace"))


class Terminal:
    """``threadbot chat`` with its stdin, stdout and stderr on one pseudo-terminal."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        full_env = chat_env(tmp_path, TERM="xterm-256color", HOME=str(tmp_path), **env)
        full_env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bots.main", "chat"],
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            env=full_env,
            cwd=tmp_path,
            preexec_fn=_own_terminal,
        )
        self.output = b""
        self._seen = 0  # how much of the visible output earlier matches consumed

    def send(self, keys: bytes | str) -> None:
        os.write(self.master, keys.encode() if isinstance(keys, str) else keys)

    def read_until(self, needle: str, timeout: float = 30) -> str:
        """Read until ``needle`` shows after the previous match; what showed up to its end."""
        deadline = time.monotonic() + timeout
        while needle not in visible(self.output)[self._seen :]:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.proc.poll() is not None and not self._pending()):
                raise AssertionError(f"never saw {needle!r}; got {visible(self.output)!r}")
            if select.select([self.master], [], [], min(remaining, 1))[0]:
                self._read()
        shown = visible(self.output)
        end = shown.index(needle, self._seen) + len(needle)
        text, self._seen = shown[self._seen : end], end
        return text

    def wait(self) -> int:
        """Read until the process has ended; its exit status."""
        deadline = time.monotonic() + 30
        while self.proc.poll() is None or self._pending():
            assert time.monotonic() < deadline, visible(self.output)
            if select.select([self.master], [], [], 0.5)[0]:
                self._read()
        return self.proc.wait()

    def modes(self) -> int:
        """The local-mode flags of the terminal (echo, line buffering...)."""
        return int(termios.tcgetattr(self.slave)[3])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)

    def _pending(self) -> bool:
        return bool(select.select([self.master], [], [], 0)[0])

    def _read(self) -> None:
        with contextlib.suppress(OSError):  # the other side closed
            self.output += os.read(self.master, 65536)


def _own_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pseudo-terminal (stdin), so
    Ctrl-C typed there sends SIGINT, as in a real terminal."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    term = Terminal(tmp_path)
    yield term
    term.close()


def test_line_editing_and_history_kept_across_runs(tmp_path: Path, terminal: Terminal) -> None:
    terminal.read_until(PROMPT)
    terminal.send(b"helo world" + LEFT * 7 + b"l\r")  # fix the typo in the middle of the line
    terminal.read_until("You said: “hello world”")
    terminal.read_until(PROMPT)
    terminal.send(CTRL_D)
    assert terminal.wait() == 0
    assert "^[[" not in visible(terminal.output)
    assert (tmp_path / "chat.db.history").read_text().splitlines() == ["hello world"]

    again = Terminal(tmp_path)
    try:
        again.read_until(PROMPT)
        again.send(UP + b"\r")  # the line typed in the previous run
        shown = again.read_until("I can see 1 earlier message")
        assert "You said: “hello world”" in shown
        again.send(CTRL_D)
        assert again.wait() == 0
    finally:
        again.close()


def test_text_typed_during_an_answer_waits_for_the_next_prompt(tmp_path: Path) -> None:
    terminal = Terminal(tmp_path, OFFLINE_DELAY="0.1")
    try:
        terminal.read_until(PROMPT)
        terminal.send("tell me something\r")
        during = terminal.read_until("You said: “tell me something”")
        assert "real model" not in visible(terminal.output)  # the answer is still being written
        terminal.send("typed ahead")
        after = terminal.read_until(PROMPT)
        assert "typed ahead" not in during + after  # never echoed into the answer
        assert "to talk to a real model." in after  # the answer finished undisturbed
        assert terminal.read_until("typed ahead").strip() == "typed ahead"  # shown at the prompt
        terminal.send("\r")
        terminal.read_until("You said: “typed ahead”")  # and sent when Enter is pressed
        terminal.send(CTRL_D)
        assert terminal.wait() == 0
    finally:
        terminal.close()


def test_ctrl_c_stops_a_streaming_answer_and_the_terminal_is_restored(tmp_path: Path) -> None:
    terminal = Terminal(tmp_path, OFFLINE_DELAY="0.3")
    try:
        before = terminal.modes()
        terminal.read_until(PROMPT)
        terminal.send("a long answer please\r")
        shown = terminal.read_until("You said")  # words appear while the answer is written...
        assert "real model" not in shown  # ...long before its last one
        terminal.send(CTRL_C)
        terminal.read_until("[stopped]")
        terminal.read_until(PROMPT)
        terminal.send("half a line")
        terminal.read_until("half a line")
        terminal.send(CTRL_C)  # at the prompt, with the line editor active: leave
        assert terminal.wait() == 0
        assert "Traceback" not in visible(terminal.output)
        after = terminal.modes()
        assert after & termios.ECHO and after & termios.ICANON
        assert after == before
    finally:
        terminal.close()


def test_sigterm_during_an_answer_leaves_the_terminal_as_it_was(tmp_path: Path) -> None:
    terminal = Terminal(tmp_path, OFFLINE_DELAY="0.3")
    try:
        before = terminal.modes()
        terminal.read_until(PROMPT)
        terminal.send("a long answer please\r")
        terminal.read_until("You said")
        assert terminal.modes() & termios.ECHO == 0  # typing is hidden while it answers
        terminal.proc.send_signal(signal.SIGTERM)
        assert terminal.wait() == 128 + signal.SIGTERM
        assert "Traceback" not in visible(terminal.output)
        assert terminal.modes() == before
    finally:
        terminal.close()


# -- Markdown from a real provider -------------------------------------------------------------

MARKDOWN_ANSWER = (
    "Use **bold** words.\n\n```python\ndef add(a, b):\n    return a + b\n```\n\nThat `add` is all."
)


@pytest.fixture(scope="module")
def llm_process() -> Iterator[LLMServerProcess]:
    with LLMServerProcess.start() as server:
        yield server


def test_answers_render_as_markdown_on_a_terminal(
    tmp_path: Path, llm_process: LLMServerProcess
) -> None:
    llm_process.enqueue(answer(chunks=_words(MARKDOWN_ANSWER)))
    terminal = Terminal(tmp_path, OPENAI_BASE_URL=llm_process.openai_base_url)
    try:
        terminal.read_until(PROMPT)
        terminal.send("show me code\r")
        shown = terminal.read_until("is all.")
        terminal.read_until(PROMPT)
        terminal.send(CTRL_D)
        assert terminal.wait() == 0
    finally:
        terminal.close()
    assert "Use bold words." in shown and "**" not in shown
    assert "```" not in shown and "def add(a, b):" in shown and "`add`" not in shown
    raw = terminal.output.decode()
    assert re.search(r"\x1b\[1m\s*bold", raw)  # bold is bold
    assert re.search(
        r"\x1b\[38;5;\d+[;\d]*mdef\b", raw
    )  # the keyword is coloured by the highlighter


def test_piped_output_stays_the_plain_markdown_text(
    tmp_path: Path, llm_process: LLMServerProcess
) -> None:
    llm_process.enqueue(answer(chunks=_words(MARKDOWN_ANSWER)))
    result = run_chat(tmp_path, "show me code\n", OPENAI_BASE_URL=llm_process.openai_base_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == MARKDOWN_ANSWER + "\n"


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


def test_ctrl_c_keeps_the_shown_part_and_the_next_question_is_asked_once(
    tmp_path: Path, llm_process: LLMServerProcess
) -> None:
    story = " ".join(f"word{n}" for n in range(200))
    llm_process.enqueue(slow(0.1, story))
    before = len(llm_process.requests())
    terminal = Terminal(tmp_path, OPENAI_BASE_URL=llm_process.openai_base_url)
    try:
        terminal.read_until(PROMPT)
        terminal.send("tell me a long story\r")
        terminal.read_until("word3 ")
        terminal.send(CTRL_C)
        terminal.read_until("[stopped]")
        terminal.read_until(PROMPT)
        terminal.send("and now something short\r")
        terminal.read_until("You said: and now something short")
        terminal.read_until(PROMPT)
        terminal.send(CTRL_D)
        assert terminal.wait() == 0
    finally:
        terminal.close()
    _, second = llm_process.requests()[before:]
    sent = [(m["role"], m["content"]) for m in second["body"]["messages"] if m["role"] != "system"]
    assert [role for role, _ in sent] == ["user", "assistant", "user"]
    assert sent[0][1] == "tell me a long story" and sent[2][1] == "and now something short"
    partial = sent[1][1]
    assert partial.startswith("word0 word1 word2 word3") and len(partial) < len(story)
