"""The one retry policy for provider requests (tenacity).

Transient failures are retried up to ``MAX_RETRY_ATTEMPTS`` attempts in all, waiting
``min(cap, base * 2**n)`` with full jitter, or the server's Retry-After when it gave one (bounded
by ``max_retry_after``). Permanent failures are never retried. The SDK clients are built with
``max_retries=0`` so that this is the only layer that retries.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    AttemptManager,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)

from core.errors import TransientProviderError

#: Longest backoff wait between attempts, seconds (ARCHITECTURE: min(5 s, base * 2^n)).
BACKOFF_CAP_SECONDS = 5.0
#: First backoff wait, seconds.
BACKOFF_BASE_SECONDS = 0.5
#: Longest Retry-After honoured; a server asking for more is waited on this long, then retried.
MAX_RETRY_AFTER_SECONDS = 30.0

#: Called before each wait with (attempt that failed, seconds to wait, its error).
OnRetry = Callable[[int, float, TransientProviderError], Awaitable[None]]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry transient provider failures."""

    max_attempts: int = 4
    base: float = BACKOFF_BASE_SECONDS
    cap: float = BACKOFF_CAP_SECONDS
    max_retry_after: float = MAX_RETRY_AFTER_SECONDS
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    random: Callable[[], float] = random.random

    def wait_seconds(self, failed_attempt: int, error: BaseException | None) -> float:
        """The wait after ``failed_attempt`` (1-based) failed with ``error``."""
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None and retry_after >= 0:
            return min(float(retry_after), self.max_retry_after)
        ceiling = min(self.cap, self.base * 2.0 ** (failed_attempt - 1))
        # Full jitter, but never less than half the step, so waits still grow.
        return ceiling / 2 + self.random() * ceiling / 2

    async def attempts(self, on_retry: OnRetry | None = None) -> AsyncIterator[AttemptManager]:
        """Iterate attempts: ``async for attempt in policy.attempts(): with attempt: ...``.

        The last failure is re-raised as itself when attempts run out.
        """

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            return self.wait_seconds(state.attempt_number, error)

        async def before_sleep(state: RetryCallState) -> None:
            if on_retry is None or state.outcome is None or state.next_action is None:
                return
            error = state.outcome.exception()
            assert isinstance(error, TransientProviderError)
            await on_retry(state.attempt_number, state.next_action.sleep, error)

        retrying = AsyncRetrying(
            sleep=self.sleep,
            stop=stop_after_attempt(self.max_attempts),
            wait=wait,
            retry=retry_if_exception_type(TransientProviderError),
            before_sleep=before_sleep,
            reraise=True,
        )
        async for attempt in retrying:
            yield attempt
