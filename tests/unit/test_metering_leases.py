"""``MeteringMiddleware``'s money path at its edges, in process: no vendor call without a
ledger row (503 when the database is down), a unique ledger key with the caller's
``X-Request-ID`` kept as correlation id, and a client that vanished mid-write recorded as
``client_disconnected`` rather than as the proxy's own failure."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import httpx
import pytest
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from robota_client.messages import Usage
from robota_proxy.call_record import call_record
from robota_proxy.middleware.metering import MeteringMiddleware
from robota_proxy.middleware.request_context import RequestContextMiddleware
from robota_proxy.policy.pricing import PriceBook
from robota_proxy.scope import request_id
from robota_proxy.storage import tables
from robota_proxy.storage.database import Database
from robota_proxy.storage.usage_store import (
    IN_FLIGHT,
    INTERRUPTED,
    LeaseReclaimer,
    Opening,
    UsageStore,
    period_of,
)
from tests.unit import usage_store_support as support

pytestmark = pytest.mark.anyio

fresh_statements = support.fresh_statements  # the shared fixture, used by name

BODY = {
    "provider": "openai",
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hello"}],
    "options": {"maxTokens": 10},
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Vendor:
    """The host's endpoint: counts the vendor calls it would make."""

    def __init__(self) -> None:
        self.calls = 0

    async def endpoint(self, request: Request) -> JSONResponse:
        self.calls += 1
        record = call_record(request.scope, request_id(request.scope))
        record.upstream_called = True
        record.settle_usage("openai", "gpt-4o-mini", Usage(prompt_tokens=3, completion_tokens=2))
        return JSONResponse({"ok": True})


def metered(store: UsageStore, vendor: Vendor) -> RequestContextMiddleware:
    host = Starlette(routes=[Route("/ai/chat", vendor.endpoint, methods=["POST"])])
    metering = MeteringMiddleware(host, store=store, prices=PriceBook.from_file(None))
    return RequestContextMiddleware(metering)


@pytest.fixture
async def store(tmp_path: Path, anyio_backend: str) -> AsyncIterator[UsageStore]:
    database = Database(f"sqlite:///{tmp_path / 'metering.db'}")
    await database.open()
    try:
        yield UsageStore(database)
    finally:
        await database.aclose()


async def ledger(store: UsageStore) -> list[dict[str, object]]:
    ledger = tables.usage_ledger
    async with store.database.engine.connect() as conn:
        rows = await conn.execute(select(ledger).order_by(ledger.c.id))
        return [dict(row._mapping) for row in rows]


async def test_no_ledger_row_no_vendor_call(tmp_path: Path) -> None:
    """The database is unreachable: the call is refused with 503 before the vendor."""
    database = Database("postgresql://postgres@127.0.0.1:1/nowhere")
    vendor = Vendor()
    app = metered(UsageStore(database), vendor)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://proxy"
        ) as client:
            answer = await client.post("/ai/chat", json=BODY)
    finally:
        await database.aclose()
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert error["code"] == "upstream_unavailable"
    assert "no vendor call is made without its ledger row" in error["message"]
    assert error["requestId"] == answer.headers["x-request-id"]
    assert vendor.calls == 0


async def test_callers_request_id_is_a_correlation_id_not_the_ledger_key(
    store: UsageStore,
) -> None:
    vendor = Vendor()
    app = metered(store, vendor)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://proxy"
    ) as client:
        answers = [
            await client.post("/ai/chat", json=BODY, headers={"X-Request-ID": "mine-1"})
            for _ in range(2)
        ]
        plain = await client.post("/ai/chat", json=BODY)
    assert [answer.headers["x-request-id"] for answer in answers] == ["mine-1", "mine-1"]
    rows = await ledger(store)
    assert [(row["correlation_id"], row["status"]) for row in rows] == [
        ("mine-1", "ok"),
        ("mine-1", "ok"),
        (None, "ok"),
    ]
    keys = [row["request_id"] for row in rows]
    assert len(set(keys)) == 3 and "mine-1" not in keys
    # Without a caller's id, the ledger key is the id the caller was shown.
    assert keys[2] == plain.headers["x-request-id"]
    period = period_of(datetime.now(UTC))
    assert await store.counters("anonymous", period) == await store.ledger_totals(
        "anonymous", period
    )


async def test_a_client_gone_mid_write_is_client_disconnected(store: UsageStore) -> None:
    """The server's write of the answer fails (uvicorn raises ``ClientDisconnected``, an
    ``OSError``, when a pipelined client has vanished): that is the client's doing."""
    vendor = Vendor()
    app = metered(store, vendor)
    body = httpx.Request("POST", "http://proxy/ai/chat", json=BODY).read()
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            raise OSError("client gone")

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/ai/chat",
        "raw_path": b"/ai/chat",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("proxy", 80),
    }
    receive_: Receive = receive
    send_: Send = send
    with pytest.raises(OSError, match="client gone"):
        await app(scope, receive_, send_)
    [row] = await ledger(store)
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == (
        "client_disconnected",
        3,
        2,
    )
    assert vendor.calls == 1


def in_flight(user: str, request_id: str, when: datetime, lease: timedelta) -> Opening:
    return Opening(
        request_id=request_id,
        created_at=when,
        user=user,
        key_id=None,
        provider="openai",
        model="gpt-4o-mini",
        streamed=False,
        prompt_tokens=5,
        completion_tokens=10,
        cost_pico=300,
        lease_owner="dead-host:1:00000000",
        lease_expires_at=when + lease,
    )


async def statuses(store: UsageStore) -> dict[object, object]:
    return {row["request_id"]: row["status"] for row in await ledger(store)}


async def test_the_lease_reclaimer_runs_at_start_then_every_interval_until_stopped(
    store: UsageStore,
) -> None:
    """An app's reclaimer closes the leases that expired before it started at once, one that
    is found expired while it runs within an interval, and none once it is stopped.

    No lease here expires on the wall clock during the test (each one ended an hour ago or
    ends in an hour): a lease due a few hundred milliseconds after start made the first check
    a race with the clock, which a loaded machine (a mutation run) sometimes lost."""
    now = datetime.now(UTC)
    hour = timedelta(hours=1)
    for key, when in [("expired", now - 2 * hour), ("alive", now)]:
        await store.open(in_flight("zoe", key, when, hour), token_limit=None, cost_limit_pico=None)
    reclaimer = LeaseReclaimer(store, interval=0.05)
    await reclaimer.start()
    try:
        # The round at start is over when start() returns.
        assert await statuses(store) == {"expired": INTERRUPTED, "alive": IN_FLIGHT}
        # A lease found expired after start (its process died while this one ran).
        await store.open(
            in_flight("zoe", "found", now - 2 * hour, hour), token_limit=None, cost_limit_pico=None
        )
        for _ in range(200):  # 10 s at most
            if (await statuses(store))["found"] == INTERRUPTED:
                break
            await anyio.sleep(0.05)
        assert await statuses(store) == {
            "expired": INTERRUPTED,
            "alive": IN_FLIGHT,
            "found": INTERRUPTED,
        }
    finally:
        await reclaimer.stop()
    await store.open(
        in_flight("zoe", "after", now - 2 * hour, hour), token_limit=None, cost_limit_pico=None
    )
    await anyio.sleep(0.25)  # five intervals: a reclaimer still running would close it
    assert await statuses(store) == {
        "expired": INTERRUPTED,
        "alive": IN_FLIGHT,
        "found": INTERRUPTED,
        "after": IN_FLIGHT,
    }
    await reclaimer.stop()  # stopping twice is harmless


async def test_the_lease_reclaimer_outlives_a_database_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The database is unreachable: starting the app's reclaimer does not fail, it logs one
    warning per round and keeps trying."""
    database = Database("postgresql://postgres@127.0.0.1:1/nowhere")
    reclaimer = LeaseReclaimer(UsageStore(database), interval=0.05)
    caplog.set_level("WARNING", logger="robota_proxy.usage")
    try:
        await reclaimer.start()
        for _ in range(200):  # 10 s at most
            if len(caplog.records) >= 2:
                break
            await anyio.sleep(0.05)
    finally:
        await reclaimer.stop()
        await database.aclose()
    logged = [
        (record.name, record.levelname, record.getMessage(), bool(record.exc_info))
        for record in caplog.records
    ]
    assert len(logged) >= 2  # one at start, then one per round
    # An outage is no bug of ours: no traceback.
    assert set(logged) == {
        (
            "robota_proxy.usage",
            "WARNING",
            "could not reclaim expired leases (ConnectionRefusedError)",
            False,
        )
    }
