"""Rate limits end to end: keys with limits issued by the CLI, real proxy processes, real Redis.

* rpm on one process (memory storage);
* the same rpm shared by two processes through ``ROBOTA_REDIS_URL`` (and one PostgreSQL for
  their keys): requests alternate between them and exactly the limit gets through;
* tpm refusing the request after a large (streamed) answer from the mock provider, whose usage
  is deterministic: prompt tokens = words sent, completion tokens = words answered.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from robota_proxy.testing import FakeVendors
from tests.e2e.auth_support import chat, chat_body, create_key
from tests.e2e.conftest import ProxyProcess, start_proxy, stop_proxy, vendor_env

pytestmark = pytest.mark.e2e


def inside_one_minute(margin: float = 5.0) -> None:
    """Memory storage aligns its windows to the clock minute, and right after a boundary the
    sliding counter's rounding lets one more request through; start the count well inside a
    minute so that an exact limit is tested deterministically (Redis windows start at the
    first hit and need no such care)."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.1)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('ratelimit') / 'robota.db'}"


@pytest.fixture(scope="module")
def memory_proxy(
    fake_server: FakeVendors, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    env = {**vendor_env(fake_server), "ROBOTA_DATABASE_URL": database_url}
    running = start_proxy(env, tmp_path_factory.mktemp("rl-memory") / "proxy.log")
    yield running
    stop_proxy(running)


@pytest.fixture(scope="module")
def redis_proxies(
    fake_server: FakeVendors,
    postgres_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    env = {
        **vendor_env(fake_server),
        "ROBOTA_DATABASE_URL": postgres_url,
        "ROBOTA_REDIS_URL": redis_url,
    }
    first = start_proxy(env, tmp_path_factory.mktemp("rl-redis-a") / "proxy.log")
    try:
        second = start_proxy(env, tmp_path_factory.mktemp("rl-redis-b") / "proxy.log")
    except BaseException:
        stop_proxy(first)
        raise
    yield first, second
    stop_proxy(second)
    stop_proxy(first)


def test_rpm_on_one_process(memory_proxy: ProxyProcess, database_url: str) -> None:
    alice = create_key(database_url, unique("alice"), "--rpm", "3")["key"]
    bob = create_key(database_url, unique("bob"), "--rpm", "3")["key"]
    inside_one_minute()
    for remaining in ("2", "1", "0"):
        answer = chat(memory_proxy.url, alice)
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-RateLimit-Limit"] == "3"
        assert answer.headers["X-RateLimit-Remaining"] == remaining
        # Reading one's own account is not counted.
        me = httpx.get(
            f"{memory_proxy.url}/ai/me", headers={"Authorization": f"Bearer {alice}"}, timeout=10
        )
        assert me.status_code == 200, me.text
    refused = chat(memory_proxy.url, alice)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limited"
    assert "3 requests per minute (rpm)" in error["message"]
    assert error["requestId"] == refused.headers["X-Request-ID"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Limit"] == "3"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(refused.headers["X-RateLimit-Reset"]) <= 60
    assert alice not in refused.text and alice not in memory_proxy.log()
    # Another user is unaffected.
    assert chat(memory_proxy.url, bob).status_code == 200


def test_rpm_is_shared_by_two_processes_through_redis(
    redis_proxies: tuple[ProxyProcess, ProxyProcess], postgres_url: str
) -> None:
    key = create_key(postgres_url, unique("carol"), "--rpm", "4")["key"]
    statuses = [chat(redis_proxies[index % 2].url, key).status_code for index in range(9)]
    assert statuses == [200] * 4 + [429] * 5
    # Both processes refuse from then on, each naming the limit.
    for proxy in redis_proxies:
        refused = chat(proxy.url, key)
        assert refused.status_code == 429 and "rpm" in refused.json()["error"]["message"]
        assert refused.headers["X-RateLimit-Remaining"] == "0"


def test_tpm_refuses_after_a_large_answer(memory_proxy: ProxyProcess, database_url: str) -> None:
    key = create_key(database_url, unique("dave"), "--tpm", "60")["key"]
    headers = {"Authorization": f"Bearer {key}"}
    inside_one_minute()
    words = " ".join(["word"] * 40)  # 200 bytes: about 50 prompt tokens, which fit in 60
    events: list[dict[str, object]] = []
    with httpx.stream(
        "POST",
        f"{memory_proxy.url}/ai/chat/stream",
        json=chat_body(messages=[{"role": "user", "content": words}]),
        headers=headers,
        timeout=10,
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers["X-RateLimit-Limit-Tokens"] == "60"
        assert answer.headers["X-RateLimit-Remaining-Tokens"] == "60"
        for line in answer.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    # The mock's usage: 40 prompt words, "You said: " + 40 words answered.
    usage = next(event["usage"] for event in events if "usage" in event)
    assert usage == {**usage, "promptTokens": 40, "completionTokens": 42, "totalTokens": 82}
    # 82 real tokens > 60: the minute is spent, even a one-word prompt must wait.
    refused = chat(memory_proxy.url, key)
    assert refused.status_code == 429
    assert "tokens per minute (tpm)" in refused.json()["error"]["message"]
    assert refused.headers["X-RateLimit-Limit"] == "60"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert int(refused.headers["Retry-After"]) >= 1
