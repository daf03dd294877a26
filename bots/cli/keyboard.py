"""Reading what the user types: piped lines, or a line editor with history on a terminal.

Both readers run the blocking read on a thread, so the event loop (and Ctrl-C) stays responsive,
and read only when asked: between prompts nobody reads the terminal, so text typed during an
answer waits in the terminal's queue and shows up, editable, at the next prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

#: Lines of input history kept in the history file.
HISTORY_LINES = 1000
#: The input history holds what the user typed: readable by its owner only.
HISTORY_FILE_MODE = 0o600
#: Where the input history lives when the database is not a local SQLite file.
DEFAULT_HISTORY_FILE = Path("~/.local/share/threadbot/chat_history")
#: Turns off bracketed paste, which GNU readline turns on while it edits a line.
BRACKETED_PASTE_OFF = "\x1b[?2004l"

# Terminal escape sequences (ECMA-48): CSI (cursor keys, colours), OSC/DCS/PM/APC strings,
# SS3 (F1-F4, keypad), other two-character escapes, a lone ESC. Then the remaining C0 and C1
# control characters except tab and newline (a pasted paragraph keeps its lines). None of them
# belongs in a message to a model.
_ESCAPES = re.compile(
    r"""
      (?:\x1b\[|\x9b) [0-?]* [ -/]* [@-~]
    | (?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]) .*? (?:\x07|\x1b\\|\x9c|$)
    | \x1bO.?
    | \x1b[ -~]?
    | [\x00-\x08\x0b-\x1f\x7f-\x9f]
    """,
    re.VERBOSE | re.DOTALL,
)
# Lone surrogates come from undecodable bytes (surrogateescape); the store cannot encode them.
_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_line(text: str) -> str:
    """``text`` without escape sequences and control characters, surrogates replaced by U+FFFD."""
    return _ESCAPES.sub("", _SURROGATES.sub("\ufffd", text))


def history_path(database_url: str) -> Path:
    """The input history file: next to a SQLite database file, else in the user's data dir."""
    match = re.match(r"sqlite(?:\+\w+)?:///([^?]+)", database_url)
    if match and match.group(1) != ":memory:":
        database = Path(match.group(1)).expanduser()
        return database.with_name(database.name + ".history")
    return DEFAULT_HISTORY_FILE.expanduser()


class _ThreadedReader:
    """Runs ``read()`` on a thread, one call per ``readline()``; None means end of input."""

    def __init__(self, read: Callable[[], str | None], loop: asyncio.AbstractEventLoop) -> None:
        self._read = read
        self._loop = loop
        self._wanted = threading.Semaphore(0)
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        #: True while the thread is inside ``read()`` (the line editor owns the terminal).
        self.reading = False
        threading.Thread(target=self._run, name="stdin-reader", daemon=True).start()

    def _run(self) -> None:
        while True:
            self._wanted.acquire()
            self.reading = True
            try:
                line = self._read()
            except (OSError, ValueError, EOFError):
                line = None
            self.reading = False
            self._loop.call_soon_threadsafe(self._lines.put_nowait, line)
            if line is None:
                return

    async def readline(self) -> str | None:
        """The next line, cleaned, without its newline; None at end of input."""
        self._wanted.release()
        line = await self._lines.get()
        return None if line is None else clean_line(line.rstrip("\r\n"))


class PipedReader(_ThreadedReader):
    """Reads lines from a pipe or a file."""

    def __init__(self, stream: TextIO, loop: asyncio.AbstractEventLoop) -> None:
        def read() -> str | None:
            return stream.readline() or None

        super().__init__(read, loop)

    def close(self) -> None:
        """Nothing to restore for a pipe."""


class TerminalReader(_ThreadedReader):
    """Reads lines with GNU readline (editing, ↑/↓ history) and keeps the history in a file."""

    def __init__(self, prompt: str, history: Path, loop: asyncio.AbstractEventLoop) -> None:
        self._history_ok = _load_history(history)

        def read() -> str | None:
            before = _history_length()
            line = input(prompt)
            if self._history_ok and _history_length() > before:
                self._history_ok = _append_history(history)
            return line

        super().__init__(read, loop)

    def close(self) -> None:
        """Leaving while the line editor is active (Ctrl-C at the prompt): undo its paste mode."""
        if self.reading:
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.write(BRACKETED_PASTE_OFF)
                sys.stdout.flush()


def _load_history(path: Path) -> bool:
    """Load readline and the history file (created private); False when either is unavailable."""
    try:
        # Imported here: loading readline can write to the terminal, never into piped output.
        import readline as rl
    except ImportError:  # Python built without readline: input() still works, without editing
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, HISTORY_FILE_MODE))
        rl.set_history_length(HISTORY_LINES)
        rl.read_history_file(path)
        if rl.get_current_history_length() > HISTORY_LINES:
            rl.write_history_file(path)  # trims the file to the newest HISTORY_LINES
    except OSError:
        return False
    return True


def _history_length() -> int:
    """How many entries readline's history holds (0 without readline)."""
    try:
        import readline as rl
    except ImportError:
        return 0
    return rl.get_current_history_length()


def _append_history(path: Path) -> bool:
    """Append the newest history entry to the file, so concurrent sessions do not clobber it."""
    import readline as rl

    try:
        rl.append_history_file(1, path)
    except OSError:
        return False
    return True
