"""Redis dies under load and comes back: never a 500, never a traceback per request.

The test starts a private ``redis-server`` on a free port (the shared one on 6379 is never
touched), points a proxy at it, and keeps chats, streams and failed sign-ins going while the
instance is SIGKILLed and, two seconds later, started again on the same port. By default
(``ROBOTA_REDIS_FAILURE=open``) every honest call is served through the outage, unlimited and
uncached; with ``closed`` they are refused with a 503 JSON error. Either way the proxy
recovers by itself and logs the outage a few times, not once per request.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from tests.e2e.conftest import ProxyProcess, free_port, start_proxy, stop_proxy

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

ADMIN = "admin-key-for-the-outage-test"
#: Failed sign-ins are counted in Redis too, but all come from 127.0.0.1 here: a high bound
#: keeps the limiter on the path without it refusing the honest calls of the same address.
BASE_ENV = {"ROBOTA_ADMIN_KEY": ADMIN, "ROBOTA_AUTH_FAILURES_PER_MINUTE": "1000000"}
CHAT = {
    "provider": "mock",
    "model": "mock-1",
    "messages": [{"role": "user", "content": "hello through the outage"}],
    "options": {"temperature": 0},  # cacheable: the cache is on the path too
}


@dataclass
class PrivateRedis:
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server is not None, "redis-server is needed (Debian package redis-server)"
        self.process = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1"]  # noqa: RUF005
            + ["--save", "", "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=0.2).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    instance = PrivateRedis(free_port())
    instance.start()
    yield instance
    if instance.process is not None and instance.process.poll() is None:
        instance.kill()


def _rk_key(proxy: ProxyProcess) -> str:
    created = httpx.post(
        f"{proxy.url}/admin/keys",
        json={"user": "outage-user", "permissions": {"rpm": 100000, "tpm": 10000000}},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert created.status_code == 201, created.text
    key: str = created.json()["key"]
    return key


async def _load(proxy: ProxyProcess, key: str, until: float) -> Counter[tuple[str, int]]:
    """Chats, streams and failed sign-ins, ten at a time, until ``until``."""
    seen: Counter[tuple[str, int]] = Counter()
    good = {"Authorization": f"Bearer {key}"}
    bad = {"Authorization": "Bearer rk_nobody00_" + "x" * 43}

    async def one(client: httpx.AsyncClient, n: int) -> None:
        kind = ("chat", "stream", "bad-key")[n % 3]
        path = "/ai/chat/stream" if kind == "stream" else "/ai/chat"
        response = await client.post(path, json=CHAT, headers=bad if kind == "bad-key" else good)
        await response.aread()
        seen[(kind, response.status_code)] += 1

    async def worker(client: httpx.AsyncClient, offset: int) -> None:
        n = offset
        while time.monotonic() < until:
            await one(client, n)
            n += 10

    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        await asyncio.gather(*(worker(client, i) for i in range(10)))
    return seen


Phases = dict[str, Counter[tuple[str, int]]]


def _outage(proxy: ProxyProcess, private_redis: PrivateRedis) -> Phases:
    key = _rk_key(proxy)
    phases: Phases = {}
    phases["before"] = asyncio.run(_load(proxy, key, time.monotonic() + 1.0))
    private_redis.kill()
    phases["during"] = asyncio.run(_load(proxy, key, time.monotonic() + 2.0))
    private_redis.start()
    time.sleep(0.5)  # the pools reconnect on their next command
    phases["after"] = asyncio.run(_load(proxy, key, time.monotonic() + 1.0))
    return phases


def _statuses(counts: Counter[tuple[str, int]], kind: str) -> set[int]:
    return {status for (seen_kind, status) in counts if seen_kind == kind}


def _assert_clean_log(proxy: ProxyProcess) -> None:
    log = proxy.log()
    assert "Traceback" not in log
    assert "internal_error" not in log
    warnings = [line for line in log.splitlines() if "shared state unreachable" in line]
    # Throttled: a line per part and interval, not one per request (hundreds were sent).
    assert 1 <= len(warnings) <= 12, warnings


def test_redis_outage_fails_open_by_default(private_redis: PrivateRedis, tmp_path: Path) -> None:
    proxy = start_proxy(
        {**BASE_ENV, "ROBOTA_REDIS_URL": private_redis.url},
        tmp_path / "proxy.log",
    )
    try:
        phases = _outage(proxy, private_redis)
    finally:
        stop_proxy(proxy)
    print({name: dict(counts) for name, counts in phases.items()})
    for name, counts in phases.items():
        assert _statuses(counts, "chat") == {200}, (name, counts)
        assert _statuses(counts, "stream") == {200}, (name, counts)
        assert _statuses(counts, "bad-key") == {401}, (name, counts)
        assert sum(counts.values()) > 30, (name, counts)
    _assert_clean_log(proxy)


def test_redis_outage_fails_closed_when_asked(private_redis: PrivateRedis, tmp_path: Path) -> None:
    proxy = start_proxy(
        {**BASE_ENV, "ROBOTA_REDIS_URL": private_redis.url, "ROBOTA_REDIS_FAILURE": "closed"},
        tmp_path / "proxy.log",
    )
    try:
        phases = _outage(proxy, private_redis)
        during = httpx.post(
            f"{proxy.url}/ai/chat",
            json=CHAT,
            headers={"Authorization": "Bearer rk_nobody00_" + "x" * 43},
        )
    finally:
        stop_proxy(proxy)
    print({name: dict(counts) for name, counts in phases.items()})
    assert _statuses(phases["before"], "chat") == {200}
    assert _statuses(phases["during"], "chat") == {503}
    assert _statuses(phases["during"], "stream") == {503}
    assert _statuses(phases["during"], "bad-key") == {503}
    assert _statuses(phases["after"], "chat") == {200}
    assert _statuses(phases["after"], "stream") == {200}
    assert during.status_code == 401  # recovered: a bad key is judged again
    _assert_clean_log(proxy)
