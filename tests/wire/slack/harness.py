"""The real Slack bot wired to the fake Slack: Bolt in HTTP mode on 127.0.0.1, the real
AsyncWebClient pointed at ``FakeSlack``, a ChatEngine on a temp SQLite file with the offline
provider. Tests and ``bench/slack_concurrency.py`` drive it with ``SlackSender``.

``serving`` runs the entry point's own ``serve()`` instead (what ``python -m bots.slack`` runs,
HTTP or Socket Mode, built from settings alone), in this process, until the block ends."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from bots.slack.__main__ import serve
from bots.slack.app import (
    COMMAND_ACK_BUDGET_SECONDS,
    EVENTS_PATH,
    HEALTH_PATH,
    SlackBot,
    build_client,
)
from core.config import Settings
from core.conversation import ChatMessage
from core.engine import ChatEngine
from core.providers.offline import OfflineProvider, demo_answer
from core.ratelimit import Budgets
from core.retry import RetryPolicy
from core.store import ConversationStore

from .sender import SlackSender
from .server import FakeSlack

SIGNING_SECRET = "test-signing-secret-0123456789abcdef"


async def _no_wait(seconds: float) -> None:
    await asyncio.sleep(0)


@dataclass
class Harness:
    """Everything a Slack test touches."""

    fake: FakeSlack
    bot: SlackBot
    engine: ChatEngine
    provider: OfflineProvider
    sender: SlackSender
    session: aiohttp.ClientSession
    base_url: str

    async def settle(self) -> None:
        """Wait until every turn the bot accepted so far has finished."""
        await asyncio.wait_for(self.bot.drain(), timeout=60)

    def new_ts(self) -> str:
        """A timestamp for a message a person is about to post."""
        return self.fake.next_ts()

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.base_url + path) as response:
            return response.status, await response.json()


@asynccontextmanager
async def running_bot(
    database_url: str,
    *,
    streaming: str = "update",
    rate_scale: float = 10.0,
    provider_delay: float = 0.0,
    max_attempts: int = 3,
    start: bool = True,
    fake: FakeSlack | None = None,
    command_ack_budget: float = COMMAND_ACK_BUDGET_SECONDS,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    """Serve the fake Slack and the bot; yield a ``Harness``; shut both down."""
    own_fake = fake is None
    fake = fake or FakeSlack(rate_scale=rate_scale)
    if own_fake:
        await fake.start()
    settings = Settings.from_mapping({"DATABASE_URL": database_url, "OFFLINE_DELAY": "0"})
    settings = settings.with_overrides(
        slack_bot_token=fake.team.token,
        slack_signing_secret=SIGNING_SECRET,
        slack_api_url=fake.url,
        slack_streaming=streaming,
        **overrides,
    )
    store = await ConversationStore.open(settings.database_url)
    provider = OfflineProvider(settings, delay=provider_delay)
    engine = ChatEngine(
        settings, store, provider, retry=RetryPolicy(max_attempts=max_attempts, sleep=_no_wait)
    )
    session = aiohttp.ClientSession()
    client = build_client(settings)
    client.session = session
    bot = SlackBot(
        settings,
        engine,
        client=client,
        budgets=Budgets(),
        rate_scale=rate_scale,
        command_ack_budget=command_ack_budget,
    )
    runner = web.AppRunner(bot.web_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None and server.sockets
    base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    if start:
        await bot.start()
    sender = SlackSender(
        base_url + EVENTS_PATH,
        SIGNING_SECRET,
        session,
        team_id=fake.team.team_id,
        bot_user_id=fake.team.bot_user_id,
    )
    try:
        yield Harness(fake, bot, engine, provider, sender, session, base_url)
    finally:
        await bot.close()
        await runner.cleanup()
        await engine.close()
        await session.close()
        if own_fake:
            await fake.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a server that only takes PORT."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Served:
    """``serve()`` running in this process: set ``stop`` (as SIGTERM does) to end it."""

    task: asyncio.Task[None]
    stop: asyncio.Event
    base_url: str
    session: aiohttp.ClientSession

    async def health(self) -> tuple[int, Any]:
        async with self.session.get(self.base_url + HEALTH_PATH) as response:
            return response.status, await response.json()

    async def healthy(self, within: float = 30.0) -> None:
        """Wait until ``GET /healthz`` answers 200 (raising what ``serve`` raised, if it ended)."""
        deadline = time.monotonic() + within
        while True:
            if self.task.done():
                self.task.result()
                raise AssertionError("serve() returned before it was healthy")
            try:
                if (await self.health())[0] == 200:
                    return
            except aiohttp.ClientError:
                pass  # Not listening yet.
            if time.monotonic() > deadline:
                raise AssertionError(f"/healthz not 200 within {within} s")
            await asyncio.sleep(0.02)

    async def stopped(self, within: float = 30.0) -> None:
        """Set ``stop`` and wait for ``serve()`` to return."""
        self.stop.set()
        await asyncio.wait_for(asyncio.shield(self.task), timeout=within)


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Served]:
    """Run ``serve(settings)`` on 127.0.0.1:``settings.port``; stop it when the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop, host="127.0.0.1"), name="serve")
    session = aiohttp.ClientSession()
    served = Served(task, stop, f"http://127.0.0.1:{settings.port}", session)
    try:
        yield served
    finally:
        try:
            # Also raises what serve() raised, if it ended on its own.
            await served.stopped()
        finally:
            await session.close()


async def until(condition: Callable[[], bool], within: float = 20.0) -> None:
    """Poll ``condition()`` until true: state reached over the network, not a timing claim."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def demo(*user_messages: str) -> str:
    """The offline provider's answer to a conversation of these user messages."""
    return "".join(demo_answer([ChatMessage("user", text) for text in user_messages]))
