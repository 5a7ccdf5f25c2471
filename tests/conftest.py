"""Every test gets its own SQLite file, so no test writes ``robota.db`` into the checkout."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest
import redis


@pytest.fixture(autouse=True)
def _own_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBOTA_DATABASE_URL", f"sqlite:///{tmp_path / 'robota.db'}")


# --- the real services of the scale-out backends ----------------------------------------------
# They must be running (``.ci/run`` starts them); a missing one fails the tests that need it,
# it never skips them.

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_BASE_URL = "redis://127.0.0.1:6379"


@contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """A PostgreSQL database of its own, dropped afterwards, so parallel and earlier runs never
    see each other's keys or ledger rows."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"

    async def admin(statement: str) -> None:
        conn = await asyncpg.connect(POSTGRES_ADMIN_URL.replace("postgresql", "postgres", 1))
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session."""
    with fresh_postgres_database("robota_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each engine, for migration tests that build an old schema in it."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    with fresh_postgres_database("robota_migrate") as url:
        yield url


#: Every Redis key a test run writes starts with it (``ROBOTA_REDIS_PREFIX`` of the proxies the
#: tests start, ``prefix=`` of the storages they build), and only those keys are deleted at the
#: end: runs sharing the Redis, and anyone else using it, never see or lose each other's data.
REDIS_TEST_PREFIX = f"robota-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The shared Redis; this run's keys (``REDIS_TEST_PREFIX``) are removed afterwards."""
    url = f"{REDIS_BASE_URL}/0"
    yield url
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=f"{REDIS_TEST_PREFIX}*", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_prefix() -> str:
    return REDIS_TEST_PREFIX
