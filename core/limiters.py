"""The shared limiters behind ``Budgets``: Redis and PostgreSQL, and the factory that picks one.

``core/ratelimit.py`` paces calls in a process and defines the ``SharedLimiter`` seam; this module
holds its two implementations. Both run GCRA (the theoretical arrival time of the next call) on
the backend's own clock, so processes on different hosts agree: Redis with a Lua script per take
(``REDIS_URL``), PostgreSQL with one atomic statement per take through ``ConversationStore``
(the only code that speaks SQL). ``budgets_for`` picks Redis when ``REDIS_URL`` is set, else
PostgreSQL when the store is on it, else none (SQLite serves one process).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Protocol

from core.errors import ConfigError
from core.ratelimit import (
    SHARED_CALL_TIMEOUT_SECONDS,
    SHARED_EPSILON,
    Budgets,
    Clock,
    SharedLimiter,
    Sleeper,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from core.config import Settings

log = logging.getLogger(__name__)

#: Redis keys of the shared buckets start with this (one hash per rate-limit scope).
REDIS_KEY_PREFIX = "threadbot:rate:"
#: A Redis bucket outlives its last effect by this much, then expires (nothing accumulates).
REDIS_TTL_MARGIN_SECONDS = 60.0
#: PostgreSQL rows of scopes idle this long are deleted, at most once per this period too.
STORE_PRUNE_SECONDS = 3600.0


class RateBudgetStore(Protocol):
    """What ``StoreLimiter`` needs of ``core.store.ConversationStore`` (which speaks the SQL)."""

    is_postgres: bool

    async def take_rate_token(self, key: str, per_second: float, burst: int) -> float: ...

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
