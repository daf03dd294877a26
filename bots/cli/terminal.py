"""The terminal's modes: typing kept out of an answer, and restored on every way out."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TextIO

try:
    import termios
except ImportError:  # not a POSIX system: no terminal modes to manage
    termios = None  # type: ignore[assignment]


class TerminalModes:
    """Saves the terminal's modes at start; ``answering()`` hides typing; ``restore()`` undoes all.

    While an answer prints, echo and line buffering are off, so keys typed meanwhile are neither
    printed into the answer nor lost: they wait in the terminal's queue and the line editor shows
    them, editable, at the next prompt (a finished line is sent as the next message). Signals stay
    on, so Ctrl-C still stops the answer.
    """

    def __init__(self, stream: TextIO) -> None:
        self._fd: int | None = None
        self._saved: list[Any] | None = None
        if termios is None or not stream.isatty():
            return
        with contextlib.suppress(termios.error, OSError, ValueError):
            self._fd = stream.fileno()
            self._saved = termios.tcgetattr(self._fd)

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """Typing is hidden and kept for the next prompt inside this block."""
        if self._fd is None or self._saved is None:
            yield
            return
        try:
            quiet = termios.tcgetattr(self._fd)
            quiet[3] &= ~(termios.ECHO | termios.ICANON)
            quiet[6][termios.VMIN] = 1
            quiet[6][termios.VTIME] = 0
            # TCSANOW, not TCSAFLUSH: flushing would throw away what was typed ahead.
            termios.tcsetattr(self._fd, termios.TCSANOW, quiet)
        except termios.error:
            yield
            return
        try:
            yield
        finally:
            self.restore()

    def restore(self) -> None:
        """Put the terminal back as it was when the chat started."""
        if self._fd is None or self._saved is None:
            return
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(self._fd, termios.TCSANOW, self._saved)
