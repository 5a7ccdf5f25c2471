"""SQLite's write-ahead log is written back beside the requests, never inside their commits.

By default SQLite checkpoints in the commit that takes the WAL past 1000 pages: two
fdatasyncs while that request waits, about 1.5% of requests, tens of milliseconds each on a
slow disk (the c=1 p99 of issue 13). The proxy turns that off and checkpoints from a
background task every ``CHECKPOINT_SECONDS``. Observed from the outside: the pages a commit
writes stay in the ``-wal`` file until the background checkpoint copies them into the
database file.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from sqlalchemy import text

from robota_proxy.storage import database as database_module
from robota_proxy.storage.database import Database

pytestmark = pytest.mark.anyio

PAGE = 4096
#: 1200 rows of one page each: past the 1000 pages at which SQLite would checkpoint itself.
ROWS = 1200


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def size(path: Path | str) -> int:
    """A file's size in bytes (a stat of a local file: too quick to need a thread)."""
    return os.path.getsize(path)


async def write_pages(db: Database) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(text("CREATE TABLE scratch (data BLOB)"))
    for _ in range(ROWS // 100):  # many commits, as requests make them
        async with db.engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO scratch (data) VALUES (randomblob(:size))"),
                [{"size": PAGE - 100}] * 100,
            )


async def test_commits_leave_the_log_to_the_background_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database_module, "CHECKPOINT_SECONDS", 3600.0)  # not during the test
    path = tmp_path / "robota.db"
    db = Database(f"sqlite:///{path}")
    await db.open()
    try:
        async with db.engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA wal_autocheckpoint"))).scalar() == 0
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
        before = size(path)
        await write_pages(db)
        # Every page went to the log, none into the database file: no commit checkpointed.
        assert size(f"{path}-wal") > ROWS * PAGE
        assert size(path) == before
    finally:
        await db.aclose()


async def test_the_background_task_writes_the_log_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database_module, "CHECKPOINT_SECONDS", 0.05)
    path = tmp_path / "robota.db"
    db = Database(f"sqlite:///{path}")
    await db.open()
    try:
        await write_pages(db)
        with anyio.fail_after(10):
            # Polled: a file growing is nothing an event can be awaited for.
            while size(path) < ROWS * PAGE:  # noqa: ASYNC110
                await anyio.sleep(0.05)
    finally:
        await db.aclose()


async def test_an_in_memory_database_has_no_checkpoint_task() -> None:
    db = Database("sqlite:///:memory:")
    await db.open()
    try:
        assert db._checkpointer is None
    finally:
        await db.aclose()
