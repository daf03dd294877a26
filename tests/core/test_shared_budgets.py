"""Budgets shared across processes: the real PostgreSQL and the real Redis, two instances each.

Each pair of ``Budgets`` stands for two processes: its own store (connection pool) or its own
Redis client. Timing assertions only bound how *fast* calls may go (a slow machine only makes
them pass more easily), with generous rates and counts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from core.bot import FrontDoor, PlatformProfile
from core.commands import HelpStyle
from core.config import Settings
from core.conversation import ConversationKey, IncomingMessage
from core.engine import ChatEngine
from core.limiters import (
    SHARED_CALL_TIMEOUT_SECONDS,
    SHARED_RETRY_SECONDS,
    RedisLimiter,
    SharedLimiter,
    StoreLimiter,
    budgets_for,
)
from core.providers.offline import OfflineProvider
from core.ratelimit import Budgets, RateScope
from core.store import ConversationStore
from tests.fake_platform import FAKE_NATIVE, FakeAppendSurface, Platform, run_virtual

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: The shared scope of most tests: 20 calls a second, one at a time.
RATE = 20.0


def _redis_url() -> str:
    return os.environ.get("TEST_REDIS_URL", DEFAULT_REDIS_URL)


@pytest.fixture
def redis_url() -> str:
    """The test Redis; skips with the reason when unreachable (fails when CI is set)."""
    import redis

    url = _redis_url()
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except Exception as error:
        if os.environ.get("CI"):
            pytest.fail(f"Redis must be reachable on CI ({url}): {error}")
        pytest.skip(f"Redis not reachable at {url} ({error}); set TEST_REDIS_URL")
    finally:
        client.close()
    return url


MakeLimiter = Callable[[], Awaitable[SharedLimiter]]


@dataclass
class Backend:
    """Independent limiters on one shared backend, and a key no other test uses."""

    name: str
    make: MakeLimiter
    key: str
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


@pytest.fixture(params=["postgres", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    tag = uuid.uuid4().hex[:10]
    key = f"test:{tag}:chat.update"
    closers: list[Callable[[], Awaitable[None]]] = []
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        stores: list[ConversationStore] = []

        async def make() -> SharedLimiter:
            store = await ConversationStore.open(url)
            stores.append(store)
            return StoreLimiter(store)

        yield Backend("postgres", make, key, closers)
        for store in stores:
            async with store.engine.begin() as conn:
                await conn.execute(text("DELETE FROM rate_budgets WHERE key = :k"), {"k": key})
            await store.close()
    else:
        redis_url: str = request.getfixturevalue("redis_url")
        prefix = f"threadbot-test:{tag}:"
        limiters: list[RedisLimiter] = []

        async def make() -> SharedLimiter:
            limiter = RedisLimiter(Redis.from_url(redis_url), prefix=prefix)
            limiters.append(limiter)
            return limiter

        yield Backend("redis", make, key, closers)
        cleaner = Redis.from_url(redis_url)
        async for name in cleaner.scan_iter(match=prefix + "*"):
            await cleaner.delete(name)
        await cleaner.aclose()
        for limiter in limiters:
            await limiter.aclose()


async def grants(budgets: Budgets, scope: RateScope, count: int, into: list[float]) -> None:
    for _ in range(count):
        await budgets.acquire([scope])
        into.append(time.monotonic())


def most_in_any_window(times: list[float], window: float) -> int:
    ordered = sorted(times)
    return max(sum(1 for t in ordered[i:] if t < start + window) for i, start in enumerate(ordered))


async def test_two_processes_together_stay_within_the_rate(backend: Backend) -> None:
    a = Budgets(shared=await backend.make())
    b = Budgets(shared=await backend.make())
    scope = RateScope(backend.key, RATE, 1)
    times: list[float] = []
    # Two replies in each process, twelve calls each process.
    await asyncio.gather(
        grants(a, scope, 6, times),
        grants(a, scope, 6, times),
        grants(b, scope, 6, times),
        grants(b, scope, 6, times),
    )
    assert len(times) == 24
    assert a.get(backend.key) is not None and b.get(backend.key) is not None
    assert a.get(backend.key).granted == b.get(backend.key).granted == 12  # type: ignore[union-attr]
    # Alone, each process would go at RATE: 24 calls in ~0.55 s, ~20 in any half second.
    # Together at RATE: 23 gaps of 1/RATE at least; one call of slack for network jitter.
    assert max(times) - min(times) >= (24 - 1) / RATE - 0.1
    assert most_in_any_window(times, 0.5) <= 0.5 * RATE + 2


async def test_the_shared_bucket_holds_its_burst_then_the_rate(backend: Backend) -> None:
    a, b = await backend.make(), await backend.make()
    # One call every 10 s, three at once after a quiet spell.
    answers = [await a.take(backend.key, 0.1, 3) for _ in range(3)]
    wait = await b.take(backend.key, 0.1, 3)
    assert answers == [0.0, 0.0, 0.0]
    # The next slot is 10 s after the first call: the other process is told so.
    assert 9.0 < wait <= 10.0
    # Asking again takes nothing: the answer only shrinks with time.
    assert 9.0 < await a.take(backend.key, 0.1, 3) <= wait


async def test_a_pause_ends_with_one_call_then_the_rate(backend: Backend) -> None:
    a, b = await backend.make(), await backend.make()
    await a.pause(backend.key, 30.0)
    assert 29.0 < await b.take(backend.key, 0.1, 3) <= 30.0
    other = backend.key + ":short"
    await a.pause(other, 0.2)
    await asyncio.sleep(0.25)
    # A burst of 3 was idle, but after a pause one call goes, then the rate (10 s).
    assert await b.take(other, 0.1, 3) == 0.0
    assert 9.0 < await a.take(other, 0.1, 3) <= 10.0


@pytest.mark.parametrize("how", ["429", "headers"])
async def test_a_429_seen_by_one_process_holds_the_other(backend: Backend, how: str) -> None:
    a = Budgets(shared=await backend.make())
    b = Budgets(shared=await backend.make())
    scope = RateScope(backend.key, RATE, 1)
    await a.acquire([scope])
    await b.acquire([scope])
    started = time.monotonic()
    if how == "429":
        a.pause(backend.key, 0.5)
    else:
        a.observe(backend.key, remaining=0, reset_after=0.5)
    await a.flush()
    # B saw nothing itself: its own bucket would let the call go within one interval.
    budget = b.get(backend.key)
    assert budget is not None and budget.delay() <= 1 / RATE
    await b.acquire([scope])
    assert time.monotonic() - started >= 0.5 - 0.01


async def test_turns_inside_a_process_stay_first_come_first_served(backend: Backend) -> None:
    budgets = Budgets(shared=await backend.make())
    other = Budgets(shared=await backend.make())
    scope = RateScope(backend.key, 5 * RATE, 1)
    order: list[str] = []

    async def reply(name: str, budgets: Budgets) -> None:
        for _ in range(3):
            await budgets.acquire([scope])
            order.append(name)

    await asyncio.gather(
        *(reply(name, budgets) for name in "abc"), *(reply(name, other) for name in "XY")
    )
    assert [name for name in order if name in "abc"] == list("abcabcabc")
    assert [name for name in order if name in "XY"] == list("XYXYXY")


async def test_redis_buckets_expire_when_idle(redis_url: str) -> None:
    prefix = f"threadbot-test:{uuid.uuid4().hex[:10]}:"
    client = Redis.from_url(redis_url)
    limiter = RedisLimiter(client, prefix=prefix)
    try:
        assert await limiter.take("k", 1.0, 3) == 0.0
        await limiter.pause("p", 2.0)
        # Gone a minute after their last effect (TTL margin) plus the burst's tolerance.
        assert 0 < await client.pttl(prefix + "k") <= (60 + 3) * 1000
        assert 0 < await client.pttl(prefix + "p") <= (60 + 2) * 1000
    finally:
        await client.delete(prefix + "k", prefix + "p")
        await limiter.aclose()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SteppedClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


async def _limiter_down(kind: str) -> tuple[SharedLimiter, Callable[[], Awaitable[None]]]:
    port = _closed_port()
    if kind == "redis":
        redis_limiter = RedisLimiter.from_url(f"redis://127.0.0.1:{port}/0")
        return redis_limiter, redis_limiter.aclose
    store = ConversationStore(create_async_engine(f"postgresql+asyncpg://x@127.0.0.1:{port}/x"))
    return StoreLimiter(store), store.close


@pytest.mark.parametrize(("kind", "setting"), [("redis", "REDIS_URL"), ("pg", "DATABASE_URL")])
async def test_an_unreachable_backend_paces_in_the_process_with_one_warning(
    kind: str, setting: str, caplog: pytest.LogCaptureFixture
) -> None:
    limiter, close = await _limiter_down(kind)
    clock = SteppedClock()
    budgets = Budgets(now=clock, shared=limiter)
    scope = RateScope("down:chat.update", 1000.0, 10)
    caplog.set_level(logging.WARNING, logger="core.ratelimit")
    try:
        for _ in range(3):
            await asyncio.wait_for(budgets.acquire([scope]), timeout=SHARED_CALL_TIMEOUT_SECONDS)
            budgets.pause("down:chat.update", 0.0)
            await budgets.flush()
            # Past the retry interval: the backend is asked again, and fails again.
            clock.value += SHARED_RETRY_SECONDS + 1
    finally:
        await budgets.aclose()
        await close()
    budget = budgets.get(scope.key)
    assert budget is not None and budget.granted == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert setting in warnings[0]


class FlakyLimiter:
    """A shared limiter that fails while ``down``, hangs while ``hung``, else grants everything."""

    setting = "REDIS_URL"

    def __init__(self) -> None:
        self.down = False
        self.hung = False
        self.slow = 0.0
        self.takes = 0
        self.answered = 0
        self.closed = False

    async def take(self, key: str, per_second: float, burst: int) -> float:
        self.takes += 1
        if self.hung:
            await asyncio.Event().wait()
        await asyncio.sleep(self.slow)
        self.answered += 1
        if self.down:
            raise ConnectionError("connection refused")
        return 0.0

    async def available(self, key: str, per_second: float, burst: int) -> float:
        if self.down:
            raise ConnectionError("connection refused")
        return 0.0

    async def pause(self, key: str, seconds: float) -> None:
        if self.down:
            raise ConnectionError("connection refused")

    async def aclose(self) -> None:
        self.closed = True


def test_each_outage_is_warned_once_and_a_hung_backend_times_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="core.ratelimit")
    limiter = FlakyLimiter()

    async def main() -> tuple[list[float], list[int]]:
        loop = asyncio.get_running_loop()
        budgets = Budgets(now=loop.time, shared=limiter)
        scope = RateScope("flaky", 1000.0, 100)
        times, asked = [], []
        for state in ("up", "down", "down", "up", "hung", "hung", "up"):
            limiter.down = state == "down"
            limiter.hung = state == "hung"
            before = limiter.takes
            # Two calls in a row: after a failure the second does not ask the backend.
            await budgets.acquire([scope])
            await budgets.acquire([scope])
            times.append(loop.time())
            asked.append(limiter.takes - before)
            await asyncio.sleep(SHARED_RETRY_SECONDS)
        await budgets.aclose()
        await budgets.aclose()
        return times, asked

    times, asked = run_virtual(main())
    messages = [r.getMessage() for r in caplog.records]
    assert [("unavailable" in m, "again" in m) for m in messages] == [
        (True, False),  # down
        (False, True),  # up
        (True, False),  # hung: timed out
        (False, True),  # up
    ]
    assert asked == [2, 1, 1, 2, 1, 1, 2]
    # A hung backend costs one call the timeout, once per retry interval.
    gaps = [round(b - a - SHARED_RETRY_SECONDS, 6) for a, b in itertools.pairwise(times)]
    assert gaps == [0, 0, 0, SHARED_CALL_TIMEOUT_SECONDS, SHARED_CALL_TIMEOUT_SECONDS, 0]
    assert limiter.closed


def test_a_cancelled_caller_lets_the_backend_call_finish() -> None:
    limiter = FlakyLimiter()
    limiter.slow = 1.0

    async def main() -> None:
        budgets = Budgets(now=asyncio.get_running_loop().time, shared=limiter)
        scope = RateScope("slow", 10.0, 1)
        waiter = asyncio.create_task(budgets.acquire([scope]))
        await asyncio.sleep(0.5)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        # The caller left the queue at once; the command it sent still ran to its end, so a
        # Redis or database connection is never left halfway through one.
        budget = budgets.get("slow")
        assert budget is not None and budget.waiting == 0 and budget.granted == 0
        assert limiter.answered == 0
        await budgets.flush()
        assert limiter.answered == 1

    run_virtual(main())


async def test_budgets_for_picks_redis_then_postgres_then_the_process(
    postgres_url: str, redis_url: str, sqlite_url: str
) -> None:
    pg = await ConversationStore.open(postgres_url)
    lite = await ConversationStore.open(sqlite_url)
    try:
        on_redis = budgets_for(Settings.from_mapping({"REDIS_URL": redis_url}), pg)
        on_pg = budgets_for(Settings.from_mapping({}), pg)
        alone = budgets_for(Settings.from_mapping({}), lite)
        assert isinstance(on_redis.shared, RedisLimiter)
        assert isinstance(on_pg.shared, StoreLimiter)
        assert alone.shared is None
        for budgets in (on_redis, on_pg, alone):
            await budgets.acquire([RateScope(f"test:{uuid.uuid4().hex}", RATE, 1)])
            await budgets.aclose()
        with pytest.raises(RuntimeError, match="PostgreSQL"):
            await lite.take_rate_token("k", 1.0, 1)
    finally:
        await pg.close()
        await lite.close()


async def test_a_look_at_the_shared_bucket_takes_nothing(backend: Backend) -> None:
    a, b = await backend.make(), await backend.make()
    # Three calls at once, then one a minute.
    per_second, burst = 1 / 60, 3
    for _ in range(10):
        assert await b.available(backend.key, per_second, burst) == 0
    for _ in range(burst):
        assert await a.take(backend.key, per_second, burst) == 0
    waits = [await b.available(backend.key, per_second, burst) for _ in range(5)]
    # Empty for every process, by about a minute; looking again and again changed nothing.
    assert all(55 < wait <= 60 for wait in waits)
    assert await b.take(backend.key, per_second, burst) >= waits[-1] - 1


async def test_native_admission_asks_the_budgets_every_worker_shares(
    backend: Backend, settings: Settings
) -> None:
    """Worker A spent the chat.startStream burst: worker B answers with edits, not a stream that
    would start late and land out of order in the thread."""
    start = RateScope(f"{backend.key}:chat.startStream", 20 / 60, 3)
    stop = RateScope(f"{backend.key}:chat.stopStream", 20 / 60, 3)
    worker_a = Budgets(shared=await backend.make())
    worker_b = Budgets(shared=await backend.make())
    store = await ConversationStore.open(settings.database_url)
    # Tokens a little apart, as a model's: the reply shows progress while the answer comes.
    engine = ChatEngine(settings, store, OfflineProvider(settings, delay=0.01))
    profile = PlatformProfile(
        "fake", HelpStyle(prefix="/"), command_deadline=1.0, native=FAKE_NATIVE, native_mode="auto"
    )
    door = FrontDoor(settings, engine, profile, budgets=worker_b)
    platform = Platform()

    async def ask(thread: str) -> tuple[dict[str, int], list[str]]:
        """The platform calls of one answer, and the states its message went through."""
        surface = FakeAppendSurface(platform, start_scopes=(start,), stop_scopes=(stop,))
        before = dict(platform.calls)
        key = ConversationKey("fake", "T1", "C1", thread)
        result = await door.answer(IncomingMessage(key, "hello", "alice"), surface)
        assert surface.messages() == [result.text]
        calls = {k: n - before.get(k, 0) for k, n in platform.calls.items()}
        states = [text for _, id_, text in platform.log if id_ == surface.posted[0]]
        return {k: n for k, n in calls.items() if n}, states

    try:
        # Idle everywhere: B streams natively.
        calls, _ = await ask("1")
        assert calls["start"] == 1
        # A spends what is left of the burst, as its own three streams would.
        for _ in range(2):
            await worker_a.acquire([start])
        calls, states = await ask("2")
        # Edits, shown at once: not a stream queued behind A's until the answer is over.
        assert "start" not in calls and calls["post"] == 1 and calls["edit"] >= 1
        # The message showed something (the placeholder, or the first words on a busy machine)
        # long before the final text.
        assert len(states) >= 2 and states[0] != states[-1]
        # B's own budget was full all along: only the shared bucket knew.
        assert worker_b.budget(start).delay() == 0
    finally:
        await worker_a.aclose()
        await worker_b.aclose()
        await engine.close()
