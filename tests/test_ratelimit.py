"""Pacing budgets on virtual time: rate, burst, FIFO sharing, pauses and header feedback."""

from __future__ import annotations

import asyncio
import itertools

from core.ratelimit import Budgets
from core.reply import RateScope
from tests.fake_platform import run_virtual

EDIT = RateScope("slack:T1:chat.update", per_second=50 / 60, burst=1)


async def grant_times(budgets: Budgets, scope: RateScope, count: int) -> list[float]:
    loop = asyncio.get_running_loop()
    times = []
    for _ in range(count):
        await budgets.acquire([scope])
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
