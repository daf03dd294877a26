"""Pacing budgets: one token bucket per platform rate-limit scope, shared by every reply using it.

A ``Budgets`` registry lives for the whole process. Each ``RateScope.key`` (e.g. Slack's
``chat.update`` for one workspace, Discord's edit bucket for one channel) gets one ``Budget``:

- a token bucket refilled at the scope's published rate, holding at most ``burst`` calls;
- a FIFO queue of waiting callers, so concurrent replies are served in turn: a reply asks for one
  call at a time and queues again behind the others afterwards, which makes the sharing
  round-robin and starvation-free;
- a pause: a 429 (``pause``) or rate-limit headers saying the bucket is empty (``observe``) stop
  the whole scope until the platform's reset time, for every reply at once.

Clocks are injected (``now``, ``sleep``) so tests and benchmarks run in virtual time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from core.reply import RateScope

Clock = Callable[[], float]
# Float slack: a refill computed as 0.9999999999 tokens is a token (else a 1e-17 s sleep loops).
_EPSILON = 1e-9
Sleeper = Callable[[float], Awaitable[None]]


class Budget:
    """The token bucket and FIFO queue of one rate-limit scope."""

    def __init__(self, scope: RateScope, *, now: Clock, sleep: Sleeper) -> None:
        if scope.per_second <= 0 or scope.burst < 1:
            raise ValueError(f"rate scope {scope.key!r} needs per_second > 0 and burst >= 1")
        self.key = scope.key
        self.per_second = scope.per_second
        self.burst = scope.burst
        self._now = now
        self._sleep = sleep
        self._tokens = float(scope.burst)
        self._stamp = now()
        self._paused_until = -math.inf
        self._queue: deque[asyncio.Event] = deque()
        self.granted = 0

    @property
    def waiting(self) -> int:
        """How many callers are queued for this scope."""
        return len(self._queue)

    def _refill(self) -> None:
        now = self._now()
        if now > self._stamp:
            self._tokens = min(
                float(self.burst), self._tokens + (now - self._stamp) * self.per_second
            )
            self._stamp = now

    def delay(self) -> float:
        """Seconds until one call may go (0 when it may go now), ignoring the queue."""
        self._refill()
        now = self._now()
        wait = self._paused_until - now
        if self._tokens < 1 - _EPSILON:
            # While paused, _stamp sits at the pause's end, so the refill starts from there.
            wait = max(wait, (self._stamp - now) + (1 - self._tokens) / self.per_second)
        return wait if wait > _EPSILON else 0.0

    async def acquire(self) -> None:
        """Wait for this caller's turn and for a token, then consume it."""
        ticket = asyncio.Event()
        self._queue.append(ticket)
        if self._queue[0] is ticket:
            ticket.set()
        try:
            while True:
                await ticket.wait()
                wait = self.delay()
                if wait <= 0:
                    break
                # Re-check after sleeping: a 429 or a header may have moved the goalposts.
                await self._sleep(wait)
        except BaseException:
            self._leave(ticket)
            raise
        self._tokens = max(0.0, self._tokens - 1)
        self.granted += 1
        self._leave(ticket)

    def _leave(self, ticket: asyncio.Event) -> None:
        was_head = bool(self._queue) and self._queue[0] is ticket
        try:
            self._queue.remove(ticket)
        except ValueError:
            return
        if was_head and self._queue:
            self._queue[0].set()

    def pause(self, seconds: float) -> None:
        """Stop the scope for ``seconds`` (a 429's Retry-After); one call may go at the end."""
        until = self._now() + max(0.0, seconds)
        if until > self._paused_until:
            self._paused_until = until
        # The platform's window resets when the pause ends: one call then, the rate after it.
        self._tokens = 1.0
        self._stamp = max(self._stamp, self._paused_until)

    def observe(
        self,
        *,
        remaining: float | None = None,
        reset_after: float | None = None,
        limit: int | None = None,
        window: float | None = None,
    ) -> None:
        """Adapt to the platform's rate-limit headers after a successful call.

        ``remaining`` calls are left until ``reset_after`` seconds from now (Discord's
        ``X-RateLimit-Remaining`` / ``X-RateLimit-Reset-After``); ``limit`` calls per ``window``
        seconds, when the platform states both, replace the configured rate and burst.
        """
        if limit is not None and window is not None and limit >= 1 and window > 0:
            self.per_second = limit / window
            self.burst = int(limit)
        self._refill()
        if remaining is not None:
            self._tokens = min(self._tokens, float(remaining))
            if remaining < 1 and reset_after is not None and reset_after > 0:
                self.pause(reset_after)


class Budgets:
    """The per-process registry of budgets, one per ``RateScope.key``.

    Adapters and streamers share one instance. ``acquire(scopes)`` waits for every scope a call
    consumes; ``pause`` is what a 429 does; ``observe`` feeds rate-limit headers. ``overrides``
    maps a key prefix (e.g. ``"slack:"`` or a full key) to a ``(per_second, burst)`` pair that
    replaces what a surface declares, for deployments whose limits differ from the published ones.
    """

    def __init__(
        self,
        *,
        now: Clock = time.monotonic,
        sleep: Sleeper = asyncio.sleep,
        overrides: dict[str, tuple[float, int]] | None = None,
    ) -> None:
        self._now = now
        self._sleep = sleep
        self._budgets: dict[str, Budget] = {}
        self._overrides = dict(overrides or {})

    def budget(self, scope: RateScope) -> Budget:
        """The budget of ``scope.key``, created from the first declaration of that key."""
        found = self._budgets.get(scope.key)
        if found is None:
            for prefix, (per_second, burst) in sorted(
                self._overrides.items(), key=lambda item: -len(item[0])
            ):
                if scope.key.startswith(prefix):
                    scope = RateScope(scope.key, per_second, burst)
                    break
            found = Budget(scope, now=self._now, sleep=self._sleep)
            self._budgets[scope.key] = found
        return found

    def get(self, key: str) -> Budget | None:
        """The budget of ``key`` if any call declared it yet."""
        return self._budgets.get(key)

    async def acquire(self, scopes: Iterable[RateScope]) -> None:
        """Wait until one call may go in every scope, consuming one token of each.

        Scopes are taken in key order so two calls needing the same pair never hold one each.
        """
        for scope in sorted(set(scopes), key=lambda s: s.key):
            await self.budget(scope).acquire()

    def pause(self, key: str, seconds: float) -> None:
        """A 429 on ``key``: every reply in the scope waits ``seconds``."""
        budget = self._budgets.get(key)
        if budget is not None:
            budget.pause(seconds)

    def observe(
        self,
        key: str,
        *,
        remaining: float | None = None,
        reset_after: float | None = None,
        limit: int | None = None,
        window: float | None = None,
    ) -> None:
        """Feed the platform's rate-limit headers for ``key`` (see ``Budget.observe``)."""
        budget = self._budgets.get(key)
        if budget is not None:
            budget.observe(remaining=remaining, reset_after=reset_after, limit=limit, window=window)
