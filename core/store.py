"""ConversationStore: the only code that speaks SQL.

SQLAlchemy 2 async models for conversations, their messages, per-channel settings and the
platform events already processed; Alembic migrations (``migrations/``) create the schema. SQLite
(WAL) is the embedded default; PostgreSQL through ``DATABASE_URL`` for several processes, where a
per-conversation advisory lock serialises turns across processes.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    case,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    InvalidRequestError,
    NoSuchModuleError,
    OperationalError,
)
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.conversation import ChatMessage, ConversationKey, Role
from core.errors import ConfigError, ExperimentError, StoreUnavailableError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
#: Next to a SQLite file ``x.db``: ``x.db.lock``, held by the one process applying migrations.
MIGRATION_LOCK_SUFFIX = ".lock"

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def _now() -> datetime:
    return datetime.now(UTC)


#: Seconds to open a PostgreSQL connection (or wait for one from the pool) before the database
#: counts as unreachable.
POSTGRES_CONNECT_TIMEOUT_SECONDS = 5.0
#: Seconds a health check waits for the database.
PING_TIMEOUT_SECONDS = 2.0
#: SQLite serves one process per platform: the bot holds ``<database>.<platform>.lock``.
PLATFORM_LOCK_SUFFIX = ".{platform}.lock"


class Base(DeclarativeBase):
    pass


class ConversationRow(Base):
    __tablename__ = "conversations"
    __table_args__ = (
        UniqueConstraint("platform", "workspace", "channel", "thread", name="uq_conversation_key"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    platform: Mapped[str] = mapped_column(String(32))
    workspace: Mapped[str] = mapped_column(String(128))
    channel: Mapped[str] = mapped_column(String(128))
    thread: Mapped[str] = mapped_column(String(128))
    # A reset starts a new generation: older messages stay stored but are no longer sent.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    system_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    summary: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The newest message folded into ``summary``; messages up to it are not sent again.
    summary_upto_id: Mapped[int | None] = mapped_column(BigId, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    # The model this conversation was switched to (migration 0006); NULL: the channel's default.
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)


class MessageRow(Base):
    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_window", "conversation_id", "generation", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    conversation_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("conversations.id", ondelete="CASCADE")
    )
    generation: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    user_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Platform ids of the message(s) showing this text, comma-separated (long replies span several).
    platform_message_ids: Mapped[str | None] = mapped_column(Text, nullable=True)
    input_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    output_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    first_token_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    duration_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Which provider/model and system prompt produced an assistant message.
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    prompt_variant: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # What became of it (``MessageStatus``; NULL: an ordinary message) and the provider's
    # finish reason; the turn that wrote it.
    status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    turn_id: Mapped[int | None] = mapped_column(BigId, nullable=True)


class TurnRow(Base):
    """One accepted question from intake to its outcome; see ``TurnRecord``."""

    __tablename__ = "turns"
    __table_args__ = (
        Index("ix_turns_open", "status", "lease_until"),
        Index("ix_turns_conversation", "conversation_id", "id"),
        Index("ix_turns_user_time", "platform", "user_id", "created_at"),
        Index("ix_turns_created", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    conversation_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("conversations.id", ondelete="CASCADE")
    )
    platform: Mapped[str] = mapped_column(String(32))
    event_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    user_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    question: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    reply_to: Mapped[str | None] = mapped_column(Text, nullable=True)
    reply_message_ids: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    takeovers: Mapped[int] = mapped_column(Integer, default=0)
    finish_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    # Usage and cost (migration 0004); NULL tokens: the model was never called.
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    input_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    output_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tokens_estimated: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    cost_usd: Mapped[float | None] = mapped_column(Double, nullable=True)
    refused: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # The exposure of an experiment (migration 0005): experiment, variant, prompt version, and
    # the time to the first token.
    experiment_id: Mapped[int | None] = mapped_column(BigId, nullable=True)
    variant: Mapped[str | None] = mapped_column(String(100), nullable=True)
    prompt_version: Mapped[str | None] = mapped_column(String(16), nullable=True)
    first_token_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # A stop asked for while the turn answered (migration 0006), seen by the worker answering it.
    stop_requested_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )


class FeedbackRow(Base):
    """One click on a reply (append-only; a user's latest click on a reply counts)."""

    __tablename__ = "feedback"
    __table_args__ = (Index("ix_feedback_message", "message_id", "user_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(BigId, ForeignKey("messages.id", ondelete="CASCADE"))
    conversation_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("conversations.id", ondelete="CASCADE")
    )
    platform: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str] = mapped_column(String(128))
    # +1 (thumbs up) or -1 (thumbs down).
    value: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ExperimentRow(Base):
    """A comparison of system prompts over new conversations of a scope (see migration 0005)."""

    __tablename__ = "experiments"
    __table_args__ = (UniqueConstraint("name", name="uq_experiment_name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))
    seed: Mapped[str] = mapped_column(String(64))
    # JSON: [{"name": ..., "prompt": ..., "weight": ...}, ...]
    variants: Mapped[str] = mapped_column(Text)
    # Comma-separated channel ids; NULL: the whole deployment.
    channels: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    shipped: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ExperimentAssignmentRow(Base):
    """A conversation's variant in an experiment, chosen once and kept (or its exclusion)."""

    __tablename__ = "experiment_assignments"

    experiment_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True
    )
    conversation_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    variant: Mapped[str | None] = mapped_column(String(100), nullable=True)
    excluded: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class DeploymentSettingRow(Base):
    """A deployment-wide setting kept in the database (a shipped variant's system prompt)."""

    __tablename__ = "deployment_settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ChannelSettingsRow(Base):
    __tablename__ = "channel_settings"
    __table_args__ = (
        UniqueConstraint("platform", "workspace", "channel", name="uq_channel_settings"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    platform: Mapped[str] = mapped_column(String(32))
    workspace: Mapped[str] = mapped_column(String(128))
    channel: Mapped[str] = mapped_column(String(128))
    system_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    history_strategy: Mapped[str | None] = mapped_column(String(16), nullable=True)
    max_history_messages: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_history_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    # Migration 0006: the channel's default model, and how answers stream there.
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    streaming: Mapped[str | None] = mapped_column(String(16), nullable=True)


class ProcessedEventRow(Base):
    __tablename__ = "processed_events"
    __table_args__ = (UniqueConstraint("platform", "event_key", name="uq_processed_event"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    platform: Mapped[str] = mapped_column(String(32))
    event_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)


class RateBudgetRow(Base):
    """One shared rate-limit scope (GCRA state); used on PostgreSQL only.

    Times are seconds since the epoch on the database server's clock, so processes on different
    hosts agree. A row whose ``tat`` and ``paused_until`` are both past means the same as no row.
    """

    __tablename__ = "rate_budgets"

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    # Theoretical arrival time: when the scope's bucket is back to full (GCRA).
    tat: Mapped[float] = mapped_column(Double)
    # Set by a 429 seen in any process: no call before this time.
    paused_until: Mapped[float] = mapped_column(Double)
    # What the latest take was told: 0 (granted) or the seconds to wait (RETURNING sees only
    # the new row, so the answer travels through it).
    last_wait: Mapped[float] = mapped_column(Double)
    # When the latest take or pause ran.
    checked_at: Mapped[float] = mapped_column(Double)


@dataclass(frozen=True, slots=True)
class Conversation:
    """A conversation as the engine sees it."""

    id: int
    key: ConversationKey
    generation: int
    system_prompt: str | None
    summary: str | None
    summary_upto_id: int | None
    # The model chosen for this conversation (``model`` command); None: the channel's default.
    model: str | None = None


#: What became of a message (``messages.status``; None: an ordinary message). Questions of
#: failed turns and replaced answers are never sent to the model again; stopped, cut and
#: interrupted answers are, as the user saw them.
MessageStatus = Literal["failed", "stopped", "cut", "interrupted", "replaced"]
#: Statuses whose messages stay out of every history window.
UNSENT_STATUSES = ("failed", "replaced")
#: A turn's lifecycle: received -> answering -> answered | failed | stopped | interrupted.
TurnStatus = Literal["received", "answering", "answered", "failed", "stopped", "interrupted"]
#: Turns still to be finished (by their worker, or by a live one when its lease expired).
OPEN_TURN_STATUSES = ("received", "answering")


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A stored message of a conversation."""

    id: int
    role: Role
    content: str
    created_at: datetime
    input_tokens: int | None = None
    output_tokens: int | None = None
    status: str | None = None

    def as_chat(self) -> ChatMessage:
        return ChatMessage(self.role, self.content)


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """An accepted question as stored: where its answer goes and how far it got.

    ``reply_to`` is the adapter's description of where the answer goes (opaque here, JSON text),
    ``reply_message_ids`` the platform messages the reply has posted so far, so a worker taking
    over a turn whose worker died can finish that reply. ``worker`` holds the turn until
    ``lease_until``.
    """

    id: int
    conversation_id: int
    platform: str
    event_key: str | None
    user_id: str | None
    question: str
    status: str
    reply_to: str | None
    reply_message_ids: tuple[str, ...]
    worker: str | None
    lease_until: datetime | None
    takeovers: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ChannelSettings:
    """Per-channel defaults: the system prompt and history overrides for new threads, the
    default model and how answers stream there (``native``, ``update``, ``auto``)."""

    system_prompt: str | None = None
    history_strategy: str | None = None
    max_history_messages: int | None = None
    max_history_tokens: int | None = None
    model: str | None = None
    streaming: str | None = None


#: How ``usage_report`` groups turns.
UsageGrouping = Literal["user", "channel", "model", "day"]


@dataclass(frozen=True, slots=True)
class TurnUsage:
    """What one turn's requests to the model used: reported by the provider, else estimated
    (``estimated``); ``cost_usd`` None when the model has no price."""

    model: str
    input_tokens: int
    output_tokens: int
    estimated: bool
    cost_usd: float | None


@dataclass(frozen=True, slots=True)
class UsageGroup:
    """One line of a usage report; ``cost`` None when no turn of the group had a price."""

    key: str
    turns: int
    input_tokens: int
    output_tokens: int
    cost: float | None


@dataclass(frozen=True, slots=True)
class RatedReply:
    """An answer as feedback names it: the stored assistant message ``id``, its conversation,
    the platform messages that show it (a click must come from one of them) and its text."""

    id: int
    conversation_id: int
    platform: str
    platform_message_ids: tuple[str, ...]
    content: str


#: Message ids per ``IN (...)`` list of ``latest_feedback`` (SQLite allows 32,766 variables).
FEEDBACK_LOOKUP_CHUNK = 500

#: ``experiments.status`` of an experiment that still assigns conversations, and of one ended.
EXPERIMENT_RUNNING = "running"
EXPERIMENT_STOPPED = "stopped"
#: The ``deployment_settings`` row of the deployment's own default system prompt.
DEPLOYMENT_SYSTEM_PROMPT = "system_prompt"
#: Turn outcomes an experiment report counts as replies (``failed`` among them, as errors).
ENDED_TURN_STATUSES = ("answered", "failed", "stopped", "interrupted")


@dataclass(frozen=True, slots=True)
class ExperimentVariant:
    """One system prompt under test and its share of new conversations (a relative weight)."""

    name: str
    prompt: str
    weight: float


@dataclass(frozen=True, slots=True)
class Experiment:
    """An experiment as stored; ``channels`` None: the whole deployment."""

    id: int
    name: str
    seed: str
    variants: tuple[ExperimentVariant, ...]
    channels: tuple[str, ...] | None
    status: str
    shipped: str | None
    created_at: datetime
    stopped_at: datetime | None

    @property
    def running(self) -> bool:
        return self.status == EXPERIMENT_RUNNING


@dataclass(frozen=True, slots=True)
class TurnExposure:
    """What a reply was exposed to: the experiment and variant (if any), the prompt's version
    (a short hash of its text) and the milliseconds to its first token."""

    experiment_id: int | None
    variant: str | None
    prompt_version: str
    first_token_ms: int | None


@dataclass(frozen=True, slots=True)
class ExperimentReply:
    """One reply of an experiment with its outcome and ratings (each user's latest click)."""

    conversation_id: int
    variant: str
    failed: bool
    first_token_ms: int | None
    input_tokens: int | None
    output_tokens: int | None
    rated: int
    positive: int


@dataclass(frozen=True, slots=True)
class AssignmentCounts:
    """Conversations per variant of an experiment, and those excluded (own prompt)."""

    per_variant: dict[str, int]
    excluded: int


def _experiment(row: ExperimentRow) -> Experiment:
    variants = tuple(
        ExperimentVariant(str(v["name"]), str(v["prompt"]), float(v["weight"]))
        for v in json.loads(row.variants)
    )
    return Experiment(
        id=row.id,
        name=row.name,
        seed=row.seed,
        variants=variants,
        channels=tuple(row.channels.split(",")) if row.channels else None,
        status=row.status,
        shipped=row.shipped,
        created_at=_aware(row.created_at) or row.created_at,
        stopped_at=_aware(row.stopped_at),
    )


def _conversation(row: ConversationRow) -> Conversation:
    return Conversation(
        id=row.id,
        key=ConversationKey(row.platform, row.workspace, row.channel, row.thread),
        generation=row.generation,
        system_prompt=row.system_prompt,
        summary=row.summary,
        summary_upto_id=row.summary_upto_id,
        model=row.model,
    )


def _still_sent() -> Any:
    """The condition of messages still sent as history (``UNSENT_STATUSES`` aside)."""
    return or_(MessageRow.status.is_(None), MessageRow.status.not_in(UNSENT_STATUSES))


def _id_list(joined: str | None) -> tuple[str, ...]:
    """Platform message ids stored comma-separated, as a tuple."""
    return tuple(filter(None, (joined or "").split(",")))


def _message(row: MessageRow) -> StoredMessage:
    role: Role = "assistant" if row.role == "assistant" else "user"
    return StoredMessage(
        id=row.id,
        role=role,
        content=row.content,
        created_at=row.created_at,
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        status=row.status,
    )


def _turn(row: TurnRow) -> TurnRecord:
    return TurnRecord(
        id=row.id,
        conversation_id=row.conversation_id,
        platform=row.platform,
        event_key=row.event_key,
        user_id=row.user_id,
        question=row.question,
        status=row.status,
        reply_to=row.reply_to,
        reply_message_ids=_id_list(row.reply_message_ids),
        worker=row.worker,
        lease_until=_aware(row.lease_until),
        takeovers=row.takeovers,
        created_at=_aware(row.created_at) or row.created_at,
    )


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands timestamps back without their zone; they were stored in UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # busy_timeout waits instead of failing (first: switching to WAL needs a moment alone with
    # the file); WAL lets readers proceed while a turn writes.
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _upgrade(connection: Connection) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


@asynccontextmanager
async def _sqlite_migration_lock(database: str | None) -> AsyncIterator[None]:
    """Hold ``<database>.lock`` exclusively, so processes starting together migrate one by one.

    SQLite has no advisory locks, and two processes that both find no schema would both create
    it; the second then fails on "table already exists". Closing the file releases the lock, also
    when the process dies.
    """
    if not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    # Once, at start-up: blocking is harmless, and the wait for the lock runs in a thread.
    descriptor = os.open(database + MIGRATION_LOCK_SUFFIX, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        await asyncio.to_thread(fcntl.flock, descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


class ConversationStore:
    """Conversations, their messages, channel defaults and processed events, in one database.

    Build with ``await ConversationStore.open(url)``, which applies the migrations; ``close()``
    when done.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        # Lock files held for this process (``hold_platform``), released by ``close``.
        self._held: list[int] = []

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True) -> ConversationStore:
        """Connect to ``url`` (any async SQLAlchemy URL) and bring the schema up to date."""
        try:
            parsed = make_url(url)
        except ArgumentError as error:
            raise ConfigError(
                f"DATABASE_URL is not a database URL ({error})", setting="DATABASE_URL"
            ) from error
        kwargs: dict[str, Any] = {}
        if parsed.get_backend_name() == "postgresql":
            # A turn holds one connection for its advisory lock; leave room for the rest. An
            # unreachable server fails a connection in seconds, not asyncpg's default minute:
            # intake must answer the platform within its window.
            kwargs.update(
                pool_size=20,
                max_overflow=20,
                pool_pre_ping=True,
                pool_timeout=POSTGRES_CONNECT_TIMEOUT_SECONDS,
                connect_args={"timeout": POSTGRES_CONNECT_TIMEOUT_SECONDS},
            )
        elif parsed.get_backend_name() == "sqlite" and parsed.database not in (
            None,
            "",
            ":memory:",
        ):
            # Once, at start-up, before any connection exists: blocking is harmless here.
            folder = Path(parsed.database).expanduser().parent  # noqa: ASYNC240
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ConfigError(
                    f"cannot create the folder {folder} for the SQLite database ({error.strerror}); "
                    "check DATABASE_URL",
                    setting="DATABASE_URL",
                ) from error
        try:
            engine = create_async_engine(url, **kwargs)
        except (ArgumentError, InvalidRequestError, NoSuchModuleError, ImportError) as error:
            where = parsed.render_as_string(hide_password=True)
            raise ConfigError(
                f"cannot use the database URL {where} ({error}); DATABASE_URL must be a "
                "postgresql+asyncpg:// or sqlite+aiosqlite:// URL",
                setting="DATABASE_URL",
            ) from error
        if engine.dialect.name == "sqlite":
            event.listen(engine.sync_engine, "connect", _set_sqlite_pragmas)
        store = cls(engine)
        try:
            if migrate:
                await store.migrate()
            else:
                async with engine.connect():
                    pass
        except Exception as error:
            await engine.dispose()
            # An operator's mistake (wrong host, missing database, unwritable file) should read
            # as one line naming the setting, not as a driver's traceback.
            where = parsed.render_as_string(hide_password=True)
            # SQLAlchemy wraps the driver's error and appends a help link: the driver's says it.
            reason = " ".join(str(getattr(error, "orig", None) or error).split())
            raise ConfigError(
                f"cannot open the database {where} ({reason}); check DATABASE_URL",
                setting="DATABASE_URL",
            ) from error
        return store

    async def migrate(self) -> None:
        """Apply every Alembic migration not yet applied, one process at a time."""
        database = None if self.is_postgres else self.engine.url.database
        async with _sqlite_migration_lock(database), self.engine.begin() as conn:
            if self.is_postgres:
                # Two workers starting at once must not both create the tables.
                await conn.execute(text("SELECT pg_advisory_xact_lock(7461237)"))
            await conn.run_sync(_upgrade)

    async def close(self) -> None:
        for descriptor in self._held:
            os.close(descriptor)
        self._held.clear()
        await self.engine.dispose()

    # -- conversations -------------------------------------------------------------------------

    async def find(self, key: ConversationKey) -> Conversation | None:
        """The conversation at ``key``, if there is one."""
        async with self._sessions() as session:
            row = await session.scalar(self._select_key(key))
            return _conversation(row) if row else None

    async def get(self, conversation_id: int) -> Conversation:
        async with self._sessions() as session:
            row = await session.get(ConversationRow, conversation_id)
            if row is None:
                raise LookupError(f"no conversation {conversation_id}")
            return _conversation(row)

    async def get_or_create(
        self, key: ConversationKey, *, seed: Sequence[ChatMessage] = ()
    ) -> tuple[Conversation, bool]:
        """The conversation at ``key``, created (with ``seed`` as its first messages) if new.

        Returns ``(conversation, created)``. Safe against two processes creating it at once.
        """
        found = await self.find(key)
        if found is not None:
            if seed and not await self.count_messages(found, all_generations=True):
                # Created at intake, before the thread's earlier messages were read.
                await self._add_seed(found.id, seed)
            return found, False
        try:
            async with self._sessions.begin() as session:
                row = ConversationRow(
                    platform=key.platform,
                    workspace=key.workspace,
                    channel=key.channel,
                    thread=key.thread,
                    generation=0,
                )
                session.add(row)
                await session.flush()
                for message in seed:
                    session.add(
                        MessageRow(
                            conversation_id=row.id,
                            generation=0,
                            role=message.role,
                            content=message.content,
                        )
                    )
            return _conversation(row), True
        except IntegrityError:
            # Someone else created it between our read and our insert.
            found = await self.find(key)
            if found is None:
                raise
            return found, False

    async def _add_seed(self, conversation_id: int, seed: Sequence[ChatMessage]) -> None:
        async with self._sessions.begin() as session:
            for message in seed:
                session.add(
                    MessageRow(
                        conversation_id=conversation_id,
                        generation=0,
                        role=message.role,
                        content=message.content,
                    )
                )

    async def reset(self, conversation_id: int) -> None:
        """Start the conversation over; earlier messages stay stored but are no longer sent."""
        async with self._sessions.begin() as session:
            await session.execute(
                update(ConversationRow)
                .where(ConversationRow.id == conversation_id)
                .values(
                    generation=ConversationRow.generation + 1,
                    summary=None,
                    summary_upto_id=None,
                    updated_at=_now(),
                )
            )

    async def set_system_prompt(self, conversation_id: int, prompt: str | None) -> None:
        """Set (or with ``None`` clear) the conversation's own system prompt."""
        async with self._sessions.begin() as session:
            await session.execute(
                update(ConversationRow)
                .where(ConversationRow.id == conversation_id)
                .values(system_prompt=prompt, updated_at=_now())
            )

    async def set_conversation_model(self, conversation_id: int, model: str | None) -> None:
        """Set (or with ``None`` clear) the model chosen for the conversation."""
        async with self._sessions.begin() as session:
            await session.execute(
                update(ConversationRow)
                .where(ConversationRow.id == conversation_id)
                .values(model=model, updated_at=_now())
            )

    async def set_summary(self, conversation_id: int, summary: str, upto_id: int) -> None:
        """Store the running summary, covering messages up to ``upto_id``."""
        async with self._sessions.begin() as session:
            await session.execute(
                update(ConversationRow)
                .where(ConversationRow.id == conversation_id)
                .values(summary=summary, summary_upto_id=upto_id, updated_at=_now())
            )

    async def replace_summary(
        self,
        conversation_id: int,
        *,
        generation: int,
        previous_upto_id: int | None,
        summary: str,
        upto_id: int,
    ) -> bool:
        """Store a new running summary only if nothing changed it since it was read.

        A compare-and-set: False (and nothing stored) when the conversation was reset (its
        ``generation`` moved on) or another fold stored a summary meanwhile, so a slow fold that
        finishes late can neither bring back a summary a reset cleared nor overwrite a newer one.
        """
        unchanged = (
            ConversationRow.summary_upto_id.is_(None)
            if previous_upto_id is None
            else ConversationRow.summary_upto_id == previous_upto_id
        )
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(ConversationRow)
                .where(
                    ConversationRow.id == conversation_id,
                    ConversationRow.generation == generation,
                    unchanged,
                )
                .values(summary=summary, summary_upto_id=upto_id, updated_at=_now())
            )
        return bool(getattr(result, "rowcount", 0))

    # -- messages ------------------------------------------------------------------------------

    async def append(
        self,
        conversation: Conversation,
        role: Role,
        content: str,
        *,
        user_id: str | None = None,
        platform_message_ids: Sequence[str] = (),
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        first_token_ms: int | None = None,
        duration_ms: int | None = None,
        model: str | None = None,
        prompt_variant: str | None = None,
        status: MessageStatus | None = None,
        finish_reason: str | None = None,
        turn_id: int | None = None,
    ) -> StoredMessage:
        """Add a message to the conversation's current generation."""
        now = _now()
        # Core statements rather than ORM objects: this runs twice per turn.
        current_generation = _current_generation(conversation.id)
        async with self.engine.begin() as conn:
            message_id = (
                await conn.execute(
                    insert(MessageRow)
                    .values(
                        conversation_id=conversation.id,
                        generation=current_generation,
                        role=role,
                        content=content,
                        created_at=now,
                        user_id=user_id,
                        platform_message_ids=",".join(platform_message_ids) or None,
                        input_tokens=input_tokens,
                        output_tokens=output_tokens,
                        first_token_ms=first_token_ms,
                        duration_ms=duration_ms,
                        model=model,
                        prompt_variant=prompt_variant,
                        status=status,
                        finish_reason=finish_reason,
                        turn_id=turn_id,
                    )
                    .returning(MessageRow.id)
                )
            ).scalar_one()
            await conn.execute(
                update(ConversationRow)
                .where(ConversationRow.id == conversation.id)
                .values(updated_at=now)
            )
        return StoredMessage(
            id=message_id,
            role=role,
            content=content,
            created_at=now,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            status=status,
        )

    async def set_message_status(self, message_id: int, status: MessageStatus | None) -> None:
        """Record what became of a message (a failed turn's question: ``"failed"``)."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(MessageRow).where(MessageRow.id == message_id).values(status=status)
            )

    async def history(
        self, conversation: Conversation, *, limit: int | None, after_id: int | None = None
    ) -> list[StoredMessage]:
        """The newest ``limit`` messages of the current generation, oldest first.

        Messages with ids up to ``after_id`` (already folded into a summary) are left out. Reads
        only the rows asked for, through the (conversation, generation, id) index.
        """
        # Plain columns, not ORM objects: this runs every turn, and the ORM's per-object
        # bookkeeping roughly doubled its cost for a 64-row window (bench/history.py).
        query = (
            select(
                MessageRow.id,
                MessageRow.role,
                MessageRow.content,
                MessageRow.created_at,
                MessageRow.input_tokens,
                MessageRow.output_tokens,
                MessageRow.status,
            )
            .where(
                MessageRow.conversation_id == conversation.id,
                MessageRow.generation == _current_generation(conversation.id),
                _still_sent(),
            )
            .order_by(MessageRow.id.desc())
        )
        if after_id is not None:
            query = query.where(MessageRow.id > after_id)
        if limit is not None:
            query = query.limit(limit)
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
        return [
            StoredMessage(
                id=row.id,
                role="assistant" if row.role == "assistant" else "user",
                content=row.content,
                created_at=row.created_at,
                input_tokens=row.input_tokens,
                output_tokens=row.output_tokens,
                status=row.status,
            )
            for row in reversed(rows)
        ]

    async def count_messages(
        self, conversation: Conversation, *, all_generations: bool = False
    ) -> int:
        query = (
            select(func.count())
            .select_from(MessageRow)
            .where(MessageRow.conversation_id == conversation.id)
        )
        if not all_generations:
            query = query.where(MessageRow.generation == _current_generation(conversation.id))
        async with self._sessions() as session:
            return int(await session.scalar(query) or 0)

    # -- stop and regenerate -------------------------------------------------------------------

    async def request_stop(self, conversation_id: int) -> bool:
        """Ask the worker answering in the conversation to stop (``turns.stop_requested_at`` on
        its answering turn; the first request's time is kept). False when no turn is answering
        there."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(TurnRow)
                .where(TurnRow.conversation_id == conversation_id, TurnRow.status == "answering")
                .values(stop_requested_at=func.coalesce(TurnRow.stop_requested_at, _now()))
            )
        return bool(getattr(result, "rowcount", 0))

    async def stop_requests(self, turn_ids: Sequence[int]) -> set[int]:
        """Which of these turns someone asked to stop (one indexed read for all of them)."""
        if not turn_ids:
            return set()
        query = select(TurnRow.id).where(
            TurnRow.id.in_(list(turn_ids)), TurnRow.stop_requested_at.is_not(None)
        )
        async with self._sessions() as session:
            return set(await session.scalars(query))

    async def open_turn_count(self, conversation_id: int) -> int:
        """How many turns of the conversation are still to be answered or being answered."""
        query = (
            select(func.count())
            .select_from(TurnRow)
            .where(
                TurnRow.conversation_id == conversation_id,
                TurnRow.status.in_(OPEN_TURN_STATUSES),
            )
        )
        async with self._sessions() as session:
            return int(await session.scalar(query) or 0)

    async def newest_answer(
        self, conversation_id: int
    ) -> tuple[StoredMessage, int | None, tuple[str, ...]] | None:
        """The newest answer of the conversation's current generation that is still sent as
        history (replaced and failed ones aside): the stored message, the turn that wrote it,
        and the platform messages showing it (the message's own ids, else its turn's reply,
        as a stopped answer records only there). None when there is none."""
        query = (
            select(MessageRow, TurnRow.reply_message_ids)
            .outerjoin(TurnRow, TurnRow.id == MessageRow.turn_id)
            .where(
                MessageRow.conversation_id == conversation_id,
                MessageRow.generation == _current_generation(conversation_id),
                MessageRow.role == "assistant",
                _still_sent(),
            )
            .order_by(MessageRow.id.desc())
            .limit(1)
        )
        async with self._sessions() as session:
            found = (await session.execute(query)).first()
        if found is None:
            return None
        row, reply_ids = found
        shown = row.platform_message_ids or reply_ids or ""
        return _message(row), row.turn_id, _id_list(shown)

    async def start_regeneration(
        self,
        answer_id: int,
        question_id: int,
        *,
        conversation_id: int,
        platform: str,
        question: str,
        worker: str,
        lease_seconds: float,
        user_id: str | None,
        reply_to: str | None,
        reply_message_ids: Sequence[str],
    ) -> TurnRecord | None:
        """In one transaction: mark answer ``answer_id`` ``replaced`` (never sent as history
        again), open a new turn (``received``, held by ``worker``) that answers stored question
        ``question_id`` again into ``reply_message_ids``, and make the question that turn's (so
        ``turn_question`` finds it: it is not stored twice). None, and nothing changed, when the
        answer was replaced already (another regenerate won)."""
        now = _now()
        async with self._sessions.begin() as session:
            replaced = await session.execute(
                update(MessageRow)
                .where(
                    MessageRow.id == answer_id,
                    _still_sent(),
                )
                .values(status="replaced")
            )
            if not getattr(replaced, "rowcount", 0):
                return None
            row = TurnRow(
                conversation_id=conversation_id,
                platform=platform,
                user_id=user_id,
                question=question,
                status="received",
                reply_to=reply_to,
                reply_message_ids=",".join(reply_message_ids) or None,
                worker=worker,
                lease_until=now + timedelta(seconds=lease_seconds),
                takeovers=0,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            await session.flush()
            await session.execute(
                update(MessageRow).where(MessageRow.id == question_id).values(turn_id=row.id)
            )
            return _turn(row)

    # -- channel defaults ----------------------------------------------------------------------

    async def channel_settings(
        self, platform: str, workspace: str, channel: str
    ) -> ChannelSettings:
        """The channel's defaults (all ``None`` when it has none)."""
        async with self._sessions() as session:
            row = await session.scalar(self._select_channel(platform, workspace, channel))
        if row is None:
            return ChannelSettings()
        return ChannelSettings(
            system_prompt=row.system_prompt,
            history_strategy=row.history_strategy,
            max_history_messages=row.max_history_messages,
            max_history_tokens=row.max_history_tokens,
            model=row.model,
            streaming=row.streaming,
        )

    async def update_channel_settings(
        self, platform: str, workspace: str, channel: str, **values: Any
    ) -> None:
        """Set some of a channel's defaults (``system_prompt``, ``history_strategy``, ...)."""
        allowed = {
            "system_prompt",
            "history_strategy",
            "max_history_messages",
            "max_history_tokens",
            "model",
            "streaming",
        }
        unknown = set(values) - allowed
        if unknown:
            raise TypeError(f"unknown channel settings: {sorted(unknown)}")
        for attempt in range(2):
            try:
                async with self._sessions.begin() as session:
                    row = await session.scalar(self._select_channel(platform, workspace, channel))
                    if row is None:
                        row = ChannelSettingsRow(
                            platform=platform, workspace=workspace, channel=channel
                        )
                        session.add(row)
                    for name, value in values.items():
                        setattr(row, name, value)
                    row.updated_at = _now()
                return
            except IntegrityError:
                if attempt:
                    raise

    # -- events --------------------------------------------------------------------------------

    async def claim_event(self, platform: str, event_key: str) -> bool:
        """Record a platform event as processed. False when it already was (a redelivery)."""
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(ProcessedEventRow).values(
                        platform=platform, event_key=event_key[:255], created_at=_now()
                    )
                )
            return True
        except IntegrityError:
            return False

    async def prune_events(self, older_than: timedelta = timedelta(days=2)) -> int:
        """Forget processed events older than any platform would redeliver."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                delete(ProcessedEventRow).where(ProcessedEventRow.created_at < _now() - older_than)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    # -- turns ---------------------------------------------------------------------------------

    async def open_turn(
        self,
        conversation_id: int,
        *,
        platform: str,
        question: str,
        worker: str,
        lease_seconds: float,
        event_key: str | None = None,
        user_id: str | None = None,
        reply_to: str | None = None,
        claim: bool = False,
    ) -> TurnRecord | None:
        """Record an accepted question (``received``), held by ``worker`` for ``lease_seconds``.

        With ``claim``, ``event_key`` is also recorded as processed in the same transaction
        (see ``claim_event``): None, and nothing recorded, when it already was (a redelivery).
        Either both are stored or neither, so a blip between them cannot lose the question.
        """
        now = _now()
        try:
            return await self._open_turn(
                conversation_id,
                platform=platform,
                question=question,
                worker=worker,
                lease_until=now + timedelta(seconds=lease_seconds),
                event_key=event_key,
                user_id=user_id,
                reply_to=reply_to,
                claim=claim,
            )
        except IntegrityError:
            if not claim:
                raise
            return None

    async def _open_turn(
        self,
        conversation_id: int,
        *,
        platform: str,
        question: str,
        worker: str,
        lease_until: datetime,
        event_key: str | None,
        user_id: str | None,
        reply_to: str | None,
        claim: bool,
    ) -> TurnRecord:
        now = _now()
        async with self._sessions.begin() as session:
            if claim:
                assert event_key is not None, "claiming needs the event's key"
                session.add(
                    ProcessedEventRow(platform=platform, event_key=event_key[:255], created_at=now)
                )
                await session.flush()
            row = TurnRow(
                conversation_id=conversation_id,
                platform=platform,
                event_key=event_key[:255] if event_key else None,
                user_id=user_id,
                question=question,
                status="received",
                reply_to=reply_to,
                worker=worker,
                lease_until=lease_until,
                takeovers=0,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            await session.flush()
            return _turn(row)

    async def turn_question(self, turn_id: int) -> StoredMessage | None:
        """The question a turn stored, if it got that far (a taken-over turn goes on from it)."""
        async with self._sessions() as session:
            row = await session.scalar(
                select(MessageRow)
                .where(MessageRow.turn_id == turn_id, MessageRow.role == "user")
                .order_by(MessageRow.id)
                .limit(1)
            )
            return _message(row) if row is not None else None

    async def get_turn(self, turn_id: int) -> TurnRecord:
        async with self._sessions() as session:
            row = await session.get(TurnRow, turn_id)
            if row is None:
                raise LookupError(f"no turn {turn_id}")
            return _turn(row)

    async def update_turn(
        self,
        turn_id: int,
        *,
        status: TurnStatus | None = None,
        reply_message_ids: Sequence[str] | None = None,
        finish_reason: str | None = None,
        note: str | None = None,
        reply_to: str | None = None,
    ) -> None:
        """Record a turn's progress: its status, where and what its reply posted, its outcome."""
        values: dict[str, Any] = {"updated_at": _now()}
        if reply_to is not None:
            values["reply_to"] = reply_to
        if status is not None:
            values["status"] = status
            if status not in OPEN_TURN_STATUSES:
                values["lease_until"] = None
        if reply_message_ids is not None:
            values["reply_message_ids"] = ",".join(reply_message_ids) or None
        if finish_reason is not None:
            values["finish_reason"] = finish_reason
        if note is not None:
            values["note"] = note
        async with self.engine.begin() as conn:
            await conn.execute(update(TurnRow).where(TurnRow.id == turn_id).values(**values))

    async def renew_turn(self, turn_id: int, worker: str, lease_seconds: float) -> bool:
        """Extend ``worker``'s lease on an open turn; False when the turn is no longer its own."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(TurnRow)
                .where(
                    TurnRow.id == turn_id,
                    TurnRow.worker == worker,
                    TurnRow.status.in_(OPEN_TURN_STATUSES),
                )
                .values(lease_until=_now() + timedelta(seconds=lease_seconds))
            )
        return bool(getattr(result, "rowcount", 0))

    async def claim_stale_turns(
        self,
        worker: str,
        *,
        lease_seconds: float,
        platform: str | None = None,
        limit: int = 20,
        grace_seconds: float = 0.0,
    ) -> list[TurnRecord]:
        """Take over other workers' open turns whose lease expired ``grace_seconds`` ago or more
        (their worker died): each goes to exactly one caller across processes (a compare-and-set
        on the lease), oldest first."""
        now = _now()
        # Never the caller's own turns: a live worker is still finishing them (after a database
        # outage it saves their outcomes as soon as it can).
        expired = (
            TurnRow.status.in_(OPEN_TURN_STATUSES)
            & (TurnRow.worker.is_(None) | (TurnRow.worker != worker))
            & (
                TurnRow.lease_until.is_(None)
                | (TurnRow.lease_until < now - timedelta(seconds=grace_seconds))
            )
        )
        query = select(TurnRow.id).where(expired).order_by(TurnRow.id).limit(limit)
        if platform is not None:
            query = query.where(TurnRow.platform == platform)
        claimed: list[TurnRecord] = []
        async with self._sessions() as session:
            candidates = list(await session.scalars(query))
        for turn_id in candidates:
            async with self.engine.begin() as conn:
                result = await conn.execute(
                    update(TurnRow)
                    .where(TurnRow.id == turn_id, expired)
                    .values(
                        worker=worker,
                        lease_until=now + timedelta(seconds=lease_seconds),
                        takeovers=TurnRow.takeovers + 1,
                        updated_at=now,
                    )
                )
            if getattr(result, "rowcount", 0):
                claimed.append(await self.get_turn(turn_id))
        return claimed

    # -- health ----------------------------------------------------------------------------------

    async def ping(self) -> str | None:
        """None when the database answers within ``PING_TIMEOUT_SECONDS``, else why not."""
        try:
            async with asyncio.timeout(PING_TIMEOUT_SECONDS), self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except TimeoutError:
            # A dead network answers nothing at all; the error's own text is empty.
            return f"no answer within {PING_TIMEOUT_SECONDS:g} s"
        except Exception as error:
            return f"{type(error).__name__}: {error}".splitlines()[0][:200] or "no answer"
        return None

    def hold_platform(self, platform: str) -> None:
        """On SQLite, be the only process serving ``platform`` on this file, until ``close``.

        SQLite has no cross-process lock to order the turns of a conversation, so a second bot
        process on the same file and platform is refused (ConfigError) rather than answering
        out of order. PostgreSQL needs no such lock (advisory locks order turns).
        """
        database = self.engine.url.database
        if self.is_postgres or not database or database == ":memory:":
            return
        path = database + PLATFORM_LOCK_SUFFIX.format(platform=platform)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise ConfigError(
                f"another threadbot {platform} process is already serving {database}: SQLite "
                "serves one process, so stop the other one, or point every worker at one "
                "PostgreSQL database (DATABASE_URL=postgresql://...)",
                setting="DATABASE_URL",
            ) from None
        self._held.append(descriptor)

    # -- serialisation -------------------------------------------------------------------------

    @asynccontextmanager
    async def conversation_lock(self, conversation_id: int) -> AsyncIterator[None]:
        """Hold the conversation across processes so its turns run one at a time.

        On PostgreSQL a session advisory lock, held on its own connection; SQLite serves one
        process, where nothing is needed. Within a process the engine already orders a
        conversation's turns (``ChatEngine.handle`` takes a FIFO lock per conversation first).
        """
        if not self.is_postgres:
            yield
            return
        key = _advisory_key(conversation_id)
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            await conn.commit()
            try:
                yield
            finally:
                await _unlock(conn, key, conversation_id)

    # -- shared rate-limit budgets (PostgreSQL) --------------------------------------------------

    async def take_rate_token(self, key: str, per_second: float, burst: int) -> float:
        """Take one call from the shared bucket of ``key``: 0 when taken, else seconds to wait.

        GCRA in one statement (a row lock for its duration only): a call may go when the
        bucket's theoretical arrival time is at most ``(burst - 1) / per_second`` ahead of now,
        and no pause holds it; after a pause, one call goes at its end and then the rate.
        PostgreSQL only (SQLite serves one process: pace in the process).
        """
        self._require_postgres()
        interval = 1.0 / per_second
        async with self.engine.begin() as conn:
            wait = await conn.scalar(
                _TAKE_RATE_TOKEN,
                {
                    "key": key,
                    "interval": interval,
                    "tau": (max(1, burst) - 1) * interval,
                    "eps": RATE_EPSILON_SECONDS,
                },
            )
        return max(0.0, float(wait or 0.0))

    async def peek_rate_token(self, key: str, per_second: float, burst: int) -> float:
        """Seconds a take from the shared bucket of ``key`` would wait now (0: it would go).

        Read-only: the same GCRA arithmetic as ``take_rate_token``, without taking. PostgreSQL
        only.
        """
        self._require_postgres()
        interval = 1.0 / per_second
        async with self.engine.connect() as conn:
            wait = await conn.scalar(
                _PEEK_RATE_TOKEN, {"key": key, "tau": (max(1, burst) - 1) * interval}
            )
        wait = float(wait or 0.0)
        return wait if wait > RATE_EPSILON_SECONDS else 0.0

    async def pause_rate_scope(self, key: str, seconds: float) -> None:
        """Hold every process's calls in ``key`` for ``seconds`` (a 429's Retry-After)."""
        self._require_postgres()
        async with self.engine.begin() as conn:
            await conn.execute(_PAUSE_RATE_SCOPE, {"key": key, "seconds": max(0.0, seconds)})

    async def prune_rate_budgets(self, idle_seconds: float = 3600.0) -> int:
        """Forget scopes idle for ``idle_seconds`` (their rows say no more than no row)."""
        self._require_postgres()
        async with self.engine.begin() as conn:
            result = await conn.execute(_PRUNE_RATE_BUDGETS, {"idle": idle_seconds})
        return int(getattr(result, "rowcount", 0) or 0)

    def _require_postgres(self) -> None:
        if not self.is_postgres:
            raise RuntimeError(
                "shared rate-limit budgets need PostgreSQL (DATABASE_URL); "
                "on SQLite one process paces its own calls"
            )

    # -- usage -----------------------------------------------------------------------------------

    async def record_turn_usage(
        self, turn_id: int, usage: TurnUsage, exposure: TurnExposure | None = None
    ) -> None:
        """Store what a turn's requests to the model used and cost, and what its reply was
        exposed to (one write at the turn's end)."""
        values: dict[str, Any] = {
            "model": usage.model[:200],
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "tokens_estimated": usage.estimated,
            "cost_usd": usage.cost_usd,
            "updated_at": _now(),
        }
        if exposure is not None:
            values.update(
                experiment_id=exposure.experiment_id,
                variant=exposure.variant,
                prompt_version=exposure.prompt_version,
                first_token_ms=exposure.first_token_ms,
            )
        async with self.engine.begin() as conn:
            await conn.execute(update(TurnRow).where(TurnRow.id == turn_id).values(**values))

    async def refuse_turn(self, turn_id: int, limit: str) -> None:
        """Mark a turn turned away by ``limit`` (it is not counted against the rate)."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(TurnRow).where(TurnRow.id == turn_id).values(refused=limit[:16])
            )

    async def tokens_since(
        self,
        since: datetime,
        *,
        platform: str,
        user_id: str | None = None,
        channel: tuple[str, str] | None = None,
    ) -> int:
        """Tokens (input and output) of ``platform``'s turns since ``since``: one user's, or one
        channel's (``(workspace, channel)``), across every worker."""
        spent = func.coalesce(func.sum(TurnRow.input_tokens + TurnRow.output_tokens), 0)
        query = select(spent).where(TurnRow.platform == platform, TurnRow.created_at >= since)
        if user_id is not None:
            query = query.where(TurnRow.user_id == user_id)
        if channel is not None:
            query = query.join(ConversationRow, ConversationRow.id == TurnRow.conversation_id)
            query = query.where(
                ConversationRow.workspace == channel[0], ConversationRow.channel == channel[1]
            )
        async with self._sessions() as session:
            return int(await session.scalar(query) or 0)

    async def recent_turn_times(
        self, platform: str, user_id: str, since: datetime, *, before_id: int | None
    ) -> list[datetime]:
        """When ``user_id``'s turns accepted since ``since`` (and before turn ``before_id``)
        arrived, oldest first; turns a limit turned away are left out."""
        query = select(TurnRow.created_at).where(
            TurnRow.platform == platform,
            TurnRow.user_id == user_id,
            TurnRow.created_at >= since,
            TurnRow.refused.is_(None),
        )
        if before_id is not None:
            query = query.where(TurnRow.id < before_id)
        async with self._sessions() as session:
            times = await session.scalars(query.order_by(TurnRow.created_at))
            return [_aware(t) or t for t in times]

    async def usage_report(self, since: datetime, by: UsageGrouping) -> list[UsageGroup]:
        """Turns that called the model since ``since``, with their tokens and cost, per ``by``."""
        key = self._usage_key(by)
        priced = func.count(TurnRow.cost_usd)
        query = (
            select(
                key,
                func.count(),
                func.coalesce(func.sum(TurnRow.input_tokens), 0),
                func.coalesce(func.sum(TurnRow.output_tokens), 0),
                func.coalesce(func.sum(TurnRow.cost_usd), 0.0),
                priced,
            )
            .join(ConversationRow, ConversationRow.id == TurnRow.conversation_id)
            .where(TurnRow.created_at >= since, TurnRow.input_tokens.is_not(None))
            .group_by(key)
            .order_by(key)
        )
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
        return [
            UsageGroup(str(k), int(n), int(i), int(o), float(c) if p else None)
            for k, n, i, o, c, p in rows
        ]

    def _usage_key(self, by: UsageGrouping) -> Any:
        if by == "user":
            return TurnRow.platform + ":" + func.coalesce(TurnRow.user_id, "-")
        if by == "channel":
            return (
                ConversationRow.platform
                + ":"
                + ConversationRow.workspace
                + ":"
                + ConversationRow.channel
            )
        if by == "model":
            return TurnRow.model
        # Timestamps are stored in UTC: SQLite keeps them as ISO text, date first.
        if self.is_postgres:
            return func.to_char(func.timezone("UTC", TurnRow.created_at), "YYYY-MM-DD")
        return func.substr(TurnRow.created_at, 1, 10)

    # -- queries -------------------------------------------------------------------------------

    @staticmethod
    def _select_key(key: ConversationKey) -> Any:
        return select(ConversationRow).where(
            ConversationRow.platform == key.platform,
            ConversationRow.workspace == key.workspace,
            ConversationRow.channel == key.channel,
            ConversationRow.thread == key.thread,
        )

    @staticmethod
    def _select_channel(platform: str, workspace: str, channel: str) -> Any:
        return select(ChannelSettingsRow).where(
            ChannelSettingsRow.platform == platform,
            ChannelSettingsRow.workspace == workspace,
            ChannelSettingsRow.channel == channel,
        )

    # -- feedback ------------------------------------------------------------------------------

    async def rated_reply(self, message_id: int) -> RatedReply | None:
        """The answer ``message_id`` names (None: no assistant message has that id)."""
        return await self._rated_reply(MessageRow.id == message_id)

    async def last_reply(self, conversation_id: int) -> RatedReply | None:
        """The latest answer of a conversation (replaced answers aside), for ``/good`` ``/bad``."""
        return await self._rated_reply(
            MessageRow.conversation_id == conversation_id,
            _still_sent(),
        )

    async def _rated_reply(self, *conditions: Any) -> RatedReply | None:
        query = (
            select(MessageRow, ConversationRow.platform)
            .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
            .where(MessageRow.role == "assistant", *conditions)
            .order_by(MessageRow.id.desc())
            .limit(1)
        )
        async with self._sessions() as session:
            found = (await session.execute(query)).first()
        if found is None:
            return None
        row, platform = found
        return RatedReply(
            id=row.id,
            conversation_id=row.conversation_id,
            platform=platform,
            platform_message_ids=_id_list(row.platform_message_ids),
            content=row.content,
        )

    async def add_feedback(
        self, reply: RatedReply, user_id: str, value: int, reason: str | None = None
    ) -> int:
        """Append one click of ``user_id`` on ``reply`` (+1 or -1, with an optional reason).

        Rows are never changed: a second click, or the reason given after a thumbs-down, is a
        new row, and ``latest_feedback`` reads the latest of each user.
        """
        if value not in (1, -1):
            raise ValueError(f"feedback is +1 or -1, not {value!r}")
        async with self.engine.begin() as conn:
            result = await conn.execute(
                insert(FeedbackRow)
                .values(
                    message_id=reply.id,
                    conversation_id=reply.conversation_id,
                    platform=reply.platform,
                    user_id=user_id[:128],
                    value=value,
                    reason=reason or None,
                    created_at=_now(),
                )
                .returning(FeedbackRow.id)
            )
            feedback_id: int = result.scalar_one()
        return feedback_id

    async def latest_feedback(self, message_ids: Sequence[int]) -> dict[int, dict[str, int]]:
        """What counts of the feedback on these answers: ``{message id: {user: +1 or -1}}``,
        each user's latest click (answers nobody rated are absent). The experiment report reads
        this."""
        latest: dict[int, dict[str, int]] = {}
        ids = sorted(set(message_ids))
        async with self._sessions() as session:
            for start in range(0, len(ids), FEEDBACK_LOOKUP_CHUNK):
                chunk = ids[start : start + FEEDBACK_LOOKUP_CHUNK]
                rows = await session.execute(
                    select(FeedbackRow.message_id, FeedbackRow.user_id, FeedbackRow.value)
                    .where(FeedbackRow.message_id.in_(chunk))
                    .order_by(FeedbackRow.id)
                )
                # In insertion order, so a later click replaces an earlier one.
                for message_id, user_id, value in rows:
                    latest.setdefault(message_id, {})[user_id] = value
        return latest

    async def feedback_reasons(self, message_id: int) -> list[str]:
        """The reasons given with clicks on an answer, oldest first (for reading them out)."""
        async with self._sessions() as session:
            rows = await session.scalars(
                select(FeedbackRow.reason)
                .where(FeedbackRow.message_id == message_id, FeedbackRow.reason.is_not(None))
                .order_by(FeedbackRow.id)
            )
            return [reason for reason in rows if reason]

    # -- experiments ---------------------------------------------------------------------------

    async def start_experiment(
        self,
        name: str,
        seed: str,
        variants: Sequence[ExperimentVariant],
        channels: Sequence[str] | None,
    ) -> Experiment:
        """Record a running experiment; ``ExperimentError`` when its name is taken or its scope
        (the deployment, or one of ``channels``) already has a running experiment."""
        payload = json.dumps(
            [{"name": v.name, "prompt": v.prompt, "weight": v.weight} for v in variants]
        )
        try:
            async with self._sessions.begin() as session:
                running = await session.scalars(
                    select(ExperimentRow).where(ExperimentRow.status == EXPERIMENT_RUNNING)
                )
                for other in running:
                    _refuse_overlap(_experiment(other), channels)
                row = ExperimentRow(
                    name=name,
                    seed=seed,
                    variants=payload,
                    channels=",".join(channels) if channels else None,
                    status=EXPERIMENT_RUNNING,
                    created_at=_now(),
                )
                session.add(row)
                await session.flush()
                return _experiment(row)
        except IntegrityError as error:
            raise ExperimentError(f"an experiment named {name!r} already exists") from error

    async def experiments(self, *, running_only: bool = False) -> list[Experiment]:
        """Every experiment (or the running ones), oldest first."""
        query = select(ExperimentRow).order_by(ExperimentRow.id)
        if running_only:
            query = query.where(ExperimentRow.status == EXPERIMENT_RUNNING)
        async with self._sessions() as session:
            return [_experiment(row) for row in await session.scalars(query)]

    async def experiment(self, name: str) -> Experiment | None:
        """The experiment called ``name``, if there is one."""
        async with self._sessions() as session:
            row = await session.scalar(select(ExperimentRow).where(ExperimentRow.name == name))
            return _experiment(row) if row else None

    async def stop_experiment(
        self, experiment_id: int, *, shipped: ExperimentVariant | None
    ) -> int:
        """End an experiment for every conversation; with ``shipped``, make that variant's prompt
        the default of the experiment's scope in the same step. Returns the channels whose
        default was set (0 for the deployment)."""
        async with self._sessions.begin() as session:
            row = await session.get(ExperimentRow, experiment_id)
            if row is None:
                raise LookupError(f"no experiment {experiment_id}")
            row.status = EXPERIMENT_STOPPED
            row.stopped_at = row.stopped_at or _now()
            if shipped is None:
                return 0
            row.shipped = shipped.name
            if not row.channels:
                setting = await session.get(DeploymentSettingRow, DEPLOYMENT_SYSTEM_PROMPT)
                if setting is None:
                    setting = DeploymentSettingRow(name=DEPLOYMENT_SYSTEM_PROMPT)
                    session.add(setting)
                setting.value = shipped.prompt
                setting.updated_at = _now()
                return 0
            return await self._ship_to_channels(session, row.channels.split(","), shipped.prompt)

    async def _ship_to_channels(self, session: Any, channels: list[str], prompt: str) -> int:
        """Set ``prompt`` as the default of every channel with one of these ids, on any
        platform and workspace where it has settings or conversations."""
        known = select(
            ChannelSettingsRow.platform, ChannelSettingsRow.workspace, ChannelSettingsRow.channel
        ).where(ChannelSettingsRow.channel.in_(channels))
        seen = select(
            ConversationRow.platform, ConversationRow.workspace, ConversationRow.channel
        ).where(ConversationRow.channel.in_(channels))
        places = set((await session.execute(known.union(seen))).all())
        for platform, workspace, channel in places:
            row = await session.scalar(self._select_channel(platform, workspace, channel))
            if row is None:
                row = ChannelSettingsRow(platform=platform, workspace=workspace, channel=channel)
                session.add(row)
            row.system_prompt = prompt
            row.updated_at = _now()
        return len(places)

    async def deployment_setting(self, name: str) -> str | None:
        """A deployment-wide setting kept in the database (None when unset)."""
        async with self._sessions() as session:
            row = await session.get(DeploymentSettingRow, name)
            return row.value if row else None

    async def assignment(
        self, experiment_id: int, conversation_id: int
    ) -> tuple[str | None, bool] | None:
        """A conversation's stored (variant, excluded) in an experiment, or None."""
        query = select(ExperimentAssignmentRow.variant, ExperimentAssignmentRow.excluded).where(
            ExperimentAssignmentRow.experiment_id == experiment_id,
            ExperimentAssignmentRow.conversation_id == conversation_id,
        )
        async with self._sessions() as session:
            row = (await session.execute(query)).first()
        return None if row is None else (row.variant, bool(row.excluded))

    async def assign(
        self, experiment_id: int, conversation_id: int, variant: str | None, *, excluded: bool
    ) -> tuple[str | None, bool]:
        """Store a conversation's variant (or exclusion) unless one is stored already; the one
        that is stored afterwards, so workers choosing at once agree."""
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(ExperimentAssignmentRow).values(
                        experiment_id=experiment_id,
                        conversation_id=conversation_id,
                        variant=variant,
                        excluded=excluded,
                        created_at=_now(),
                    )
                )
        except IntegrityError:
            pass  # another worker stored its choice first: that one stands
        stored = await self.assignment(experiment_id, conversation_id)
        if stored is None:
            raise LookupError(f"conversation {conversation_id} has no assignment")
        return stored

    async def conversation_created_at(self, conversation_id: int) -> datetime:
        async with self._sessions() as session:
            created = await session.scalar(
                select(ConversationRow.created_at).where(ConversationRow.id == conversation_id)
            )
        if created is None:
            raise LookupError(f"no conversation {conversation_id}")
        return _aware(created) or created

    async def assignment_counts(self, experiment_id: int) -> AssignmentCounts:
        """How many conversations each variant has, and how many were excluded."""
        query = (
            select(ExperimentAssignmentRow.variant, ExperimentAssignmentRow.excluded, func.count())
            .where(ExperimentAssignmentRow.experiment_id == experiment_id)
            .group_by(ExperimentAssignmentRow.variant, ExperimentAssignmentRow.excluded)
        )
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
        per_variant = {str(v): int(n) for v, x, n in rows if not x and v is not None}
        return AssignmentCounts(per_variant, sum(int(n) for _, x, n in rows if x))

    async def experiment_replies(self, experiment_id: int) -> list[ExperimentReply]:
        """Every ended reply of an experiment with its ratings: each user's latest click on
        the reply's stored answer counts once."""
        in_experiment = select(ExperimentAssignmentRow.conversation_id).where(
            ExperimentAssignmentRow.experiment_id == experiment_id
        )
        latest = (
            select(func.max(FeedbackRow.id))
            .where(FeedbackRow.conversation_id.in_(in_experiment))
            .group_by(FeedbackRow.message_id, FeedbackRow.user_id)
        )
        ratings = (
            select(
                MessageRow.turn_id.label("turn_id"),
                func.count().label("rated"),
                func.sum(case((FeedbackRow.value > 0, 1), else_=0)).label("positive"),
            )
            .join(MessageRow, MessageRow.id == FeedbackRow.message_id)
            .where(FeedbackRow.id.in_(latest))
            .group_by(MessageRow.turn_id)
            .subquery()
        )
        query = (
            select(
                TurnRow.conversation_id,
                TurnRow.variant,
                TurnRow.status,
                TurnRow.first_token_ms,
                TurnRow.input_tokens,
                TurnRow.output_tokens,
                func.coalesce(ratings.c.rated, 0),
                func.coalesce(ratings.c.positive, 0),
            )
            .outerjoin(ratings, ratings.c.turn_id == TurnRow.id)
            .where(
                TurnRow.experiment_id == experiment_id,
                TurnRow.variant.is_not(None),
                TurnRow.status.in_(ENDED_TURN_STATUSES),
            )
            .order_by(TurnRow.id)
        )
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
        return [
            ExperimentReply(int(c), str(v), s == "failed", ttft, i, o, int(n), int(p))
            for c, v, s, ttft, i, o, n, p in rows
        ]


#: Float slack in the GCRA comparison, in seconds (a wait of a microsecond is no wait).
RATE_EPSILON_SECONDS = 1e-6

# The database clock read once per statement (clock_timestamp(), not now(): the transaction's
# start would be stale). It travels into the UPDATE branch as EXCLUDED.checked_at. A take that
# waited for a competing take's row lock reads the clock before that wait, so it may grant up to
# that wait (milliseconds) early: the tolerance of this limiter.
_DB_CLOCK = "WITH clock AS (SELECT extract(epoch FROM clock_timestamp())::double precision AS now)"
_GCRA_BASE = "greatest(b.tat, EXCLUDED.checked_at, b.paused_until + CAST(:tau AS double precision))"
_GCRA_WAIT = f"({_GCRA_BASE} - CAST(:tau AS double precision) - EXCLUDED.checked_at)"
_TAKE_RATE_TOKEN = text(
    f"""{_DB_CLOCK}
INSERT INTO rate_budgets AS b (key, tat, paused_until, last_wait, checked_at)
SELECT :key, clock.now + CAST(:interval AS double precision), 0, 0, clock.now FROM clock
ON CONFLICT (key) DO UPDATE SET
    tat = CASE WHEN {_GCRA_WAIT} <= CAST(:eps AS double precision)
        THEN {_GCRA_BASE} + CAST(:interval AS double precision) ELSE b.tat END,
    last_wait = CASE WHEN {_GCRA_WAIT} <= CAST(:eps AS double precision)
        THEN 0 ELSE {_GCRA_WAIT} END,
    checked_at = EXCLUDED.checked_at
RETURNING last_wait"""
)
# No row: the bucket is full (a take would go at once).
_PEEK_RATE_TOKEN = text(
    f"""{_DB_CLOCK}
SELECT greatest(b.tat, clock.now, b.paused_until + CAST(:tau AS double precision))
    - CAST(:tau AS double precision) - clock.now
FROM rate_budgets AS b, clock WHERE b.key = :key"""
)
_PAUSE_RATE_SCOPE = text(
    f"""{_DB_CLOCK}
INSERT INTO rate_budgets AS b (key, tat, paused_until, last_wait, checked_at)
SELECT :key, 0, clock.now + CAST(:seconds AS double precision), 0, clock.now FROM clock
ON CONFLICT (key) DO UPDATE SET
    paused_until = greatest(b.paused_until, EXCLUDED.paused_until),
    checked_at = EXCLUDED.checked_at"""
)
_PRUNE_RATE_BUDGETS = text(
    "DELETE FROM rate_budgets WHERE greatest(tat, paused_until) "
    "< extract(epoch FROM clock_timestamp())::double precision - CAST(:idle AS double precision)"
)


def _refuse_overlap(running: Experiment, channels: Sequence[str] | None) -> None:
    """Raise when a new experiment over ``channels`` (None: the deployment) would share a scope
    with ``running``: one running experiment per scope."""
    if channels is None and running.channels is None:
        raise ExperimentError(
            f"experiment {running.name!r} is already running for the whole deployment; "
            "stop it first"
        )
    shared = sorted(set(channels or ()) & set(running.channels or ()))
    if shared:
        raise ExperimentError(
            f"experiment {running.name!r} is already running in channel {shared[0]}; stop it first"
        )


def _current_generation(conversation_id: int) -> Any:
    # Read in the statement itself: a reset between our reads and our write cannot be missed.
    return (
        select(ConversationRow.generation)
        .where(ConversationRow.id == conversation_id)
        .scalar_subquery()
    )


async def _unlock(conn: AsyncConnection, key: int, conversation_id: int) -> None:
    """Release a conversation's advisory lock. A connection that dropped meanwhile (the database
    restarted, the network broke) took the lock with it: the turn it guarded still ends well."""
    try:
        await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        await conn.commit()
    except Exception as error:
        if not is_passing_database_error(error):
            raise
        log.warning(
            "conversation %s: its lock's connection dropped (%s); the server released the lock",
            conversation_id,
            " ".join(str(getattr(error, "orig", None) or error).split()),
        )


def _advisory_key(conversation_id: int) -> int:
    # A 64-bit signed key in a namespace of our own, so other users of advisory locks don't clash.
    digest = hashlib.blake2b(f"threadbot:conversation:{conversation_id}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


#: Errors that mean "the database cannot be reached right now" rather than a bug in a statement.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    OSError,
    TimeoutError,
)


@contextmanager
def database_errors() -> Iterator[None]:
    """Translate "the database is unreachable" into ``StoreUnavailableError`` (ours from theirs)."""
    try:
        yield
    except UNAVAILABLE_ERRORS as error:
        raise StoreUnavailableError(f"database unreachable: {error}".splitlines()[0]) from error
    except DBAPIError as error:
        if error.connection_invalidated:
            raise StoreUnavailableError(f"database connection lost: {error.orig}") from error
        raise


# -- retrying the writes that matter ---------------------------------------------------------------

#: Waits before the second and third attempt of a write that matters (a question, an answer),
#: in seconds: short, since a user is waiting, and enough for a lock to clear or a pool to
#: replace a dropped connection.
WRITE_RETRY_WAITS = (0.2, 1.0)

_T = TypeVar("_T")


def is_passing_database_error(error: BaseException) -> bool:
    """Whether a failed write may succeed when tried again: the database was busy or unreachable
    or the connection dropped; never for a refused statement (a constraint, a bad query)."""
    if isinstance(error, DBAPIError):
        return error.connection_invalidated or isinstance(error, OperationalError | InterfaceError)
    return isinstance(error, ConnectionError | TimeoutError)


async def retry_write(
    write: Callable[[], Awaitable[_T]],
    *,
    what: str,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> _T:
    """``write()``, tried again after ``WRITE_RETRY_WAITS`` when the database fails in passing.

    The last failure is raised as itself; ``what`` names the write in the log.
    """
    waits = iter(WRITE_RETRY_WAITS)
    attempt = 1
    while True:
        try:
            return await write()
        except Exception as error:
            wait = next(waits, None)
            if wait is None or not is_passing_database_error(error):
                raise
            log.warning(
                "saving %s failed (attempt %d of %d): %s; trying again in %.1f s",
                what,
                attempt,
                len(WRITE_RETRY_WAITS) + 1,
                " ".join(str(getattr(error, "orig", None) or error).split()),
                wait,
            )
            attempt += 1
            await sleep(wait)
