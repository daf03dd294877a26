"""A simulated chat platform on virtual time, for streaming tests and the streaming benchmark.

``VirtualTimeLoop`` is an asyncio event loop on virtual time; ``FakeSurface`` is an in-memory
``ReplySurface`` (and ``AppendReplySurface``) that enforces its rate limits like a platform (429
with Retry-After), its character limit, a call latency, and injected faults.

The loop: ``loop.time()`` only moves when every task is waiting: the selector, instead of blocking for
``timeout`` seconds, adds ``timeout`` to the virtual clock. So ``asyncio.sleep(60)`` returns at
once yet ``loop.time()`` says a minute passed, and timers fire in exactly the real order.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import selectors
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from core.errors import PermanentSurfaceError, SurfaceRateLimited, TransientSurfaceError
from core.ratelimit import RateScope
from core.streaming import NativeStreams

T = TypeVar("T")


class _VirtualSelector(selectors.SelectSelector):
    """Polls real file descriptors without waiting, and advances the virtual clock instead."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if not ready:
            if timeout is None:
                raise RuntimeError("virtual time deadlock: every task waits and no timer is set")
            self.clock += timeout
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose clock is virtual (see the module docstring)."""

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(selector=self._virtual)

    def time(self) -> float:
        return self._virtual.clock


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh virtual-time loop."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()


class ServerBucket:
    """The platform's own token bucket for one scope: what decides a 429."""

    def __init__(self, scope: RateScope, now: float) -> None:
        self.rate = scope.per_second
        self.burst = scope.burst
        self.tokens = float(scope.burst)
        self.stamp = now

    def take(self, now: float) -> float:
        """Consume a token and return 0, or return the seconds until one is available."""
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1 - 1e-9:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class Platform:
    """Shared server state: buckets per scope key, every message, counters, a visibility log."""

    latency: float = 0.0
    whole_second_retry_after: bool = False
    #: One entry per call, consumed in order: None (normal), "429", "500", "gone".
    faults: Iterator[str | None] = field(default_factory=lambda: iter(()))
    buckets: dict[str, ServerBucket] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    log: list[tuple[float, str, str]] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    rate_limited: int = 0
    ids: Iterator[int] = field(default_factory=itertools.count)

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def call(self, kind: str, scopes: tuple[RateScope, ...]) -> None:
        """Half the latency to arrive, the checks, then the other half back."""
        self.calls[kind] = self.calls.get(kind, 0) + 1
        await asyncio.sleep(self.latency / 2)
        fault = next(self.faults, None)
        if fault == "500":
            await asyncio.sleep(self.latency / 2)
            raise TransientSurfaceError("fake 500")
        now = self.now()
        waits = []
        for scope in scopes:
            bucket = self.buckets.get(scope.key)
            if bucket is None:
                bucket = self.buckets[scope.key] = ServerBucket(scope, now)
            waits.append((bucket.take(now), scope.key))
        wait, key = max(waits)
        if fault == "429" and wait == 0:
            wait = 1.0
        if wait > 0:
            self.rate_limited += 1
            await asyncio.sleep(self.latency / 2)
            retry_after = math.ceil(wait) if self.whole_second_retry_after else wait
            raise SurfaceRateLimited("fake 429", retry_after=retry_after, scope=key)
        if fault == "gone":
            raise PermanentSurfaceError("fake message_not_found", code="message_not_found")

    async def back(self) -> None:
        await asyncio.sleep(self.latency / 2)


class FakeSurface:
    """An in-memory ``ReplySurface`` over a ``Platform``; set ``native=True`` for append streams."""

    def __init__(
        self,
        platform: Platform,
        *,
        max_chars: int = 4000,
        post_scopes: tuple[RateScope, ...] = (RateScope("post", 1.0, 1),),
        edit_scopes: tuple[RateScope, ...] = (RateScope("edit", 1.0, 5),),
        render: Callable[[str], str] = lambda text: text,
        typing: bool = False,
    ) -> None:
        self.platform = platform
        self.max_chars = max_chars
        # Whether the platform has a typing indicator (Discord) or not (Slack).
        self.typing = typing
        self.typing_calls = 0
        self._scopes = {"post": post_scopes, "edit": edit_scopes}
        self._render = render
        self.posted: list[str] = []

    def render(self, text: str) -> str:
        return self._render(text)

    def scopes(self, call: str) -> tuple[RateScope, ...]:
        return self._scopes[call]

    def _check(self, text: str) -> None:
        if text == "" or len(text) > self.max_chars:
            raise PermanentSurfaceError(f"fake: bad text length {len(text)}", code="msg_too_long")

    async def post(self, text: str) -> str:
        self._check(text)
        await self.platform.call("post", self.scopes("post"))
        message_id = str(next(self.platform.ids))
        self.posted.append(message_id)
        self.platform.texts[message_id] = text
        self.platform.log.append((self.platform.now(), message_id, text))
        await self.platform.back()
        return message_id

    async def edit(self, message_id: str, text: str) -> None:
        self._check(text)
        await self.platform.call("edit", self.scopes("edit"))
        self.platform.texts[message_id] = text
        self.platform.log.append((self.platform.now(), message_id, text))
        await self.platform.back()

    async def show_typing(self) -> bool:
        self.typing_calls += 1
        return self.typing

    def messages(self) -> list[str]:
        """The texts of this reply's messages as the platform shows them now."""
        return [self.platform.texts[message_id] for message_id in self.posted]


#: The fake platform's native streams: what it answers when it cannot stream, when a stream
#: ended, and how long streams may live.
FAKE_NATIVE = NativeStreams(
    unsupported_codes=frozenset({"method_not_supported_for_channel_type", "not_allowed"}),
    ended_code="stream_ended",
    max_age_seconds=270.0,
    per_scope=3,
)


class FakeAppendSurface(FakeSurface):
    """A ``FakeSurface`` with Slack-style native streams (start / append / stop)."""

    native_scope = "fake"

    def __init__(
        self,
        platform: Platform,
        *,
        refuse: str | None = None,
        lifetime: float = 300.0,
        stream_scopes: tuple[RateScope, ...] = (RateScope("stream", 2.0, 5),),
        start_scopes: tuple[RateScope, ...] | None = None,
        append_scopes: tuple[RateScope, ...] | None = None,
        stop_scopes: tuple[RateScope, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(platform, **kwargs)
        self.refuse = refuse
        self.lifetime = lifetime
        # One scope for every stream call unless a call has its own (Slack: Tier 2 start and
        # stop, Tier 4 append, each its own method limit).
        self._stream_scopes = {
            "start": start_scopes or stream_scopes,
            "append": append_scopes or stream_scopes,
            "stop": stop_scopes or stream_scopes,
        }
        self.live: dict[str, float] = {}

    def scopes(self, call: str) -> tuple[RateScope, ...]:
        if call in self._stream_scopes:
            return self._stream_scopes[call]
        return super().scopes(call)

    def _alive(self, message_id: str) -> None:
        started = self.live.get(message_id)
        if started is None or self.platform.now() - started > self.lifetime:
            self.live.pop(message_id, None)
            raise PermanentSurfaceError("fake: stream ended", code=FAKE_NATIVE.ended_code)

    async def start(self, text: str) -> str:
        if self.refuse is not None:
            raise PermanentSurfaceError("fake: no native streams here", code=self.refuse)
        await self.platform.call("start", self.scopes("start"))
        message_id = str(next(self.platform.ids))
        self.posted.append(message_id)
        self.live[message_id] = self.platform.now()
        self.platform.texts[message_id] = text
        self.platform.log.append((self.platform.now(), message_id, text))
        await self.platform.back()
        return message_id

    async def append(self, message_id: str, delta: str) -> None:
        await self.platform.call("append", self.scopes("append"))
        self._alive(message_id)
        self._check(self.platform.texts[message_id] + delta)
        self.platform.texts[message_id] += delta
        self.platform.log.append((self.platform.now(), message_id, self.platform.texts[message_id]))
        await self.platform.back()

    async def stop(self, message_id: str, delta: str) -> None:
        await self.platform.call("stop", self.scopes("stop"))
        self._alive(message_id)
        del self.live[message_id]
        self.platform.texts[message_id] += delta
        self.platform.log.append((self.platform.now(), message_id, self.platform.texts[message_id]))
        await self.platform.back()
