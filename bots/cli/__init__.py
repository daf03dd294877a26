"""Terminal chat: ``threadbot chat`` (also ``python -m bots.cli``).

Answers stream as they are written: as plain text into a pipe, rendered as Markdown (code
highlighted) on a terminal. History persists in the store, one conversation per user unless
``--conversation NAME`` names another. On a terminal the line editor keeps input history across
runs, and keys typed during an answer wait for the next prompt. Ctrl-C during an answer stops
that answer; Ctrl-C at the prompt, Ctrl-D or closed stdin exits with status 0. Any bytes on stdin
are safe: what is not UTF-8 becomes U+FFFD.
"""

from __future__ import annotations

from bots.cli.chat import main

__all__ = ["main"]
