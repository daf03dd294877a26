"""Engine overhead per token, and history-window load time for short and long conversations.

Run: ``python bench/engine.py``. Prints figures; asserts nothing.

1. The offline provider streams N chunks at full speed (no delay). We time iterating the provider
   alone, then full turns through ChatEngine (dedupe, lock, store both messages, window, retry
   wrapper) into a null sink, on a temp SQLite file. Overhead per token = (engine - provider) / N.
2. A conversation of 20 and one of 10,000 stored messages: time to load a 20-message window.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import Settings
from core.conversation import ConversationKey, IncomingMessage
from core.engine import ChatEngine
from core.history import policy_for
from core.providers.offline import OfflineProvider
from core.store import ConversationStore, MessageRow

TOKENS_PER_TURN = 2000
LONG_TURN_TOKENS = 50_000
TURNS = 9
WINDOW_LOADS = 200


class NullSink:
    """Accepts a reply and shows it nowhere."""

    async def begin(self) -> None:
        return None

    async def waiting(self, notice: str | None) -> None:
        return None

    def write(self, delta: str) -> None:
        return None

    async def retrying(self, notice: str) -> None:
        return None

    async def finish(self, note: str | None = None) -> list[str]:
        return []

    async def amend(self, note: str) -> None:
        return None

    async def fail(self, message: str) -> None:
        raise RuntimeError(message)

    async def cancel(self, note: str) -> None:
        return None


async def provider_alone(provider: OfflineProvider, tokens: int) -> float:
    provider.enqueue(["tok "] * tokens)
    start = time.perf_counter()
    async for _ in provider.stream([], system="s", max_tokens=10):
        pass
    return time.perf_counter() - start


async def engine_turn(engine: ChatEngine, provider: OfflineProvider, tokens: int, n: int) -> float:
    provider.enqueue(["tok "] * tokens)
    incoming = IncomingMessage(
        key=ConversationKey("bench", "w", "c", str(n % 3)),
        text=f"q{n}",
        user_id="u",
        message_id=f"m{n}",
    )
    start = time.perf_counter()
    await engine.handle(incoming, NullSink())
    return time.perf_counter() - start


async def bench_overhead(directory: Path) -> None:
    settings = Settings.from_mapping({"OFFLINE_DELAY": "0"})
    store = await ConversationStore.open(f"sqlite+aiosqlite:///{directory / 'overhead.db'}")
    provider = OfflineProvider(settings, delay=0)
    engine = ChatEngine(settings, store, provider)
    await engine_turn(engine, provider, 10, -1)  # warm up
    counter = iter(range(10_000))
    rows = {}
    for tokens in (1, TOKENS_PER_TURN, LONG_TURN_TOKENS):
        alone = statistics.median([await provider_alone(provider, tokens) for _ in range(TURNS)])
        full = statistics.median(
            [await engine_turn(engine, provider, tokens, next(counter)) for _ in range(TURNS)]
        )
        rows[tokens] = (alone, full)
    await store.close()
    fixed = rows[1][1] - rows[1][0]
    a_long, f_long = rows[LONG_TURN_TOKENS]
    a_short, f_short = rows[TOKENS_PER_TURN]
    marginal = ((f_long - f_short) - (a_long - a_short)) / (LONG_TURN_TOKENS - TOKENS_PER_TURN)
    print(
        f"engine overhead (offline provider at full speed, null sink, SQLite, medians of {TURNS})"
    )
    print("  tokens/turn   provider alone    through engine    overhead/token (whole turn)")
    for tokens, (alone, full) in rows.items():
        print(
            f"  {tokens:>11,} {alone * 1e3:12.3f} ms {full * 1e3:14.3f} ms"
            f" {(full - alone) / tokens * 1e6:16.2f} µs"
        )
    print(f"  fixed cost per turn (dedupe, lock, 2 inserts, window read): {fixed * 1e3:.2f} ms")
    print(f"  marginal engine cost per streamed token: {marginal * 1e6:.3f} µs (target < 20)")
    print(
        f"  streaming-phase rate, engine / provider alone: "
        f"{(a_long - a_short) / (f_long - f_short):.2f}  (the provider yields a token every "
        f"{(a_long - a_short) / (LONG_TURN_TOKENS - TOKENS_PER_TURN) * 1e6:.2f} µs)"
    )
    for pace in (50, 200, 1000):
        model = TOKENS_PER_TURN / pace
        ratio = model / (model + (f_short - a_short))
        print(
            f"  at {pace:>4} tokens/s from the model, {TOKENS_PER_TURN:,}-token turns: engine delivers {ratio:.4f} of its rate"
        )


async def bench_window(directory: Path) -> None:
    settings = Settings.from_mapping({})
    store = await ConversationStore.open(f"sqlite+aiosqlite:///{directory / 'window.db'}")
    policy = policy_for(settings)
    results = {}
    for size in (20, 10_000):
        conversation, _ = await store.get_or_create(ConversationKey("bench", "w", "c", f"n{size}"))
        async with store.engine.begin() as conn:
            await conn.execute(
                MessageRow.__table__.insert(),
                [
                    {
                        "conversation_id": conversation.id,
                        "generation": 0,
                        "role": "user" if i % 2 == 0 else "assistant",
                        "content": f"message number {i} " * 20,
                        "created_at": datetime.now(UTC),
                    }
                    for i in range(size)
                ],
            )
        for _ in range(20):
            await policy.load(store, conversation, system="s")
        times = []
        for _ in range(WINDOW_LOADS):
            start = time.perf_counter()
            window = await policy.load(store, conversation, system="s")
            times.append(time.perf_counter() - start)
        assert len(window.messages) <= settings.max_history_messages
        results[size] = statistics.median(times)
    await store.close()
    print(
        f"history window load (count strategy, {settings.max_history_messages} messages, SQLite, median of {WINDOW_LOADS})"
    )
    for size, seconds in results.items():
        print(f"  {size:>6,} stored messages: {seconds * 1e3:6.3f} ms")
    print(f"  ratio 10,000 / 20: {results[10_000] / results[20]:.2f} (target <= 1.5)")


async def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        await bench_overhead(Path(directory))
        print()
        await bench_window(Path(directory))


if __name__ == "__main__":
    asyncio.run(main())
