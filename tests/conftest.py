"""Shared fixtures: every test's state lives in a temp dir; PostgreSQL tests run when reachable."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from core.config import Settings
from core.engine import ChatEngine
from core.providers.offline import OfflineProvider
from core.retry import RetryPolicy
from core.store import ConversationStore

T = TypeVar("T")
DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads a developer's .env or writes threadbot.db into the repository."""
    monkeypatch.chdir(tmp_path)


def _run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even while an event loop runs here."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _pg_admin_url() -> str:
    return os.environ.get("TEST_DATABASE_URL", DEFAULT_PG_URL)


async def _pg_reachable(url: str) -> str | None:
    import asyncpg

    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    try:
        conn = await asyncio.wait_for(asyncpg.connect(dsn), timeout=3)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    await conn.close()
    return None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards.

    Skips with the reason when no server answers at TEST_DATABASE_URL (default 127.0.0.1:5432).
    """
    import asyncpg

    admin = _pg_admin_url()
    problem = _run_sync(_pg_reachable(admin))
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL must be reachable on CI ({admin}): {problem}")
        pytest.skip(f"PostgreSQL not reachable at {admin} ({problem}); set TEST_DATABASE_URL")
    name = f"threadbot_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    dsn = admin.replace("postgresql+asyncpg://", "postgresql://")

    async def admin_sql(statement: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    _run_sync(admin_sql(f'CREATE DATABASE "{name}"'))
    base, _, _ = admin.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        _run_sync(admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Each store test runs on SQLite and, when reachable, on PostgreSQL (emptied first)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
        return
    url: str = request.getfixturevalue("postgres_url")
    store = await ConversationStore.open(url, migrate=False)
    async with store.engine.begin() as conn:
        from sqlalchemy import text

        for table in (
            "feedback",
            "experiment_assignments",
            "experiments",
            "deployment_settings",
            "turns",
            "messages",
            "conversations",
            "channel_settings",
            "processed_events",
            "rate_budgets",
        ):
            await conn.execute(text(f"DROP TABLE IF EXISTS {table} CASCADE"))
        await conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    await store.close()
    yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"


@pytest.fixture
def settings(sqlite_url: str) -> Settings:
    return Settings.from_mapping({"DATABASE_URL": sqlite_url, "OFFLINE_DELAY": "0"})


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[ConversationStore]:
    store = await ConversationStore.open(settings.database_url)
    yield store
    await store.close()


@pytest.fixture
def provider(settings: Settings) -> OfflineProvider:
    return OfflineProvider(settings, delay=0)


class RecordedSleep:
    """An instant ``sleep`` that records what it was asked to wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def recorded_sleep() -> RecordedSleep:
    return RecordedSleep()


@pytest.fixture
async def engine(
    settings: Settings,
    store: ConversationStore,
    provider: OfflineProvider,
    recorded_sleep: RecordedSleep,
) -> AsyncIterator[ChatEngine]:
    retry = RetryPolicy(max_attempts=settings.max_retry_attempts, sleep=recorded_sleep)
    engine = ChatEngine(settings, store, provider, retry=retry)
    yield engine
    if engine._background:
        await asyncio.wait(engine._background, timeout=5)
