"""Showing answers: plain text as it streams, or Markdown rendered block by block on a terminal.

Both are ``ReplySink``s. ``PlainReply`` prints the deltas exactly as they arrive (pipes, files,
dumb terminals). ``MarkdownReply`` keeps the block being written in a live region at the bottom
of the terminal, rendered as it grows, and prints each block for good once it is complete: the
user sees progress token by token, and the scrollback holds the finished rendering.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from typing import TYPE_CHECKING, TextIO

from core.splitting import fence_at_end

if TYPE_CHECKING:  # rich costs start-up time: loaded only when a terminal shows the answer
    from rich.console import Console, ConsoleOptions, RenderResult
    from rich.live import Live

STOPPED_NOTE = "[stopped]"
BOT_PROMPT = "bot › "
#: Pygments style for code blocks.
CODE_THEME = "monokai"
#: How often the live region is redrawn while tokens arrive (per second).
LIVE_REFRESH_PER_SECOND = 10
THINKING = "thinking…"

# An opening or closing code fence: three or more backticks or tildes (CommonMark).
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def closing_fence(answer: str) -> str:
    """What closes a code block ``answer`` leaves open ("" when none is open)."""
    fence = fence_at_end(answer + "\n")
    return "" if fence is None else fence.close(answer) + "\n"


def silence(stream: TextIO) -> None:
    """Point a closed output at /dev/null so the interpreter's last flush stays quiet."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


class PlainReply:
    """A ReplySink that prints the answer's text exactly as it arrives."""

    def __init__(self, out: TextIO, err: TextIO, *, interactive: bool) -> None:
        self.out = out
        self.err = err
        self.interactive = interactive
        self.failed = False
        # Set when whoever reads our output went away (``threadbot chat | head -1``).
        self.closed = False
        self._at_line_start = True
        # The answer so far (this attempt), to close a code block it leaves open before a note.
        self._answer: list[str] = []

    def _print(self, text: str) -> None:
        if self.closed:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except BrokenPipeError:
            self.closed = True
            silence(self.out)
            return
        if text:
            self._at_line_start = text.endswith("\n")

    def _newline(self) -> None:
        if not self._at_line_start:
            self._print("\n")

    async def begin(self) -> None:
        if self.interactive:
            self._print(BOT_PROMPT)

    async def waiting(self, notice: str | None) -> None:
        if notice is not None:
            self._newline()
            self._print(f"[{notice.strip('_')}]\n")

    def write(self, delta: str) -> None:
        self._answer.append(delta)
        self._print(delta)

    async def retrying(self, notice: str) -> None:
        # A terminal cannot take back printed text: say that the answer starts over.
        self._answer.clear()
        self._newline()
        self._print(f"[{notice.strip('_')} The answer starts over.]\n")

    async def finish(self, note: str | None = None) -> list[str]:
        if note is not None:
            self._print(closing_fence("".join(self._answer)))
            self._newline()
            self._print(f"[{note.strip('_')}]\n")
        self._newline()
        return []

    async def amend(self, note: str) -> None:
        self._newline()
        self._print(f"[{note.strip('_')}]\n")

    async def fail(self, message: str) -> None:
        self.failed = True
        self._newline()
        self.err.write(f"error: {message}\n")
        self.err.flush()

    async def cancel(self, note: str) -> None:
        self._newline()
        self._print(f"{STOPPED_NOTE} {note}\n")

    def close(self) -> None:
        """Nothing is left on screen to tidy up."""


class MarkdownBlocks:
    """Splits streamed Markdown into blocks that can be rendered on their own.

    A block ends where a line starts at the left margin after a blank line, outside a code fence
    (an indented line after a blank line may continue a list item), or right after a closing
    fence at the left margin.
    """

    def __init__(self) -> None:
        self.pending = ""  # text not yet handed out as a block
        self._scanned = 0  # where the first line not yet looked at starts in ``pending``
        self._fence: str | None = None
        self._after_blank = False

    def _reset(self) -> None:
        self.pending, self._scanned, self._fence, self._after_blank = "", 0, None, False

    def feed(self, delta: str) -> list[str]:
        """Add ``delta``; return the blocks it completed, in order."""
        self.pending += delta
        blocks: list[str] = []
        while True:
            end = self.pending.find("\n", self._scanned)
            line = self.pending[self._scanned : None if end < 0 else end]
            if self._starts_block(line) and self._scanned:
                blocks.append(self._take(self._scanned))
                continue
            if end < 0:
                break
            self._scanned = end + 1
            if self._line_closes_fence(line):
                blocks.append(self._take(self._scanned))
        return [block for block in blocks if block.strip()]

    def flush(self) -> str:
        """Everything not yet handed out; the splitter starts afresh."""
        text = self.pending
        self._reset()
        return text

    @property
    def open_fence(self) -> str | None:
        """The fence of the code block being written, if any (to close it for a preview)."""
        return self._fence

    def _starts_block(self, line: str) -> bool:
        """Whether ``line`` (maybe still incomplete) begins a new block after the text before it."""
        return self._fence is None and self._after_blank and line[:1] not in ("", " ", "\t")

    def _line_closes_fence(self, line: str) -> bool:
        """Track fences and blank lines; True when ``line`` closed a fence at the left margin."""
        fence = _FENCE.match(line)
        if self._fence is not None:
            if fence and _closes(fence, line, self._fence):
                self._fence = None
                self._after_blank = False
                return not line.startswith(" ")
            return False
        if fence:
            self._fence = fence.group(1)
        self._after_blank = not line.strip()
        return False

    def _take(self, end: int) -> str:
        block, self.pending = self.pending[:end], self.pending[end:]
        self._scanned -= end
        self._after_blank = False
        return block


def _closes(fence: re.Match[str], line: str, opening: str) -> bool:
    """Whether a fence line closes the block ``opening`` began (same character, as long, bare)."""
    marker = fence.group(1)
    return (
        marker[0] == opening[0] and len(marker) >= len(opening) and not line[fence.end() :].strip()
    )


class MarkdownReply:
    """A ReplySink that renders Markdown on a terminal, with code blocks highlighted."""

    def __init__(self, console: Console, err: TextIO) -> None:
        self.console = console
        self.err = err
        self.failed = False
        self.closed = False  # a terminal does not go away like a pipe's reader
        self.blocks = MarkdownBlocks()
        self.printed_block = False
        self._live: Live | None = None
        self._ticker: asyncio.Task[None] | None = None

    async def begin(self) -> None:
        from rich.live import Live

        if self._live is not None:
            return
        # Redrawn by our own ticker on the event loop, not rich's refresh thread: a redraw racing
        # a block being printed above the live region leaves stray lines on the screen.
        self._live = Live(
            _LivePreview(self),
            console=self.console,
            auto_refresh=False,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._live.start(refresh=True)
        self._ticker = asyncio.ensure_future(self._tick(self._live))

    async def _tick(self, live: Live) -> None:
        while True:
            await asyncio.sleep(1 / LIVE_REFRESH_PER_SECOND)
            live.refresh()

    async def waiting(self, notice: str | None) -> None:
        if notice is not None:
            self.console.print(f"[{notice.strip('_')}]", markup=False, highlight=False, style="dim")

    def write(self, delta: str) -> None:
        for block in self.blocks.feed(delta):
            self._print_block(block)

    async def retrying(self, notice: str) -> None:
        # Blocks already printed stay; the block in progress is dropped and the answer restarts.
        self.blocks.flush()
        self.console.print(f"[{notice.strip('_')} The answer starts over.]", markup=False)

    async def finish(self, note: str | None = None) -> list[str]:
        # A note after an answer cut inside a code block must not render as code.
        self._end(close_fence=note is not None)
        if note is not None:
            self._note(note)
        return []

    async def amend(self, note: str) -> None:
        self._note(note)

    def _note(self, note: str) -> None:
        self.console.print(f"[{note.strip('_')}]", markup=False, highlight=False)

    async def fail(self, message: str) -> None:
        self.failed = True
        self._end()
        self.err.write(f"error: {message}\n")
        self.err.flush()

    async def cancel(self, note: str) -> None:
        self._end()
        self.console.print(f"{STOPPED_NOTE} {note}", markup=False, highlight=False)

    def close(self) -> None:
        """Stop the live region (and show the cursor again) if the turn ended another way."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _end(self, *, close_fence: bool = False) -> None:
        fence = self.blocks.open_fence if close_fence else None
        rest = self.blocks.flush()
        if fence is not None:
            rest += ("" if rest.endswith("\n") else "\n") + fence
        self.close()
        if rest.strip():
            self._print_block(rest)

    def _print_block(self, block: str) -> None:
        if self.printed_block:
            self.console.print()
        self.console.print(_Block(block))
        self.printed_block = True


class _Block:
    """One block of Markdown, rendered without the blank lines rich puts before lists and quotes.

    ``tail`` keeps only the last lines (a live region taller than the screen cannot be redrawn).
    """

    def __init__(self, text: str, *, tail: int | None = None) -> None:
        self.text = text.strip("\n")
        self.tail = tail

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.markdown import Markdown
        from rich.segment import Segment

        lines = console.render_lines(Markdown(self.text, code_theme=CODE_THEME), options, pad=False)
        while lines and not "".join(segment.text for segment in lines[0]).strip("\n"):
            lines.pop(0)
        if self.tail is not None:
            lines = lines[-self.tail :]
        for line in lines:
            yield from line
            # Every line ends with its newline: without it, what prints next (the live region)
            # would start on the block's last line and erase it when redrawn.
            yield Segment.line()


class _LivePreview:
    """The live region: a spinner until text comes, then the block being written."""

    def __init__(self, reply: MarkdownReply) -> None:
        self._reply = reply
        self._blocks = reply.blocks

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.spinner import Spinner

        text = self._blocks.pending
        if not text.strip():
            if not self._reply.printed_block:  # a sign of life until the first words come
                yield Spinner("dots", THINKING, style="dim")
            return
        fence = self._blocks.open_fence
        if fence is not None:
            text += "\n" + fence  # close the open code block so it renders as code meanwhile
        # One line short of the screen, so the region can always be redrawn in place.
        yield _Block(text, tail=max(1, console.height - 1))
