"""Tokens sent per turn under each history strategy, and the cost of building a window.

Run: ``python bench/history.py``. Prints figures; asserts nothing.

1. A scripted 200-turn conversation whose messages grow longer as it goes (the user pastes more,
   the answers get longer), played once per strategy (count, tokens, summary) on a temp SQLite
   file with the deployment defaults: MAX_HISTORY_MESSAGES=20, MAX_HISTORY_TOKENS=8000,
   REPLY_RESERVE_TOKENS=1024. Each turn stores the user message, loads the window as the engine
   does, stores the answer and runs the policy's upkeep (awaited here, so the run is repeatable;
   the engine runs it in the background). Summaries come from the offline provider, answering
   with a digest of what it is asked to fold. Tokens are counted with the offline estimate.
2. With the 200 turns (400 messages) stored: the time to build the next window as the engine
   does per turn (policy_for + load: the history query and the windowing), and the pure
   windowing (build) alone.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import Settings
from core.conversation import ChatMessage, ConversationKey
from core.history import HistoryPolicy, Window, policy_for
from core.providers.offline import OfflineProvider
from core.store import ConversationStore
from core.tokens import CHARS_PER_TOKEN

TURNS = 200
LOADS = 300
WARMUP_LOADS = 30
STRATEGIES = ("count", "tokens", "summary")
SYSTEM = "You are a helpful assistant in a team chat. Answer clearly and concisely."
SENTENCE = (
    "the deploy failed because the migration locked the orders table while the worker retried "
    "each batch with a longer timeout so we moved the index build to a separate step and the "
    "queue drained after the cache warmed up again in the morning"
)
VOCABULARY = tuple(SENTENCE.split(" "))


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(count))


def script(turns: int) -> list[tuple[str, str]]:
    """(question, answer) per turn; both grow with the turn number."""
    rng = random.Random(6)
    return [
        (f"Turn {n}: " + words(rng, 15 + 3 * n), f"Answer {n}: " + words(rng, 40 + 2 * n))
        for n in range(turns)
    ]


class DigestProvider(OfflineProvider):
    """Summarises by keeping the first words of each folded message, within ``max_tokens``."""

    async def complete(
        self, messages: Sequence[ChatMessage], *, system: str, max_tokens: int
    ) -> str:
        await super().complete(messages, system=system, max_tokens=max_tokens)  # recorded
        request = messages[-1].content
        previous = request.split("Summary so far:\n", 1)[1].split("\n\nMessages that follow", 1)[0]
        folded = request.split("Messages that follow it:\n", 1)[1].rsplit("\n\nWrite the", 1)[0]
        heads = [" ".join(line.split()[:8]) for line in folded.split("\n\n")]
        digest = ("" if previous == "(none yet)" else previous + " ") + "; ".join(heads)
        return digest[-int(max_tokens * CHARS_PER_TOKEN * 0.9) :]


async def play(strategy: str, directory: Path) -> tuple[list[Window], ConversationStore, Settings]:
    settings = Settings.from_mapping(
        {
            "DATABASE_URL": f"sqlite+aiosqlite:///{directory / f'{strategy}.db'}",
            "HISTORY_STRATEGY": strategy,
            "OFFLINE_DELAY": "0",
        }
    )
    store = await ConversationStore.open(settings.database_url)
    provider = DigestProvider(settings, delay=0)
    key = ConversationKey("bench", "w", strategy, "t")
    conversation, _ = await store.get_or_create(key)
    windows: list[Window] = []
    for question, answer in script(TURNS):
        conversation = await store.get(conversation.id)
        await store.append(conversation, "user", question)
        policy = policy_for(settings, await store.channel_settings("bench", "w", strategy))
        windows.append(await policy.load(store, conversation, system=SYSTEM))
        await store.append(conversation, "assistant", answer)
        await policy.after_turn(store, conversation, provider)
    if strategy == "summary":
        print(f"  summary: {len(provider.requests)} folds in {TURNS} turns")
    return windows, store, settings


async def time_window(store: ConversationStore, settings: Settings, strategy: str) -> None:
    key = ConversationKey("bench", "w", strategy, "t")
    conversation = await store.find(key)
    assert conversation is not None
    channel = await store.channel_settings("bench", "w", strategy)
    for _ in range(WARMUP_LOADS):  # connections opened, statements compiled and cached
        await policy_for(settings, channel).load(store, conversation, system=SYSTEM)
    loads: list[float] = []
    for _ in range(LOADS):
        start = time.perf_counter()
        policy: HistoryPolicy = policy_for(settings, channel)
        await policy.load(store, conversation, system=SYSTEM)
        loads.append(time.perf_counter() - start)
    rows = await store.history(conversation, limit=None, after_id=conversation.summary_upto_id)
    builds: list[float] = []
    for _ in range(LOADS):
        start = time.perf_counter()
        policy.build(rows, system=SYSTEM, summary=conversation.summary)
        builds.append(time.perf_counter() - start)
    loads.sort()
    print(
        f"  {strategy:8} load {statistics.median(loads) * 1000:6.3f} ms median, "
        f"{loads[int(len(loads) * 0.95)] * 1000:6.3f} ms p95;  build alone "
        f"{statistics.median(builds) * 1000:6.3f} ms ({len(rows)} messages given)"
    )


async def main() -> None:
    settings = Settings()
    budget = settings.max_history_tokens - settings.reply_reserve_tokens
    print(
        f"{TURNS}-turn scripted conversation; MAX_HISTORY_TOKENS={settings.max_history_tokens}, "
        f"REPLY_RESERVE_TOKENS={settings.reply_reserve_tokens} (request budget {budget:,}), "
        f"MAX_HISTORY_MESSAGES={settings.max_history_messages}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, list[Window]] = {}
        stores: dict[str, tuple[ConversationStore, Settings]] = {}
        for strategy in STRATEGIES:
            windows, store, strategy_settings = await play(strategy, Path(tmp))
            runs[strategy] = windows
            stores[strategy] = (store, strategy_settings)

        print("\nTokens sent per request (system prompt + history), every 10th turn:")
        print(f"{'turn':>5} {'message':>8} " + " ".join(f"{s:>16}" for s in STRATEGIES))
        for n in [0, *range(9, TURNS, 10)]:
            question, _ = script(TURNS)[n]
            cells = []
            for strategy in STRATEGIES:
                window = runs[strategy][n]
                mark = "+S" if window.summary_included else "  "
                cells.append(f"{window.tokens:>9,} {len(window.messages):>3}m{mark}")
            size = len(question) / CHARS_PER_TOKEN
            print(f"{n + 1:>5} {size:>7,.0f}t " + " ".join(f"{c:>16}" for c in cells))
        print("(m: messages sent; +S: a summary is included; message: the turn's question)")

        print("\nOver all turns:")
        for strategy in STRATEGIES:
            sent = [w.tokens for w in runs[strategy]]
            over = sum(1 for t in sent if t > budget)
            print(
                f"  {strategy:8} max {max(sent):>7,}  mean {statistics.mean(sent):>8,.0f}  "
                f"total {sum(sent):>10,}  turns over the {budget:,} budget: {over}"
            )

        print(f"\nBuilding the next window at {TURNS} turns ({2 * TURNS} stored messages), SQLite:")
        for strategy in STRATEGIES:
            store, strategy_settings = stores[strategy]
            await time_window(store, strategy_settings, strategy)
            await store.close()


if __name__ == "__main__":
    asyncio.run(main())
