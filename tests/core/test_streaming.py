"""ReplyStreamer on virtual time over a simulated platform (limits, latency, 429s, faults)."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import PermanentSurfaceError, SurfaceError, TransientSurfaceError
from core.ratelimit import Budgets, RateScope
from core.streaming import (
    EMPTY_ANSWER_TEXT,
    RETRACTED_TEXT,
    STREAMING_INDICATOR,
    THINKING_TEXT,
    TYPING_REFRESH_SECONDS,
    ReplyStreamer,
)
from tests.fake_platform import (
    FAKE_NATIVE,
    FakeAppendSurface,
    FakeSurface,
    Platform,
    run_virtual,
)

LATENCY = 0.08


def streamer_for(
    surface: FakeSurface, budgets: Budgets | None = None, **kwargs: object
) -> ReplyStreamer:
    loop = asyncio.get_running_loop()
    budgets = budgets or Budgets(now=loop.time)
    max_age = kwargs.pop("native_max_age", FAKE_NATIVE.max_age_seconds)
    if isinstance(surface, FakeAppendSurface):
        kwargs.setdefault("native", replace(FAKE_NATIVE, max_age_seconds=max_age))
    return ReplyStreamer(surface, budgets, now=loop.time, **kwargs)  # type: ignore[arg-type]


async def feed(streamer: ReplyStreamer, tokens: Iterable[str], gap: float = 0.025) -> None:
    for token in tokens:
        await asyncio.sleep(gap)
        streamer.write(token)


def words(count: int) -> list[str]:
    return [f"w{n} " for n in range(count)]


def test_indicator_first_then_exact_final_text_without_indicator() -> None:
    async def main() -> tuple[list[str], list[tuple[float, str, str]], list[str]]:
        platform = Platform(latency=LATENCY)
        surface = FakeSurface(platform)
        streamer = streamer_for(surface)
        await streamer.begin()
        await asyncio.sleep(2.0)  # the model is slow to start
        await feed(streamer, words(40))
        ids = await streamer.finish()
        return ids, platform.log, surface.messages()

    ids, log, shown = run_virtual(main())
    assert log[0][2] == THINKING_TEXT and log[0][0] <= LATENCY
    assert shown == ["".join(words(40))]
    assert ids == ["0"]
    assert any(text.endswith(STREAMING_INDICATOR) for _, _, text in log[1:-1])


def test_a_typing_indicator_stands_in_for_the_thinking_message_until_text() -> None:
    async def main() -> tuple[list[tuple[float, str, str]], int, list[str]]:
        platform = Platform(latency=LATENCY)
        surface = FakeSurface(platform, typing=True)
        streamer = streamer_for(surface)
        await streamer.begin()
        await asyncio.sleep(20.0)  # a model silent for 20 s: the indicator is refreshed
        await feed(streamer, words(10))
        await streamer.finish()
        return platform.log, surface.typing_calls, surface.messages()

    log, typing_calls, shown = run_virtual(main())
    assert all(text != THINKING_TEXT for _, _, text in log)
    assert log[0][0] >= 20.0  # nothing was posted before the first token
    # Triggered at once, then every TYPING_REFRESH_SECONDS while the model stayed silent.
    assert typing_calls == 1 + int(20.0 // TYPING_REFRESH_SECONDS)
    assert shown == ["".join(words(10))]


def test_a_failed_turn_without_text_still_posts_its_message_when_typing() -> None:
    async def main() -> list[str]:
        platform = Platform(latency=LATENCY)
        surface = FakeSurface(platform, typing=True)
        streamer = streamer_for(surface)
        await streamer.begin()
        await asyncio.sleep(1.0)
        await streamer.fail("The model is down.")
        return surface.messages()

    assert run_virtual(main()) == ["The model is down."]


def test_tokens_coalesce_and_pacing_causes_no_429() -> None:
    async def main() -> tuple[int, int, list[float]]:
        platform = Platform(latency=LATENCY)
        surface = FakeSurface(platform, edit_scopes=(RateScope("edit", 1.0, 1),))
        streamer = streamer_for(surface)
        await streamer.begin()
        await feed(streamer, words(400))  # 10 s at 40 tokens/s
        await streamer.finish()
        edits = [t for t, _, _ in platform.log[1:]]
        return platform.calls["edit"], platform.rate_limited, edits

    edits, limited, times = run_virtual(main())
    assert limited == 0
    # 400 tokens, about one edit a second: the budget's rate, not one per token.
    assert 9 <= edits <= 12
    assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(times))


def test_a_429_pauses_the_scope_then_the_latest_text_lands() -> None:
    async def main() -> tuple[list[str], int, list[float]]:
        platform = Platform(latency=LATENCY, faults=iter([None, "429"]))
        surface = FakeSurface(platform, edit_scopes=(RateScope("edit", 5.0, 5),))
        streamer = streamer_for(surface)
        await streamer.begin()
        await feed(streamer, words(30))
        await streamer.finish()
        return surface.messages(), platform.rate_limited, [t for t, _, _ in platform.log]

    shown, limited, times = run_virtual(main())
    assert shown == ["".join(words(30))]
    assert limited == 1
    # The 429 (answered at about 0.1 s, Retry-After 1 s) left a gap of at least a second.
    assert times[1] - times[0] >= 1.0


def test_transient_errors_are_retried_and_the_final_text_lands() -> None:
    async def main() -> list[str]:
        platform = Platform(latency=LATENCY, faults=iter([None, "500", "500", None, "500"]))
        surface = FakeSurface(platform)
        streamer = streamer_for(surface)
        await streamer.begin()
        await feed(streamer, words(20))
        await streamer.finish()
        assert streamer.delivered
        return surface.messages()

    assert run_virtual(main()) == ["".join(words(20))]


def test_platform_down_is_logged_with_the_context_and_finish_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> tuple[list[str], str, bool]:
        platform = Platform(latency=LATENCY, faults=iter([None] + ["500"] * 1000))
        surface = FakeSurface(platform)
        streamer = streamer_for(surface, log_context="slack:C1:1700000000.1")
        await streamer.begin()
        await feed(streamer, words(20))
        ids = await streamer.finish()
        return ids, streamer.text, streamer.delivered

    with caplog.at_level(logging.ERROR, logger="core.streaming"):
        ids, text, delivered = run_virtual(main())
    assert ids == ["0"]
    assert text == "".join(words(20))
    assert not delivered
    assert "slack:C1:1700000000.1" in caplog.text


def test_long_text_splits_and_finished_messages_are_never_edited_again() -> None:
    async def main() -> tuple[list[str], list[tuple[float, str, str]], list[str]]:
        platform = Platform(latency=LATENCY)
        surface = FakeSurface(platform, max_chars=100, edit_scopes=(RateScope("edit", 4.0, 2),))
        streamer = streamer_for(surface)
        await streamer.begin()
        tokens = [f"sentence {n} goes here. " + ("\n\n" if n % 3 == 2 else "") for n in range(30)]
        await feed(streamer, tokens)
        ids = await streamer.finish()
        return ids, platform.log, surface.messages()

    ids, log, shown = run_virtual(main())
    assert len(ids) > 3
    assert all(len(text) <= 100 for text in shown)
    assert "".join(shown) == "".join(
        f"sentence {n} goes here. " + ("\n\n" if n % 3 == 2 else "") for n in range(30)
    )
    first_seen = {}
    for index, (_, message_id, _) in enumerate(log):
        first_seen.setdefault(message_id, index)
    for earlier, later in itertools.pairwise(ids):
        assert all(mid != earlier for _, mid, _ in log[first_seen[later] :])


def test_retry_shows_the_notice_then_the_new_attempt_replaces_the_text() -> None:
    async def main() -> tuple[list[str], list[str]]:
        platform = Platform(latency=LATENCY)
        surface = FakeSurface(platform)
        streamer = streamer_for(surface)
        await streamer.begin()
        await feed(streamer, ["partial ", "answer "])
        await asyncio.sleep(1.0)
        await streamer.retrying("_Connection lost, retrying…_")
        await asyncio.sleep(3.0)
        await feed(streamer, ["fresh ", "answer"])
        await streamer.finish()
        return surface.messages(), [text for _, _, text in platform.log]

    shown, history = run_virtual(main())
    assert shown == ["fresh answer"]
    assert "_Connection lost, retrying…_" in history


def test_a_shorter_retried_answer_retracts_continuation_messages_it_no_longer_needs() -> None:
    async def main() -> list[str]:
        platform = Platform(latency=LATENCY)
        surface = FakeSurface(platform, max_chars=60)
        streamer = streamer_for(surface)
        await streamer.begin()
        await feed(streamer, words(40))
        await asyncio.sleep(5.0)
        await streamer.retrying("_retrying…_")
        await feed(streamer, ["short ", "answer"])
        await streamer.finish()
        return surface.messages()

    shown = run_virtual(main())
    assert len(shown) > 2
    assert shown[0] == "short answer"
    assert shown[1:] == [RETRACTED_TEXT] * (len(shown) - 1)


def test_cancel_closes_an_open_code_block_and_shows_the_note() -> None:
    async def main() -> list[str]:
        platform = Platform(latency=LATENCY)
        surface = FakeSurface(platform)
        streamer = streamer_for(surface)
        await streamer.begin()
        await feed(streamer, ["Here:\n", "```py\n", "x = 1"])
        await streamer.cancel("_(stopped: the conversation was reset)_")
        return surface.messages()

    assert run_virtual(main()) == [
        "Here:\n```py\nx = 1\n```\n\n_(stopped: the conversation was reset)_"
    ]


def test_fail_after_nothing_shows_only_the_message_and_empty_answers_are_labelled() -> None:
    async def main() -> tuple[list[str], list[str]]:
        platform = Platform(latency=LATENCY)
        failed = FakeSurface(platform)
        streamer = streamer_for(failed)
        await streamer.begin()
        await streamer.fail("Sorry, the model is unavailable.")
        empty = FakeSurface(platform)
        other = streamer_for(empty)
        await other.begin()
        await other.finish()
        return failed.messages(), empty.messages()

    failed, empty = run_virtual(main())
    assert failed == ["Sorry, the model is unavailable."]
    assert empty == [EMPTY_ANSWER_TEXT]


def test_concurrent_replies_in_one_scope_all_progress() -> None:
    async def main() -> list[list[float]]:
        platform = Platform(latency=LATENCY)
        edit = RateScope("workspace:chat.update", 50 / 60, 1)
        budgets = Budgets(now=asyncio.get_running_loop().time)
        surfaces = [
            FakeSurface(
                platform, post_scopes=(RateScope(f"post:{n}", 1.0, 1),), edit_scopes=(edit,)
            )
            for n in range(10)
        ]
        streamers = [streamer_for(surface, budgets) for surface in surfaces]
        for streamer in streamers:
            await streamer.begin()

        async def one(streamer: ReplyStreamer) -> None:
            await feed(streamer, words(1200))  # 30 s each
            await streamer.finish()

        await asyncio.gather(*(one(streamer) for streamer in streamers))
        assert platform.rate_limited == 0
        return [[t for t, mid, _ in platform.log if mid in s.posted] for s in surfaces]

    per_reply = run_virtual(main())
    # Within the first 15 s (12 s is a full round at 50 edits a minute) every reply was edited.
    assert all(len([t for t in times[1:] if t < 15.0]) >= 1 for times in per_reply)


def test_native_stream_appends_and_stops_with_the_exact_text() -> None:
    async def main() -> tuple[list[str], dict[str, int]]:
        platform = Platform(latency=LATENCY)
        surface = FakeAppendSurface(platform)
        streamer = streamer_for(surface)
        await streamer.begin()
        await feed(streamer, words(60))
        await streamer.finish()
        return surface.messages(), platform.calls

    shown, calls = run_virtual(main())
    assert shown == ["".join(words(60))]
    assert calls.get("start") == 1 and calls.get("stop") == 1 and calls.get("append", 0) >= 2
    assert "edit" not in calls and "post" not in calls


def test_native_refused_falls_back_to_edits() -> None:
    async def main() -> tuple[list[str], dict[str, int]]:
        platform = Platform(latency=LATENCY)
        surface = FakeAppendSurface(platform, refuse="method_not_supported_for_channel_type")
        streamer = streamer_for(surface)
        await streamer.begin()
        await feed(streamer, words(20))
        await streamer.finish()
        return surface.messages(), platform.calls

    shown, calls = run_virtual(main())
    assert shown == ["".join(words(20))]
    assert calls.get("post") == 1 and "append" not in calls


def test_native_stream_that_dies_or_must_change_is_finished_with_an_edit() -> None:
    async def main() -> tuple[list[str], list[str], dict[str, int]]:
        platform = Platform(latency=LATENCY)
        dying = FakeAppendSurface(platform, lifetime=1.0)
        streamer = streamer_for(dying, native_max_age=100.0)
        await streamer.begin()
        await feed(streamer, words(120))
        await streamer.finish()
        retried = FakeAppendSurface(platform)
        other = streamer_for(retried)
        await other.begin()
        await feed(other, ["first ", "try "])
        await asyncio.sleep(1.0)
        await other.retrying("_retrying…_")
        await feed(other, ["second ", "try"])
        await other.finish()
        return dying.messages(), retried.messages(), platform.calls

    died, retried, calls = run_virtual(main())
    assert died == ["".join(words(120))]
    assert retried == ["second try"]
    assert calls.get("edit", 0) >= 2


class FailingStreams(FakeAppendSurface):
    """Native streams whose ``append`` / ``stop`` calls fail: ``failures`` maps a call to how many
    times it fails, and ``error`` says how (a 5xx by default)."""

    def __init__(
        self,
        platform: Platform,
        failures: dict[str, int],
        error: SurfaceError | None = None,
    ) -> None:
        super().__init__(platform)
        self.failures = dict(failures)
        self.error = error or TransientSurfaceError("fake 503 (an HTML page)")

    def _fail(self, call: str) -> None:
        if self.failures.get(call, 0) > 0:
            self.failures[call] -= 1
            self.platform.calls[f"failed {call}"] = self.platform.calls.get(f"failed {call}", 0) + 1
            raise self.error

    async def append(self, message_id: str, delta: str) -> None:
        self._fail("append")
        await super().append(message_id, delta)

    async def stop(self, message_id: str, delta: str) -> None:
        self._fail("stop")
        await super().stop(message_id, delta)


@pytest.mark.parametrize(
    ("failures", "error"),
    [
        # Appends keep failing: the stream is stopped with the rest of the text.
        ({"append": 100}, None),
        # The stop keeps failing too: the edit path lands the text.
        ({"append": 100, "stop": 100}, None),
        # Slack refuses the calls outright (a 4xx page from a proxy).
        ({"append": 100, "stop": 100}, PermanentSurfaceError("fake 403", code="http_403")),
        # One failure is retried on the stream itself.
        ({"append": 1, "stop": 1}, None),
    ],
)
def test_a_native_stream_whose_calls_fail_still_ends_with_the_exact_text(
    failures: dict[str, int], error: SurfaceError | None
) -> None:
    async def main() -> tuple[list[str], dict[str, int], bool]:
        platform = Platform(latency=LATENCY)
        surface = FailingStreams(platform, failures, error)
        streamer = streamer_for(surface)
        await streamer.begin()
        # A long answer: the failures happen while it is still streaming.
        await feed(streamer, words(200), gap=0.1)
        await streamer.finish()
        return surface.messages(), platform.calls, streamer.delivered

    shown, calls, delivered = run_virtual(main())
    assert shown == ["".join(words(200))]
    assert delivered
    if failures["append"] == 1:
        # Retried in place: the stream went on.
        assert "edit" not in calls and calls["stop"] == 1
    else:
        # The stream was left (stopped, when the stop goes through) and edits went on with it.
        assert calls["start"] == 1 and calls.get("edit", 0) >= 1
        assert calls.get("stop", 0) == (0 if "stop" in failures else 1)


def test_a_native_stream_that_cannot_start_posts_instead() -> None:
    class NoStart(FakeAppendSurface):
        async def start(self, text: str) -> str:
            self.platform.calls["failed start"] = self.platform.calls.get("failed start", 0) + 1
            raise TransientSurfaceError("fake 502 (plain text)")

    async def main() -> tuple[list[str], dict[str, int]]:
        platform = Platform(latency=LATENCY)
        surface = NoStart(platform)
        streamer = streamer_for(surface)
        await streamer.begin()
        await feed(streamer, words(200), gap=0.1)
        await streamer.finish()
        return surface.messages(), platform.calls

    shown, calls = run_virtual(main())
    assert shown == ["".join(words(200))]
    assert calls["post"] == 1 and calls.get("edit", 0) >= 1 and "append" not in calls


def test_an_old_native_stream_is_stopped_and_continued_with_edits() -> None:
    async def main() -> tuple[list[str], dict[str, int]]:
        platform = Platform(latency=LATENCY)
        surface = FakeAppendSurface(platform)
        streamer = streamer_for(surface, native_max_age=2.0)
        await streamer.begin()
        await feed(streamer, words(200))
        await streamer.finish()
        return surface.messages(), platform.calls

    shown, calls = run_virtual(main())
    assert shown == ["".join(words(200))]
    assert calls.get("stop") == 1 and calls.get("edit", 0) >= 2


def test_a_retry_while_waiting_to_append_replaces_the_text_without_waiting() -> None:
    async def main() -> tuple[list[str], dict[str, int], float]:
        loop = asyncio.get_running_loop()
        platform = Platform(latency=LATENCY)
        surface = FakeAppendSurface(platform, append_scopes=(RateScope("append", 0.2, 1),))
        streamer = streamer_for(surface)
        await streamer.begin()
        await feed(streamer, words(20))
        retried_at = loop.time()
        await streamer.retrying("_retrying…_")
        await asyncio.sleep(1.0)
        notice_at = min((t for t, _, text in platform.log if text == "_retrying…_"), default=1e9)
        await feed(streamer, ["second ", "try"])
        await streamer.finish()
        return surface.messages(), platform.calls, notice_at - retried_at

    shown, calls, notice_lag = run_virtual(main())
    assert shown == ["second try"]
    # The queued append was given up: the stream was stopped and the notice shown at once.
    assert calls["append"] == 1
    assert notice_lag <= 3 * LATENCY


#: Slack's chat.startStream / chat.stopStream: Tier 2, about 20 calls a minute per workspace.
TIER_2 = 20 / 60


def landed(platform: Platform, surface: FakeSurface) -> float:
    """When the last of ``surface``'s messages first showed its final text."""
    return max(
        min(t for t, mid, text in platform.log if mid == message and text == platform.texts[mid])
        for message in surface.posted
    )


def test_replies_queued_for_a_native_stream_post_the_answer_once_it_is_complete() -> None:
    async def main() -> tuple[list[float], list[list[str]], dict[str, int], float]:
        loop = asyncio.get_running_loop()
        platform = Platform(latency=LATENCY)
        budgets = Budgets(now=loop.time)

        def surface(n: int) -> FakeAppendSurface:
            return FakeAppendSurface(
                platform,
                post_scopes=(RateScope(f"post:{n}", 1.0, 1),),
                start_scopes=(RateScope("start", TIER_2, 1),),
                stop_scopes=(RateScope("stop", TIER_2, 1),),
                append_scopes=(RateScope("append", 100 / 60, 5),),
            )

        async def one(surface: FakeAppendSurface, at: float) -> float:
            await asyncio.sleep(at - loop.time())
            streamer = streamer_for(surface, budgets)
            await streamer.begin()
            await feed(streamer, words(20))
            last_token = loop.time()
            await streamer.finish()
            return landed(platform, surface) - last_token

        surfaces = [surface(n) for n in range(6)]
        lags = await asyncio.gather(*(one(s, 0.0) for s in surfaces))
        # One stream start went out in the first three seconds, so one is available again.
        late = surface(6)
        await one(late, 3.0)
        late_first_shown = min(t for t, mid, _ in platform.log if mid in late.posted)
        return lags, [s.messages() for s in surfaces], platform.calls, late_first_shown

    lags, shown, calls, late_first_shown = run_virtual(main())
    assert shown == [["".join(words(20))]] * 6
    # Five replies found the stream budget taken: each posted its complete answer as soon as it
    # was done, instead of waiting up to 15 s for a Tier 2 start it no longer needed.
    assert max(lags) <= 2 * LATENCY
    assert calls["start"] == 2 and calls["post"] == 5
    # And they gave their places in the queue up without spending the budget.
    assert late_first_shown <= 3.0 + LATENCY


def test_a_reply_waiting_to_append_when_the_answer_completes_stops_at_once() -> None:
    async def main() -> tuple[list[str], dict[str, int], float]:
        loop = asyncio.get_running_loop()
        platform = Platform(latency=LATENCY)
        surface = FakeAppendSurface(platform, append_scopes=(RateScope("append", 0.2, 1),))
        streamer = streamer_for(surface)
        await streamer.begin()
        await feed(streamer, words(20))
        last_token = loop.time()
        await streamer.finish()
        return surface.messages(), platform.calls, landed(platform, surface) - last_token

    shown, calls, lag = run_virtual(main())
    assert shown == ["".join(words(20))]
    # The second append's turn was 5 s away; the stop carried the rest of the text instead.
    assert calls == {"start": 1, "append": 1, "stop": 1}
    assert lag <= 2 * LATENCY


def test_a_finished_reply_lands_its_final_text_ahead_of_other_replies_progress_edits() -> None:
    #: Slack's chat.update: Tier 3, about 50 calls a minute per workspace.
    interval = 60 / 50

    async def main() -> tuple[float, list[str], list[list[str]], int, list[int]]:
        loop = asyncio.get_running_loop()
        platform = Platform(latency=LATENCY)
        edit = RateScope("workspace:chat.update", 1 / interval, 1)
        budgets = Budgets(now=loop.time)

        def surface(n: int) -> FakeSurface:
            return FakeSurface(
                platform,
                max_chars=20_000,  # one message per reply: the queue is what is measured
                post_scopes=(RateScope(f"post:{n}", 1.0, 1),),
                edit_scopes=(edit,),
            )

        async def one(surface: FakeSurface, count: int) -> float:
            streamer = streamer_for(surface, budgets)
            await streamer.begin()
            await feed(streamer, words(count))
            last_token = loop.time()
            await streamer.finish()
            return last_token

        # Ten replies stream for 30 s each, keeping the edit queue about ten deep ...
        busy = [surface(n) for n in range(10)]
        others = [asyncio.create_task(one(s, 1200)) for s in busy]
        # ... and a short one, asked a little later, finishes while they are all mid-stream.
        await asyncio.sleep(8.0)
        short = surface(10)
        last_token = await one(short, 80)
        lag = landed(platform, short) - last_token
        await asyncio.gather(*others)
        edits_after = [
            sum(1 for t, mid, _ in platform.log if mid in s.posted and t > last_token) for s in busy
        ]
        shown = [s.messages() for s in busy]
        return lag, short.messages(), shown, platform.rate_limited, edits_after

    lag, short, busy, limited, edits_after = run_virtual(main())
    assert short == ["".join(words(80))]
    assert busy == [["".join(words(1200))]] * 10
    assert limited == 0
    # The final edit jumped the queue of progress edits: one pacing interval and the call's
    # latency at most, instead of a turn behind the ten others (about 12 s).
    assert lag <= interval + 2 * LATENCY
    # The others kept being edited while it went first.
    assert all(count >= 2 for count in edits_after)


def test_replies_finishing_together_land_at_once_with_the_burst_progress_edits_left() -> None:
    #: Discord: about 5 message edits per 5 s per channel; every reply here is in one channel.
    edit = RateScope("channel:edit", 1.0, 5)

    async def main() -> tuple[list[float], list[list[str]], int, list[int]]:
        loop = asyncio.get_running_loop()
        platform = Platform(latency=LATENCY)
        budgets = Budgets(now=loop.time)
        surfaces = [
            FakeSurface(
                platform, post_scopes=(RateScope(f"post:{n}", 1.0, 5),), edit_scopes=(edit,)
            )
            for n in range(5)
        ]

        async def one(surface: FakeSurface) -> float:
            streamer = streamer_for(surface, budgets)
            await streamer.begin()
            await feed(streamer, words(60))  # 1.5 s each, all at once
            last_token = loop.time()
            await streamer.finish()
            return landed(platform, surface) - last_token

        lags = await asyncio.gather(*(one(surface) for surface in surfaces))
        edits = [sum(1 for _, mid, _ in platform.log if mid in s.posted) - 1 for s in surfaces]
        return lags, [s.messages() for s in surfaces], platform.rate_limited, edits

    lags, shown, limited, edits = run_virtual(main())
    assert shown == [["".join(words(60))]] * 5
    assert limited == 0
    # Progress edits kept to the sustained rate and left the burst: the five final edits went
    # at once (the bucket refilled a little meanwhile), instead of a second apart after it.
    assert max(lags) <= 1.0 + 2 * LATENCY
    assert sum(sorted(lags)[:4]) <= 4 * 2 * LATENCY
    # Someone still saw progress while the answers streamed.
    assert sum(edits) > 5


# -- property: whatever happens on the way, the final messages are the text -------------------

FENCE_OPEN = "```"


def open_fence_line(text: str) -> str | None:
    """The opening line of a ``` block open after the complete lines of ``text`` (test-local)."""
    opening = None
    for line in text.split("\n")[:-1]:
        if line.startswith(FENCE_OPEN):
            opening = line if opening is None else (None if line.strip() == FENCE_OPEN else opening)
    return opening


def open_block(text: str) -> str | None:
    """The opening line of the ``` block open at the end of a message ending with ``text``: the
    complete lines decide, and a last partial line that opens a block counts (test-local)."""
    opening = open_fence_line(text)
    last = text.split("\n")[-1]
    if opening is None and last.startswith(FENCE_OPEN):
        return last
    return opening


def reassemble(messages: list[str], text: str, out: str = "") -> str | None:
    """Undo the splitter's close/reopen of code blocks; None if ``messages`` are not ``text``.

    A message may end with a close the splitter added (then the text is inside a code block
    there, and the next message starts by reopening that block: with its opening line, or with
    the bare fence when that line is long or was cut in two); the ways to read a message's ends
    are tried in turn against the text.
    """
    if not messages:
        return out if out == text else None
    message, rest = messages[0], messages[1:]
    bodies = [message]
    if out:
        opening = open_fence_line(out)
        if opening is None and open_block(out) is not None:
            reopens = [FENCE_OPEN]  # the previous message ended inside the opening line
        else:
            reopens = list(dict.fromkeys([FENCE_OPEN, opening])) if opening is not None else []
        if reopens:
            bodies = [message[len(r) + 1 :] for r in reopens if message.startswith(r + "\n")]
    for body in bodies:
        options = [(body, False)]
        if rest and body.endswith("```"):
            options.append((body[:-3], True))
        if rest and body.endswith("\n```"):
            options.append((body[:-4], True))
        for part, closed in options:
            inside = open_block(out + part) is not None
            if text.startswith(out + part) and (not rest or inside == closed):
                found = reassemble(rest, text, out + part)
                if found is not None:
                    return found
    return None


def balanced(message: str) -> bool:
    return open_fence_line(message + "\n") is None


word = st.sampled_from(
    ["a", "bb", "ccc", "dddd", "eeeee", "fffffff", "lorem", "ipsum"]
) | st.integers(min_value=30, max_value=90).map(lambda size: "x" * size)
line = st.lists(word, min_size=1, max_size=6).map(" ".join)
paragraph = st.lists(line, min_size=1, max_size=3).map("\n".join)
# Info strings up to several hundred characters: longer than a whole message at small limits.
info = st.sampled_from(["", "py", "js"]) | line.map(lambda words: "py title=" + words)
code = st.tuples(info, st.lists(line, max_size=4)).map(
    lambda parts: "```" + parts[0] + "\n" + "".join(f"    {row}\n" for row in parts[1]) + "```"
)
document = st.lists(st.one_of(paragraph, code), min_size=1, max_size=5).map("\n\n".join)


def runs_capped(faults: list[str | None], most: int) -> list[str | None]:
    """Faults with no run of one kind longer than ``most`` (longer runs mean 'platform down')."""
    capped: list[str | None] = []
    for fault in faults:
        if fault is not None and capped[-most:] == [fault] * most:
            fault = None
        capped.append(fault)
    return capped


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=document,
    cuts=st.lists(st.integers(min_value=1, max_value=60), max_size=20),
    gaps=st.lists(st.sampled_from([0.0, 0.01, 0.05, 0.3, 1.5]), min_size=1, max_size=8),
    faults=st.lists(st.sampled_from([None, None, None, "429", "500"]), max_size=40),
    limit=st.integers(min_value=40, max_value=400),
    native=st.booleans(),
)
def test_final_messages_are_the_text_within_limits_with_balanced_fences(
    text: str,
    cuts: list[int],
    gaps: list[float],
    faults: list[str | None],
    limit: int,
    native: bool,
) -> None:
    tokens, rest = [], text
    for size in itertools.cycle(cuts or [len(text)]):
        if not rest:
            break
        tokens.append(rest[:size])
        rest = rest[size:]

    async def main() -> tuple[list[str], bool]:
        platform = Platform(latency=LATENCY, faults=iter(runs_capped(faults, 2)))
        kind = FakeAppendSurface if native else FakeSurface
        surface = kind(platform, max_chars=limit, edit_scopes=(RateScope("edit", 2.0, 2),))
        streamer = streamer_for(surface)
        await streamer.begin()
        for token, gap in zip(tokens, itertools.cycle(gaps), strict=False):
            await asyncio.sleep(gap)
            streamer.write(token)
        await streamer.finish()
        return surface.messages(), streamer.delivered

    quiet = logging.getLogger("core.streaming")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # expected retries would log thousands of warnings
    try:
        messages, delivered = run_virtual(main())
    finally:
        quiet.setLevel(level)
    assert delivered
    assert all(len(message) <= limit for message in messages)
    assert all(balanced(message) for message in messages), messages
    assert reassemble(messages, text) == text


# ---- a status while waiting, and the held first post ----------------------------------------

#: A Slack-like edit scope: a small burst, refilled slowly (chat.update: 50 a minute).
SCARCE_EDITS = (RateScope("edit", 50 / 60, 3),)


async def spend(budgets: Budgets, scopes: tuple[RateScope, ...], calls: int) -> None:
    """Other replies' calls: the scope's burst is spent."""
    for _ in range(calls):
        await budgets.acquire(scopes)


def test_an_answer_complete_before_an_edit_is_due_is_one_post_and_no_edit() -> None:
    async def main() -> tuple[dict[str, int], list[str], int, list[tuple[float, str, str]]]:
        platform = Platform(latency=LATENCY)
        budgets = Budgets(now=asyncio.get_running_loop().time)
        await spend(budgets, SCARCE_EDITS, 3)
        surface = FakeSurface(platform, typing=True, edit_scopes=SCARCE_EDITS)
        streamer = streamer_for(surface, budgets)
        await streamer.begin()
        await feed(streamer, words(20))  # half a second of answer
        await streamer.finish()
        return platform.calls, surface.messages(), surface.typing_calls, platform.log

    calls, shown, typing_calls, log = run_virtual(main())
    assert calls == {"post": 1}
    assert shown == ["".join(words(20))]
    assert typing_calls == 1
    assert [text for _, _, text in log] == ["".join(words(20))]


def test_with_a_status_a_long_answer_starts_posting_once_an_edit_is_due() -> None:
    async def main() -> tuple[Platform, list[str], float]:
        loop = asyncio.get_running_loop()
        platform = Platform(latency=LATENCY)
        budgets = Budgets(now=loop.time)
        await spend(budgets, SCARCE_EDITS, 3)
        surface = FakeSurface(platform, typing=True, edit_scopes=SCARCE_EDITS)
        streamer = streamer_for(surface, budgets)
        await streamer.begin()
        await feed(streamer, words(400))  # ten seconds of answer
        last_token = loop.time()
        await streamer.finish()
        return platform, surface.messages(), last_token

    platform, shown, last_token = run_virtual(main())
    calls, log = platform.calls, platform.log
    assert shown == ["".join(words(400))]
    # Posted while the answer was still coming (once edits were due), then edited.
    first_at, _, first_text = log[0]
    assert first_at < last_token and first_text.endswith(STREAMING_INDICATOR)
    assert first_text != THINKING_TEXT
    assert calls["post"] == 1 and calls["edit"] >= 2
    assert platform.rate_limited == 0


def test_with_a_status_and_idle_edits_the_first_text_is_posted_at_once() -> None:
    async def main() -> tuple[list[tuple[float, str, str]], list[str]]:
        platform = Platform(latency=LATENCY)
        surface = FakeSurface(platform, typing=True, edit_scopes=SCARCE_EDITS)
        streamer = streamer_for(surface)
        await streamer.begin()
        await asyncio.sleep(1.0)
        await feed(streamer, words(40), gap=0.05)
        await streamer.finish()
        return platform.log, surface.messages()

    log, shown = run_virtual(main())
    assert shown == ["".join(words(40))]
    first_at, _, first_text = log[0]
    assert first_text.startswith("w0 ") and first_text.endswith(STREAMING_INDICATOR)
    assert first_at < 1.0 + 0.05 * 40  # before the answer was complete


class BrokenStatus(FakeSurface):
    """A surface whose status call fails or never answers."""

    def __init__(self, platform: Platform, *, hang: bool) -> None:
        super().__init__(platform, typing=True)
        self.hang = hang
        self.cancelled = False

    async def show_typing(self) -> bool:
        self.typing_calls += 1
        if not self.hang:
            raise TransientSurfaceError("status: 500")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return True


@pytest.mark.parametrize("hang", [False, True], ids=["raises", "hangs"])
def test_a_status_that_fails_or_hangs_does_not_delay_the_first_text(hang: bool) -> None:
    async def main() -> tuple[list[tuple[float, str, str]], list[str]]:
        platform = Platform(latency=LATENCY)
        surface = BrokenStatus(platform, hang=hang)
        streamer = streamer_for(surface)
        await streamer.begin()
        await asyncio.sleep(0.5)
        await feed(streamer, words(10))
        await streamer.finish()
        return platform.log, surface.messages()

    log, shown = run_virtual(main())
    assert shown == ["".join(words(10))]
    text_at = next(at for at, _, text in log if text.startswith("w0"))
    # The first token came at 0.525 s: shown one call later, long before the status timed out.
    assert text_at <= 0.525 + 2 * LATENCY
    if not hang:
        assert log[0][2] == THINKING_TEXT  # the failed status: the "Thinking…" message at once


def test_a_status_that_never_answers_counts_as_none_after_its_timeout() -> None:
    async def main() -> tuple[list[tuple[float, str, str]], bool]:
        platform = Platform(latency=LATENCY)
        surface = BrokenStatus(platform, hang=True)
        streamer = streamer_for(surface, status_timeout=2.0)
        await streamer.begin()
        await asyncio.sleep(5.0)
        streamer.write("late")
        await streamer.finish()
        return platform.log, surface.cancelled

    log, cancelled = run_virtual(main())
    assert log[0][2] == THINKING_TEXT and 2.0 <= log[0][0] < 5.0
    assert cancelled  # the status call was given up, not left running


def test_a_burst_of_short_answers_under_a_status_lands_as_one_post_each() -> None:
    """Twenty short answers at once sharing a workspace's scarce edit budget."""

    async def burst(typing: bool) -> tuple[dict[str, int], int, list[list[str]]]:
        loop = asyncio.get_running_loop()
        platform = Platform(latency=LATENCY)
        budgets = Budgets(now=loop.time)
        surfaces = [
            FakeSurface(
                platform,
                typing=typing,
                edit_scopes=SCARCE_EDITS,
                post_scopes=(RateScope(f"post:{n % 5}", 1.0, 1), RateScope("post", 5.0, 1)),
            )
            for n in range(20)
        ]

        async def reply(surface: FakeSurface) -> None:
            streamer = streamer_for(surface, budgets)
            await streamer.begin()
            await asyncio.sleep(0.4)
            await feed(streamer, words(30), gap=0.03)
            await streamer.finish()

        await asyncio.gather(*(reply(surface) for surface in surfaces))
        return platform.calls, platform.rate_limited, [s.messages() for s in surfaces]

    async def main() -> tuple[tuple[dict[str, int], int, list[list[str]]], ...]:
        return await burst(True), await burst(False)

    (calls, limited, shown), (thinking_calls, _, thinking_shown) = run_virtual(main())
    expected = ["".join(words(30))]
    assert shown == thinking_shown == [expected] * 20
    assert limited == 0
    assert calls["post"] == 20
    # Without a status, the replies whose "Thinking…" went out before their answer was
    # complete edit it; with one, only the few replies an idle edit budget let stream do.
    assert calls.get("edit", 0) < thinking_calls["edit"]
    assert calls.get("edit", 0) <= 3


# ---- live controls ---------------------------------------------------------------------------


class ControlledSurface(FakeSurface):
    """A surface with a Stop button while a message streams (``LiveControls``)."""

    def __init__(self, platform: Platform, **kwargs: object) -> None:
        super().__init__(platform, **kwargs)  # type: ignore[arg-type]
        self.live: bool | None = None
        # (message id or "new", live, text) for every post and edit.
        self.calls: list[tuple[str, bool | None, str]] = []

    def controls(self, live: bool) -> None:
        self.live = live

    async def post(self, text: str) -> str:
        live, self.live = self.live, None
        message_id = await super().post(text)
        self.calls.append((message_id, live, text))
        return message_id

    async def edit(self, message_id: str, text: str) -> None:
        live, self.live = self.live, None
        await super().edit(message_id, text)
        self.calls.append((message_id, live, text))


@pytest.mark.parametrize("ending", ["finish", "cancel", "fail"])
def test_live_controls_show_while_a_message_streams_and_go_with_its_final_text(
    ending: str,
) -> None:
    async def main() -> list[tuple[str, bool | None, str]]:
        platform = Platform(latency=LATENCY)
        surface = ControlledSurface(platform, max_chars=120)
        streamer = streamer_for(surface)
        await streamer.begin()
        await feed(streamer, words(60))  # 230 characters: two messages
        if ending == "finish":
            await streamer.finish()
        elif ending == "cancel":
            await streamer.cancel("_Stopped._")
        else:
            await streamer.fail("The model is down.")
        return surface.calls

    calls = run_virtual(main())
    assert all(live is not None for _, live, _ in calls)  # told before every call
    assert all(live for _, live, text in calls if text.endswith(STREAMING_INDICATOR))
    final: dict[str, bool | None] = {}
    for message_id, live, _ in calls:
        final[message_id] = live
    assert len(final) >= 2 and not any(final.values())  # every message ends without controls
    assert calls[0][1] is True  # "Thinking…" streams too: stoppable at once
