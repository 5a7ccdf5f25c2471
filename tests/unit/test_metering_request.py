"""``MeteringMiddleware`` leaves the parsed request as the caller sent it: the ``maxTokens``
it imposes on a budgeted call goes on the call record (the request sent to the vendor carries
it, see ``Resilience``), and the prompt's bound is worked out once and shared."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from robota_client.messages import ChatRequest, Usage
from robota_proxy.call_record import CallRecord
from robota_proxy.chat_body import parse_into_scope
from robota_proxy.middleware.metering import MeteringMiddleware
from robota_proxy.policy.pricing import PriceBook, prompt_token_bound
from robota_proxy.policy.principals import Principal, UserPermissions
from robota_proxy.scope import CALL, CHAT_REQUEST, PRINCIPAL, PROMPT_TOKEN_BOUND
from robota_proxy.storage.database import Database
from robota_proxy.storage.usage_store import UsageStore
from tests.unit import usage_store_support as support

pytestmark = pytest.mark.anyio

fresh_statements = support.fresh_statements  # the shared fixture, used by name

BODY = b"""{"provider": "openai", "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hello"}], "options": {"temperature": 0}}"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store(tmp_path: Path, anyio_backend: str) -> AsyncIterator[UsageStore]:
    database = Database(f"sqlite:///{tmp_path / 'metering.db'}")
    await database.open()
    try:
        yield UsageStore(database)
    finally:
        await database.aclose()


class Seen:
    def __init__(self) -> None:
        self.scopes: list[Scope] = []

    async def endpoint(self, request: Request) -> JSONResponse:
        self.scopes.append(request.scope)
        record = request.scope[CALL]
        record.upstream_called = True
        record.settle_usage("openai", "gpt-4o-mini", Usage(prompt_tokens=3, completion_tokens=2))
        return JSONResponse({"ok": True})


def with_caller(app: MeteringMiddleware, principal: Principal) -> ASGIApp:
    """The caller (as the auth middleware would put it) and the body parsed before metering
    runs, so that the test holds the very object metering sees."""

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[PRINCIPAL] = principal
            parse_into_scope(scope, BODY)
        await app(scope, receive, send)

    return outer


@pytest.mark.parametrize("budget", [Decimal("5"), None])
async def test_the_parsed_request_is_unchanged_after_metering(
    store: UsageStore, budget: Decimal | None
) -> None:
    seen = Seen()
    host = Starlette(routes=[Route("/ai/chat", seen.endpoint, methods=["POST"])])
    metering = MeteringMiddleware(
        host, store=store, prices=PriceBook.from_file(None), reserve_max_tokens=321
    )
    caller = Principal("u", permissions=UserPermissions(monthly_budget_usd=budget))
    app = with_caller(metering, caller)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://proxy"
    ) as client:
        answer = await client.post("/ai/chat", content=BODY)
    assert answer.status_code == 200, answer.text
    (scope,) = seen.scopes
    request = scope[CHAT_REQUEST]
    assert isinstance(request, ChatRequest)
    assert request == ChatRequest.model_validate_json(BODY)
    assert request.options.max_tokens is None
    record = scope[CALL]
    assert isinstance(record, CallRecord)
    assert record.max_tokens == (321 if budget is not None else None)
    # The bound the reservation used is kept beside the very request it bounds.
    assert scope[PROMPT_TOKEN_BOUND] == (request, prompt_token_bound(request))
