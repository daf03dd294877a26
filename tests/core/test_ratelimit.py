"""Pacing budgets on virtual time: rate, burst, FIFO sharing, pauses and header feedback."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from core.config import Settings
from core.errors import ConfigError
from core.limiters import budgets_for
from core.ratelimit import URGENT_STREAK_LIMIT, Budgets, RateScope, Urgency
from tests.fake_platform import run_virtual

EDIT = RateScope("slack:T1:chat.update", per_second=50 / 60, burst=1)


async def grant_times(
    budgets: Budgets, scope: RateScope, count: int, *, urgent: bool = False
) -> list[float]:
    loop = asyncio.get_running_loop()
    times = []
    for _ in range(count):
        await budgets.acquire([scope], urgent=urgent)
        times.append(loop.time())
    return times


def test_calls_are_spaced_at_the_published_rate() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        return await grant_times(Budgets(now=loop.time), EDIT, 4)

    times = run_virtual(main())
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(times)]
    assert times[0] == 0
    assert gaps == [1.2, 1.2, 1.2]


def test_burst_goes_at_once_then_the_rate() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        return await grant_times(Budgets(now=loop.time), RateScope("b", 1.0, 3), 5)

    assert [round(t, 6) for t in run_virtual(main())] == [0, 0, 0, 1, 2]


def test_concurrent_callers_take_turns_in_arrival_order() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        budgets = Budgets(now=loop.time)
        order: list[str] = []

        async def reply(name: str) -> None:
            for _ in range(3):
                await budgets.acquire([EDIT])
                order.append(name)
                await asyncio.sleep(0.08)  # the call's latency

        await asyncio.gather(*(reply(name) for name in "abc"))
        return order

    assert run_virtual(main()) == list("abcabcabc")


def test_a_429_pauses_the_whole_scope() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        budgets = Budgets(now=loop.time)
        scope = RateScope("s", 10.0, 1)
        await budgets.acquire([scope])
        budgets.pause("s", 5.0)
        results = await asyncio.gather(
            grant_times(budgets, scope, 1), grant_times(budgets, scope, 1)
        )
        return sorted(t for times in results for t in times)

    assert [round(t, 6) for t in run_virtual(main())] == [5.0, 5.1]


def test_headers_saying_the_bucket_is_empty_pause_until_reset() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        budgets = Budgets(now=loop.time)
        scope = RateScope("discord:channel:1:edit", 1.0, 5)
        await budgets.acquire([scope])
        budgets.observe(scope.key, remaining=0, reset_after=4.0)
        await budgets.acquire([scope])
        return loop.time()

    assert run_virtual(main()) == 4.0


def test_calls_left_in_the_platform_window_cap_the_bucket_until_it_resets() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        budgets = Budgets(now=loop.time)
        scope = RateScope("discord:channel:2:edit", 1.0, 5)
        await budgets.acquire([scope])
        # A fixed window: two calls left for the next 4 s, though the rate would refill sooner.
        budgets.observe(scope.key, remaining=2, reset_after=4.0)
        return await grant_times(budgets, scope, 4, urgent=True)

    assert [round(t, 6) for t in run_virtual(main())] == [0.0, 0.0, 4.0, 4.0]


def test_headers_stating_the_limit_replace_the_configured_rate() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        budgets = Budgets(now=loop.time)
        scope = RateScope("k", 1.0, 1)
        budgets.budget(scope)
        budgets.observe("k", remaining=0, limit=10, window=2.0)
        return await grant_times(budgets, scope, 3)

    assert [round(t, 6) for t in run_virtual(main())] == [0.2, 0.4, 0.6]


def test_overrides_replace_published_figures_by_key_prefix() -> None:
    budgets = Budgets(overrides={"slack:": (2.0, 4)})
    budget = budgets.budget(EDIT)
    assert (budget.per_second, budget.burst) == (2.0, 4)


def test_rate_limits_setting_overrides_by_glob_most_specific_first() -> None:
    settings = Settings.from_mapping(
        {"RATE_LIMITS": "slack:=10/1/5, slack:*:chat.update=40/60/2, discord:bot=30/1/8"}
    )
    budgets = budgets_for(settings)
    update = budgets.budget(RateScope("slack:T9:chat.update", 50 / 60, 3))
    assert (round(update.per_second, 6), update.burst) == (round(40 / 60, 6), 2)
    post = budgets.budget(RateScope("slack:T9:chat.postMessage", 1.0, 1))
    assert (post.per_second, post.burst) == (10.0, 5)
    untouched = budgets.budget(RateScope("discord:channel:1:edit", 1.0, 5))
    assert (untouched.per_second, untouched.burst) == (1.0, 5)


@pytest.mark.parametrize("text", ["slack:=fast", "=1/1", "slack:=1/0", "slack:=1/1/0", "a=1/2/3/4"])
def test_malformed_rate_limits_name_the_setting(text: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_mapping({"RATE_LIMITS": text})
    assert raised.value.setting == "RATE_LIMITS"


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        budgets = Budgets(now=loop.time)
        scope = RateScope("c", 1.0, 1)
        await budgets.acquire([scope])
        waiter = asyncio.create_task(budgets.acquire([scope]))
        await asyncio.sleep(0.5)
        waiter.cancel()
        times = await grant_times(budgets, scope, 1)
        assert budgets.budget(scope).waiting == 0
        return times

    assert [round(t, 6) for t in run_virtual(main())] == [1.0]


def test_urgent_waiters_go_first_yet_waiting_ones_still_progress() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        budgets = Budgets(now=loop.time)
        scope = RateScope("u", 1.0, 1)
        order: list[str] = []

        async def call(name: str, urgent: bool) -> None:
            await budgets.acquire([scope], urgent=urgent)
            order.append(name)

        await budgets.acquire([scope])  # the bucket is empty: everyone below queues
        tasks = [asyncio.create_task(call(name, False)) for name in "abc"]
        await asyncio.sleep(0.1)
        # Far more urgent calls than the scope can serve before the others' turns.
        tasks += [
            asyncio.create_task(call(f"U{n}", True)) for n in range(2 * URGENT_STREAK_LIMIT + 2)
        ]
        await asyncio.gather(*tasks)
        return order

    order = run_virtual(main())
    urgent = [f"U{n}" for n in range(2 * URGENT_STREAK_LIMIT + 2)]
    streak = URGENT_STREAK_LIMIT
    # Urgent calls jump the queue in their own arrival order, but after a streak of them the
    # oldest waiting call goes: nobody waits forever.
    assert order == [
        *urgent[:streak],
        "a",
        *urgent[streak : 2 * streak],
        "b",
        *urgent[2 * streak :],
        "c",
    ]


def test_an_urgent_call_overtakes_a_waiter_already_sleeping_for_its_token() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        budgets = Budgets(now=loop.time)
        scope = RateScope("s", 0.5, 1)
        granted: list[tuple[str, float]] = []

        async def call(name: str, urgent: bool) -> None:
            await budgets.acquire([scope], urgent=urgent)
            granted.append((name, round(loop.time(), 6)))

        await budgets.acquire([scope])
        waiting = asyncio.create_task(call("waiting", False))
        await asyncio.sleep(1.0)  # the waiter is at the head, sleeping until t=2
        await call("urgent", True)
        await waiting
        return granted

    assert run_virtual(main()) == [("urgent", 2.0), ("waiting", 4.0)]


def test_a_queued_call_made_urgent_keeps_its_place_by_when_it_queued() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        budgets = Budgets(now=loop.time)
        scope = RateScope("e", 1.0, 1)
        order: list[str] = []

        async def call(name: str, urgent: bool | Urgency) -> None:
            await budgets.acquire([scope], urgent=urgent)
            order.append(name)

        await budgets.acquire([scope])
        urgencies = {name: Urgency() for name in "abc"}
        tasks = [asyncio.create_task(call(name, urgencies[name])) for name in "abc"]
        await asyncio.sleep(0.1)
        tasks.append(asyncio.create_task(call("U", True)))
        await asyncio.sleep(0.1)
        # Two answers complete while their edits wait: they go ahead of "b", and ahead of "U"
        # which queued after them.
        urgencies["c"].escalate()
        urgencies["a"].escalate()
        await asyncio.gather(*tasks)
        return order

    assert run_virtual(main()) == ["a", "c", "U", "b"]


def test_progress_calls_leave_part_of_the_burst_for_urgent_ones() -> None:
    async def main() -> tuple[list[float], list[float], list[float]]:
        loop = asyncio.get_running_loop()
        budgets = Budgets(now=loop.time)
        scope = RateScope("r", 1.0, 5)
        progress: list[float] = []
        for _ in range(3):
            await budgets.acquire([scope], progress=True)
            progress.append(loop.time())
        # Progress went at the sustained rate, so most of the burst is still there.
        urgent = await grant_times(budgets, scope, 5, urgent=True)
        # Calls not marked as progress (an adapter's one-off call) may spend the burst too.
        await asyncio.sleep(10.0)
        plain = await grant_times(budgets, scope, 5)
        return progress, urgent, plain

    progress, urgent, plain = run_virtual(main())
    assert [round(t, 6) for t in progress] == [0.0, 1.0, 2.0]
    assert [round(t, 6) for t in urgent] == [2.0, 2.0, 2.0, 2.0, 3.0]
    assert len({round(t, 6) for t in plain}) == 1


def test_an_urgent_call_does_not_wait_for_the_reserve_a_progress_head_waits_for() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        budgets = Budgets(now=loop.time)
        scope = RateScope("h", 1.0, 3)
        granted: list[tuple[str, float]] = []

        async def call(name: str, **kind: bool) -> None:
            await budgets.acquire([scope], **kind)
            granted.append((name, round(loop.time(), 6)))

        await call("first", progress=True)  # 2 tokens left: the reserve
        head = asyncio.create_task(call("progress", progress=True))  # sleeps until t=1
        await asyncio.sleep(0.5)
        await call("urgent", urgent=True)
        await head
        return granted

    assert run_virtual(main()) == [("first", 0.0), ("urgent", 0.5), ("progress", 2.0)]


def test_a_cancelled_urgent_waiter_hands_the_turn_back() -> None:
    async def main() -> tuple[list[float], int]:
        loop = asyncio.get_running_loop()
        budgets = Budgets(now=loop.time)
        scope = RateScope("c", 1.0, 1)
        await budgets.acquire([scope])
        waiting = asyncio.create_task(grant_times(budgets, scope, 1))
        await asyncio.sleep(0.2)
        urgent = asyncio.create_task(budgets.acquire([scope], urgent=True))
        await asyncio.sleep(0.2)
        urgent.cancel()
        times = await waiting
        return times, budgets.budget(scope).waiting

    times, waiting = run_virtual(main())
    assert [round(t, 6) for t in times] == [1.0]
    assert waiting == 0


class SlowSharedLimiter:
    """A shared limiter that answers after ``delay`` seconds: always go, counting the takes."""

    setting = "REDIS_URL"

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.takes = 0

    async def take(self, key: str, per_second: float, burst: int) -> float:
        await asyncio.sleep(self.delay)
        self.takes += 1
        return 0.0

    async def pause(self, key: str, seconds: float) -> None:
        return None

    async def aclose(self) -> None:
        return None


def test_a_waiter_asking_the_shared_bucket_keeps_its_turn() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        shared = SlowSharedLimiter(0.5)
        budgets = Budgets(now=loop.time, shared=shared)
        scope = RateScope("k", 1.0, 1)
        granted: list[tuple[str, float]] = []

        async def call(name: str, urgent: bool) -> None:
            await budgets.acquire([scope], urgent=urgent)
            granted.append((name, round(loop.time(), 6)))

        first = asyncio.create_task(call("asking", False))
        await asyncio.sleep(0.1)  # "asking" waits for the shared bucket's answer
        await asyncio.gather(first, call("urgent", True))
        assert shared.takes == 2
        return granted

    # The shared bucket gave "asking" its call: it goes, and the local bucket is not overdrawn.
    assert run_virtual(main()) == [("asking", 0.5), ("urgent", 1.5)]
