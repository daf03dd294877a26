"""A running bot against the fake: the real DiscordBot, a ChatEngine on a temp SQLite file and
the offline provider, connected to ``FakeDiscord`` over loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import discord
from discord.gateway import DiscordWebSocket

from bots.discord.__main__ import point_discord_py_at
from bots.discord.client import DiscordBot
from core.config import Settings
from core.engine import ChatEngine
from core.providers.offline import OfflineProvider
from core.ratelimit import Budgets
from core.retry import RetryPolicy
from core.store import ConversationStore
from tests.wire.discord.server import BOT_TOKEN, FakeDiscord

# How long a broken test may hang before failing; never a timing assertion.
GIVE_UP_AFTER = 20.0


async def _instant_sleep(_seconds: float) -> None:
    await asyncio.sleep(0)


@dataclass
class RunningBot:
    """Everything a Discord test touches."""

    fake: FakeDiscord
    client: DiscordBot
    engine: ChatEngine
    provider: OfflineProvider
    settings: Settings
    announced: list[str] = field(default_factory=list)

    async def settle(self) -> None:
        """Wait until every turn the client has started is over."""
        await self.client.drain()

    async def final_texts(self, channel_id: int) -> list[str]:
        return [m.content for m in self.fake.bot_messages_in(channel_id)]

    async def answered(self, channel_id: int, text: str) -> None:
        """Wait until a bot message in ``channel_id`` shows exactly ``text``, then settle."""
        await self.fake.wait_for(
            lambda: any(m.content == text for m in self.fake.bot_messages_in(channel_id)),
            GIVE_UP_AFTER,
        )
        await self.settle()

    async def marker(self) -> int:
        """A DM round trip: once it is answered, every earlier event has been handled.

        Gateway events are handled in order and each turn's task is spawned before the next
        event is read, so when the marker's reply exists every earlier turn has started;
        ``settle`` then waits for them. Call it with no script queued (it takes the demo answer).
        Returns the marker's DM channel.
        """
        dm = self.fake.add_dm()
        await self.fake.send_message(dm, "marker", mention=False)
        await self.fake.wait_for(lambda: bool(self.fake.bot_messages_in(dm)), GIVE_UP_AFTER)
        await self.settle()
        return dm


def make_settings(fake: FakeDiscord, db: Path, **env: str) -> Settings:
    return Settings.from_mapping(
        {
            "DATABASE_URL": f"sqlite+aiosqlite:///{db}",
            "DISCORD_BOT_TOKEN": BOT_TOKEN,
            "DISCORD_API_URL": fake.api_url,
            "OFFLINE_DELAY": "0",
            "MAX_RETRY_ATTEMPTS": "2",
            **env,
        }
    )


@contextlib.asynccontextmanager
async def running_bot(
    tmp_path: Path,
    *,
    fake: FakeDiscord | None = None,
    env: dict[str, str] | None = None,
    budgets: Budgets | None = None,
    provider_delay: float = 0.0,
    **client_options: Any,
) -> AsyncIterator[RunningBot]:
    """Start the fake (unless given one already started) and the bot; stop both afterwards."""
    own_fake = fake is None
    if fake is None:
        fake = FakeDiscord()
        await fake.start()
    settings = make_settings(fake, tmp_path / "discord.db", **(env or {}))
    saved_base, saved_gateway = discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    point_discord_py_at(settings)
    store = await ConversationStore.open(settings.database_url)
    provider = OfflineProvider(settings, delay=provider_delay)
    retry = RetryPolicy(max_attempts=settings.max_retry_attempts, sleep=_instant_sleep)
    engine = ChatEngine(settings, store, provider, retry=retry)
    announced: list[str] = []
    client = DiscordBot(
        settings,
        engine,
        budgets=budgets or Budgets(),
        announce=announced.append,
        guild_ready_timeout=0.05,
        **client_options,
    )
    bot = RunningBot(fake, client, engine, provider, settings, announced)
    runner = asyncio.create_task(client.start(BOT_TOKEN))
    try:
        async with asyncio.timeout(GIVE_UP_AFTER):
            while not client.is_ready():
                if runner.done():
                    runner.result()  # raises what stopped the client
                    raise RuntimeError("the client stopped before it was ready")
                await asyncio.sleep(0.01)
        yield bot
    finally:
        await client.close()
        with contextlib.suppress(Exception):
            await runner
        await engine.close()
        discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = saved_base, saved_gateway
        if own_fake:
            await fake.close()
