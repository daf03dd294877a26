"""Markdown-aware splitting of a long reply into platform-sized messages.

A cut goes, in order of preference, at a paragraph break, a line break, a space, and only as a last
resort inside a word; cuts in the second half of the allowed length are preferred so messages stay
full. A cut inside a fenced code block closes the fence at the end of the message and reopens it
with the same opening line (same fence and info string) at the start of the next one, so every
message renders on its own. An opening line too long to repeat (more than about half a message)
is reopened as the bare fence instead; one longer than a whole message is cut like any over-long
line, and the message it starts in closes the block it opens, so fences balance in every message.
Cuts are decided once and kept (``Splitter``) so a message that was completed is never changed by
text that arrives later.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# CommonMark fenced code blocks: up to 3 spaces of indent, 3+ backticks or tildes, an info string
# (no backticks for a backtick fence). A closing fence uses the same character, at least as many,
# and nothing but spaces after it.
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


@dataclass(frozen=True, slots=True)
class Fence:
    """An open fenced code block: its opening line, marker character and marker length."""

    line: str
    char: str
    length: int

    @property
    def marker(self) -> str:
        """The bare fence: the marker characters, without indent or info string."""
        return self.char * self.length

    def reopen(self, fits: Callable[[str], bool]) -> str:
        """The text that reopens this block at the start of the next message.

        The opening line, so the next message keeps the info string (the language), unless the
        line would take more than about half a message (``fits`` says whether a message's
        Markdown is within the limit): then the bare fence, so a message always has room for
        the block's text.
        """
        line = self.line + "\n"
        if self.line != self.marker and not fits(line + line + self.marker):
            return self.marker + "\n"
        return line

    def close(self, body: str) -> str:
        """The text that closes this block after ``body``."""
        return ("" if body.endswith("\n") or body == "" else "\n") + self.marker


def fence_after_line(line: str, fence: Fence | None) -> Fence | None:
    """The open fence after a complete ``line`` (without its newline), given the one before it."""
    match = _FENCE.match(line)
    if match is None:
        return fence
    marker, rest = match.group(1), match.group(2)
    if fence is None:
        if marker[0] == "`" and "`" in rest:
            return None
        return Fence(line=line, char=marker[0], length=len(marker))
    if marker[0] == fence.char and len(marker) >= fence.length and rest.strip() == "":
        return None
    return fence


def fence_at_end(text: str, fence: Fence | None = None) -> Fence | None:
    """The fence still open after the complete lines of ``text`` (a trailing partial line is
    not a line yet), starting from ``fence``."""
    lines = text.split("\n")
    for line in lines[:-1]:
        fence = fence_after_line(line, fence)
    return fence


def fence_at_cut(text: str, start: int, cut: int, fence: Fence | None) -> Fence | None:
    """The fence open at the end of a message holding ``text[start:cut]`` after ``fence``.

    A cut inside a line makes the line's first part the message's last line, so it counts: an
    opening fence cut off there (an info string longer than a message) opens a block the message
    must close. The next message then reopens it with the bare fence, since the info string was
    shown already and the rest of the line continues inside the block.
    """
    state = fence_at_end(text[start:cut], fence)
    line_start = text.rfind("\n", start, cut) + 1 or start
    if line_start == cut:
        return state
    after = fence_after_line(text[line_start:cut], state)
    if state is None and after is not None:
        return Fence(line=after.marker, char=after.char, length=after.length)
    return after


def _looks_like_fence(text: str, line_start: int) -> bool:
    """Whether the line starting at ``line_start`` begins like a fence line."""
    head = text[line_start : line_start + 6].lstrip(" ")
    return head.startswith(("```", "~~~"))


@dataclass(frozen=True, slots=True)
class Chunk:
    """One message's share of the text: ``text[start:end]`` wrapped in ``prefix`` and ``suffix``.

    ``prefix`` reopens a code block the previous message closed; ``suffix`` closes one this
    message cuts through. ``fence`` is the block still open at ``end`` (reopened by the next).
    """

    start: int
    end: int
    prefix: str
    suffix: str
    fence: Fence | None

    def message(self, text: str) -> str:
        """The Markdown of this message."""
        return self.prefix + text[self.start : self.end] + self.suffix


# Tiers of cut positions, best first.
_PARAGRAPH, _LINE_OUTSIDE, _LINE_IN_CODE, _SPACE = range(4)


def cut_chunk(
    text: str,
    start: int,
    fence: Fence | None,
    fits: Callable[[str], bool],
) -> Chunk | None:
    """The first message of ``text[start:]`` if all of it does not fit in one, else ``None``.

    ``fence`` is the block open at ``start`` (reopened by this message); ``fits(markdown)`` says
    whether a message's Markdown is within the platform's limit once rendered.
    """
    prefix = fence.reopen(fits) if fence is not None else ""
    if fits(prefix + text[start:]):
        return None
    # Scan the text line by line, noting every cut position with its tier and open fence.
    candidates: list[tuple[int, int, Fence | None]] = []
    state = fence
    pos = start
    length = len(text)
    while pos < length:
        newline = text.find("\n", pos)
        line_end = length if newline == -1 else newline
        line_is_fence = _looks_like_fence(text, pos)
        if not line_is_fence:
            space = text.find(" ", pos, line_end)
            while space != -1:
                if space + 1 < line_end and state is None:
                    candidates.append((space + 1, _SPACE, state))
                space = text.find(" ", space + 1, line_end)
        if newline == -1:
            break
        state = fence_after_line(text[pos:line_end], state)
        cut = newline + 1
        if cut < length:
            if state is not None:
                tier = _LINE_IN_CODE
            elif text[pos:line_end].strip() == "":
                tier = _PARAGRAPH
            else:
                tier = _LINE_OUTSIDE
            candidates.append((cut, tier, state))
        pos = cut

    def chunk_at(cut: int, open_fence: Fence | None) -> Chunk:
        body = text[start:cut]
        suffix = open_fence.close(body) if open_fence is not None else ""
        return Chunk(start, cut, prefix, suffix, open_fence)

    # The longest prefix that fits (render length grows with the text, near enough to bisect).
    low, high = start + 1, length
    while low < high:
        mid = (low + high + 1) // 2
        if fits(chunk_at(mid, fence_at_cut(text, start, mid, fence)).message(text)):
            low = mid
        else:
            high = mid - 1
    longest = low
    half = start + (longest - start) // 2
    fitting = [c for c in candidates if c[0] <= longest]
    for minimum in (half, start + 1):
        for tier in (_PARAGRAPH, _LINE_OUTSIDE, _LINE_IN_CODE, _SPACE):
            for cut, cut_tier, open_fence in reversed(fitting):
                if cut_tier != tier or cut < minimum:
                    continue
                chunk = chunk_at(cut, open_fence)
                if fits(chunk.message(text)):
                    return chunk
    # No boundary fits: cut inside the word (or the over-long line) at the longest prefix.
    return chunk_at(longest, fence_at_cut(text, start, longest, fence))


class Splitter:
    """Splits one growing text into messages, keeping every cut once it is made.

    ``chunks(text)`` returns the settled chunks (complete messages, never changed again) and the
    open tail (the last message, still growing). ``reset()`` forgets the cuts, for a retried
    answer that replaces the text.
    """

    def __init__(self, fits: Callable[[str], bool]) -> None:
        self._fits = fits
        self._settled: list[Chunk] = []

    def reset(self) -> None:
        """Forget every cut (the text is being replaced)."""
        self._settled = []

    def chunks(self, text: str) -> list[Chunk]:
        """Every message of ``text``: the settled ones, then the open tail (if any text is left)."""
        while True:
            last = self._settled[-1] if self._settled else None
            start = last.end if last is not None else 0
            fence = last.fence if last is not None else None
            if start >= len(text):
                return list(self._settled)
            chunk = cut_chunk(text, start, fence, self._fits)
            if chunk is None:
                prefix = fence.reopen(self._fits) if fence is not None else ""
                return [*self._settled, Chunk(start, len(text), prefix, "", None)]
            self._settled.append(chunk)

    @property
    def settled(self) -> int:
        """How many chunks are settled."""
        return len(self._settled)
