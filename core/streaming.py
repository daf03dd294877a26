"""ReplyStreamer: one model answer streamed into platform messages, paced by shared budgets.

This module also defines ``AppendReplySurface``, the optional append-style surface (Slack's
``chat.startStream`` / ``chat.appendStream`` / ``chat.stopStream``) the streamer prefers when an
adapter offers it, falling back to the edit path of ``ReplySurface`` when the platform refuses.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from core.reply import RateScope, ReplySurface

#: ``PermanentSurfaceError.code`` values meaning "this platform/channel cannot stream natively":
#: the streamer falls back to post + edit for this reply. Codes are Slack's error strings from the
#: chat.startStream / chat.appendStream reference pages; adapters may raise any of them.
NATIVE_STREAM_UNSUPPORTED_CODES = frozenset(
    {
        "not_allowed",
        "not_allowed_token_type",
        "method_not_supported_for_channel_type",
        "method_not_supported",
        "unknown_method",
        "missing_scope",
        "feature_not_enabled",
    }
)

#: ``PermanentSurfaceError.code`` when a native stream is no longer appendable (Slack ends
#: streams after about 5 minutes: ``message_not_in_streaming_state``); the streamer finishes that
#: message with ``edit`` (chat.update) and goes on with the edit path.
NATIVE_STREAM_ENDED_CODE = "message_not_in_streaming_state"


@runtime_checkable
class AppendReplySurface(ReplySurface, Protocol):
    """A ``ReplySurface`` that can also stream natively by appending text to one message.

    Contract (the streamer drives it; the adapter only translates):

    - ``scopes(call)`` also answers for ``"start"``, ``"append"`` and ``"stop"`` (Slack: method
      scopes per workspace, Tier 2 / Tier 4 / Tier 2), in addition to ``"post"`` and ``"edit"``.
    - ``start(text)`` begins a streaming message showing ``text`` (rendered, may be empty) and
      returns its platform id. A platform or channel that cannot stream raises
      ``PermanentSurfaceError`` with a code in ``NATIVE_STREAM_UNSUPPORTED_CODES``; the streamer
      then uses ``post`` / ``edit`` for the rest of the reply.
    - ``append(message_id, delta)`` appends rendered text. Appended text can never be replaced
      while the stream lives: on a retry, a correction of earlier text or a split, the streamer
      calls ``stop`` and then ``edit`` (chat.update) with the exact text.
    - ``stop(message_id, delta)`` ends the stream, appending ``delta`` (rendered, may be empty).
      After ``stop`` the message is an ordinary message: ``edit`` works on it.
    - A dead stream (about 5 minutes old) raises ``PermanentSurfaceError`` with code
      ``NATIVE_STREAM_ENDED_CODE`` from ``append`` or ``stop``; the streamer finishes it with
      ``edit``.
    - Like every surface: ``SurfaceRateLimited`` on a 429, ``TransientSurfaceError`` for 5xx and
      timeouts; never sleeps or retries on its own. Rendering must be chunk-safe for appends:
      ``render(a + b) == render(a) + render(b)`` at the boundaries the streamer appends at
      (Slack ``markdown_text`` takes Markdown as is, so ``render`` is the identity there).
    """

    async def start(self, text: str) -> str:
        """Start a natively streamed message showing ``text``; return its platform id."""
        ...

    async def append(self, message_id: str, delta: str) -> None:
        """Append ``delta`` to a live stream."""
        ...

    async def stop(self, message_id: str, delta: str) -> None:
        """End the stream, appending ``delta`` (may be empty)."""
        ...


__all__ = [
    "NATIVE_STREAM_ENDED_CODE",
    "NATIVE_STREAM_UNSUPPORTED_CODES",
    "AppendReplySurface",
    "RateScope",
    "ReplySurface",
]
