"""``RedisBreakers`` on the real Redis: the rules of the memory breakers, shared by processes.

Two ``RedisBreakers`` on two clients stand for two proxy processes. Every test writes under a
prefix of its own (below the run's ``redis_prefix``) and deletes its keys afterwards. The clock
is injected except in the one test of the server's own clock."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from robota_proxy.storage.breakers_redis import RedisBreakers
from robota_proxy.upstreams.breakers import BreakerPolicy, Breakers

pytestmark = pytest.mark.anyio

T = "openai/gpt-4o"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[tuple[Redis, Redis]]:
    one, two = Redis.from_url(redis_url), Redis.from_url(redis_url)
    yield one, two
    await one.aclose()
    await two.aclose()


@pytest.fixture
async def prefix(redis_url: str, redis_prefix: str) -> AsyncIterator[str]:
    own = f"{redis_prefix}-breakers-{uuid.uuid4().hex[:8]}"
    yield own
    client = Redis.from_url(redis_url)
    try:
        async for key in client.scan_iter(match=f"{own}:*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


async def keys_under(client: Redis, prefix: str) -> list[str]:
    return sorted([key.decode() async for key in client.scan_iter(match=f"{prefix}:*")])


def pair(
    clients: tuple[Redis, Redis], prefix: str, clock: Clock, **policy: float | int | None
) -> tuple[RedisBreakers, RedisBreakers]:
    rules = BreakerPolicy(**policy)  # type: ignore[arg-type]
    return (
        RedisBreakers(clients[0], prefix, rules, clock=clock),
        RedisBreakers(clients[1], prefix, rules, clock=clock),
    )


async def test_opens_after_exactly_n_failures_seen_by_both_processes(
    clients: tuple[Redis, Redis], prefix: str
) -> None:
    one, two = pair(clients, prefix, Clock(), failures=3, error_rate=None)
    breakers: Breakers = one
    await breakers.failure(T)
    await two.failure(T)  # consecutive across processes
    assert await one.allow(T) is True
    assert await two.allow(T) is True
    assert await one.snapshot() == {T: "closed"}
    await one.failure(T)
    assert await two.allow(T) is False
    assert await one.allow(T) is False
    assert await two.snapshot() == {T: "open"}
    assert await one.snapshot() == {T: "open"}
    assert await keys_under(clients[0], prefix) == [f"{prefix}:breaker:{T}:state"]
    ttl = await clients[0].pttl(f"{prefix}:breaker:{T}:state")
    assert 0 < ttl <= (30 + 30 + 60) * 1000


async def test_a_success_resets_the_consecutive_count(
    clients: tuple[Redis, Redis], prefix: str
) -> None:
    one, two = pair(clients, prefix, Clock(), failures=3, error_rate=None)
    await one.failure(T)
    await one.failure(T)
    await two.success(T)
    await one.failure(T)
    await one.failure(T)
    assert await one.snapshot() == {T: "closed"}
    await two.failure(T)
    assert await one.snapshot() == {T: "open"}


async def test_error_rate_opens_from_min_calls_on(
    clients: tuple[Redis, Redis], prefix: str
) -> None:
    one, two = pair(clients, prefix, Clock(), failures=100, error_rate=0.5, min_calls=10)
    for i in range(9):
        target = one if i % 3 else two
        await (target.failure(T) if i % 2 == 0 else target.success(T))
    await one.success(T)  # 10 calls, 5 failed: a success never opens it
    assert await one.snapshot() == {T: "closed"}
    await two.failure(T)  # 11 calls, 6 failed
    assert await one.snapshot() == {T: "open"}


async def test_failures_that_left_the_window_no_longer_count(
    clients: tuple[Redis, Redis], prefix: str
) -> None:
    clock = Clock()
    one, _ = pair(clients, prefix, clock, failures=100, min_calls=4, window_seconds=30)
    for _ in range(3):
        await one.failure(T)
    clock.now += 30.0
    for _ in range(3):
        await one.success(T)
    await one.failure(T)  # 1 of 4
    await one.failure(T)  # 2 of 5
    assert await one.snapshot() == {T: "closed"}
    await one.failure(T)  # 3 of 6
    assert await one.snapshot() == {T: "open"}


async def test_one_probe_across_processes_after_the_cooldown(
    clients: tuple[Redis, Redis], prefix: str
) -> None:
    clock = Clock()
    one, two = pair(clients, prefix, clock, failures=1, cooldown_seconds=30)
    await one.failure(T)
    clock.now += 29.999
    assert await two.allow(T) is False
    clock.now = 1030.0
    answers = await asyncio.gather(*(b.allow(T) for _ in range(25) for b in (one, two)))
    assert answers.count(True) == 1
    assert answers.count(False) == 49
    assert await two.snapshot() == {T: "half_open"}


async def test_the_probe_succeeding_closes_for_everyone(
    clients: tuple[Redis, Redis], prefix: str
) -> None:
    clock = Clock()
    one, two = pair(clients, prefix, clock, failures=2, cooldown_seconds=30)
    await one.failure(T)
    await one.failure(T)
    clock.now += 30
    assert await two.allow(T) is True
    await two.success(T)
    assert await keys_under(clients[0], prefix) == []  # closed is the default: nothing kept
    assert await one.snapshot() == {T: "closed"}
    assert [await one.allow(T) for _ in range(3)] == [True, True, True]
    await one.failure(T)  # fresh counts: 1 of 2
    assert await two.snapshot() == {T: "closed"}


async def test_the_probe_failing_opens_for_another_full_cooldown(
    clients: tuple[Redis, Redis], prefix: str
) -> None:
    clock = Clock()
    one, two = pair(clients, prefix, clock, failures=1, cooldown_seconds=30)
    await one.failure(T)
    clock.now += 30
    assert await one.allow(T) is True
    clock.now += 5
    await one.failure(T)
    assert await one.snapshot() == {T: "open"}
    assert await two.snapshot() == {}  # a target two never used: not reported by two
    clock.now += 29.9
    assert await two.allow(T) is False
    clock.now += 0.1
    assert await two.allow(T) is True
    assert await one.allow(T) is False


async def test_a_straggling_success_does_not_cut_the_cooldown_short(
    clients: tuple[Redis, Redis], prefix: str
) -> None:
    clock = Clock()
    one, two = pair(clients, prefix, clock, failures=1, cooldown_seconds=30)
    await one.failure(T)
    await two.success(T)
    await two.failure(T)
    clock.now += 29
    assert await one.allow(T) is False
    assert await one.snapshot() == {T: "open"}


async def test_a_probe_whose_process_died_expires(
    clients: tuple[Redis, Redis], prefix: str
) -> None:
    clock = Clock()
    one, two = pair(
        clients, prefix, clock, failures=1, cooldown_seconds=30, probe_timeout_seconds=60
    )
    await one.failure(T)
    clock.now += 30
    assert await one.allow(T) is True  # process one dies with its probe
    clock.now += 59.9
    assert await two.allow(T) is False
    clock.now += 0.1
    answers = await asyncio.gather(*(two.allow(T) for _ in range(10)))
    assert answers.count(True) == 1
    await two.success(T)
    assert await two.snapshot() == {T: "closed"}


async def test_transitions_are_logged_once_by_the_process_that_made_them(
    clients: tuple[Redis, Redis], prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    seen: list[tuple[str, str, int]] = []
    rules = BreakerPolicy(failures=2, cooldown_seconds=30)
    one = RedisBreakers(clients[0], prefix, rules, clock=clock, on_change=lambda *c: seen.append(c))
    two = RedisBreakers(clients[1], prefix, rules, clock=clock)
    caplog.set_level(logging.INFO, logger="robota_proxy.upstream")
    await one.failure(T)
    await one.failure(T)
    clock.now += 30
    assert await two.allow(T) is True  # logged by two, not hooked into one
    await one.success(T)
    assert seen == [(T, "open", 2), (T, "closed", 0)]
    assert [r.getMessage() for r in caplog.records] == [
        f"circuit breaker {T}: open (2 consecutive failures, 2 of 2 calls failed lately)",
        f"circuit breaker {T}: half_open (2 consecutive failures)",
        f"circuit breaker {T}: closed (0 consecutive failures)",
    ]


async def test_the_servers_clock_when_none_is_given(
    clients: tuple[Redis, Redis], prefix: str
) -> None:
    rules = BreakerPolicy(failures=1, cooldown_seconds=0.2)
    one, two = RedisBreakers(clients[0], prefix, rules), RedisBreakers(clients[1], prefix, rules)
    await one.failure(T)
    assert await two.allow(T) is False
    await asyncio.sleep(0.25)
    answers = [await two.allow(T), await one.allow(T)]
    assert answers == [True, False]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_redis_down_fails_open_without_raising(caplog: pytest.LogCaptureFixture) -> None:
    client = Redis(
        host="127.0.0.1", port=closed_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    breakers = RedisBreakers(client, "robota", BreakerPolicy(failures=1))
    caplog.set_level(logging.WARNING)
    try:
        for _ in range(3):
            await breakers.failure(T)
            assert await breakers.allow(T) is True
            await breakers.success(T)
        assert await breakers.snapshot() == {}
    finally:
        await client.aclose()
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        (
            "robota_proxy.redis",
            "shared state unreachable for circuit breakers (ConnectionError): "
            "every target is let through meanwhile",
        )
    ]


async def test_a_client_that_retries_is_given_up_on_after_the_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = Redis(host="127.0.0.1", port=closed_port())  # redis-py retries with back-off
    breakers = RedisBreakers(client, "robota", BreakerPolicy(), timeout=0.1)
    caplog.set_level(logging.WARNING)
    try:
        started = time.monotonic()
        assert await breakers.allow(T) is True
        assert time.monotonic() - started < 1.0
    finally:
        await client.aclose()
    assert [r.getMessage() for r in caplog.records] == [
        "shared state unreachable for circuit breakers (TimeoutError): "
        "every target is let through meanwhile"
    ]
