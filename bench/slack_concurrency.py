"""Twenty conversations starting at once in one Slack workspace, at Slack's real rate limits,
measured end to end.

The real Bolt app in HTTP mode and the real AsyncWebClient against the local fake Slack Web API
(tests/wire/slack), which enforces Slack's published limits per method per workspace (and
chat.postMessage's per channel) with real 429s. Each conversation is a mention at the top of a
channel; its end-to-end time runs from the moment its mention is sent to the moment the fake
Slack first shows its reply's final text (the whole answer, streaming indicator gone). Prints,
for each streaming mode: the slowest and median end-to-end seconds, the first message's median, the lag from the last token to the final text, the
429s seen, and the calls made per method.

    .venv/bin/python bench/slack_concurrency.py [--conversations 20] [--channels 5]
        [--scale 1] [--delay 0.03] [--modes update,auto,native]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.conversation import ChatMessage
from core.providers.offline import OfflineProvider, demo_answer
from tests.wire.slack import FakeSlack, Message
from tests.wire.slack.harness import running_bot

#: Methods the bench leaves out of its per-method counts (start-up, not the burst).
NOT_COUNTED = frozenset({"auth.test"})


def final_shown_at(replies: list[Message], expected: str) -> float | None:
    """When the reply first showed ``expected`` whole (its last message's first final state)."""
    if not replies or "".join(m.visible() for m in replies) != expected:
        return None
    last = replies[-1]
    return last.times[last.states.index(last.visible())]


async def run(mode: str, conversations: int, channels: int, scale: float, delay: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/bench.db"
        async with (
            FakeSlack(rate_scale=scale) as fake,
            # One fake user asks all twenty: the per-user message rate is not what this measures.
            running_bot(
                url, streaming=mode, rate_scale=scale, fake=fake, user_messages_per_minute=0
            ) as h,
        ):
            provider = OfflineProvider(h.bot.settings, delay=delay)
            h.engine.provider = provider
            questions: dict[tuple[str, str], str] = {}
            for n in range(conversations):
                channel = f"C{n % channels + 1:04d}"
                questions[(channel, h.new_ts())] = f"question number {n}"
            sent: dict[tuple[str, str], float] = {}

            async def ask(channel: str, ts: str, text: str) -> None:
                sent[(channel, ts)] = time.monotonic()
                await h.sender.mention(text, channel=channel, ts=ts)

            started = time.monotonic()
            await asyncio.gather(*(ask(c, ts, text) for (c, ts), text in questions.items()))
            await h.settle()
            elapsed = time.monotonic() - started

            ends: list[float] = []
            firsts: list[float] = []
            lags: list[float] = []
            incomplete = 0
            for (channel, ts), text in questions.items():
                expected = "".join(demo_answer([ChatMessage("user", text)]))
                replies = fake.bot_messages(channel, ts)
                shown = final_shown_at(replies, expected)
                if shown is None:
                    incomplete += 1
                    continue
                ends.append(shown - sent[(channel, ts)])
                firsts.append(replies[0].times[0] - sent[(channel, ts)])
                lags.append(shown - provider.last_token_at[text])
            calls = {k: v for k, v in sorted(fake.counts.items()) if k not in NOT_COUNTED}
            print(
                f"mode={mode}: {conversations} conversations in {channels} channels, "
                f"rate scale {scale:g}, {delay * 1000:.0f} ms between tokens"
            )
            print(f"  complete replies:         {conversations - incomplete}/{conversations}")
            if ends:
                print(
                    f"  end to end (final text): slowest {max(ends):.2f} s, "
                    f"median {statistics.median(ends):.2f} s"
                )
                print(f"  first message shown:     median {statistics.median(firsts):.2f} s")
                print(
                    f"  last token -> final:     slowest {max(lags):.2f} s, "
                    f"median {statistics.median(lags):.2f} s (pacing and Slack's answers)"
                )
            print(
                f"  429s seen:                {fake.ratelimited.total()} {dict(fake.ratelimited)}"
            )
            print(f"  calls per method:         {calls} (total {sum(calls.values())})")
            print(f"  wall time:                {elapsed:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="Slack rate multiplier")
    parser.add_argument("--delay", type=float, default=0.03, help="seconds between tokens")
    parser.add_argument("--modes", default="update,auto,native")
    args = parser.parse_args()
    for mode in args.modes.split(","):
        asyncio.run(run(mode, args.conversations, args.channels, args.scale, args.delay))


if __name__ == "__main__":
    main()
