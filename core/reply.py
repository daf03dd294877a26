"""The ReplySink protocol: where the engine sends one answer while it is being generated."""

from __future__ import annotations

from typing import Protocol


class ReplySink(Protocol):
    """What the engine writes one reply into.

    The terminal implements it by printing; Slack and Discord through ``ReplyStreamer``
    (``core/streaming.py``) over their ``ReplySurface``. The engine calls, in order:

    - ``begin()`` once, as soon as the turn starts (show a thinking indicator).
    - ``write(delta)`` for each text delta, never blocking on the platform.
    - ``retrying(notice)`` when a provider attempt failed and another follows: the text written so
      far is discarded (the next attempt replaces it) and ``notice`` is shown while waiting.
    - then exactly one of ``finish()`` (the reply is complete: make the final text land exactly,
      return the platform message ids), ``fail(message)`` (show a plain-words error instead of,
      or after, the partial text) or ``cancel(note)`` (the turn was cancelled: end cleanly).
    """

    async def begin(self) -> None: ...

    def write(self, delta: str) -> None: ...

    async def retrying(self, notice: str) -> None: ...

    async def finish(self) -> list[str]: ...

    async def fail(self, message: str) -> None: ...

    async def cancel(self, note: str) -> None: ...


class CollectingSink:
    """A sink that keeps everything in memory: for benchmarks, tests and non-streaming callers."""

    def __init__(self) -> None:
        self.text = ""
        self.notices: list[str] = []
        self.error: str | None = None
        self.cancelled: str | None = None
        self.begun = False
        self.finished = False

    async def begin(self) -> None:
        self.begun = True

    def write(self, delta: str) -> None:
        self.text += delta

    async def retrying(self, notice: str) -> None:
        self.notices.append(notice)
        self.text = ""

    async def finish(self) -> list[str]:
        self.finished = True
        return []

    async def fail(self, message: str) -> None:
        self.error = message

    async def cancel(self, note: str) -> None:
        self.cancelled = note
