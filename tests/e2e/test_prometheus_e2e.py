"""Prometheus metrics of real proxy processes: after a known set of calls (chats, a stream,
a cache hit, a refusal, a fallback) the scraped counters equal what was sent and what the
ledger holds; a real Prometheus server (Debian's ``prometheus``) scraping ``serve
--workers 2`` sums both workers; ``X-Robota-Overhead-Ms`` leaves the vendor's time out."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from robota_proxy.testing import FakeVendors, Fault, Reply
from tests.e2e.conftest import (
    USER_KEY,
    ProxyProcess,
    free_port,
    start_proxy,
    stop_proxy,
    vendor_env,
    wait_for_ledger,
)

pytestmark = [pytest.mark.e2e]

ADMIN_KEY = "admin-key-for-prometheus-e2e-0123456789"
CHAIN = ["openai/gpt-4o-mini", "anthropic/claude-3-5-haiku-latest"]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over every series carrying ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= got)


@pytest.fixture(scope="module")
def metered(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Path, str]]:
    home = tmp_path_factory.mktemp("prometheus")
    prices = home / "prices.json"
    prices.write_text(json.dumps({"default": {"input": "1", "output": "2"}}))
    port = free_port()
    env = {
        **vendor_env(fake_server),
        "ROBOTA_API_KEYS": USER_KEY,
        "ROBOTA_ADMIN_KEY": ADMIN_KEY,
        "ROBOTA_DATABASE_URL": f"sqlite:///{home / 'robota.db'}",
        "ROBOTA_PRICES_FILE": str(prices),
        "ROBOTA_FALLBACKS": json.dumps({"fast": CHAIN}),
        "ROBOTA_METRICS_ADDR": f"127.0.0.1:{port}",
    }
    running = start_proxy(env, home / "proxy.log", startup_timeout=120)
    yield running, home / "robota.db", f"http://127.0.0.1:{port}/metrics"
    stop_proxy(running)


def chat(proxy: ProxyProcess, text: str, **extra: Any) -> httpx.Response:
    body = {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
        **extra,
    }
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    return httpx.post(f"{proxy.url}/ai/chat", json=body, headers=headers, timeout=30)


def test_counters_equal_what_was_sent_and_the_ledger(
    metered: tuple[ProxyProcess, Path, str], fake: FakeVendors
) -> None:
    proxy, database, address = metered
    fake.script(Reply(text="one two three", prompt_tokens=7, completion_tokens=3), match="plain")
    fake.script(Reply(text="cached words", prompt_tokens=5, completion_tokens=2), match="same")
    fake.script(Fault(status=503), match="falls", vendor="openai")
    fake.script(Reply(text="from b", prompt_tokens=4, completion_tokens=2), match="falls")
    fake.script(Reply(text="a b c d", prompt_tokens=6, completion_tokens=4), match="streams")
    for n in range(3):
        assert chat(proxy, f"plain {n}").status_code == 200
    for expected in ("MISS", "HIT"):
        answer = chat(proxy, "same", options={"temperature": 0})
        assert answer.headers["X-Robota-Cache"] == expected
    fallen = httpx.post(
        f"{proxy.url}/ai/chat",
        json={
            "provider": "openai",
            "model": "fast",
            "messages": [{"role": "user", "content": "falls"}],
        },
        headers={"Authorization": f"Bearer {USER_KEY}"},
        timeout=30,
    )
    assert fallen.status_code == 200 and fallen.json()["content"] == "from b"
    streamed = httpx.post(
        f"{proxy.url}/ai/chat/stream",
        json={
            "provider": "openai",
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "streams"}],
        },
        headers={"Authorization": f"Bearer {USER_KEY}"},
        timeout=30,
    )
    assert "event: done" in streamed.text
    assert chat(proxy, "plain again").status_code == 200
    assert httpx.post(f"{proxy.url}/ai/chat", json={}, timeout=10).status_code == 401
    # 8 calls, and the fallback's failed try of its first target: a row of its own.
    rows = wait_for_ledger(database, "1 = 1", (), count=9)
    assert len(rows) == 9
    # The separate bind answers without a key; the admin route needs the admin key.
    assert httpx.get(f"{proxy.url}/metrics", timeout=10).status_code == 401
    scraped = httpx.get(address, timeout=10)
    assert scraped.status_code == 200
    got = parse(scraped.text)
    admin = httpx.get(
        f"{proxy.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    )
    assert admin.status_code == 200

    # What was sent: 6 chats answered by openai (4 plain, the cache miss and hit),
    # the fallback answered by anthropic, one stream; one refusal.
    sent = {"surface": "robota", "status": "200"}
    assert total(got, "robota_requests_total", route="/ai/chat", **sent, provider="openai") == 6
    assert total(got, "robota_requests_total", route="/ai/chat", **sent, provider="anthropic") == 1
    assert total(got, "robota_requests_total", route="/ai/chat/stream", **sent) == 1
    # The chat without a key and the admin route scraped without one.
    assert total(got, "robota_refusals_total", reason="unauthenticated") == 2
    assert total(got, "robota_cache_requests_total", result="hit") == 1
    assert total(got, "robota_cache_requests_total", result="miss") == 1
    attempts = "robota_upstream_attempts_total"
    assert total(got, attempts, target=CHAIN[0], outcome="upstream_unavailable") == 1
    assert total(got, attempts, target=CHAIN[0], outcome="fallback") == 1
    assert total(got, attempts, target=CHAIN[1], outcome="ok") == 1
    assert total(got, attempts, target=CHAIN[0], outcome="ok") == 6  # the hit made no call
    assert total(got, "robota_time_to_first_token_seconds_count") == 1
    assert total(got, "robota_inter_token_seconds_count") == 3  # 4 words, 3 gaps

    # What the ledger holds: per provider and model, the rows of vendor calls that answered;
    # the failed try is a row too, with nothing to bill.
    with sqlite3.connect(database) as conn:
        sums = conn.execute(
            "SELECT provider, model, SUM(prompt_tokens), SUM(completion_tokens), "
            "SUM(cost_pico), COUNT(*) FROM usage_ledger WHERE cached = 0 AND status = 'ok' "
            "GROUP BY 1, 2"
        ).fetchall()
        hits = conn.execute("SELECT COUNT(*) FROM usage_ledger WHERE cached = 1").fetchone()[0]
        failed = conn.execute(
            "SELECT provider || '/' || model, status, prompt_tokens + completion_tokens, "
            "cost_pico FROM usage_ledger WHERE attempt_of IS NOT NULL"
        ).fetchall()
    assert failed == [(CHAIN[0], "upstream_unavailable", 0, 0)]
    assert hits == total(got, "robota_cache_requests_total", result="hit") == 1
    assert len(sums) == 2
    for provider, model, prompt, completion, cost_pico, count in sums:
        labels = {"provider": provider, "model": model}
        assert total(got, "robota_tokens_total", **labels, kind="prompt") == prompt
        assert total(got, "robota_tokens_total", **labels, kind="completion") == completion
        assert total(got, "robota_cost_usd_total", **labels) == pytest.approx(cost_pico / 1e12)
        calls = total(
            got, "robota_upstream_attempts_total", target=f"{provider}/{model}", outcome="ok"
        )
        assert calls == count
    assert sum(row[2] for row in sums) == 3 * 7 + 5 + 4 + 6 + 7  # "plain again" too
    assert USER_KEY not in scraped.text and ADMIN_KEY not in scraped.text


def test_overhead_header_leaves_the_vendor_time_out(
    metered: tuple[ProxyProcess, Path, str], fake: FakeVendors
) -> None:
    proxy, _, _ = metered
    fake.script(Reply(text="slow", fault=Fault(latency=0.6)), match="slowly")
    chat(proxy, "warm up")
    started = time.monotonic()
    answer = chat(proxy, "slowly")
    elapsed = time.monotonic() - started
    assert answer.status_code == 200
    overhead = float(answer.headers["X-Robota-Overhead-Ms"])
    assert elapsed >= 0.6
    assert 0 <= overhead < 100, overhead  # 600 ms of vendor time not in it


def _prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None
    )
    if found is None:
        pytest.fail(
            "the prometheus binary is missing: install Debian's package "
            "(apt-get install -y prometheus); .ci/run must install it",
            pytrace=False,
        )
    return found


def test_a_real_prometheus_sums_two_workers(tmp_path: Path) -> None:
    binary = _prometheus_binary()
    port, metrics_port, prom_port = free_port(), free_port(), free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ROBOTA_") and key != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(
        ROBOTA_API_KEYS=USER_KEY,
        ROBOTA_DATABASE_URL=f"sqlite:///{tmp_path / 'robota.db'}",
        ROBOTA_METRICS_ADDR=f"127.0.0.1:{metrics_port}",
        ROBOTA_CACHE_ENABLED="false",
        ROBOTA_LOG_LEVEL="warning",
    )
    log = (tmp_path / "proxy.log").open("wb")
    proxy = subprocess.Popen(
        [sys.executable, "-m", "robota_proxy", "serve", "--port", str(port), "--workers", "2"],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: robota\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    prometheus: subprocess.Popen[bytes] | None = None
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(f"{url}/health", proxy, tmp_path / "proxy.log")
        body = {
            "provider": "mock",
            "model": "mock-1",
            "messages": [{"role": "user", "content": "a b c"}],
        }
        headers = {"Authorization": f"Bearer {USER_KEY}"}

        def one(n: int) -> int:
            path = "/ai/chat/stream" if n % 6 == 0 else "/ai/chat"
            return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=30).status_code

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, range(24))) == [200] * 24
        prometheus = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=(tmp_path / "prometheus.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        api = f"http://127.0.0.1:{prom_port}/api/v1/query"
        expected = {
            'sum(robota_requests_total{route="/ai/chat",status="200"})': 20,
            'sum(robota_requests_total{route="/ai/chat/stream",status="200"})': 4,
            'sum(robota_tokens_total{kind="prompt"})': 24 * 3,
            'sum(robota_upstream_attempts_total{outcome="ok"})': 24,
            "sum(robota_streams_open)": 0,
        }
        seen = _query_until(api, expected, prometheus, tmp_path / "prometheus.log")
        assert seen == expected
        assert len(_children(proxy.pid)) == 2  # the sums above are two workers'
    finally:
        for process in (prometheus, proxy):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _children(pid: int) -> list[int]:
    """uvicorn's worker processes: the children of ``pid`` that run Python (uvicorn also
    starts a resource tracker, which is not a worker), read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        if parent == pid and b"multiprocessing" in command and b"resource_tracker" not in command:
            found.append(int(entry.name))
    return found


def _wait_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"proxy exited early:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"proxy did not start:\n{log.read_text()}")


def _query_until(
    api: str, expected: dict[str, float], prometheus: subprocess.Popen[bytes], log: Path
) -> dict[str, float]:
    """Each query's value once all match, or what they were after 40 s."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if prometheus.poll() is not None:
            pytest.fail(f"prometheus exited:\n{log.read_text()}")
        try:
            for query in expected:
                answer = httpx.get(api, params={"query": query}, timeout=5).json()
                result = answer["data"]["result"]
                seen[query] = float(result[0]["value"][1]) if result else -1.0
        except (httpx.TransportError, KeyError, ValueError):
            pass
        if seen == expected:
            return seen
        time.sleep(0.5)
    return seen
