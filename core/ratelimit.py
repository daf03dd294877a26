"""Pacing budgets: one token bucket per platform rate-limit scope, shared by every reply using it.

A ``Budgets`` registry lives for the whole process. Each ``RateScope.key`` (e.g. Slack's
``chat.update`` for one workspace, Discord's edit bucket for one channel) gets one ``Budget``:

- a token bucket refilled at the scope's published rate, holding at most ``burst`` calls;
- a FIFO queue of waiting callers, so concurrent replies are served in turn: a reply asks for one
  call at a time and queues again behind the others afterwards, which makes the sharing
  round-robin and starvation-free;
- urgent callers (a reply landing its final text, which the user is waiting for) queue ahead of
  the others, in the order they first queued; a queued caller can become urgent without losing
  its place (``Urgency``). After ``URGENT_STREAK_LIMIT`` urgent calls in a row the oldest
  ordinary caller goes, so ordinary callers still progress;
- a pause: a 429 (``pause``) or rate-limit headers saying the bucket is empty (``observe``) stop
  the whole scope until the platform's reset time, for every reply at once.

Clocks are injected (``now``, ``sleep``) so tests and benchmarks run in virtual time.

Several processes (Slack HTTP workers behind a load balancer, Discord processes) share the
platform's limits, so each budget can also take from a ``SharedLimiter``: one GCRA bucket per key
in Redis (``REDIS_URL``) or PostgreSQL (``DATABASE_URL``), which ``core.limiters.budgets_for``
picks. The turn
order (FIFO, urgent first) stays in the process; the shared bucket decides when the head of the
queue may go, and a 429 seen by any process pauses the scope for all. When the shared backend fails, calls are paced
in the process only (with one warning per outage): the limiter never blocks or fails a reply.
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from core.limiters import SharedGuard, SharedLimiter

log = logging.getLogger(__name__)

Clock = Callable[[], float]
# Float slack: a refill computed as 0.9999999999 tokens is a token (else a 1e-17 s sleep loops).
_EPSILON = 1e-9
Sleeper = Callable[[float], Awaitable[None]]
T = TypeVar("T")

#: Urgent calls granted in a row while ordinary callers wait, before the oldest of those goes:
#: final texts jump the queue, yet progress edits keep at least a fifth of a saturated scope.
URGENT_STREAK_LIMIT = 4
#: Tokens of a scope's burst that progress calls (intermediate edits) leave for urgent ones (at
#: most burst - 1): a few replies finishing together land their final texts at once instead of
#: waiting for the refill after progress edits spent the burst. Progress keeps the sustained
#: rate. Kept in the process only (the shared bucket is taken with the full burst: see Budget).
URGENT_RESERVE = 4


@dataclass(frozen=True, slots=True)
class RateScope:
    """A platform rate-limit scope a call consumes, with the platform's published rate.

    ``key`` names the scope as the platform really limits it (e.g. ``slack:T123:chat.update`` for a
    method per workspace, ``discord:channel:42:edit`` for a channel's edit bucket); every reply in
    the same scope shares one budget. ``per_second`` is the sustained rate, ``burst`` how many
    calls may go at once after a quiet spell.
    """

    key: str
    per_second: float
    burst: int = 1


@dataclass(eq=False, slots=True)
class _Waiter:
    """One caller queued for a budget; ``turn`` is set while it is the head of the queue."""

    urgent: bool
    #: When it queued (a per-budget count): the order among urgent callers.
    number: int
    #: A progress call: it leaves the budget's reserve for urgent calls (unless escalated).
    progress: bool = False
    turn: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when it is escalated: a progress head sleeping for the reserve wakes to go sooner.
    escalated: asyncio.Event = field(default_factory=asyncio.Event)


class Urgency:
    """Whether a call is urgent, which may become true while the call waits for its budgets.

    Pass one to ``Budgets.acquire(scopes, urgent=...)`` instead of a bool when the urgency can
    change during the wait (a reply's answer completes while its next edit is queued):
    ``escalate()`` then moves the queued call ahead of the ordinary ones, keeping its place
    among urgent calls by when it first queued (so a round-robin turn is not lost). Urgency
    never goes back down.
    """

    __slots__ = ("_queued", "urgent")

    def __init__(self, urgent: bool = False) -> None:
        self.urgent = urgent
        self._queued: dict[_Waiter, Budget] = {}

    def escalate(self) -> None:
        """Make the call urgent in the budget it waits for now and in those it waits for next."""
        if self.urgent:
            return
        self.urgent = True
        for waiter, budget in list(self._queued.items()):
            budget.escalate(waiter)


class Budget:
    """The token bucket and the queue (urgent callers first, FIFO otherwise) of one scope."""

    def __init__(
        self,
        scope: RateScope,
        *,
        now: Clock,
        sleep: Sleeper,
        shared: SharedGuard | None = None,
    ) -> None:
        if scope.per_second <= 0 or scope.burst < 1:
            raise ValueError(f"rate scope {scope.key!r} needs per_second > 0 and burst >= 1")
        self.key = scope.key
        self.per_second = scope.per_second
        self.burst = scope.burst
        self._now = now
        self._sleep = sleep
        self._shared = shared
        self._tokens = float(scope.burst)
        self._stamp = now()
        self._paused_until = -math.inf
        # What the platform's headers said is left in its window (Discord's fixed windows): no
        # more calls than that until the window resets, whatever the local refill says.
        self._cap = math.inf
        self._cap_until = -math.inf
        self._urgent: deque[_Waiter] = deque()
        self._ordinary: deque[_Waiter] = deque()
        self._numbers = itertools.count()
        # The caller whose turn it is (its ``turn`` is set): it waits for a token, then goes.
        self._head: _Waiter | None = None
        # The head while it asks the shared limiter.
        self._asking: _Waiter | None = None
        # Urgent calls granted in a row while ordinary callers waited.
        self._streak = 0
        self.granted = 0
        # Calls announced but not queued yet (``Budgets.hold``): the scope is not idle.
        self.held = 0

    @property
    def waiting(self) -> int:
        """How many callers are queued for this scope."""
        return len(self._urgent) + len(self._ordinary)

    def _refill(self) -> None:
        now = self._now()
        if now > self._stamp:
            self._tokens = min(
                float(self.burst), self._tokens + (now - self._stamp) * self.per_second
            )
            self._stamp = now
        if now < self._cap_until:
            self._tokens = min(self._tokens, self._cap)

    @property
    def reserve(self) -> int:
        """Tokens a progress call leaves in the bucket for urgent ones (part of the burst)."""
        return max(0, min(self.burst - 1, URGENT_RESERVE))

    def delay(self, reserve: float = 0) -> float:
        """Seconds until one call may go leaving ``reserve`` tokens (0: now), ignoring the queue."""
        self._refill()
        now = self._now()
        wait = self._paused_until - now
        needed = 1 + reserve
        if self._tokens < needed - _EPSILON:
            # While paused, _stamp sits at the pause's end, so the refill starts from there.
            wait = max(wait, (self._stamp - now) + (needed - self._tokens) / self.per_second)
            if now < self._cap_until and self._cap < needed - _EPSILON:
                # The platform's window has no more to give before it resets.
                wait = max(wait, self._cap_until - now)
        return wait if wait > _EPSILON else 0.0

    async def acquire(self, *, urgent: bool | Urgency = False, progress: bool = False) -> None:
        """Wait for this caller's turn and for a token, then consume it.

        ``urgent`` callers go before the others, in the order they queued; after
        ``URGENT_STREAK_LIMIT`` urgent grants in a row, the oldest other caller goes next. An
        ``Urgency`` may escalate while the caller waits. ``progress`` callers (intermediate
        edits) leave ``reserve`` tokens of the burst for urgent ones; the others may spend all
        of it. With a shared limiter, the head of the queue also takes from the shared bucket
        (every process's calls) before it goes, asking again after the wait it is told.
        """
        urgency = urgent if isinstance(urgent, Urgency) else None
        waiter = _Waiter(urgency.urgent if urgency else bool(urgent), next(self._numbers), progress)
        (self._urgent if waiter.urgent else self._ordinary).append(waiter)
        if urgency is not None:
            urgency._queued[waiter] = self
        self._hand_turn()
        try:
            while True:
                await waiter.turn.wait()
                if self._head is not waiter:
                    # Overtaken between being woken and running: the turn is cleared again.
                    continue
                wait = self.delay(self.reserve if waiter.progress and not waiter.urgent else 0)
                if wait <= 0 and self._shared is not None:
                    # A call the shared bucket grants must go: nobody overtakes it meanwhile.
                    self._asking = waiter
                    try:
                        wait = await self._shared.take(self.key, self.per_second, self.burst)
                    finally:
                        self._asking = None
                    if wait > 0:
                        self._hand_turn()
                if wait <= 0:
                    break
                # Re-check after sleeping: a 429 or a header may have moved the goalposts, and
                # an overtaken head finds its turn cleared and waits for it again.
                await self._doze(waiter, wait)
        except BaseException:
            self._leave(waiter)
            raise
        finally:
            if urgency is not None:
                del urgency._queued[waiter]
        self._tokens = max(0.0, self._tokens - 1)
        self._cap = max(0.0, self._cap - 1)
        self.granted += 1
        if not waiter.urgent:
            self._streak = 0
        elif self._ordinary:
            self._streak += 1
        self._leave(waiter)

    async def _doze(self, waiter: _Waiter, seconds: float) -> None:
        """Sleep ``seconds``; a progress caller wakes early if escalated (no reserve to wait for
        any more)."""
        if waiter.urgent or not waiter.progress:
            await self._sleep(seconds)
            return
        sleeping = asyncio.ensure_future(self._sleep(seconds))
        escalated = asyncio.ensure_future(waiter.escalated.wait())
        try:
            await asyncio.wait((sleeping, escalated), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            escalated.cancel()

    def escalate(self, waiter: _Waiter) -> None:
        """Move a queued ordinary caller among the urgent ones, by when it first queued."""
        if waiter.urgent:
            return
        self._ordinary.remove(waiter)
        waiter.urgent = True
        waiter.escalated.set()
        place = next(
            (i for i, other in enumerate(self._urgent) if other.number > waiter.number),
            len(self._urgent),
        )
        self._urgent.insert(place, waiter)
        self._hand_turn()

    def _next(self) -> _Waiter | None:
        """Who should go next: urgent callers first, unless their streak is spent."""
        if self._urgent and (not self._ordinary or self._streak < URGENT_STREAK_LIMIT):
            return self._urgent[0]
        return self._ordinary[0] if self._ordinary else None

    def _hand_turn(self) -> None:
        """Give the turn to ``_next()``; a head asking the shared limiter keeps it meanwhile.

        A head sleeping until its token finds its turn cleared when it wakes and waits again;
        the new head computes its own wait (an urgent caller's is shorter: no reserve).
        """
        chosen = self._next()
        head = self._head
        if chosen is head or (head is not None and head is self._asking):
            return
        if head is not None:
            head.turn.clear()
        self._head = chosen
        if chosen is not None:
            chosen.turn.set()

    def _leave(self, waiter: _Waiter) -> None:
        (self._urgent if waiter.urgent else self._ordinary).remove(waiter)
        if self._head is waiter:
            self._head = None
        self._hand_turn()

    def spent_now(self) -> None:
        """The token granted earlier is spent only now (a call that waited for another scope
        after this one's grant): the platform's bucket, full meanwhile, refilled nothing, so
        neither does this one."""
        self._refill()
        self._tokens = min(self._tokens, self.burst - 1)

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
        ``X-RateLimit-Remaining`` / ``X-RateLimit-Reset-After``): no more go before then, even
        if the sustained rate would refill more; ``limit`` calls per ``window`` seconds, when the
        platform states both, replace the configured rate and burst.
        """
        if limit is not None and window is not None and limit >= 1 and window > 0:
            self.per_second = limit / window
            self.burst = int(limit)
        self._refill()
        if remaining is not None:
            self._tokens = min(self._tokens, float(remaining))
            if reset_after is not None and reset_after > 0:
                if remaining < 1:
                    self.pause(reset_after)
                else:
                    self._cap = float(remaining)
                    self._cap_until = self._now() + reset_after


def _slowest_first(budget: Budget) -> tuple[float, str]:
    return (budget.per_second, budget.key)


def override_matches(pattern: str, key: str) -> bool:
    """Whether a rate-limit override ``pattern`` applies to scope ``key``.

    A pattern with ``*`` is a glob (``slack:*:chat.update``: that method in every workspace);
    one without is a key prefix (``discord:`` covers every Discord scope).
    """
    if "*" in pattern:
        return fnmatch.fnmatchcase(key, pattern)
    return key.startswith(pattern)


class Budgets:
    """The per-process registry of budgets, one per ``RateScope.key``.

    Adapters and streamers share one instance. ``acquire(scopes)`` waits for every scope a call
    consumes; ``pause`` is what a 429 does; ``observe`` feeds rate-limit headers. ``overrides``
    maps a key pattern (``override_matches``: a prefix such as ``"slack:"``, or a glob such as
    ``"slack:*:chat.update"``) to a ``(per_second, burst)`` pair that replaces what a surface
    declares, for deployments whose limits differ from the published ones (``RATE_LIMITS``).
    ``shared`` makes every budget also take from buckets shared with other processes (see
    ``SharedLimiter``; ``budgets_for`` picks one from the settings); ``aclose()`` releases it.
    """

    def __init__(
        self,
        *,
        now: Clock = time.monotonic,
        sleep: Sleeper = asyncio.sleep,
        overrides: dict[str, tuple[float, int]] | None = None,
        shared: SharedLimiter | None = None,
    ) -> None:
        self._now = now
        self._sleep = sleep
        self._budgets: dict[str, Budget] = {}
        self._overrides = dict(overrides or {})
        self._shared = SharedGuard(shared, now=now) if shared is not None else None

    @property
    def shared(self) -> SharedLimiter | None:
        """The limiter shared with other processes, if any."""
        return self._shared.limiter if self._shared is not None else None

    def budget(self, scope: RateScope) -> Budget:
        """The budget of ``scope.key``, created from the first declaration of that key."""
        found = self._budgets.get(scope.key)
        if found is None:
            # The most specific pattern wins: the longest one that matches.
            for pattern, (per_second, burst) in sorted(
                self._overrides.items(), key=lambda item: -len(item[0])
            ):
                if override_matches(pattern, scope.key):
                    scope = RateScope(scope.key, per_second, burst)
                    break
            found = Budget(scope, now=self._now, sleep=self._sleep, shared=self._shared)
            self._budgets[scope.key] = found
        return found

    def get(self, key: str) -> Budget | None:
        """The budget of ``key`` if any call declared it yet."""
        return self._budgets.get(key)

    async def acquire(
        self,
        scopes: Iterable[RateScope],
        *,
        urgent: bool | Urgency = False,
        progress: bool = False,
    ) -> None:
        """Wait until one call may go in every scope, consuming one token of each.

        Scopes are taken one after the other, the slowest (lowest rate) first; a token taken
        before a wait in a later scope counts as spent when the call goes (``Budget.spent_now``),
        so the platform, which sees the call only then, never finds that scope over its limit.
        ``urgent`` puts the call ahead of the others in every scope (see ``Budget.acquire``):
        for calls a user is waiting on, such as the one that lands a reply's final text; an
        ``Urgency`` can be escalated while the call waits, without losing its place.
        ``progress`` marks a call that only refreshes what is already shown (an intermediate
        edit): it leaves part of each burst (``Budget.reserve``) for urgent calls.
        """
        granted: list[tuple[Budget, float]] = []
        # The slowest scope first: the wait for a later one is then short, and the earlier
        # token, granted before that wait, is marked spent when the call really goes.
        budgets = sorted({self.budget(scope) for scope in scopes}, key=_slowest_first)
        for budget in budgets:
            await budget.acquire(urgent=urgent, progress=progress)
            granted.append((budget, self._now()))
        now = self._now()
        for budget, at in granted:
            if at < now:
                # It waited in a later scope: this token is spent when the call goes, now.
                budget.spent_now()

    async def idle(self, scopes: Iterable[RateScope], *, progress: bool = False) -> bool:
        """Whether a call in every scope could go now without queueing: nobody waits for it in
        this process (nor announced one, ``hold``), its own bucket has a token, and the bucket
        shared with other processes (if any) has one too. ``progress``: whether a progress call
        would go now, leaving the scope's reserve for urgent calls. Takes nothing."""
        budgets = [self.budget(scope) for scope in set(scopes)]
        if any(
            budget.waiting or budget.held or budget.delay(budget.reserve if progress else 0)
            for budget in budgets
        ):
            return False
        if self._shared is None:
            return True
        shared = self._shared
        waits = await asyncio.gather(
            *(shared.available(b.key, b.per_second, b.burst) for b in budgets)
        )
        return not any(waits)

    def delay(self, scopes: Iterable[RateScope], *, progress: bool = False) -> float:
        """Seconds until a call in every scope could go as far as this process's buckets tell
        (0: now; ``progress`` leaves the reserve), ignoring queues and other processes. Takes
        nothing: a hint for when to look again (``idle``)."""
        return max(
            (
                budget.delay(budget.reserve if progress else 0)
                for budget in (self.budget(scope) for scope in set(scopes))
            ),
            default=0.0,
        )

    def hold(self, scopes: Iterable[RateScope]) -> Callable[[], None]:
        """Announce a call about to queue in ``scopes``: ``idle`` answers False for them until
        the returned release is called (once; later calls do nothing). A reply that decided to
        stream by edits holds its edit scopes until its first edit is granted, so replies
        deciding at the same moment do not all count on the same idle bucket."""
        budgets = [self.budget(scope) for scope in set(scopes)]
        for budget in budgets:
            budget.held += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                for budget in budgets:
                    budget.held -= 1

        return release

    def pause(self, key: str, seconds: float) -> None:
        """A 429 on ``key``: every reply in the scope waits ``seconds``, in every process."""
        budget = self._budgets.get(key)
        if budget is not None:
            budget.pause(seconds)
        if self._shared is not None:
            self._shared.pause(key, seconds)

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
        if (
            self._shared is not None
            and remaining is not None
            and remaining < 1
            and reset_after is not None
            and reset_after > 0
        ):
            # The platform's bucket is the bot's, not this process's: empty for everyone.
            self._shared.pause(key, reset_after)

    async def flush(self) -> None:
        """Wait until every call to the shared limiter so far has finished (tests, shutdown)."""
        if self._shared is not None:
            await self._shared.flush()

    async def aclose(self) -> None:
        """Release the shared limiter (its Redis client); budgets then pace in the process only.

        Safe to call more than once.
        """
        if self._shared is not None and not self._shared.closed:
            await self._shared.aclose()
