"""Twenty conversations streaming at once in one Slack workspace, at Slack's real rate limits.

The real Bolt app in HTTP mode and the real AsyncWebClient against the local fake Slack Web API
(tests/wire/slack), which enforces Slack's published limits per method per workspace with real
429s. Prints, for each streaming mode: 429s seen, calls made per method, and the time from the
last token to the final text for the slowest reply.

    .venv/bin/python bench/slack_concurrency.py [--conversations 20] [--channels 5]
        [--scale 1] [--delay 0.03] [--modes update,auto,native]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.conversation import ChatMessage
from core.providers.offline import OfflineProvider, demo_answer
from tests.wire.slack import FakeSlack
from tests.wire.slack.harness import running_bot


async def run(mode: str, conversations: int, channels: int, scale: float, delay: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/bench.db"
        async with (
            FakeSlack(rate_scale=scale) as fake,
            running_bot(url, streaming=mode, rate_scale=scale, fake=fake) as h,
        ):
            provider = OfflineProvider(h.bot.settings, delay=delay)
            h.engine.provider = provider
            questions: dict[tuple[str, str], str] = {}
            for n in range(conversations):
                channel = f"C{n % channels + 1:04d}"
                questions[(channel, h.new_ts())] = f"question number {n}"
            started = time.monotonic()
            await asyncio.gather(
                *(
                    h.sender.mention(text, channel=channel, ts=ts)
                    for (channel, ts), text in questions.items()
                )
            )
            await h.settle()
            elapsed = time.monotonic() - started

            lags: list[float] = []
            complete = 0
            for (channel, ts), text in questions.items():
                expected = "".join(demo_answer([ChatMessage("user", text)]))
                replies = fake.bot_messages(channel, ts)
                if [m.visible() for m in replies] == [expected]:
                    complete += 1
                final_at = max(
                    m.times[m.states.index(m.visible())] for m in replies
                )  # when the message first showed its final text
                lags.append(final_at - provider.last_token_at[text])
            calls = {k: v for k, v in sorted(fake.counts.items()) if k != "auth.test"}
            print(
                f"mode={mode}: {conversations} conversations in {channels} channels, "
                f"rate scale {scale:g}, {delay * 1000:.0f} ms between tokens"
            )
            print(f"  complete replies:        {complete}/{conversations}")
            print(f"  429s seen:               {fake.ratelimited.total()}")
            print(f"  calls per method:        {calls} (total {sum(calls.values())})")
            print(
                f"  last token -> final text: slowest {max(lags):.2f} s, "
                f"median {sorted(lags)[len(lags) // 2]:.2f} s"
            )
            print(f"  wall time:               {elapsed:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
