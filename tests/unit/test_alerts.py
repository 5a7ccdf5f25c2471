"""Alerts: the signature scheme, the webhook's retries and back-off, the bounded outbox, the
once-per-month thresholds (two ``Alerts`` on one database or one Redis stand for two
processes), the breakers' hook and the throttled ledger alert.

The receiver is an ``httpx.MockTransport``; the back-off's sleeps are recorded, not slept."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from redis.asyncio import Redis

from robota_proxy.observability.alerts import Alerts, Webhook, sign, verify
from robota_proxy.storage.alert_marks import (
    MARK_TTL_SECONDS,
    DatabaseAlertMarks,
    RedisAlertMarks,
)
from robota_proxy.storage.database import Database
from robota_proxy.upstreams.breakers import BreakerPolicy, MemoryBreakers

pytestmark = pytest.mark.anyio

SECRET = "whsec-test-0123456789"
URL = "http://receiver.test/hook"
NOW = 1_760_000_000.0
PERIOD = "2026-03"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Receiver:
    """Answers each POST with the next status of ``statuses`` (the last one repeats); an
    ``Exception`` instance is raised instead, as a failed connection would be."""

    def __init__(self, *statuses: int | Exception) -> None:
        self.statuses = list(statuses) or [200]
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        outcome = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if isinstance(outcome, Exception):
            raise outcome
        return httpx.Response(outcome)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(request.content) for request in self.requests]


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def webhook(receiver: Receiver, sleeps: Sleeps | None = None, **options: Any) -> Webhook:
    return Webhook(
        URL,
        options.pop("secret", SECRET),
        transport=httpx.MockTransport(receiver),
        sleep=sleeps or Sleeps(),
        clock=lambda: NOW,
        **options,
    )


def an_alert() -> dict[str, Any]:
    return {"id": "a1", "type": "circuit_open", "time": "t", "details": {"target": "x/y"}}


# --- the signature --------------------------------------------------------------------------


def test_the_signature_is_the_hmac_of_the_timestamp_a_dot_and_the_raw_body() -> None:
    body = b'{"type":"circuit_open"}'
    expected = hmac.new(SECRET.encode(), b"1760000000." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET.encode(), "1760000000", body) == expected
    assert len(expected) == 64


def test_verify_accepts_the_signed_body_and_rejects_tampering_replays_and_other_secrets() -> None:
    body = b'{"a":1}'
    headers = {
        "X-Robota-Timestamp": "1760000000",
        "X-Robota-Signature": "sha256=" + sign(SECRET.encode(), "1760000000", body),
    }
    assert verify(SECRET.encode(), headers, body, now=NOW) is True
    assert verify(SECRET.encode(), headers, body, now=NOW + 300) is True
    assert verify(SECRET.encode(), headers, b'{"a":2}', now=NOW) is False
    assert verify(b"another-secret", headers, body, now=NOW) is False
    assert verify(SECRET.encode(), headers, body, now=NOW + 301) is False  # a replay
    # The timestamp is signed: a fresh one on a captured signature does not pass.
    fresh = {**headers, "X-Robota-Timestamp": str(int(NOW) + 600)}
    assert verify(SECRET.encode(), fresh, body, now=NOW + 600) is False
    assert verify(SECRET.encode(), {}, body, now=NOW) is False


async def test_a_delivered_alert_is_signed_json_with_the_attempts_timestamp() -> None:
    receiver = Receiver(200)
    hook = webhook(receiver)
    assert await hook.deliver(an_alert()) is True
    [request] = receiver.requests
    assert request.method == "POST"
    assert str(request.url) == URL
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-robota-timestamp"] == "1760000000"
    assert verify(SECRET.encode(), dict(request.headers), request.content, now=NOW) is True
    assert json.loads(request.content) == an_alert()
    await hook.aclose()


async def test_without_a_secret_no_signature_is_sent() -> None:
    receiver = Receiver(204)
    hook = webhook(receiver, secret=None)
    assert await hook.deliver(an_alert()) is True
    assert "x-robota-signature" not in receiver.requests[0].headers
    assert "x-robota-timestamp" not in receiver.requests[0].headers
    await hook.aclose()


# --- retries and back-off -------------------------------------------------------------------


async def test_a_failing_receiver_is_retried_with_an_exponential_back_off() -> None:
    receiver = Receiver(503, httpx.ConnectError("refused"), 429, 200)
    sleeps = Sleeps()
    hook = webhook(receiver, sleeps, attempts=5, backoff=0.5, backoff_max=30)
    assert await hook.deliver(an_alert()) is True
    assert len(receiver.requests) == 4
    assert sleeps.waits == [0.5, 1.0, 2.0]
    # Every attempt carries the same body, signed anew.
    assert {request.content for request in receiver.requests} == {receiver.requests[0].content}
    await hook.aclose()


async def test_the_back_off_is_capped(caplog: pytest.LogCaptureFixture) -> None:
    sleeps = Sleeps()
    hook = webhook(Receiver(500), sleeps, attempts=6, backoff=1.0, backoff_max=5.0)
    assert await hook.deliver(an_alert()) is False
    assert sleeps.waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    await hook.aclose()


async def test_an_alert_still_failing_after_its_attempts_is_dropped_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = Receiver(httpx.ConnectError("refused"))
    with caplog.at_level(logging.WARNING, "robota_proxy.alerts"):
        assert await webhook(receiver, attempts=3).deliver(an_alert()) is False
    assert len(receiver.requests) == 3
    assert [record.getMessage() for record in caplog.records] == [
        "alert a1 (circuit_open) dropped after 3 attempts: receiver unavailable (ConnectError)"
    ]


async def test_a_refusal_is_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    receiver = Receiver(400)
    with caplog.at_level(logging.WARNING, "robota_proxy.alerts"):
        assert await webhook(receiver, attempts=5).deliver(an_alert()) is False
    assert len(receiver.requests) == 1
    assert [record.getMessage() for record in caplog.records] == [
        "alert a1 (circuit_open) dropped: the receiver refused it (HTTP 400)"
    ]


# --- the outbox -----------------------------------------------------------------------------


class NoMarks:
    async def claim(self, user: str, period: str, alert: str) -> bool:
        return True

    async def prune(self, keep_from: str) -> None:
        return None


@dataclass
class Used:
    tokens_used: int = 0
    cost_used_pico: int = 0


class Counters:
    """The user's month as the store would return it, and how often it was read."""

    def __init__(self) -> None:
        self.used: dict[str, Used] = {}
        self.reads = 0

    async def __call__(self, user: str, period: str) -> Used:
        self.reads += 1
        return self.used.setdefault(user, Used())


def alerts_with(
    receiver: Receiver,
    marks: Any = None,
    counters: Counters | None = None,
    **options: Any,
) -> Alerts:
    return Alerts(
        webhook(receiver, attempts=options.pop("attempts", 2)),
        marks or NoMarks(),
        counters or Counters(),
        **options,
    )


async def wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await anyio.sleep(0.01)
    raise AssertionError("not within 5 s")


async def test_a_full_outbox_drops_its_oldest_alert_with_a_counted_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = Receiver(200)
    alerts = alerts_with(receiver, queue_size=2)
    with caplog.at_level(logging.WARNING, "robota_proxy.alerts"):
        for target in ("a/1", "a/2", "a/3"):
            alerts.circuit_changed(target, "open", 5)
    assert alerts.dropped == 1
    [line] = [record.getMessage() for record in caplog.records]
    assert line.startswith("alert queue full (2): dropped the oldest alert, ")
    assert line.endswith(" (circuit_open); 1 dropped so far")
    await alerts.start()
    await wait_for(lambda: len(receiver.requests) == 2)
    await alerts.stop()
    assert [body["details"]["target"] for body in receiver.bodies()] == ["a/2", "a/3"]


async def test_emitting_never_waits_for_a_slow_receiver() -> None:
    """The hooks return at once whatever the receiver does; stop gives what is queued
    ``drain_seconds`` and counts what is left."""
    gate = anyio.Event()

    async def hanging(request: httpx.Request) -> httpx.Response:
        await gate.wait()
        return httpx.Response(200)

    hook = Webhook(URL, None, transport=httpx.MockTransport(hanging), attempts=1)
    alerts = Alerts(hook, NoMarks(), Counters(), drain_seconds=0.2)
    await alerts.start()
    started = anyio.current_time()
    for number in range(50):
        alerts.circuit_changed(f"t/{number}", "open", 1)
    assert anyio.current_time() - started < 0.05
    started = anyio.current_time()
    await alerts.stop()
    assert anyio.current_time() - started < 1.0
    gate.set()


async def test_stop_delivers_what_is_queued(caplog: pytest.LogCaptureFixture) -> None:
    receiver = Receiver(200)
    alerts = alerts_with(receiver)
    await alerts.start()
    alerts.circuit_changed("openai/gpt-4o", "open", 3)
    alerts.circuit_changed("openai/gpt-4o", "half_open", 3)
    alerts.circuit_changed("openai/gpt-4o", "closed", 0)
    with caplog.at_level(logging.WARNING, "robota_proxy.alerts"):
        await alerts.stop()
    assert [(body["type"], body["details"]) for body in receiver.bodies()] == [
        ("circuit_open", {"target": "openai/gpt-4o", "consecutiveFailures": 3}),
        ("circuit_closed", {"target": "openai/gpt-4o"}),
    ]
    assert caplog.records == []


async def test_what_is_left_at_shutdown_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    alerts = alerts_with(Receiver(503), attempts=20, drain_seconds=0.1)
    alerts.webhook._sleep = anyio.sleep  # really wait: the drain must cut the back-off short
    await alerts.start()
    alerts.circuit_changed("a/1", "open", 1)
    alerts.circuit_changed("a/2", "open", 1)
    with caplog.at_level(logging.WARNING, "robota_proxy.alerts"):
        await alerts.stop()
    assert [record.getMessage() for record in caplog.records] == [
        "2 alert(s) not delivered before shutdown: dropped"
    ]


# --- the breakers' hook ---------------------------------------------------------------------


async def test_a_breaker_opening_and_closing_sends_circuit_open_then_circuit_closed() -> None:
    receiver = Receiver(200)
    alerts = alerts_with(receiver)
    now = [100.0]
    breakers = MemoryBreakers(
        BreakerPolicy(failures=2, error_rate=None, cooldown_seconds=10),
        clock=lambda: now[0],
        on_change=alerts.circuit_changed,
    )
    await alerts.start()
    await breakers.failure("openai/gpt-4o")
    await breakers.failure("openai/gpt-4o")
    now[0] += 10
    assert await breakers.allow("openai/gpt-4o") is True  # the probe: half-open, no alert
    await breakers.success("openai/gpt-4o")
    await wait_for(lambda: len(receiver.requests) == 2)
    await alerts.stop()
    bodies = receiver.bodies()
    assert [(body["type"], body["details"]) for body in bodies] == [
        ("circuit_open", {"target": "openai/gpt-4o", "consecutiveFailures": 2}),
        ("circuit_closed", {"target": "openai/gpt-4o"}),
    ]
    assert all(set(body) == {"id", "type", "time", "details"} for body in bodies)
    assert bodies[0]["time"].endswith("Z")


# --- ledger failures ------------------------------------------------------------------------


def test_ledger_failures_send_one_alert_per_interval_counting_the_others() -> None:
    now = [0.0]
    alerts = Alerts(
        webhook(Receiver()), NoMarks(), Counters(), ledger_interval=60, clock=lambda: now[0]
    )
    alerts.ledger_write_failed("settle", "OperationalError")
    for _ in range(4):
        now[0] += 10
        alerts.ledger_write_failed("open", "OperationalError")
    now[0] = 60.0
    alerts.ledger_write_failed("open", "OSError")
    assert [(body["type"], body["details"]) for body in alerts._outbox] == [
        ("ledger_write_failed", {"stage": "settle", "error": "OperationalError", "failures": 1}),
        ("ledger_write_failed", {"stage": "open", "error": "OSError", "failures": 5}),
    ]


# --- thresholds -----------------------------------------------------------------------------


async def test_thresholds_are_sent_once_each_as_usage_crosses_them() -> None:
    receiver = Receiver(200)
    counters = Counters()
    alerts = alerts_with(receiver, counters=counters)
    await alerts.start()
    # A budget of $1 (10**12 pico) and a quota of 1000 tokens.
    steps = [(500, 700_000_000_000), (799, 800_000_000_000), (1000, 900_000_000_000)]
    for tokens, cost in steps:
        counters.used["ann"] = Used(tokens, cost)
        alerts.usage_settled("ann", "k123", PERIOD, 1000, 10**12)
        await wait_for(lambda: not alerts._checks)
    await alerts.stop()
    assert [(body["type"], body["details"]) for body in receiver.bodies()] == [
        (
            "budget_threshold",
            {
                "user": "ann",
                "keyId": "k123",
                "period": PERIOD,
                "threshold": 80,
                "limitUsd": "1",
                "usedUsd": "0.8",
            },
        ),
        (
            "quota_threshold",
            {
                "user": "ann",
                "keyId": "k123",
                "period": PERIOD,
                "threshold": 80,
                "limitTokens": 1000,
                "usedTokens": 1000,
            },
        ),
        (
            "quota_threshold",
            {
                "user": "ann",
                "keyId": "k123",
                "period": PERIOD,
                "threshold": 100,
                "limitTokens": 1000,
                "usedTokens": 1000,
            },
        ),
    ]


async def test_a_user_without_limits_or_with_everything_announced_costs_no_read() -> None:
    counters = Counters()
    alerts = alerts_with(Receiver(200), counters=counters)
    await alerts.start()
    alerts.usage_settled("bob", None, PERIOD, None, None)
    assert alerts._checks == {}
    counters.used["bob"] = Used(tokens_used=100)
    alerts.usage_settled("bob", None, PERIOD, 100, None)
    await wait_for(lambda: counters.reads == 1 and not alerts._checks)
    alerts.usage_settled("bob", None, PERIOD, 100, None)  # 80 and 100 are known: no read
    assert alerts._checks == {}
    # A new month starts over.
    alerts.usage_settled("bob", None, "2026-04", 100, None)
    await wait_for(lambda: counters.reads == 2)
    await alerts.stop()


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'alerts.db'}")
    await db.open()
    yield db
    await db.aclose()


async def test_two_processes_on_one_database_send_each_threshold_once(database: Database) -> None:
    receiver = Receiver(200)
    counters = Counters()
    first = alerts_with(receiver, DatabaseAlertMarks(database), counters)
    second = alerts_with(receiver, DatabaseAlertMarks(database), counters)
    await first.start()
    await second.start()
    for cost in (850_000_000_000, 900_000_000_000, 1_000_000_000_000, 1_100_000_000_000):
        counters.used["cy"] = Used(cost_used_pico=cost)
        for alerts in (first, second):
            alerts.usage_settled("cy", None, PERIOD, None, 10**12)
            await wait_for(lambda a=alerts: not a._checks)  # type: ignore[misc]
    await first.stop()
    await second.stop()
    assert [
        (body["details"]["threshold"], body["details"]["usedUsd"]) for body in receiver.bodies()
    ] == [(80, "0.85"), (100, "1")]


async def test_database_marks_are_claimed_once_and_old_periods_pruned(database: Database) -> None:
    marks = DatabaseAlertMarks(database)
    assert await marks.claim("dee", "2026-02", "budget:80") is True
    assert await marks.claim("dee", "2026-02", "budget:80") is False
    assert await marks.claim("dee", "2026-02", "budget:100") is True
    assert await marks.claim("dee", "2026-03", "budget:80") is True
    await marks.prune("2026-03")
    assert await marks.claim("dee", "2026-02", "budget:80") is True  # pruned: claimable
    assert await marks.claim("dee", "2026-03", "budget:80") is False


async def test_redis_marks_are_claimed_once_with_an_expiry(
    redis_url: str, redis_prefix: str
) -> None:
    prefix = f"{redis_prefix}:alerts-{uuid.uuid4().hex[:8]}"
    one, two = Redis.from_url(redis_url), Redis.from_url(redis_url)
    try:
        first, second = RedisAlertMarks(one, prefix), RedisAlertMarks(two, prefix)
        assert await first.claim("eve", PERIOD, "quota:80") is True
        assert await second.claim("eve", PERIOD, "quota:80") is False
        assert await second.claim("eve", PERIOD, "quota:100") is True
        key = f"{prefix}:alert:{PERIOD}:quota:80:eve"
        ttl = await one.ttl(key)
        assert MARK_TTL_SECONDS - 5 <= ttl <= MARK_TTL_SECONDS
    finally:
        async for key in one.scan_iter(match=f"{prefix}:*"):
            await one.delete(key)
        await one.aclose()
        await two.aclose()


async def test_marks_that_cannot_answer_let_the_alert_go(caplog: pytest.LogCaptureFixture) -> None:
    client = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        with caplog.at_level(logging.WARNING, "robota_proxy.alerts"):
            assert await RedisAlertMarks(client, "p").claim("fay", PERIOD, "budget:80") is True
    finally:
        await client.aclose()
    assert [record.getMessage() for record in caplog.records] == [
        "alert marks unavailable (ConnectionError): sending anyway"
    ]
