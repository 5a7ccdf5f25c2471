"""End-to-end fixtures: fake vendors on 127.0.0.1, and the proxy as a real process under
uvicorn, started with the same CLI a user runs (``python -m robota_proxy serve``)."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from robota_proxy.testing import FakeVendors
from tests.conftest import REDIS_TEST_PREFIX
from tests.e2e import log_scan

VENDOR_KEY = log_scan.register("the shared vendor key", "sk-test-vendor-key-0123456789abcdef")
USER_KEY = log_scan.register("the shared user key", "user-key-for-tests-0123456789")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ProxyProcess:
    url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_once_it_has(self, text: str, timeout: float = 5.0) -> str:
        """The log once ``text`` is in it, or as it is after ``timeout``: a request's access
        line is written after its last byte went out, so it may trail the client a little."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return log


def start_proxy(
    env: Mapping[str, str], log_path: Path, startup_timeout: float = 60
) -> ProxyProcess:
    """``startup_timeout``: importing the three vendor SDKs alone can take 15 s or more on a
    busy shared machine; a proxy that is up sooner is returned at once."""
    port = free_port()
    full_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ROBOTA_")
        and key not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY")
    }
    # Server-side retries off unless a test asks for them: the error-mapping tests expect one
    # vendor call per request (and would wait out back-off and Retry-After otherwise).
    full_env["ROBOTA_UPSTREAM_RETRIES"] = "0"
    # Circuit breakers off unless a test asks for them, for the same reason: a proxy shared by
    # a module's fault tests would otherwise open a target's breaker in one test and skip the
    # target in the next (the breaker tests turn them on, each with a target of its own).
    full_env["ROBOTA_BREAKER_ENABLED"] = "false"
    full_env.update(env)
    if "ROBOTA_REDIS_URL" in full_env:
        full_env.setdefault("ROBOTA_REDIS_PREFIX", REDIS_TEST_PREFIX)
    full_env.setdefault("ROBOTA_LOG_LEVEL", "info")  # a test may ask for debug
    log_scan.register_env(full_env)
    log_scan.keep(log_path)  # a restart on the same file keeps the earlier output too
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "robota_proxy", "serve", "--port", str(port)],
        env=full_env,
        cwd=log_path.parent,  # no stray .env from the checkout
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"proxy exited early:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=0.5).status_code == 200:
                return ProxyProcess(url, log_path, process)
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"proxy did not start:\n{log_path.read_text()}")


def stop_proxy(proxy: ProxyProcess) -> None:
    proxy.process.terminate()
    try:
        proxy.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proxy.process.kill()
        proxy.process.wait()


def vendor_env(fake: FakeVendors, key: str = VENDOR_KEY) -> dict[str, str]:
    return {
        "ROBOTA_OPENAI_API_KEY": key,
        "ROBOTA_OPENAI_BASE_URL": fake.openai_base_url,
        "ROBOTA_ANTHROPIC_API_KEY": key,
        "ROBOTA_ANTHROPIC_BASE_URL": fake.anthropic_base_url,
        "ROBOTA_GOOGLE_API_KEY": key,
        "ROBOTA_GOOGLE_BASE_URL": fake.google_base_url,
    }


@pytest.fixture(scope="session", autouse=True)
def scan_every_log_line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end of the session, every log line the e2e tests kept (each proxy's output,
    whoever started it, and the in-process apps' records) is scanned for the secrets they
    used (tests/e2e/log_scan.py): a line with one fails the session, naming file and line."""
    root = tmp_path_factory.getbasetemp()
    log_scan.start_session(root / "e2e-logs")
    in_process = log_scan.InProcessLog(root / "e2e-logs" / "in-process.log")
    logging.getLogger().addHandler(in_process)
    yield
    logging.getLogger().removeHandler(in_process)
    in_process.close()
    from tests.e2e import auth_support  # here: it imports this module

    log_scan.register("the admin key", auth_support.ADMIN_KEY)
    log_scan.register("the JWT secret", auth_support.JWT_SECRET)
    findings = log_scan.scan(log_scan.session_logs(root), log_scan.registered())
    if findings:
        pytest.fail(log_scan.report(findings), pytrace=False)


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeVendors]:
    with FakeVendors(api_key=VENDOR_KEY) as fake:
        yield fake


@pytest.fixture
def fake(fake_server: FakeVendors) -> Iterator[FakeVendors]:
    fake_server.reset()
    yield fake_server
    fake_server.reset()


@pytest.fixture(scope="session")
def proxy(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    env = {
        **vendor_env(fake_server),
        "ROBOTA_API_KEYS": f"{USER_KEY},second-user-key-abcdef",
        "ROBOTA_UPSTREAM_TIMEOUT": "2",
        "ROBOTA_MAX_BODY_BYTES": str(64 * 1024),
    }
    running = start_proxy(env, tmp_path_factory.mktemp("proxy") / "proxy.log")
    yield running
    stop_proxy(running)


@pytest.fixture(scope="session")
def broken_proxy(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """A proxy whose vendor keys are wrong and whose Anthropic points at a closed port."""
    dead = f"http://127.0.0.1:{free_port()}"
    env = {
        **vendor_env(fake_server, key="sk-wrong-vendor-key-9876543210fedcba"),
        "ROBOTA_ANTHROPIC_BASE_URL": dead,
        "ROBOTA_API_KEYS": USER_KEY,
    }
    running = start_proxy(env, tmp_path_factory.mktemp("broken") / "proxy.log")
    yield running
    stop_proxy(running)


def ledger_rows(database: Path, request_id: str) -> list[dict[str, Any]]:
    """The SQLite ledger rows of one request, once its settle has landed."""
    return wait_for_ledger(database, "request_id = ?", (request_id,), count=1)


def wait_for_ledger(
    database: Path, where: str, params: tuple[Any, ...], *, count: int
) -> list[dict[str, Any]]:
    """The settled SQLite ledger rows matching ``where``, in order, once ``count`` are there
    or 5 s passed (a call's row is written in flight before the vendor call and settled after
    the answer's last byte)."""
    deadline = time.monotonic() + 5
    while True:
        with sqlite3.connect(database) as conn:
            conn.row_factory = sqlite3.Row
            query = (
                f"SELECT * FROM usage_ledger WHERE status != 'in_flight' AND ({where}) ORDER BY id"
            )
            rows = [dict(row) for row in conn.execute(query, params)]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)
