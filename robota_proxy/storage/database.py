"""One async SQLAlchemy engine for SQLite or PostgreSQL, and the migrations applied at start.

Users write the URLs they know (``sqlite:///robota.db``, ``postgresql://user@host/db``); the
async driver (aiosqlite, asyncpg) is chosen here so that nobody has to spell
``postgresql+asyncpg://``.

Migrations are a numbered list of steps recorded in ``schema_version``; each process applies
the missing ones at start, under a lock on PostgreSQL so that two workers starting together
do not race. Alembic would add a config file and a migration environment to every install for
what is, today, a handful of DDL steps; revisit when the schema needs data migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from sqlalchemy import Column, Integer, MetaData, Table, event, inspect, select, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import AsyncAdaptedQueuePool, StaticPool

from robota_proxy.storage import tables

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger("robota_proxy.storage")

Migration: TypeAlias = "Callable[[AsyncConnection], Awaitable[None]]"

_version_meta = MetaData()
schema_version = Table("schema_version", _version_meta, Column("version", Integer, nullable=False))


async def _initial_schema(conn: AsyncConnection) -> None:
    await conn.run_sync(tables.metadata.create_all)


async def _ledger_leases(conn: AsyncConnection) -> None:
    """2: crash-safe money. The ledger row is written before the vendor call, holding the
    call's lease (owner, expiry, what the counters hold for it, the worst case to charge if it
    never settles); ``request_id`` becomes unique (minted by the proxy) and the caller's
    ``X-Request-ID`` moves to ``correlation_id``.

    Idempotent, because step 1 creates the tables as ``tables.py`` has them today: a database
    created by it already has all of this. The DDL is spelled out here rather than read from
    ``tables.py``, so that later schema changes never alter what this step does."""
    existing = await conn.run_sync(
        lambda sync: {column["name"] for column in inspect(sync).get_columns("usage_ledger")}
    )
    timestamp = "TIMESTAMP WITH TIME ZONE" if conn.dialect.name == "postgresql" else "DATETIME"
    added = (
        ("correlation_id", "VARCHAR(64)"),
        ("lease_owner", "VARCHAR(100)"),
        ("lease_expires_at", timestamp),
        ("reserved_tokens", "BIGINT NOT NULL DEFAULT 0"),
        ("reserved_cost_pico", "BIGINT NOT NULL DEFAULT 0"),
        ("estimate_prompt_tokens", "BIGINT NOT NULL DEFAULT 0"),
        ("estimate_completion_tokens", "BIGINT NOT NULL DEFAULT 0"),
        ("estimate_cost_pico", "BIGINT"),
    )
    for name, ddl in added:
        if name not in existing:
            await conn.execute(text(f"ALTER TABLE usage_ledger ADD COLUMN {name} {ddl}"))
    # Rows keyed by a caller's X-Request-ID may share it: all but the first of each get a
    # unique key and keep the caller's id as their correlation id.
    await conn.execute(
        text(
            "UPDATE usage_ledger SET correlation_id = request_id, "
            "request_id = request_id || '~' || CAST(id AS VARCHAR(20)) "
            "WHERE id NOT IN (SELECT min(id) FROM usage_ledger GROUP BY request_id)"
        )
    )
    await conn.execute(
        text(
            "CREATE UNIQUE INDEX IF NOT EXISTS ux_usage_ledger_request_id "
            "ON usage_ledger (request_id)"
        )
    )
    await conn.execute(
        text(
            "CREATE INDEX IF NOT EXISTS ix_usage_ledger_lease "
            "ON usage_ledger (status, lease_expires_at)"
        )
    )


async def _user_revocation(conn: AsyncConnection) -> None:
    """3: users can be revoked whole (``users.revoked_at``, null: not revoked). Every existing
    user stays active. Idempotent for the same reason as step 2: a database created by step 1
    today already has the column. A database without a users table (only ever a partial test
    fixture: step 1 creates every table) has nothing to revoke."""

    def columns(sync: Connection) -> set[str] | None:
        inspector = inspect(sync)
        if not inspector.has_table("users"):
            return None
        return {column["name"] for column in inspector.get_columns("users")}

    existing = await conn.run_sync(columns)
    if existing is None or "revoked_at" in existing:
        return
    timestamp = "TIMESTAMP WITH TIME ZONE" if conn.dialect.name == "postgresql" else "DATETIME"
    await conn.execute(text(f"ALTER TABLE users ADD COLUMN revoked_at {timestamp}"))


async def _ledger_surface(conn: AsyncConnection) -> None:
    """4: the ledger says which surface a call came in on (``usage_ledger.surface``:
    ``robota``, ``openai``, ``anthropic``); rows written before it were all ``robota``.
    Idempotent for the same reason as step 2."""
    existing = await conn.run_sync(
        lambda sync: {column["name"] for column in inspect(sync).get_columns("usage_ledger")}
    )
    if "surface" not in existing:
        await conn.execute(
            text(
                "ALTER TABLE usage_ledger ADD COLUMN surface VARCHAR(20) NOT NULL DEFAULT 'robota'"
            )
        )


#: Append only: a released step is never edited, a change is a new step.
async def _ledger_deployment(conn: AsyncConnection) -> None:
    """5: the ledger names the deployment that answered (``usage_ledger.deployment``, null
    for rows written before it). Idempotent for the same reason as step 2."""
    existing = await conn.run_sync(
        lambda sync: {column["name"] for column in inspect(sync).get_columns("usage_ledger")}
    )
    if "deployment" not in existing:
        await conn.execute(text("ALTER TABLE usage_ledger ADD COLUMN deployment VARCHAR(60)"))


async def _ledger_attempts(conn: AsyncConnection) -> None:
    """7: a call's earlier vendor calls are rows of their own, linked to the call's row
    (``usage_ledger.attempt_of``, null for a call's own row and for rows written before it).
    Idempotent for the same reason as step 2."""
    existing = await conn.run_sync(
        lambda sync: {column["name"] for column in inspect(sync).get_columns("usage_ledger")}
    )
    if "attempt_of" not in existing:
        await conn.execute(text("ALTER TABLE usage_ledger ADD COLUMN attempt_of VARCHAR(100)"))


async def _alert_marks(conn: AsyncConnection) -> None:
    """6: ``alert_marks``, the alerts sent once per user and month (a budget's 80% and 100%),
    so that processes sharing the database send each of them once. Idempotent for the same
    reason as step 2."""
    await conn.execute(
        text(
            "CREATE TABLE IF NOT EXISTS alert_marks (user_id VARCHAR(200) NOT NULL, "
            "period VARCHAR(7) NOT NULL, alert VARCHAR(40) NOT NULL, "
            "PRIMARY KEY (user_id, period, alert))"
        )
    )


MIGRATIONS: Sequence[Migration] = (
    _initial_schema,
    _ledger_leases,
    _user_revocation,
    _ledger_surface,
    _ledger_deployment,
    _alert_marks,
    _ledger_attempts,
)

# Any fixed number: the advisory lock that serialises migrations across PostgreSQL clients.
_PG_MIGRATION_LOCK = 7_261_534


#: What an unreachable or failing database raises: SQLAlchemy wraps the driver's errors, but a
#: refused or reset connection can surface as the plain ``OSError`` asyncpg raised. Callers log
#: these as one line (an outage, not a bug), never with a traceback per request.
DATABASE_OUTAGE: tuple[type[Exception], ...] = (SQLAlchemyError, OSError)


class DatabaseURLError(ValueError):
    """The configured database URL names no engine we support."""


class DatabaseDriverMissing(DatabaseURLError):
    """The URL is fine but its driver is an optional extra that is not installed."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f'{package} is not installed: pip install "robota-remote[proxy,{extra}]"')
        self.package = package
        self.extra = extra


def parse_url(url: str) -> URL:
    """The URL, or ``DatabaseURLError`` saying what is accepted (SQLAlchemy's own message
    names neither the setting nor the two shapes we take)."""
    try:
        return make_url(url)
    except ArgumentError:
        raise DatabaseURLError(
            "not a database URL: use sqlite:///path.db or postgresql://user@host/db"
        ) from None


def async_url(url: str) -> str:
    """``sqlite:///x.db`` -> ``sqlite+aiosqlite:///x.db``; ``postgresql://`` -> asyncpg.

    The driver is imported here, so a missing extra is one clear error before the engine
    exists rather than SQLAlchemy's ``ModuleNotFoundError`` from inside ``create_engine``."""
    parsed = parse_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return str(parsed.set(drivername="sqlite+aiosqlite"))
    if backend in ("postgresql", "postgres"):
        _require("asyncpg", "postgres")
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise DatabaseURLError(
        f"unsupported database {backend!r}: use sqlite:///path.db or postgresql://..."
    )


def _require(package: str, extra: str) -> None:
    try:
        importlib.import_module(package)
    except ImportError:
        raise DatabaseDriverMissing(package, extra) from None


class Database:
    """Owns the engine; ``open`` applies migrations, ``aclose`` disposes the pool."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        # Here, not at import: SQLAlchemy's asyncio extension imports its ORM (~100 ms).
        from sqlalchemy.ext.asyncio import create_async_engine

        self.url = url
        self.is_sqlite = parse_url(url).get_backend_name() == "sqlite"
        self._checkpointer: asyncio.Task[None] | None = None
        #: A SQLite file keeps a write-ahead log to checkpoint (an in-memory one does not).
        self._has_wal = False
        if self.is_sqlite:
            database = parse_url(url).database
            in_memory = not database or database == ":memory:"
            self._has_wal = not in_memory
            if database and not in_memory:
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            # A small pool of long-lived connections: opening one (a thread for aiosqlite, and
            # the PRAGMAs) costs ~10 ms, far more than a write. SQLite serialises writers
            # anyway and WAL lets readers go on beside them, so a few connections suffice.
            # An in-memory database lives in one connection, so it gets exactly one.
            pool = (
                {"poolclass": StaticPool}
                if in_memory
                else {"poolclass": AsyncAdaptedQueuePool, "pool_size": 4, "max_overflow": 4}
            )
            self.engine: AsyncEngine = create_async_engine(async_url(url), **pool)
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_async_engine(
                async_url(url), pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
            )

    async def open(self) -> None:
        await migrate(self.engine, is_sqlite=self.is_sqlite)
        if self._has_wal and self._checkpointer is None:
            self._checkpointer = asyncio.get_running_loop().create_task(self._checkpoints())

    async def aclose(self) -> None:
        task, self._checkpointer = self._checkpointer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.engine.dispose()

    async def _checkpoints(self) -> None:
        """SQLite's WAL written back to the database every ``CHECKPOINT_SECONDS``, beside the
        requests rather than inside one of their commits (``_sqlite_pragmas``). ``PASSIVE``:
        it never waits for a writer, and copies what it can."""
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            try:
                async with self.engine.connect() as conn:
                    await conn.execute(text("PRAGMA wal_checkpoint(PASSIVE)"))
            except SQLAlchemyError as exc:
                # A locked or vanished file: the WAL keeps every write, the next round tries.
                log.warning("SQLite checkpoint failed (%s); retrying", type(exc).__name__)


#: Seconds between the background checkpoints of a SQLite database's write-ahead log.
CHECKPOINT_SECONDS = 1.0


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    # No checkpoint inside a commit: by default the commit that takes the WAL past 1000 pages
    # writes it back, two fdatasyncs while its request waits (about 1.5% of requests, tens of
    # ms each on a slow disk: the c=1 p99). ``Database._checkpoints`` does it in the
    # background instead.
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


async def migrate(engine: AsyncEngine, *, is_sqlite: bool) -> int:
    """Apply the missing migrations; returns the schema version now in force."""
    async with engine.begin() as conn:
        # SQLite: create_all checks before it creates, and busy_timeout makes a second
        # process wait for the first one's write lock.
        if not is_sqlite:
            await conn.execute(text(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})"))
        await conn.run_sync(_version_meta.create_all)
        current = (await conn.execute(select(schema_version.c.version))).scalar()
        if current is None:
            await conn.execute(schema_version.insert().values(version=0))
            current = 0
        for number, step in enumerate(MIGRATIONS[current:], start=current + 1):
            log.info("applying database migration %d", number)
            await step(conn)
            await conn.execute(schema_version.update().values(version=number))
        return len(MIGRATIONS) if current < len(MIGRATIONS) else current
