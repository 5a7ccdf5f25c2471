"""Shared by the UsageStore tests (``test_usage_store*.py``): the ``store`` fixture on a real
SQLite file and on the session's PostgreSQL database, and the helpers that build a call's
opening, its ledger entry, and read the ledger back. Every behaviour is tested on both engines.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from robota_proxy.storage import tables, usage_store
from robota_proxy.storage.database import Database
from robota_proxy.storage.usage_store import (
    LedgerEntry,
    Opening,
    Reservation,
    UsageStore,
)

LEDGER = tables.usage_ledger
OWNER = "test-host:4242:abcd1234"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def new_york() -> Iterator[None]:
    """The process runs in New York's time zone (UTC-5 in winter), as a host may."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TZ", "America/New_York")
        time.tzset()
        yield
    time.tzset()


#: The store's statements, built on first use and kept for the process's life.
_STATEMENT_CACHES = (
    usage_store._reserve_stmt,
    usage_store._insert_counters_stmt,
    usage_store._add_usage_stmt,
    usage_store._for_correction_stmt,
)


@pytest.fixture(autouse=True)
def fresh_statements() -> None:
    """Each test builds the store's statements anew, as a new process would: otherwise only
    the first test of a session would build them, and mutation testing (which runs, for a
    mutant of a statement builder, the tests it saw building statements) would judge a
    builder's mutants by that one test."""
    for cache in _STATEMENT_CACHES:
        cache.cache_clear()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'usage.db'}"
    # Looked up only when asked for, and from a plain fixture: it runs asyncio itself.
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def store(database_url: str, anyio_backend: str) -> AsyncIterator[UsageStore]:
    database = Database(database_url)
    await database.open()
    try:
        yield UsageStore(database)
    finally:
        await database.aclose()


def entry(
    user: str,
    *,
    when: datetime,
    cost: int,
    prompt: int = 10,
    completion: int = 5,
    model: str = "m1",
    cached: bool = False,
    request_id: str | None = None,
    status: str = "ok",
) -> LedgerEntry:
    return LedgerEntry(
        request_id=request_id or f"req_{uuid.uuid4().hex}",
        created_at=when,
        user=user,
        key_id="key_1",
        provider="openai",
        model=model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_prompt_tokens=0,
        reasoning_tokens=0,
        cost_pico=cost,
        latency_ms=3,
        status=status,
        streamed=False,
        cached=cached,
        priced=True,
        estimated=False,
    )


def opening(
    user: str,
    *,
    when: datetime,
    request_id: str | None = None,
    prompt: int = 40,
    completion: int = 60,
    cost: int | None = 7_000,
    lease: timedelta = timedelta(seconds=30),
    model: str = "m1",
) -> Opening:
    """A call's in-flight row: worst case ``prompt + completion`` tokens costing ``cost``
    picodollars, its lease ending ``lease`` after ``when``."""
    return Opening(
        request_id=request_id or f"req_{uuid.uuid4().hex}",
        created_at=when,
        user=user,
        key_id="key_1",
        provider="openai",
        model=model,
        streamed=True,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_pico=cost,
        lease_owner=OWNER,
        lease_expires_at=when + lease,
        correlation_id="theirs-1",
    )


async def open_call(
    store: UsageStore,
    call: Opening,
    *,
    token_limit: int | None = None,
    cost_limit: int | None = 10**15,
) -> Reservation:
    result = await store.open(call, token_limit=token_limit, cost_limit_pico=cost_limit)
    assert isinstance(result, Reservation)
    return result


async def rows_of(store: UsageStore, user: str) -> list[dict[str, object]]:
    async with store.database.engine.connect() as conn:
        result = await conn.execute(
            select(LEDGER).where(LEDGER.c.user_id == user).order_by(LEDGER.c.id)
        )
        return [dict(row._mapping) for row in result]


async def assert_adds_up(store: UsageStore, user: str, period: str) -> None:
    """counters == ledger: used = settled rows, reserved = rows in flight, requests = rows."""
    assert await store.counters(user, period) == await store.ledger_totals(user, period)


async def flush_older_leases(store: UsageStore, now: datetime) -> None:
    """PostgreSQL is shared by the session and reclaiming is global: close what earlier
    tests left in flight first, so that a count is this test's own."""
    await store.reclaim(now)


def unique(name: str) -> str:
    # PostgreSQL is shared by the whole session: users of their own per test.
    return f"{name}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def sqlite_store(tmp_path: Path, anyio_backend: str) -> AsyncIterator[UsageStore]:
    """A store of its own on SQLite, for tests that count every row in the ledger."""
    database = Database(f"sqlite:///{tmp_path / 'own.db'}")
    await database.open()
    try:
        yield UsageStore(database)
    finally:
        await database.aclose()


async def refuse_writes_to(store: UsageStore, request_id: str, *, unless_status: str = "") -> str:
    """Make the database itself refuse any UPDATE or DELETE of the ledger row ``request_id``
    (but an UPDATE that sets its status to ``unless_status``), with a trigger: a real write
    failure, on either engine. Returns the trigger's name, for ``allow_writes``."""
    name = f"refuse_{uuid.uuid4().hex[:12]}"
    rid = request_id.replace("'", "''")
    keep = unless_status.replace("'", "''")
    async with store.database.engine.begin() as conn:
        if store.database.is_sqlite:
            for event, when in (
                ("UPDATE", f"OLD.request_id = '{rid}' AND NEW.status <> '{keep}'"),
                ("DELETE", f"OLD.request_id = '{rid}'"),
            ):
                await conn.execute(
                    text(
                        f"CREATE TRIGGER {name}_{event.lower()} BEFORE {event} ON usage_ledger "
                        f"FOR EACH ROW WHEN {when} BEGIN SELECT RAISE(ABORT, 'refused by "
                        "test'); END"
                    )
                )
        else:
            await conn.execute(
                text(
                    f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    f"IF TG_OP = 'DELETE' OR NEW.status <> '{keep}' THEN "
                    "RAISE EXCEPTION 'refused by test'; END IF; "
                    "IF TG_OP = 'DELETE' THEN RETURN OLD; END IF; RETURN NEW; END $$"
                )
            )
            await conn.execute(
                text(
                    f"CREATE TRIGGER {name} BEFORE UPDATE OR DELETE ON usage_ledger FOR EACH ROW "
                    f"WHEN (OLD.request_id = '{rid}') EXECUTE FUNCTION {name}()"
                )
            )
    return name


async def allow_writes(store: UsageStore, name: str) -> None:
    """Drop a trigger made by ``refuse_writes_to``."""
    async with store.database.engine.begin() as conn:
        if store.database.is_sqlite:
            for event in ("update", "delete"):
                await conn.execute(text(f"DROP TRIGGER IF EXISTS {name}_{event}"))
        else:
            await conn.execute(text(f"DROP TRIGGER IF EXISTS {name} ON usage_ledger"))
            await conn.execute(text(f"DROP FUNCTION IF EXISTS {name}()"))
