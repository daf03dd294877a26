"""Rate-limit buckets shared across processes: the ``SharedLimiter`` seam, its guard, its backends.

``core/ratelimit.py`` paces calls in a process; this module holds what several processes share:
the ``SharedLimiter`` seam, ``SharedGuard`` (which makes any limiter safe to call from a budget:
bounded, never raising) and the two implementations. Both run GCRA (the theoretical arrival time of the next call) on
the backend's own clock, so processes on different hosts agree: Redis with a Lua script per take
(``REDIS_URL``), PostgreSQL with one atomic statement per take through ``ConversationStore``
(the only code that speaks SQL). ``budgets_for`` picks Redis when ``REDIS_URL`` is set, else
PostgreSQL when the store is on it, else none (SQLite serves one process).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from core.errors import ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from core.config import Settings
    from core.ratelimit import Budgets, Clock, Sleeper

log = logging.getLogger(__name__)
T = TypeVar("T")

# A wait of a microsecond from a shared limiter is no wait (clock resolution of the backends).
SHARED_EPSILON = 1e-6
#: Longest a shared limiter may take to answer before the call is paced in the process only.
SHARED_CALL_TIMEOUT_SECONDS = 2.0
#: After a shared limiter failed, how long calls skip it before asking it again.
SHARED_RETRY_SECONDS = 5.0

#: Redis keys of the shared buckets start with this (one hash per rate-limit scope).
REDIS_KEY_PREFIX = "threadbot:rate:"
#: A Redis bucket outlives its last effect by this much, then expires (nothing accumulates).
REDIS_TTL_MARGIN_SECONDS = 60.0
#: PostgreSQL rows of scopes idle this long are deleted, at most once per this period too.
STORE_PRUNE_SECONDS = 3600.0


class SharedLimiter(Protocol):
    """Rate-limit buckets shared by every process of a deployment (the seam).

    ``take(key, per_second, burst)`` atomically takes one call from the bucket of ``key`` and
    returns 0, or takes nothing and returns the seconds to wait before asking again. The bucket
    holds at most ``burst`` calls and refills at ``per_second`` (GCRA: the theoretical arrival
    time, on the backend's own clock so processes on different hosts agree); callers pass the
    rate each time, so a rate learnt from headers applies at once. ``pause(key, seconds)`` stops
    the scope for every process (a 429's Retry-After): ``take`` answers the time left, and when
    the pause ends one call may go, then the rate. ``available(key, per_second, burst)`` answers
    what ``take`` would (0, or the seconds to wait) without taking anything: a look at the
    bucket every process shares. Implementations raise on backend failure;
    ``Budgets`` catches that and paces in the process. ``setting`` names the setting an operator
    checks when the backend fails. ``aclose()`` releases the connections the limiter owns.
    """

    setting: str

    async def take(self, key: str, per_second: float, burst: int) -> float: ...

    async def available(self, key: str, per_second: float, burst: int) -> float: ...

    async def pause(self, key: str, seconds: float) -> None: ...

    async def aclose(self) -> None: ...


class SharedGuard:
    """A ``SharedLimiter`` that never raises: failures pace in the process, logged once.

    Every backend call runs in its own task, bounded by ``SHARED_CALL_TIMEOUT_SECONDS``: a
    caller cancelled meanwhile (the streamer re-plans a queued call) leaves it to finish rather
    than cancelling a Redis command or SQL statement halfway, which can spoil the connection.
    """

    def __init__(self, limiter: SharedLimiter, *, now: Clock) -> None:
        self.limiter = limiter
        self._now = now
        self._skip_until = -math.inf
        self._outage = False
        self.closed = False
        self._pending: set[asyncio.Future[Any]] = set()

    def _usable(self) -> bool:
        return not self.closed and self._now() >= self._skip_until

    def _start(self, call: Awaitable[T]) -> asyncio.Future[T]:
        async def bounded() -> T:
            async with asyncio.timeout(SHARED_CALL_TIMEOUT_SECONDS):
                return await call

        task = asyncio.ensure_future(bounded())
        self._pending.add(task)
        task.add_done_callback(self._settled)
        return task

    def _settled(self, task: asyncio.Future[Any]) -> None:
        self._pending.discard(task)
        if task.cancelled():
            return
        error = task.exception()  # also marks it retrieved when nobody awaits the task
        if isinstance(error, Exception):
            self._failed(error)
        elif error is None:
            self._answered()

    async def take(self, key: str, per_second: float, burst: int) -> float:
        """Seconds to wait before asking again; 0 when the call may go (or the backend failed)."""
        if not self._usable():
            return 0.0
        try:
            wait = await asyncio.shield(self._start(self.limiter.take(key, per_second, burst)))
        except Exception:
            return 0.0  # logged by _settled
        # NaN or a negative answer is no reason to stop a reply.
        return wait if wait > SHARED_EPSILON and math.isfinite(wait) else 0.0

    async def available(self, key: str, per_second: float, burst: int) -> float:
        """Seconds a take would wait now, taking nothing; 0 when it would go (or the backend
        failed: then only the process's own budget can tell)."""
        if not self._usable():
            return 0.0
        try:
            call = self.limiter.available(key, per_second, burst)
            wait = await asyncio.shield(self._start(call))
        except Exception:
            return 0.0  # logged by _settled
        return wait if wait > SHARED_EPSILON and math.isfinite(wait) else 0.0

    def pause(self, key: str, seconds: float) -> None:
        """Tell every process about a 429, in a task (callers are synchronous)."""
        if not self._usable():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop: nothing to share with
        self._start(self.limiter.pause(key, seconds))

    async def flush(self) -> None:
        """Wait until every backend call started so far has finished (each is bounded)."""
        while self._pending:
            await asyncio.wait(list(self._pending))

    async def aclose(self) -> None:
        self.closed = True
        await self.flush()
        await self.limiter.aclose()

    def _failed(self, error: Exception) -> None:
        self._skip_until = self._now() + SHARED_RETRY_SECONDS
        if not self._outage:
            self._outage = True
            log.warning(
                "shared rate-limit budgets unavailable (%s: %s): pacing platform calls in this "
                "process only, so several processes may exceed the platform's limits; check %s",
                type(error).__name__,
                error or "no answer",
                self.limiter.setting,
            )

    def _answered(self) -> None:
        if self._outage:
            self._outage = False
            log.warning("shared rate-limit budgets (%s) answer again", self.limiter.setting)


class RateBudgetStore(Protocol):
    """What ``StoreLimiter`` needs of ``core.store.ConversationStore`` (which speaks the SQL)."""

    is_postgres: bool

    async def take_rate_token(self, key: str, per_second: float, burst: int) -> float: ...

    async def peek_rate_token(self, key: str, per_second: float, burst: int) -> float: ...

    async def pause_rate_scope(self, key: str, seconds: float) -> None: ...

    async def prune_rate_budgets(self, idle_seconds: float = ...) -> int: ...


class StoreLimiter:
    """Shared buckets in PostgreSQL: one atomic statement per take (see ``ConversationStore``).

    The store belongs to the engine: ``aclose`` leaves it open. Scopes idle for an hour are
    pruned, checked at most once an hour, so Discord's per-channel rows do not accumulate.
    """

    setting = "DATABASE_URL"

    def __init__(self, store: RateBudgetStore, *, now: Clock = time.monotonic) -> None:
        self._store = store
        self._now = now
        self._next_prune = now()

    async def take(self, key: str, per_second: float, burst: int) -> float:
        wait = await self._store.take_rate_token(key, per_second, burst)
        if self._now() >= self._next_prune:
            self._next_prune = self._now() + STORE_PRUNE_SECONDS
            try:
                await self._store.prune_rate_budgets(STORE_PRUNE_SECONDS)
            except Exception as error:
                # The take itself succeeded; a failed prune only leaves rows for the next one.
                log.warning("pruning idle shared rate-limit budgets failed: %s", error)
        return wait

    async def available(self, key: str, per_second: float, burst: int) -> float:
        return await self._store.peek_rate_token(key, per_second, burst)

    async def pause(self, key: str, seconds: float) -> None:
        await self._store.pause_rate_scope(key, seconds)

    async def aclose(self) -> None:
        return None


# KEYS[1]: the bucket's hash; ARGV: emission interval (1 / rate), tolerance ((burst - 1) *
# interval), epsilon, TTL margin. Redis's TIME is the clock, so processes on different hosts
# agree. Numbers travel as strings: Redis turns a Lua number reply into an integer.
_REDIS_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tat', 'paused_until')
local tat = tonumber(state[1]) or now
local paused = tonumber(state[2]) or 0
local base = math.max(tat, now, paused + tau)
local wait = base - tau - now
if wait > tonumber(ARGV[3]) then
  return string.format('%.6f', wait)
end
tat = base + interval
redis.call('HSET', KEYS[1], 'tat', string.format('%.6f', tat))
local last = math.max(tat, paused + tau)
redis.call('PEXPIRE', KEYS[1], math.ceil((last - now + tonumber(ARGV[4])) * 1000))
return '0'
"""
# KEYS[1]: the bucket's hash; ARGV: tolerance, epsilon. The take's arithmetic, writing nothing.
_REDIS_PEEK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tau = tonumber(ARGV[1])
local state = redis.call('HMGET', KEYS[1], 'tat', 'paused_until')
local tat = tonumber(state[1]) or now
local paused = tonumber(state[2]) or 0
local wait = math.max(tat, now, paused + tau) - tau - now
if wait > tonumber(ARGV[2]) then
  return string.format('%.6f', wait)
end
return '0'
"""
# KEYS[1]: the bucket's hash; ARGV: seconds to pause, TTL margin.
_REDIS_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tat', 'paused_until')
local paused = math.max(tonumber(state[2]) or 0, now + tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 'paused_until', string.format('%.6f', paused))
local last = math.max(tonumber(state[1]) or 0, paused)
redis.call('PEXPIRE', KEYS[1], math.ceil((last - now + tonumber(ARGV[2])) * 1000))
return '0'
"""


class RedisLimiter:
    """Shared buckets in Redis: a Lua script per take (GCRA on the server's clock).

    Each scope is one hash (``tat``, ``paused_until``) whose TTL ends a minute after its last
    effect, so idle scopes disappear. The limiter owns its client: ``aclose`` closes it.
    """

    setting = "REDIS_URL"

    def __init__(self, client: Redis, *, prefix: str = REDIS_KEY_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._take = client.register_script(_REDIS_TAKE)
        self._pause = client.register_script(_REDIS_PAUSE)
        self._peek = client.register_script(_REDIS_PEEK)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = REDIS_KEY_PREFIX) -> RedisLimiter:
        """A limiter on a new client for ``url`` (``redis://host:port/db``)."""
        try:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError as error:
            raise ConfigError(
                "REDIS_URL is set but the redis package is not installed: pip install redis",
                setting="REDIS_URL",
            ) from error
        client = Redis.from_url(
            url,
            socket_connect_timeout=SHARED_CALL_TIMEOUT_SECONDS,
            socket_timeout=SHARED_CALL_TIMEOUT_SECONDS,
            # One quick retry (a pooled connection Redis dropped); beyond that, pace locally.
            retry=Retry(NoBackoff(), 1),
        )
        return cls(client, prefix=prefix)

    async def take(self, key: str, per_second: float, burst: int) -> float:
        interval = 1.0 / per_second
        answer = await self._take(
            keys=[self.prefix + key],
            args=[
                repr(interval),
                repr((max(1, burst) - 1) * interval),
                repr(SHARED_EPSILON),
                repr(REDIS_TTL_MARGIN_SECONDS),
            ],
        )
        return max(0.0, float(answer))

    async def available(self, key: str, per_second: float, burst: int) -> float:
        interval = 1.0 / per_second
        answer = await self._peek(
            keys=[self.prefix + key],
            args=[repr((max(1, burst) - 1) * interval), repr(SHARED_EPSILON)],
        )
        return max(0.0, float(answer))

    async def pause(self, key: str, seconds: float) -> None:
        await self._pause(
            keys=[self.prefix + key], args=[repr(max(0.0, seconds)), repr(REDIS_TTL_MARGIN_SECONDS)]
        )

    async def aclose(self) -> None:
        await self.client.aclose()


def budgets_for(
    settings: Settings,
    store: RateBudgetStore | None = None,
    *,
    now: Clock = time.monotonic,
    sleep: Sleeper = asyncio.sleep,
    overrides: dict[str, tuple[float, int]] | None = None,
) -> Budgets:
    """The deployment's budgets: shared through Redis when REDIS_URL is set, else through
    PostgreSQL when ``store`` is on it, else paced in this process (SQLite: one process), with the
    ``RATE_LIMITS`` overrides of the published limits."""
    # Imported here: core.ratelimit builds on this module's SharedGuard.
    from core.ratelimit import Budgets

    shared: SharedLimiter | None
    if settings.redis_url:
        shared = RedisLimiter.from_url(settings.redis_url)
        log.info("rate-limit budgets shared across processes through Redis (REDIS_URL)")
    elif store is not None and store.is_postgres:
        shared = StoreLimiter(store)
        log.info("rate-limit budgets shared across processes through PostgreSQL (DATABASE_URL)")
    else:
        shared = None
    configured = {
        pattern: (per_second, burst) for pattern, per_second, burst in settings.rate_limits
    }
    return Budgets(
        now=now, sleep=sleep, overrides={**configured, **(overrides or {})}, shared=shared
    )
