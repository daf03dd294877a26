"""Five replies streaming at once in one Discord channel, at Discord's real per-channel limits.

The real discord.py client (DiscordBot) against the local fake Discord (tests/wire/discord),
which enforces 5 posts and 5 edits per 5 s per channel and 50 requests/s per bot with real 429s.
The bot may not open threads in the channel, so every reply lands in the channel itself and all
share one edit bucket: the worst case for pacing. Prints 429s seen, edits made, and the slowest
reply's end lag (its last token -> its final text on Discord).

    .venv/bin/python bench/discord_concurrency.py [--replies 5] [--delay 0.03] [--window 5]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.conversation import ChatMessage
from core.providers.offline import OfflineProvider, demo_answer
from tests.wire.discord.harness import running_bot
from tests.wire.discord.server import FakeDiscord


async def run(replies: int, delay: float, window: float) -> None:
    fake = FakeDiscord(window=window)
    await fake.start()
    fake.no_thread_permission.add(fake.text_channel)
    with tempfile.TemporaryDirectory() as tmp:
        async with running_bot(Path(tmp), fake=fake) as bot:
            provider = OfflineProvider(bot.settings, delay=delay)
            bot.engine.provider = provider
            questions = [f"concurrent question {i}" for i in range(replies)]
            expected = {q: "".join(demo_answer([ChatMessage("user", q)])) for q in questions}
            started = time.monotonic()
            sent = await asyncio.gather(
                *(fake.send_message(fake.text_channel, q) for q in questions)
            )
            by_id = {int(m["id"]): q for m, q in zip(sent, questions, strict=True)}

            def done() -> bool:
                shown = {m.content for m in fake.bot_messages_in(fake.text_channel)}
                return all(text in shown for text in expected.values())

            await fake.wait_for(done, give_up_after=300)
            await bot.settle()
            finished = time.monotonic()
            lags = []
            for message in fake.bot_messages_in(fake.text_channel):
                question = by_id[message.reference or 0]
                final_at = message.times[message.states.index(expected[question])]
                lags.append((final_at - provider.last_token_at[question], question))
    await fake.close()
    slowest, which = max(lags)
    print(
        f"{replies} concurrent replies in one channel, {delay:.3f}s per word, {window:g}s windows"
    )
    print(f"  429s seen:          {fake.total_429s} ({dict(fake.rate_limited) or 'none'})")
    print(f"  edits made:         {fake.edits} (posts {fake.requests['POST message']})")
    print(f"  slowest end lag:    {slowest:.2f}s ({which!r}: last token -> final text)")
    print(f"  median end lag:     {sorted(lag for lag, _ in lags)[len(lags) // 2]:.2f}s")
    print(f"  wall time:          {finished - started:.2f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=5)
    parser.add_argument("--delay", type=float, default=0.03, help="seconds between streamed words")
    parser.add_argument("--window", type=float, default=5.0, help="rate-limit window in seconds")
    args = parser.parse_args()
    # The bot's warnings (no thread permission, by design here) would drown the figures.
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(run(args.replies, args.delay, args.window))


if __name__ == "__main__":
    main()
