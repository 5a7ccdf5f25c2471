"""``MeteringMiddleware`` alone, in front of someone else's LLM endpoint.

The host's endpoint makes its own vendor call and reports it only through the documented scope
key ``robota_proxy.scope.CALL`` (the ``CallRecord``); the middleware prices it and writes the
ledger row, with no other piece of the proxy present.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from robota_client.messages import Usage
from robota_proxy import MeteringMiddleware
from robota_proxy.call_record import call_record
from robota_proxy.policy.pricing import PriceBook, to_pico
from robota_proxy.scope import request_id
from robota_proxy.storage.database import Database
from robota_proxy.storage.usage_store import UsageStore, period_of

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def summarise(request: Request) -> JSONResponse:
    """The host's own endpoint: it called a vendor itself and says what it used."""
    record = call_record(request.scope, request_id(request.scope))
    record.upstream_called = True
    usage = Usage(prompt_tokens=1000, completion_tokens=200, total_tokens=1200)
    cost = record.settle_usage("openai", "gpt-4o-mini", usage)
    return JSONResponse({"summary": "...", "cost": str(cost)})


async def test_host_endpoint_is_priced_and_ledgered(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'host.db'}")
    await database.open()
    store = UsageStore(database)
    host = Starlette(routes=[Route("/summarise", summarise, methods=["POST"])])
    app = MeteringMiddleware(
        host, store=store, prices=PriceBook.from_file(None), paths=["/summarise"]
    )
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://host"
        ) as client:
            answer = await client.post("/summarise", json={})
        assert answer.status_code == 200
        # gpt-4o-mini: $0.15 per million input tokens, $0.60 per million output tokens.
        expected = Decimal(1000) * Decimal("0.15") / 10**6 + Decimal(200) * Decimal("0.6") / 10**6
        assert Decimal(answer.json()["cost"]) == expected
        period = period_of(datetime.now(UTC))
        ledger = await store.ledger_totals("anonymous", period)
        counters = await store.counters("anonymous", period)
        assert (ledger.requests, ledger.tokens_used, ledger.cost_used_pico) == (
            1,
            1200,
            to_pico(expected),
        )
        assert (counters.requests, counters.tokens_used, counters.cost_used_pico) == (
            ledger.requests,
            ledger.tokens_used,
            ledger.cost_used_pico,
        )
    finally:
        await database.aclose()
