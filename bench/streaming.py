"""Streaming benchmark: three ways to show a streamed answer, on a simulated platform.

Run ``python bench/streaming.py``. Everything runs in virtual time (``tests/fake_platform.py``),
so minutes of simulated traffic take seconds. For Slack-like and Discord-like limits, 80 ms call
latency, answers streamed at 40 tokens/s, and 1, 10 and 50 replies sharing one scope, it prints
for each strategy: calls made, 429s, mean and p95 staleness (a token's arrival to its first
display), the slowest and median end lag (last token to the final text visible), and the ideal
the budget allows. Replies arrive ``together`` (all start and finish at once: the queue is all
final edits at the end) or ``staggered`` (starts spread over one answer's duration, so each
finishes while the others stream: its final edit competes with their progress edits).

Last, a burst: twenty short answers at once in one Slack-like workspace, with a "Thinking…"
message first or with a status (``show_typing``) and the first post held until an edit is due.

Strategies:
- ``per-token``: an edit per token, in order, sleeping on a 429's Retry-After (what an SDK does);
- ``fixed-1s``: one edit a second per reply, as popular Discord bots do, same 429 handling;
- ``ours``: ``ReplyStreamer`` over shared ``Budgets``.

The ideal: a reply can be shown at best every ``I = max(latency, N / shared_rate, 1 / own_rate)``
seconds, so a token waits ``I / 2`` on average (``0.95 I`` at p95) plus the time for a call to
reach the platform (half the latency here); the end lag bound is ``latency + I`` together. Staggered,
a final edit goes ahead of progress edits, so it waits for the next call at most: ``latency + P``,
where ``P`` is the scope's interval between two calls; unless the final edits alone overload the
shared scope (N of them within one answer's duration, at the share of the scope the budget
guarantees them, ``URGENT_STREAK_LIMIT`` of every ``URGENT_STREAK_LIMIT + 1`` calls): then the
last one waits for the backlog, ``latency + N * P_shared / share - spread``.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.errors import SurfaceRateLimited
from core.ratelimit import URGENT_STREAK_LIMIT, Budgets, RateScope
from core.streaming import STREAMING_INDICATOR, ReplyStreamer
from tests.fake_platform import FakeSurface, Platform, VirtualTimeLoop

LATENCY = 0.08
TOKENS_PER_SECOND = 40.0
TOKENS = 600  # 15 s of answer, about 3,600 characters: Discord needs a second message
FIRST_TOKEN_AFTER = 0.5  # the model's time to first token
HORIZON = 240.0  # virtual seconds after which a strategy that has not finished is cut off
CONCURRENCY = (1, 10, 50)
ARRIVALS = ("together", "staggered")


@dataclass(frozen=True)
class PlatformModel:
    """A platform's limits as the benchmark simulates them."""

    name: str
    max_chars: int
    whole_second_retry_after: bool
    #: The scope every reply shares (per second, burst).
    shared_edit: tuple[float, int]
    #: Each reply's own scopes (per second, burst), or None.
    own_edit: tuple[float, int] | None
    own_post: tuple[float, int]

    def surface(self, platform: Platform, index: int) -> FakeSurface:
        shared = RateScope(f"{self.name}:shared", *self.shared_edit)
        own_edit = (
            (RateScope(f"{self.name}:{index}:edit", *self.own_edit),) if self.own_edit else ()
        )
        own_post = RateScope(f"{self.name}:{index}:post", *self.own_post)
        if self.name == "discord":
            # Discord's global 50/s counts every call; per-thread buckets for post and edit.
            return FakeSurface(
                platform,
                max_chars=self.max_chars,
                post_scopes=(own_post, shared),
                edit_scopes=(*own_edit, shared),
            )
        return FakeSurface(
            platform,
            max_chars=self.max_chars,
            post_scopes=(own_post,),
            edit_scopes=(shared,),
        )

    def interval(self, replies: int) -> float:
        """The best per-reply display interval the budget allows."""
        shared_rate = self.shared_edit[0]
        own = 1 / self.own_edit[0] if self.own_edit else 0.0
        return max(LATENCY, replies / shared_rate, own)

    def lag_bound(self, replies: int, spread: float) -> float:
        """The slowest final edit's bound when replies start ``spread`` seconds apart in all."""
        own = 1 / self.own_edit[0] if self.own_edit else 0.0
        pacing = max(1 / self.shared_edit[0], own)
        share = URGENT_STREAK_LIMIT / (URGENT_STREAK_LIMIT + 1)
        backlog = replies / self.shared_edit[0] / share - spread
        return LATENCY + max(pacing, backlog)


# Slack: chat.update is Tier 3 per workspace (~50/min, docs.slack.dev "Rate limits"), every reply
# in the workspace shares it; chat.postMessage ~1/s per channel (one reply per channel here);
# Retry-After is whole seconds; text ~4,000 characters.
SLACK = PlatformModel("slack", 4000, True, (50 / 60, 1), None, (1.0, 1))
# Discord: 50 requests/s per bot (global, shared); each reply in its own thread, whose edit and
# post buckets allow 5 per 5 s; content 2,000 characters.
DISCORD = PlatformModel("discord", 2000, False, (50.0, 50), (1.0, 5), (1.0, 5))


@dataclass
class Result:
    calls: int
    limited: int
    staleness: list[float]
    end_lags: list[float]
    unfinished: int


def tokens() -> list[tuple[float, str]]:
    """One answer: (arrival offset, token) pairs, words of varying length."""
    words = ["the", "budget", "allows", "an", "edit", "every", "second", "so", "we", "coalesce"]
    out = []
    for n in range(TOKENS):
        token = words[(n * 7) % len(words)] + ("\n\n" if n % 97 == 96 else " ")
        out.append((FIRST_TOKEN_AFTER + n / TOKENS_PER_SECOND, token))
    return out


async def call_until_accepted(
    make: Callable[[], Awaitable[None]], sleep: Callable[[float], Awaitable[None]]
) -> None:
    """What SDKs do on a 429 (discord.py, slack_sdk's retry handler): wait Retry-After, retry."""
    while True:
        try:
            await make()
            return
        except SurfaceRateLimited as exc:
            await sleep(exc.retry_after)


async def naive(surface: FakeSurface, answer: list[tuple[float, str]], interval: float) -> None:
    """Post at the first token, then edit: per token (interval 0) or every ``interval`` s."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def produce() -> None:
        for at, token in answer:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            queue.put_nowait(token)
        queue.put_nowait(None)

    producer = asyncio.create_task(produce())
    text = ""
    ids: list[str] = []
    shown: list[str] = []
    limit = surface.max_chars
    done = False
    while not done:
        if interval:
            await asyncio.sleep(interval)
            while not queue.empty():
                token = queue.get_nowait()
                if token is None:
                    done = True
                else:
                    text += token
        else:
            token = await queue.get()
            if token is None:
                done = True
            else:
                text += token
        # Naive splitting at the limit (what matters here is the call pattern).
        pieces = [text[i : i + limit] for i in range(0, len(text), limit)] or []
        for index, piece in enumerate(pieces):
            if index < len(ids):
                if shown[index] != piece:
                    message_id = ids[index]
                    await call_until_accepted(
                        lambda m=message_id, p=piece: surface.edit(m, p), asyncio.sleep
                    )
                    shown[index] = piece
            else:
                posted: list[str] = []

                async def post(p: str = piece, out: list[str] = posted) -> None:
                    out.append(await surface.post(p))

                await call_until_accepted(post, asyncio.sleep)
                ids.append(posted[0])
                shown.append(piece)
    await producer


async def ours(surface: FakeSurface, answer: list[tuple[float, str]], budgets: Budgets) -> None:
    """ReplyStreamer: begin at once, write tokens as they come, finish."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    streamer = ReplyStreamer(surface, budgets, now=loop.time)
    await streamer.begin()
    for at, token in answer:
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        streamer.write(token)
    await streamer.finish()


def measure(
    platform: Platform,
    surfaces: list[FakeSurface],
    answer: list[tuple[float, str]],
    starts: list[float],
) -> Result:
    """Staleness and end lag of every reply (started at ``starts``), from the platform's log."""
    full = "".join(token for _, token in answer)
    staleness: list[float] = []
    end_lags: list[float] = []
    unfinished = 0
    for surface, start in zip(surfaces, starts, strict=True):
        ends = []
        position = 0
        for at, token in answer:
            position += len(token)
            ends.append((start + at, position))
        last_token = start + answer[-1][0]
        texts: dict[str, str] = {}
        order: list[str] = []
        pointer = 0
        final_at: float | None = None
        for at, message_id, text in platform.log:
            if message_id not in surface.posted:
                continue
            if message_id not in texts:
                order.append(message_id)
            texts[message_id] = text
            shown = "".join(texts[m] for m in order)
            shown_text = shown.removesuffix(STREAMING_INDICATOR)
            visible = len(shown_text) if full.startswith(shown_text) else _common(full, shown_text)
            while pointer < len(ends) and ends[pointer][1] <= visible:
                staleness.append(max(0.0, at - ends[pointer][0]))
                pointer += 1
            if shown == full and final_at is None:
                final_at = at
        if final_at is None:
            unfinished += 1
            staleness.extend(HORIZON - arrival for arrival, _ in ends[pointer:])
        else:
            end_lags.append(final_at - last_token)
    return Result(
        sum(platform.calls.values()), platform.rate_limited, staleness, end_lags, unfinished
    )


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


async def later(start: float, job: Awaitable[None]) -> None:
    """Run ``job`` from ``start`` (virtual seconds since the scenario began)."""
    await asyncio.sleep(start)
    await job


def run(model: PlatformModel, strategy: str, replies: int, arrivals: str = "together") -> Result:
    """One scenario on a fresh virtual-time loop."""
    answer = tokens()
    spread = answer[-1][0] if arrivals == "staggered" else 0.0
    starts = [index * spread / replies for index in range(replies)]

    async def main() -> Result:
        loop = asyncio.get_running_loop()
        platform = Platform(
            latency=LATENCY, whole_second_retry_after=model.whole_second_retry_after
        )
        surfaces = [model.surface(platform, index) for index in range(replies)]
        budgets = Budgets(now=loop.time)
        if strategy == "ours":
            jobs = [ours(surface, answer, budgets) for surface in surfaces]
        else:
            interval = 0.0 if strategy == "per-token" else 1.0
            jobs = [naive(surface, answer, interval) for surface in surfaces]
        tasks = [
            asyncio.create_task(later(start, job)) for start, job in zip(starts, jobs, strict=True)
        ]
        await asyncio.wait(tasks, timeout=HORIZON)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return measure(platform, surfaces, answer, starts)

    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


#: The burst: short answers asked at once in one Slack workspace (chat.update 50/min with a
#: burst of 3, chat.postMessage about 1/s per channel and 5/s per workspace), in 5 channels.
BURST_REPLIES = 20
BURST_CHANNELS = 5
BURST_TOKENS = 40  # about one second of answer


class StatusSurface(FakeSurface):
    """A Slack-like reply surface whose ``show_typing`` sets a status (one call, no wait)."""

    async def show_typing(self) -> bool:
        self.typing_calls += 1
        return self.typing


def burst(status: bool) -> tuple[int, int, int, float, float]:
    """Posts, edits, 429s, and the slowest reply's final text after its last token and after
    the question, for ``BURST_REPLIES`` short answers starting together."""
    answer = tokens()[:BURST_TOKENS]

    async def main() -> tuple[int, int, int, float, float]:
        loop = asyncio.get_running_loop()
        platform = Platform(latency=LATENCY, whole_second_retry_after=True)
        surfaces = [
            StatusSurface(
                platform,
                typing=status,
                post_scopes=(
                    RateScope(f"slack:T:C{n % BURST_CHANNELS}:chat.postMessage", 1.0, 1),
                    RateScope("slack:T:chat.postMessage", 5.0, 1),
                ),
                edit_scopes=(RateScope("slack:T:chat.update", 50 / 60, 3),),
            )
            for n in range(BURST_REPLIES)
        ]
        budgets = Budgets(now=loop.time)
        await asyncio.gather(*(ours(surface, answer, budgets) for surface in surfaces))
        result = measure(platform, surfaces, answer, [0.0] * BURST_REPLIES)
        slowest_lag = max(result.end_lags)
        slowest = slowest_lag + answer[-1][0]
        calls = platform.calls
        return calls.get("post", 0), calls.get("edit", 0), result.limited, slowest_lag, slowest

    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def print_burst() -> bool:
    """The burst with and without a status shown before the first text; whether it had no 429."""
    print(
        f"\nburst: {BURST_REPLIES} answers of {BURST_TOKENS} tokens at once in one Slack-like "
        f"workspace, {BURST_CHANNELS} channels"
    )
    print(
        f"{'before the text':24} {'posts':>6} {'edits':>6} {'429s':>5} {'end lag':>8} {'final':>6}"
    )
    ok = True
    for status in (False, True):
        posts, edits, limited, lag, final = burst(status)
        label = "status, held first post" if status else "'Thinking…' message"
        print(f"{label:24} {posts:>6} {edits:>6} {limited:>5} {lag:8.2f} {final:6.2f}")
        ok = ok and limited == 0
    return ok


def main() -> int:
    header = (
        f"{'platform':8} {'arrivals':9} {'N':>3} {'strategy':10} {'calls':>7} {'429s':>6} "
        f"{'stale mean':>10} {'p95':>7} {'end lag':>8} {'p50':>6} {'ideal mean':>10} "
        f"{'p95':>7} {'lag bound':>9}  verdict"
    )
    print(header)
    print("-" * len(header))
    ok = True
    for model in (SLACK, DISCORD):
        for arrivals in ARRIVALS:
            for replies in CONCURRENCY:
                if arrivals == "staggered" and replies == 1:
                    continue  # one reply alone: the same as together
                ok = scenario(model, arrivals, replies) and ok
            print()
    print(
        f"latency {LATENCY * 1000:.0f} ms, {TOKENS} tokens at {TOKENS_PER_SECOND:.0f}/s per reply; "
        "times in seconds; end lag is the worst reply's, p50 the median's; 'ours' passes with "
        "zero 429s, mean staleness within 1.25x of the ideal and end lag within the bound."
    )
    ok = print_burst() and ok
    return 0 if ok else 1


def scenario(model: PlatformModel, arrivals: str, replies: int) -> bool:
    """Print one row per strategy; whether 'ours' passed."""
    interval = model.interval(replies)
    ideal_mean = LATENCY / 2 + interval / 2
    ideal_p95 = LATENCY / 2 + 0.95 * interval
    spread = tokens()[-1][0]
    lag_bound = LATENCY + interval if arrivals == "together" else model.lag_bound(replies, spread)
    ok = True
    for strategy in ("per-token", "fixed-1s", "ours"):
        result = run(model, strategy, replies, arrivals)
        mean = statistics.fmean(result.staleness)
        lag = max(result.end_lags) if result.end_lags else math.inf
        median = statistics.median(result.end_lags) if result.end_lags else math.inf
        lag_text = f"{lag:8.2f}" if not result.unfinished else f">{HORIZON:7.0f}"
        verdict = ""
        if strategy == "ours":
            passed = (
                result.limited == 0
                and mean <= 1.25 * ideal_mean
                and lag <= lag_bound
                and not result.unfinished
            )
            ok = ok and passed
            verdict = f"{'PASS' if passed else 'FAIL'} ({mean / ideal_mean:.2f}x ideal)"
        print(
            f"{model.name:8} {arrivals:9} {replies:>3} {strategy:10} {result.calls:>7} "
            f"{result.limited:>6} {mean:10.2f} {p95(result.staleness):7.2f} {lag_text} "
            f"{median:6.2f} {ideal_mean:10.2f} {ideal_p95:7.2f} {lag_bound:9.2f}  {verdict}"
        )
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
