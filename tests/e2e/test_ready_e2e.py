"""``/ready`` of a real ``robota-proxy serve`` follows its Redis down and back up while
``/health`` stays 200; and the single-process server drains a running stream on SIGTERM and
exits 0.

Redis here is a private ``redis-server`` on a free port (the shared one is never touched).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from robota_proxy.testing import FakeVendors, Fault, Reply
from tests.e2e.conftest import USER_KEY, free_port, start_proxy, stop_proxy, vendor_env
from tests.e2e.test_redis_outage_e2e import PrivateRedis

pytestmark = pytest.mark.e2e

ADMIN = "admin-key-for-the-ready-test-0123"


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    instance = PrivateRedis(free_port())
    instance.start()
    yield instance
    if instance.process is not None and instance.process.poll() is None:
        instance.kill()


def ready(url: str) -> tuple[int, dict[str, object]]:
    answer = httpx.get(f"{url}/ready", timeout=5)
    return answer.status_code, answer.json()


def test_ready_follows_redis_and_health_does_not(
    private_redis: PrivateRedis, tmp_path: Path
) -> None:
    env = {
        "ROBOTA_API_KEYS": USER_KEY,
        "ROBOTA_ADMIN_KEY": ADMIN,
        "ROBOTA_REDIS_URL": private_redis.url,
        "ROBOTA_READY_TIMEOUT_SECONDS": "0.5",
        "ROBOTA_DATABASE_URL": f"sqlite:///{tmp_path / 'ready.db'}",
    }
    proxy = start_proxy(env, tmp_path / "proxy.log")
    try:
        assert ready(proxy.url) == (200, {"status": "ready"})
        private_redis.kill()
        assert ready(proxy.url) == (503, {"status": "not_ready", "failed": ["redis"]})
        detail = httpx.get(
            f"{proxy.url}/ready", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5
        ).json()
        assert detail["checks"]["redis"]["ok"] is False
        assert detail["checks"]["database"]["ok"] is True
        assert httpx.get(f"{proxy.url}/health", timeout=5).status_code == 200
        private_redis.start()
        deadline = time.monotonic() + 10
        while (status := ready(proxy.url))[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == (200, {"status": "ready"})
    finally:
        stop_proxy(proxy)


def test_sigterm_lets_a_running_stream_finish_and_exits_zero(
    fake: FakeVendors, tmp_path: Path
) -> None:
    words = [f"w{i}" for i in range(15)]
    fake.script(Reply(text=" ".join(words), fault=Fault(chunk_latency=0.1)))
    env = {**vendor_env(fake), "ROBOTA_API_KEYS": USER_KEY, "ROBOTA_DRAIN_SECONDS": "10"}
    proxy = start_proxy(env, tmp_path / "proxy.log")
    events: list[str] = []
    streaming = threading.Event()

    def stream() -> None:
        with httpx.stream(
            "POST",
            f"{proxy.url}/ai/chat/stream",
            json={
                "provider": "openai",
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "a slow stream"}],
            },
            headers={"Authorization": f"Bearer {USER_KEY}"},
            timeout=30,
        ) as answer:
            for line in answer.iter_lines():
                if line.startswith("event: "):
                    events.append(line.removeprefix("event: "))
                    streaming.set()

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert streaming.wait(10)
        proxy.process.send_signal(signal.SIGTERM)
        reader.join(timeout=20)
        assert proxy.process.wait(timeout=20) == 0
    finally:
        stop_proxy(proxy)
    assert events.count("delta") == len(words) and events[-1] == "done"
    assert "drained: exiting" in proxy.log()
