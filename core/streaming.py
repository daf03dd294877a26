"""ReplyStreamer: one model answer streamed into platform messages, paced by shared budgets.

This module also defines ``AppendReplySurface``, the optional append-style surface (Slack's
``chat.startStream`` / ``chat.appendStream`` / ``chat.stopStream``) the streamer prefers when an
adapter offers it, falling back to the edit path of ``ReplySurface`` when the platform refuses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from core.errors import (
    PermanentSurfaceError,
    SurfaceError,
    SurfaceRateLimited,
    TransientSurfaceError,
)
from core.ratelimit import Budgets, RateScope, Urgency
from core.reply import ReplySurface
from core.splitting import Splitter, fence_at_end


@dataclass(frozen=True, slots=True)
class NativeStreams:
    """What a platform's native (append-style) streams can do, as its adapter's profile says.

    ``unsupported_codes``: ``PermanentSurfaceError.code`` values meaning "this platform or
    channel cannot stream natively"; the reply falls back to post + edit. ``ended_code``: the
    code of a stream that is no longer appendable (too old); the streamer finishes that message
    with ``edit``. ``max_age_seconds``: streams are stopped this old, before the platform ends
    them. ``per_scope``: natively streamed replies at once per ``native_scope`` of the surface
    (admission, ``core.bot``); beyond it replies use edits.
    """

    unsupported_codes: frozenset[str]
    ended_code: str
    max_age_seconds: float
    per_scope: int = 1


@runtime_checkable
class AppendReplySurface(ReplySurface, Protocol):
    """A ``ReplySurface`` that can also stream natively by appending text to one message.

    Contract (the streamer drives it; the adapter only translates):

    - ``scopes(call)`` also answers for ``"start"``, ``"append"`` and ``"stop"`` (Slack: method
      scopes per workspace, Tier 2 / Tier 4 / Tier 2), in addition to ``"post"`` and ``"edit"``.
    - ``native_scope``: what native-stream admission counts per (Slack: the workspace); empty
      when this reply cannot stream natively at all (a top-level DM answer on Slack).
    - ``start(text)`` begins a streaming message showing ``text`` (rendered, may be empty) and
      returns its platform id. A platform or channel that cannot stream raises
      ``PermanentSurfaceError`` with a code in ``NativeStreams.unsupported_codes``; the streamer
      then uses ``post`` / ``edit`` for the rest of the reply.
    - ``append(message_id, delta)`` appends rendered text. Appended text can never be replaced
      while the stream lives: on a retry, a correction of earlier text or a split, the streamer
      calls ``stop`` and then ``edit`` (chat.update) with the exact text.
    - ``stop(message_id, delta)`` ends the stream, appending ``delta`` (rendered, may be empty).
      After ``stop`` the message is an ordinary message: ``edit`` works on it.
    - A dead stream (too old) raises ``PermanentSurfaceError`` with code
      ``NativeStreams.ended_code`` from ``append`` or ``stop``; the streamer finishes it with
      ``edit``.
    - Like every surface: ``SurfaceRateLimited`` on a 429, ``TransientSurfaceError`` for 5xx and
      timeouts; never sleeps or retries on its own. Rendering must be chunk-safe for appends:
      ``render(a + b) == render(a) + render(b)`` at the boundaries the streamer appends at
      (Slack's ``render`` only rewrites whole mention tokens). Where a boundary cuts such a
      token, the rendered text no longer extends what was appended: the streamer then stops
      the stream and lands the exact text with ``edit``, as for any correction.
    """

    native_scope: str

    async def start(self, text: str) -> str:
        """Start a natively streamed message showing ``text``; return its platform id."""
        ...

    async def append(self, message_id: str, delta: str) -> None:
        """Append ``delta`` to a live stream."""
        ...

    async def stop(self, message_id: str, delta: str) -> None:
        """End the stream, appending ``delta`` (may be empty)."""
        ...


@runtime_checkable
class LiveControls(Protocol):
    """A surface that shows controls (a Stop button) on a message while it is still streaming.

    The streamer calls ``controls(True)`` right before it posts or edits a message whose text
    will still change, and ``controls(False)`` right before the call that lands a message's
    final text (the answer's end, a failure, a cancel or stop, a retracted message, a settled
    part of a split answer). The surface adds or removes its controls in that very call.
    """

    def controls(self, live: bool) -> None:
        """Whether the next post or edit of this reply is of a message still streaming."""
        ...


log = logging.getLogger(__name__)

#: Shown after the text while the answer is still coming (removed by the final edit).
STREAMING_INDICATOR = " \u258d"
#: The first message's text before any token arrives, so the user sees the bot at work at once.
THINKING_TEXT = "_Thinking\u2026_"
#: Shown when the model's answer was empty (platforms refuse empty messages).
EMPTY_ANSWER_TEXT = "_(empty answer)_"
#: Replaces a continuation message a retried answer no longer needs (messages cannot be deleted
#: through a ReplySurface).
RETRACTED_TEXT = "_(replaced by the retried answer above)_"
#: Attempts of one platform call on transient errors (5xx, timeouts) before it counts as failed.
MAX_CALL_ATTEMPTS = 4
#: 429s tolerated on one platform call before it counts as failed (each waits its Retry-After).
MAX_RATE_LIMITED_CALLS = 10
#: Consecutive failed calls after which the reply stops talking to the platform (logged; the
#: engine still stores the full text).
MAX_FAILED_CALLS = 3
#: Backoff between transient failures: min(cap, base * 2^n) seconds.
CALL_RETRY_BASE = 0.5
CALL_RETRY_CAP = 5.0
#: How often a typing indicator is refreshed while the model is silent, unless the platform's
#: profile says otherwise (indicators typically lapse after about 10 s).
TYPING_REFRESH_SECONDS = 8.0
#: Longest a status (typing indicator) call may take; a slower one counts as not showing.
STATUS_TIMEOUT_SECONDS = 2.0
#: While a status shows and the first post is held (see ``ReplyStreamer``), how often the
#: reply looks again whether a progress edit would go now (bounds, in seconds).
HOLD_RECHECK_MIN_SECONDS = 0.1
HOLD_RECHECK_MAX_SECONDS = 1.0
#: A look at the edit budget this much before it is due counts as due: a wait's timer may fire
#: a hair early (and a float clock may never reach the exact time).
HOLD_LOOK_EARLY_SECONDS = 0.001

_STREAMING, _FINISHED, _FAILED, _CANCELLED = "streaming", "finished", "failed", "cancelled"
#: What a resumed message is taken to show: never equal to a target, so it is edited.
_UNKNOWN = "\x00unknown"


@dataclass(slots=True)
class _Message:
    """A platform message of this reply and the rendered text it shows."""

    id: str
    shown: str
    live: bool
    started: float
    #: A live stream that may take no more appends (one failed): stop it, then edit.
    broken: bool = False


@dataclass(frozen=True, slots=True)
class _Target:
    """What message ``i`` should show now; ``complete`` when it will not change any more."""

    text: str
    complete: bool


class CallObserver(Protocol):
    """What a streamer reports as it calls the platform (``core.metrics.PlatformCalls``)."""

    def call(self, kind: str) -> None: ...

    def rate_limited(self, scope: str) -> None: ...


class ReplyStreamer:
    """Streams one answer into platform messages; implements ``core.reply.ReplySink``.

    ``write`` only appends to memory and wakes a background pump task; the pump makes at most one
    platform call at a time, each through the shared ``Budgets`` of the call's scopes, and sends
    the freshest text when its turn comes (so tokens that arrive meanwhile coalesce). A 429 pauses
    the scope for its Retry-After; transient errors are retried with backoff, a bounded number of
    times. A reply queued for a budget plans again when its answer completes or is retried, so
    it never holds a place in a slow queue for a call it no longer needs; once the answer is
    complete its calls are urgent, ahead of other replies' progress edits in the same scope.
    ``finish`` waits until the exact final text is shown everywhere (indicator gone) and
    returns the message ids; if the platform stays down it logs the failure with ``log_context``
    and returns what exists, so the engine still stores the full text (``text``).

    A surface whose ``show_typing`` says True shows a status (a typing indicator) meanwhile: the
    call runs beside the reply, bounded by ``STATUS_TIMEOUT_SECONDS`` (an error, a timeout or
    False never delays the answer: text that comes first is posted). While the status shows,
    the first post waits until the answer is complete (then the whole final text goes in one
    post, with no edit at all) or until a progress edit in the reply's ``"edit"`` scopes would
    be granted now (``Budgets.idle``): under a burst of replies sharing a scarce edit budget
    (Slack's chat.update, about 50 a minute per workspace), short answers land whole and the
    budget is left to the replies that need edits. A ``LiveControls`` surface is told before
    each post and edit whether the message is still streaming.

    Text beyond ``surface.max_chars`` continues in new messages cut by ``core.splitting``; a
    completed message is never edited again (except to replace it with a retried answer). With an
    ``AppendReplySurface`` the reply streams natively and falls back to post + edit when the
    platform refuses, when appended text must be replaced, or when the stream gets old.
    """

    def __init__(
        self,
        surface: ReplySurface,
        budgets: Budgets,
        *,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        log_context: str = "",
        native: NativeStreams | None = None,
        on_native_refused: Callable[[str], None] | None = None,
        on_posted: Callable[[list[str]], None] | None = None,
        resume: Sequence[str] = (),
        typing_refresh: float = TYPING_REFRESH_SECONDS,
        status_timeout: float = STATUS_TIMEOUT_SECONDS,
        indicator: str = STREAMING_INDICATOR,
        thinking_text: str = THINKING_TEXT,
        max_call_attempts: int = MAX_CALL_ATTEMPTS,
        max_rate_limited: int = MAX_RATE_LIMITED_CALLS,
        max_failed_calls: int = MAX_FAILED_CALLS,
        retry_base: float = CALL_RETRY_BASE,
        retry_cap: float = CALL_RETRY_CAP,
        observer: CallObserver | None = None,
    ) -> None:
        self._surface = surface
        self._observer = observer
        self._append: AppendReplySurface | None = (
            surface
            if native is not None
            and isinstance(surface, AppendReplySurface)
            and surface.native_scope
            else None
        )
        self._native = native
        self._on_native_refused = on_native_refused
        self._on_posted = on_posted
        self._typing_refresh = typing_refresh
        self._status_timeout = status_timeout
        self._controls = surface if isinstance(surface, LiveControls) else None
        self._budgets = budgets
        self._now = now
        self._sleep = sleep
        self._log_context = log_context
        self._indicator = indicator
        self._thinking = thinking_text
        self._max_call_attempts = max_call_attempts
        self._max_rate_limited = max_rate_limited
        self._max_failed_calls = max_failed_calls
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        self._splitter = Splitter(
            lambda markdown: len(surface.render(markdown)) <= surface.max_chars
        )
        # The answer's deltas, joined only when the pump needs the text: ``+=`` on an attribute
        # copies the whole text per token (10 s of CPU for a 100,000-token answer).
        self._parts: list[str] = []
        self._notice: str | None = None
        self._note: str | None = None
        self._phase = _STREAMING
        # A reply taken over from a worker that died: its messages are edited, not posted anew
        # (what they show is unknown, so the first plan replaces it).
        self._messages: list[_Message] = [
            _Message(message_id, _UNKNOWN, False, now()) for message_id in resume
        ]
        self._wake = asyncio.Event()
        # Set when the next call may change kind (a retry, the end of the answer): a reply
        # queued for a budget then plans again instead of waiting its turn for a stale call.
        self._replan = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None
        self._failures = 0
        self._gave_up = False
        # The platform's typing indicator stands in for the "Thinking…" message while it shows.
        self._typing = False
        # The status call in flight (the first, or a refresh), and when the last one began.
        self._status: asyncio.Future[bool] | None = None
        self._status_at = now()
        # The first post no longer waits for an edit to be due (see the class docstring), and
        # the announcement of the edit it will need (``Budgets.hold``) until that is granted.
        self._post_released = False
        # While the first post is held: when to look at the edit budget again. New text does
        # not change the budget's answer, so a token does not look (the look may ask Redis or
        # PostgreSQL); the answer's completion ends the hold at once.
        self._look_again_at = 0.0
        self._release_edit: Callable[[], None] | None = None
        self.calls = 0
        self.rate_limited = 0
        # When (``now``) the first answer text and the final text were shown; None: not yet.
        self.first_text_at: float | None = None
        self.final_text_at: float | None = None

    # -- ReplySink -------------------------------------------------------------------------

    async def begin(self) -> None:
        """Start the pump: the thinking indicator (or a native stream) goes out at once."""
        if self._pump_task is None:
            self._pump_task = asyncio.create_task(self._pump())

    async def waiting(self, notice: str | None) -> None:
        """Show ``notice`` while the turn waits for another answer; None: back to thinking."""
        if self._phase != _STREAMING or self._parts:
            return
        self._notice = notice
        self._replan.set()
        self._wake.set()

    def write(self, delta: str) -> None:
        """Add generated text; never waits on the platform."""
        if not delta or self._phase != _STREAMING:
            return
        self._notice = None
        self._parts.append(delta)
        self._wake.set()

    async def retrying(self, notice: str) -> None:
        """Drop the partial answer (the next attempt replaces it) and show ``notice``."""
        if self._phase != _STREAMING:
            return
        self._parts.clear()
        self._notice = notice
        self._splitter.reset()
        self._replan.set()
        self._wake.set()

    async def finish(self, note: str | None = None) -> list[str]:
        """Land the exact final text everywhere (``note`` after it) and return the message ids."""
        return await self._close(_FINISHED, note)

    async def amend(self, note: str) -> None:
        """Add ``note`` after a finished reply's text (the one later change a reply takes)."""
        if self._phase != _FINISHED or self._gave_up:
            return
        self._note = note if self._note is None else f"{self._note}\n\n{note}"
        if self._pump_task is not None and self._pump_task.done():
            # The pump ended with the final text; one more round lands the note.
            self._pump_task = None
        await self._close(_FINISHED, None)

    async def fail(self, message: str) -> None:
        """End the reply with ``message`` after the partial text (if any)."""
        await self._close(_FAILED, message)

    async def cancel(self, note: str) -> None:
        """End the reply cleanly with ``note`` after the partial text (if any)."""
        await self._close(_CANCELLED, note)

    # -- results ---------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """The generated text of the current attempt, exactly as written."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def delivered(self) -> bool:
        """Whether the platform shows exactly what it should (false after giving up)."""
        return not self._gave_up and self._plan() is None

    @property
    def message_ids(self) -> list[str]:
        """The platform ids of this reply's messages, in order."""
        return [message.id for message in self._messages]

    @property
    def last_message(self) -> tuple[str, str] | None:
        """The id and shown (rendered) text of a finished reply's last message, once the
        platform shows exactly the final text; None before that or when it never will."""
        if self._phase != _FINISHED or not self._messages or not self.delivered:
            return None
        # The answer's own last message, not a retracted one after it.
        answer = max(1, min(len(self._answer_targets()), len(self._messages)))
        last = self._messages[answer - 1]
        return None if last.live else (last.id, last.shown)

    # -- internals -------------------------------------------------------------------------

    async def _close(self, phase: str, note: str | None) -> list[str]:
        if self._phase == _STREAMING:
            self._phase = phase
            self._note = note
        self._replan.set()
        self._wake.set()
        if self._pump_task is None:
            self._pump_task = asyncio.create_task(self._pump())
        try:
            await asyncio.shield(self._pump_task)
        except asyncio.CancelledError:
            self._pump_task.cancel()
            raise
        if self._phase == _FINISHED and self.final_text_at is None and not self._gave_up:
            self.final_text_at = self._now()
        return self.message_ids

    def _content(self) -> str:
        """The Markdown the reply should hold now (without indicator)."""
        raw = self.text
        if self._note is None:
            return raw
        if raw == "":
            return self._note
        # Close a code block the partial answer left open, so the note is not shown as code.
        fence = fence_at_end(raw + "\n")
        if fence is not None:
            raw += fence.close(raw)
        return raw + "\n\n" + self._note

    def _targets(self) -> list[_Target]:
        """What each message should show now: the answer's messages, then a retraction for
        each message a retried or regenerated answer no longer needs."""
        targets = self._answer_targets()
        for _ in range(len(targets), len(self._messages)):
            targets.append(_Target(self._surface.render(RETRACTED_TEXT), True))
        return targets

    def _answer_targets(self) -> list[_Target]:
        render = self._surface.render
        final = self._phase != _STREAMING
        content = self._content()
        targets: list[_Target] = []
        if content == "":
            if final:
                targets.append(_Target(render(EMPTY_ANSWER_TEXT), True))
            elif self._notice is not None:
                targets.append(_Target(render(self._notice), False))
            elif self._append is not None and not self._messages:
                # A native stream shows its own "working" state; appended text cannot be removed.
                targets.append(_Target("", False))
            elif not ((self._typing or self._status is not None) and not self._messages):
                # (A status call still in flight may yet show the platform's own indicator.)
                targets.append(_Target(render(self._thinking), False))
        else:
            chunks = self._splitter.chunks(content)
            settled = self._splitter.settled
            for index, chunk in enumerate(chunks):
                complete = final or index < settled
                if index and index >= settled and content[chunk.start :].strip() == "":
                    # A whitespace-only tail is not a message (platforms refuse blank text, and
                    # trim trailing blanks anyway).
                    break
                text = render(chunk.message(content))
                if not complete and self._append is None:
                    decorated = text + self._indicator
                    if len(decorated) <= self._surface.max_chars:
                        text = decorated
                targets.append(_Target(text, complete))
        return targets

    def _plan(self) -> tuple[str, int] | None:
        """The next call to make, as (kind, message index), or None when all is shown."""
        targets = self._targets()
        for index, target in enumerate(targets):
            if index >= len(self._messages):
                if self._append is not None and not target.complete:
                    return ("start", index)
                return ("post", index)
            message = self._messages[index]
            if message.live:
                assert self._native is not None
                aged = self._now() - message.started >= self._native.max_age_seconds
                if (
                    message.broken
                    or aged
                    or target.complete
                    or not target.text.startswith(message.shown)
                ):
                    return ("stop", index)
                if target.text != message.shown:
                    return ("append", index)
            elif target.text != message.shown:
                return ("edit", index)
        return None

    async def _pump(self) -> None:
        try:
            if self._append is None and self._phase == _STREAMING and not self._parts:
                self._start_status()
            while True:
                # Cleared before planning, so a change from now on interrupts a budget wait
                # (and a write from now on ends an idle wait).
                self._replan.clear()
                self._wake.clear()
                self._status_landed()
                plan = self._plan()
                if plan is not None and self._holds_first_post(plan):
                    edits = self._surface.scopes("edit")
                    look = self._now() >= self._look_again_at - HOLD_LOOK_EARLY_SECONDS
                    if look and await self._budgets.idle(edits, progress=True):
                        # Edits are due now: stream by post + edit, announcing the edit.
                        self._post_released = True
                        self._release_edit = self._budgets.hold(edits)
                    else:
                        if look:
                            due = self._budgets.delay(edits, progress=True)
                            self._look_again_at = self._now() + min(
                                HOLD_RECHECK_MAX_SECONDS, max(HOLD_RECHECK_MIN_SECONDS, due)
                            )
                        await self._idle(hold=True)
                        continue
                if plan is None:
                    if self._phase != _STREAMING:
                        return
                    await self._idle(hold=False)
                    continue
                try:
                    done = await self._step(*plan)
                except PermanentSurfaceError as exc:
                    if not self._leave_native(*plan, f"{exc} (code {exc.code})"):
                        raise
                    continue
                if done:
                    self._failures = 0
                    continue
                self._failures += 1
                self._leave_native(*plan, "attempts exhausted")
                if self._failures >= self._max_failed_calls:
                    self._give_up("platform calls keep failing")
                    return
        except PermanentSurfaceError as exc:
            self._give_up(f"platform refused a call: {exc} (code {exc.code})")
        except SurfaceError as exc:
            self._give_up(f"platform call failed: {exc}")
        except Exception:
            # A bug here must not hang finish() or lose the answer: log it and stop updating.
            log.exception("reply %s: the streamer failed", self._log_context)
            self._give_up("unexpected error in the streamer")
        finally:
            self._edit_granted()
            if self._status is not None:
                self._status.cancel()
                self._status = None

    def _holds_first_post(self, plan: tuple[str, int]) -> bool:
        """Whether the first post of answer text waits (a status shows; see the class docs)."""
        return (
            plan == ("post", 0)
            and self._typing
            and not self._post_released
            and not self._messages
            and self._phase == _STREAMING
            and bool(self._parts)
        )

    async def _idle(self, *, hold: bool) -> None:
        """Wait for something to do: new text or a phase change (``_wake``), the status call's
        answer, the status's refresh, or (``hold``) the next look at the edit budget
        (``_look_again_at``)."""
        wake = asyncio.ensure_future(self._wake.wait())
        waits: list[asyncio.Future[Any]] = [wake]
        timeout: float | None = None
        refresh = self._typing and not self._messages and self._status is None
        if self._status is not None:
            waits.append(self._status)
        elif refresh:
            # Nothing posted yet: keep the typing indicator alive while we wait.
            timeout = max(0.0, self._status_at + self._typing_refresh - self._now())
        if hold:
            recheck = max(0.0, self._look_again_at - self._now())
            timeout = recheck if timeout is None else min(timeout, recheck)
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
        if refresh and self._now() >= self._status_at + self._typing_refresh:
            self._start_status()

    def _start_status(self) -> None:
        """Call ``show_typing`` beside the reply (the answer never waits for it)."""
        self._status_at = self._now()
        self._status = asyncio.ensure_future(self._show_typing())

    def _status_landed(self) -> None:
        """Take the status call's answer once it came."""
        if self._status is not None and self._status.done():
            self._typing = self._status.result()
            self._status = None

    def _edit_granted(self) -> None:
        """The edit announced for the first post was granted (or is no longer needed)."""
        if self._release_edit is not None:
            self._release_edit()
            self._release_edit = None

    def _leave_native(self, kind: str, index: int, reason: str) -> bool:
        """After a native-stream call failed for good, land the answer on the edit path instead.

        A failed ``start`` posts instead; a failed ``append`` stops the stream (the stop carries
        the rest); a failed ``stop`` leaves the stream as it is and ``edit`` lands the exact
        text (Slack ends a stream nobody stops after about 5 minutes). False for other calls.
        """
        if kind not in ("start", "append", "stop") or self._append is None:
            return False
        log.warning(
            "reply %s: native stream %s failed (%s); finishing with edits",
            self._log_context,
            kind,
            reason,
        )
        if kind == "append":
            self._messages[index].broken = True
            return True
        if kind == "stop":
            self._messages[index].live = False
        self._append = None
        return True

    async def _show_typing(self) -> bool:
        try:
            async with asyncio.timeout(self._status_timeout):
                return bool(await self._surface.show_typing())
        except Exception:
            # Best effort: without the indicator, the "Thinking…" message goes out instead.
            log.debug("reply %s: typing indicator failed", self._log_context, exc_info=True)
            return False

    def _give_up(self, reason: str) -> None:
        self._gave_up = True
        log.error(
            "reply %s: %s; stopped updating the reply after %d calls; the full text (%d chars) "
            "is kept in the store",
            self._log_context or "(no context)",
            reason,
            self.calls,
            len(self.text),
        )

    async def _step(self, kind: str, index: int) -> bool:
        """Make one call of ``kind`` on message ``index`` with the freshest text; False if it
        failed for good (transient errors and 429s exhausted)."""
        scopes = self._surface.scopes(kind)
        transient = 0
        limited = 0
        while True:
            if not await self._granted(scopes, kind, index):
                # The plan changed while we queued: nothing was spent, plan again.
                return True
            if self._plan() != (kind, index):
                # The text moved on while we waited (e.g. a retry); plan again from scratch.
                return True
            target = self._targets()[index]
            self.calls += 1
            if self._observer is not None:
                self._observer.call(kind)
            try:
                await self._call(kind, index, target)
            except SurfaceRateLimited as exc:
                self.rate_limited += 1
                limited += 1
                keys = [exc.scope] if exc.scope else [scope.key for scope in scopes]
                if self._observer is not None and keys:
                    self._observer.rate_limited(keys[0])
                for key in keys:
                    self._budgets.pause(key, exc.retry_after)
                if limited >= self._max_rate_limited:
                    return False
            except TransientSurfaceError as exc:
                transient += 1
                log.warning(
                    "reply %s: %s failed (%s), attempt %d", self._log_context, kind, exc, transient
                )
                if transient >= self._max_call_attempts:
                    return False
                await self._sleep(min(self._retry_cap, self._retry_base * 2 ** (transient - 1)))
            else:
                if self.first_text_at is None and self._parts and self._messages:
                    self.first_text_at = self._now()
                return True

    def _posted(self) -> None:
        if self._on_posted is not None:
            self._on_posted(self.message_ids)

    def _finishing(self) -> bool:
        """Whether the next call lands the reply's end: once the answer is complete (finished,
        failed or cancelled), every target is complete and the user is waiting for it."""
        return self._phase != _STREAMING

    async def _granted(self, scopes: tuple[RateScope, ...], kind: str, index: int) -> bool:
        """Wait for one call in every scope; False if the plan changed first.

        Once the answer is complete (``_finishing``) the call is urgent: it queues ahead of
        other replies' calls and may spend the whole burst, since the final text is what the
        user waits for; it happens once per reply, so the others still progress
        (``core.ratelimit.URGENT_STREAK_LIMIT``). Before that, edits and appends of a message
        already shown are progress calls, which leave part of the burst for urgent ones; a
        reply's new messages are neither. A call queued before the answer completes, and still
        needed, becomes urgent in place (``Urgency.escalate``).

        The wait races the budget against ``_replan``: when the answer completes (a ``start``
        queued on Slack's Tier 2 budget becomes a plain ``post`` of the final text, an
        ``append`` becomes the ``stop`` that carries the rest) or is retried, the reply leaves
        the queue at once instead of waiting its turn for a call it no longer needs: the
        cancelled acquire leaves the budget's queue without taking the token it waited for
        (``Budget.acquire`` cleans up on cancellation). Deltas alone
        do not interrupt: planning joins and splits the text, too costly to do per token, and
        a call's turn re-checks the plan anyway.
        """
        urgency = Urgency(self._finishing())
        progress = kind in ("edit", "append") and not urgency.urgent
        acquire = asyncio.ensure_future(
            self._budgets.acquire(scopes, urgent=urgency, progress=progress)
        )
        replanned: asyncio.Task[Literal[True]] | None = None
        try:
            while True:
                if self._replan.is_set():
                    self._replan.clear()
                    if self._plan() != (kind, index):
                        return False
                    if self._finishing():
                        # The same call now lands the final text: ahead of progress edits,
                        # keeping its place among other finishing replies.
                        urgency.escalate()
                replanned = asyncio.ensure_future(self._replan.wait())
                await asyncio.wait((acquire, replanned), return_when=asyncio.FIRST_COMPLETED)
                replanned.cancel()
                if acquire.done():
                    acquire.result()
                    if kind == "edit":
                        self._edit_granted()
                    return True
        finally:
            if replanned is not None:
                replanned.cancel()
            if not acquire.done():
                acquire.cancel()
                # Let the acquire leave the budget's queue before the next call queues.
                await asyncio.wait((acquire,))
            if not acquire.cancelled():
                # Mark the outcome retrieved: a token granted at the last moment is simply unused,
                # and an error was raised above.
                acquire.exception()

    async def _call(self, kind: str, index: int, target: _Target) -> None:
        surface = self._surface
        native = self._append
        if self._controls is not None:
            self._controls.controls(not target.complete)
        if kind == "post":
            message_id = await surface.post(target.text)
            self._messages.append(_Message(message_id, target.text, False, self._now()))
            self._posted()
            return
        if kind == "start":
            assert native is not None and self._native is not None
            try:
                message_id = await native.start(target.text)
            except PermanentSurfaceError as exc:
                if exc.code not in self._native.unsupported_codes:
                    raise
                if self._on_native_refused is not None:
                    self._on_native_refused(native.native_scope)
                log.info(
                    "reply %s: native streaming refused (%s); using edits",
                    self._log_context,
                    exc.code,
                )
                self._append = None
                return
            self._messages.append(_Message(message_id, target.text, True, self._now()))
            self._posted()
            return
        message = self._messages[index]
        if kind == "edit":
            await surface.edit(message.id, target.text)
            message.shown = target.text
            return
        assert native is not None or not message.live
        try:
            if kind == "append":
                delta = target.text[len(message.shown) :]
                await native.append(message.id, delta)  # type: ignore[union-attr]
                message.shown = target.text
            else:
                extends = target.text.startswith(message.shown)
                delta = target.text[len(message.shown) :] if extends else ""
                await native.stop(message.id, delta)  # type: ignore[union-attr]
                message.shown += delta
                message.live = False
                if message.broken:
                    # The stream failed once: the rest of this reply takes the edit path.
                    self._append = None
        except PermanentSurfaceError as exc:
            if self._native is None or exc.code != self._native.ended_code:
                raise
            # The stream died (too old): what it shows stays; the edit path takes over.
            message.live = False
