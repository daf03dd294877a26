"""The ReplySink protocol: where the engine sends one answer while it is being generated."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from core.ratelimit import RateScope


class ReplySink(Protocol):
    """What the engine writes one reply into.

    The terminal implements it by printing; Slack and Discord through ``ReplyStreamer``
    (``core/streaming.py``) over their ``ReplySurface``. The engine calls, in order:

    - ``begin()`` once, as soon as the turn starts (show a thinking indicator).
    - ``waiting(notice)`` when the turn must wait for another answer in the same conversation:
      show ``notice`` in place of the thinking indicator; ``waiting(None)`` when its turn comes
      (back to the thinking indicator until text arrives).
    - ``write(delta)`` for each text delta, never blocking on the platform.
    - ``retrying(notice)`` when a provider attempt failed and another follows: the text written so
      far is discarded (the next attempt replaces it) and ``notice`` is shown while waiting.
    - then exactly one of ``finish(note)`` (the reply is complete: make the final text land
      exactly, with ``note`` after it when given and any open code block closed before it; return
      the platform message ids), ``fail(message)`` (show a plain-words error instead of, or after,
      the partial text) or ``cancel(note)`` (the turn was cancelled: end cleanly).
    - after ``finish``, at most one ``amend(note)``: something went wrong after the answer was
      shown (it could not be saved); add ``note`` after the final text.
    """

    async def begin(self) -> None: ...

    async def waiting(self, notice: str | None) -> None: ...

    def write(self, delta: str) -> None: ...

    async def retrying(self, notice: str) -> None: ...

    async def finish(self, note: str | None = None) -> list[str]: ...

    async def amend(self, note: str) -> None: ...

    async def fail(self, message: str) -> None: ...

    async def cancel(self, note: str) -> None: ...


class CollectingSink:
    """A sink that keeps everything in memory: for benchmarks, tests and non-streaming callers."""

    def __init__(self) -> None:
        self.text = ""
        self.notices: list[str] = []
        self.error: str | None = None
        self.cancelled: str | None = None
        # The notice shown while the turn waited for another answer (kept after the wait).
        self.waited: str | None = None
        self.note: str | None = None
        self.begun = False
        self.finished = False

    async def begin(self) -> None:
        self.begun = True

    async def waiting(self, notice: str | None) -> None:
        if notice is not None:
            self.waited = notice

    def write(self, delta: str) -> None:
        self.text += delta

    async def retrying(self, notice: str) -> None:
        self.notices.append(notice)
        self.text = ""

    async def finish(self, note: str | None = None) -> list[str]:
        self.finished = True
        self.note = note
        return []

    async def amend(self, note: str) -> None:
        self.note = note if self.note is None else f"{self.note}\n\n{note}"

    async def fail(self, message: str) -> None:
        self.error = message

    async def cancel(self, note: str) -> None:
        self.cancelled = note


class ReplySurface(Protocol):
    """One reply's messages on a platform, as ``ReplyStreamer`` drives them.

    An adapter implements it as a thin translation to its SDK and raises only core errors:
    ``SurfaceRateLimited`` on a 429 (with its Retry-After), ``TransientSurfaceError`` for 5xx and
    timeouts, ``PermanentSurfaceError`` otherwise. It never sleeps or retries on its own.
    """

    #: The most characters one message may hold, measured on the rendered text.
    max_chars: int

    def render(self, text: str) -> str:
        """The platform's formatting of one message's Markdown (identity where Markdown is native)."""
        ...

    def scopes(self, call: str) -> tuple[RateScope, ...]:
        """The rate-limit scopes a ``"post"`` or an ``"edit"`` call consumes."""
        ...

    async def post(self, text: str) -> str:
        """Post a new message of this reply (rendered text); return its platform id."""
        ...

    async def edit(self, message_id: str, text: str) -> None:
        """Replace the text of a message this reply posted (rendered text)."""
        ...

    async def show_typing(self) -> bool:
        """Show the platform's typing indicator, best effort; True if it is now showing.

        When it is, the streamer posts nothing until there is text (or a notice) and calls this
        again every ``TYPING_REFRESH_SECONDS`` while the model is silent; when the platform has
        no such indicator (False), the streamer posts a "Thinking…" message at once instead.
        """
        ...
