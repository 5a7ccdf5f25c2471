"""PostgreSQL goes away under load and comes back: no vendor call without its ledger row.

The test runs a private PostgreSQL (``initdb`` into a temporary directory, its own port; the
shared server on 5432 is never touched), points a proxy at it and keeps chats going through
the fake OpenAI vendor with a static key (a credential that needs no database lookup: the
case an audit saw served with 1,277 vendor calls and no ledger row) while the server is
stopped with ``pg_ctl -m immediate`` (a crash: no shutdown checkpoint) and started again.
During the outage every call is refused with a 503 JSON error before it reaches the vendor,
``/ai/me`` too; afterwards the proxy serves again by itself, and the ledger has exactly one
row per request the fake vendor saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from robota_proxy.testing import FakeVendors
from tests.e2e.conftest import ProxyProcess, free_port, start_proxy, stop_proxy, vendor_env

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

KEY = "static-key-for-the-database-outage"
CHAT = {
    "provider": "openai",
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hello through the database outage"}],
}


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    assert found, f"{name} is needed (Debian package postgresql)"
    return found[-1]


@dataclass
class PrivatePostgres:
    directory: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *command],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def init(self) -> None:
        self.directory.mkdir(parents=True)
        shutil.chown(self.directory, "postgres", "postgres")
        self._as_postgres(
            _pg_bin("initdb"), "-D", str(self.directory / "data"), "-A", "trust", "-U", "postgres"
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            _pg_bin("pg_ctl"),
            "-D",
            str(self.directory / "data"),
            "-o",
            options,
            "-l",
            str(self.directory / "server.log"),
            "-w",
            "start",
        )

    def crash(self) -> None:
        self._as_postgres(
            _pg_bin("pg_ctl"), "-D", str(self.directory / "data"), "-m", "immediate", "stop"
        )


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    directory = Path(f"/tmp/robota-pg-{os.getpid()}-{free_port()}")
    instance = PrivatePostgres(directory, free_port())
    instance.init()
    instance.start()
    try:
        yield instance
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            instance.crash()
        shutil.rmtree(directory, ignore_errors=True)


async def _load(proxy: ProxyProcess, until: float) -> Counter[int]:
    seen: Counter[int] = Counter()
    headers = {"Authorization": f"Bearer {KEY}"}

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < until:
            response = await client.post("/ai/chat", json=CHAT, headers=headers)
            seen[response.status_code] += 1
            if response.status_code != 200:
                body = response.json()
                assert body["error"]["code"] == "upstream_unavailable", body

    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        await asyncio.gather(*(worker(client) for _ in range(8)))
    return seen


async def _ledger_rows(url: str) -> Counter[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT status FROM usage_ledger")
    finally:
        await conn.close()
    return Counter(row["status"] for row in rows)


def test_no_vendor_call_without_a_ledger_row_through_a_database_outage(
    private_postgres: PrivatePostgres, fake: FakeVendors, tmp_path: Path
) -> None:
    proxy = start_proxy(
        {**vendor_env(fake), "ROBOTA_API_KEYS": KEY, "ROBOTA_DATABASE_URL": private_postgres.url},
        tmp_path / "proxy.log",
    )
    try:
        before = asyncio.run(_load(proxy, time.monotonic() + 1.0))
        private_postgres.crash()
        during = asyncio.run(_load(proxy, time.monotonic() + 2.0))
        me = httpx.get(f"{proxy.url}/ai/me", headers={"Authorization": f"Bearer {KEY}"})
        private_postgres.start()
        deadline = time.monotonic() + 15
        recovered_after = None
        while time.monotonic() < deadline:
            if (
                httpx.post(
                    f"{proxy.url}/ai/chat", json=CHAT, headers={"Authorization": f"Bearer {KEY}"}
                ).status_code
                == 200
            ):
                recovered_after = 15 - (deadline - time.monotonic())
                break
            time.sleep(0.2)
        after = asyncio.run(_load(proxy, time.monotonic() + 1.0))
    finally:
        stop_proxy(proxy)
    vendor_calls = len(fake.requests)
    ledger = asyncio.run(_ledger_rows(private_postgres.url))
    print(
        f"\n[database outage] before {dict(before)}, during {dict(during)}, after {dict(after)};"
        f" /ai/me during: {me.status_code}; recovered {recovered_after:.1f} s after restart;"
        f" vendor calls {vendor_calls}, ledger rows {dict(ledger)}"
    )
    assert set(before) == {200} and set(after) == {200}
    assert set(during) == {503}, during  # refused before the vendor: no row could be written
    assert me.status_code == 503
    assert me.json()["error"]["code"] == "upstream_unavailable"
    assert recovered_after is not None
    assert sum(ledger.values()) == vendor_calls
    # A call whose vendor answered just as the server died keeps its in-flight row (its
    # settle failed); the lease reclaim closes it as interrupted later. At most one per worker.
    assert set(ledger) <= {"ok", "in_flight", "interrupted"}
    assert ledger["in_flight"] + ledger["interrupted"] <= 8
    log = proxy.log()
    assert "Traceback" not in log
    assert "internal_error" not in log
