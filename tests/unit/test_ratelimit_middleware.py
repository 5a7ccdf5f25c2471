"""``RateLimitMiddleware`` in process, in front of a plain Starlette app.

No ``AuthMiddleware`` here: a two-line stand-in puts the principal in the scope, which is the
whole contract between the two (``robota_proxy.scope.PRINCIPAL``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from limits.aio.storage import MemoryStorage
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from robota_client.messages import Usage
from robota_proxy import RateLimiter, RateLimitMiddleware
from robota_proxy.call_record import call_record
from robota_proxy.chat_body import chat_request
from robota_proxy.policy.principals import Principal, UserPermissions
from robota_proxy.scope import PRINCIPAL, request_id
from tests.unit.test_ratelimit import clock  # noqa: F401  (the fixture, used by name)

pytestmark = pytest.mark.usefixtures("clock")

LIMITS = {
    "rpm3": UserPermissions(rpm=3),
    "tpm100": UserPermissions(tpm=100),
    "free": UserPermissions(),
}


class PutPrincipal:
    """Test stand-in for authentication: ``X-User: <name>/<limits>``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for name, value in scope.get("headers", ()):
            if name == b"x-user":
                user, _, limits = value.decode().partition("/")
                scope[PRINCIPAL] = Principal(user, permissions=LIMITS[limits])
        if scope["type"] == "http" and scope["path"] == "/chat":
            await chat_request(Request(scope, receive), 10_000)  # parsed once, kept in scope
        await self.app(scope, receive, send)


def record_usage(request: Request, total: int) -> None:
    record = call_record(request.scope, request_id(request.scope))
    record.upstream_called = True
    record.usage = Usage(prompt_tokens=1, completion_tokens=total - 1, total_tokens=total)


async def chat(request: Request) -> Response:
    record_usage(request, int(request.query_params.get("tokens", "10")))
    return JSONResponse({"ok": True})


async def stream(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        record_usage(request, 500)  # usage arrives at the end of a stream
        yield b"data: two\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def fail(request: Request) -> Response:
    record_usage(request, 500)
    raise RuntimeError("the route broke after the vendor answered")


async def socket(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("hello")
    await websocket.close()


class WithoutDenialResponses:
    """A server without the ``websocket.http.response`` extension (uvicorn has it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["extensions"] = {}
        await self.app(scope, receive, send)


def client(*, denial_responses: bool = True) -> TestClient:
    outer = [] if denial_responses else [Middleware(WithoutDenialResponses)]
    app = Starlette(
        routes=[
            Route("/chat", chat, methods=["POST"]),
            Route("/stream", stream),
            Route("/fail", fail),
            Route("/health", lambda request: JSONResponse({"status": "ok"})),
            WebSocketRoute("/ws", socket),
        ],
        middleware=[
            *outer,
            Middleware(PutPrincipal),
            Middleware(RateLimitMiddleware, limiter=RateLimiter(MemoryStorage())),
        ],
    )
    return TestClient(app, raise_server_exceptions=False)


def as_user(limits: str) -> dict[str, str]:
    return {"X-User": f"u{uuid.uuid4().hex[:6]}/{limits}"}


BODY = {"provider": "mock", "model": "mock-1", "messages": [{"role": "user", "content": "hi"}]}


def test_passing_answers_carry_the_headers_and_the_next_one_is_refused() -> None:
    # The clock fixture stands 10 s into a minute: the minute's window ends in 50 s.
    http, alice = client(), as_user("rpm3")
    for remaining in ("2", "1", "0"):
        response = http.post("/chat", json=BODY, headers=alice)
        assert response.status_code == 200
        assert response.headers["X-RateLimit-Limit"] == "3"
        assert response.headers["X-RateLimit-Remaining"] == remaining
        if remaining != "2":  # the first answer's figures are read before its own hit
            assert response.headers["X-RateLimit-Reset"] == "50"
    refused = http.post("/chat", json=BODY, headers=alice)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limited" and error["requestId"].startswith("req_")
    assert "3 requests per minute (rpm)" in error["message"]
    assert error["retryAfter"] == 50
    assert refused.headers["Retry-After"] == str(round(error["retryAfter"]))
    assert refused.headers["X-RateLimit-Limit"] == "3"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert refused.headers["X-RateLimit-Reset"] == "50"
    # Another user is counted apart.
    assert http.post("/chat", json=BODY, headers=as_user("rpm3")).status_code == 200


def test_unlimited_unauthenticated_and_exempt_requests_are_not_counted() -> None:
    http, alice = client(), as_user("rpm3")
    for _ in range(5):
        free = http.post("/chat", json=BODY, headers=as_user("free"))
        assert free.status_code == 200 and "X-RateLimit-Limit" not in free.headers
        anonymous = http.post("/chat", json=BODY)
        assert anonymous.status_code == 200 and "X-RateLimit-Limit" not in anonymous.headers
        assert http.get("/health", headers=alice).status_code == 200
    assert http.post("/chat", json=BODY, headers=alice).headers["X-RateLimit-Remaining"] == "2"


def test_tpm_charges_the_call_record_and_refuses_the_next_prompt() -> None:
    http, dave = client(), as_user("tpm100")
    first = http.post("/chat?tokens=90", json=BODY, headers=dave)
    assert first.status_code == 200
    assert first.headers["X-RateLimit-Limit-Tokens"] == "100"
    assert first.headers["X-RateLimit-Remaining-Tokens"] == "100"  # before this call
    assert "X-RateLimit-Limit" not in first.headers  # no request limit set
    second = http.post("/chat?tokens=1", json=BODY, headers=dave)
    assert second.headers["X-RateLimit-Remaining-Tokens"] == "10"
    long_prompt = {**BODY, "messages": [{"role": "user", "content": "word " * 20}]}  # 25 tokens
    refused = http.post("/chat", json=long_prompt, headers=dave)
    assert refused.status_code == 429
    assert "tokens per minute (tpm)" in refused.json()["error"]["message"]
    assert refused.headers["X-RateLimit-Limit"] == "100"
    assert refused.headers["X-RateLimit-Remaining"] == "9"


def test_streams_and_failed_routes_are_charged_when_they_end() -> None:
    http = client()
    for path in ("/stream", "/fail"):
        user = as_user("tpm100")
        first = http.get(path, headers=user)
        assert first.status_code == (200 if path == "/stream" else 500)
        refused = http.get(path, headers=user)
        assert refused.status_code == 429, path
        assert "tpm" in refused.json()["error"]["message"]


def test_a_refused_websocket_gets_the_http_429_when_the_server_allows_it() -> None:
    http, alice = client(), as_user("rpm3")
    for _ in range(3):
        with http.websocket_connect("/ws", headers=alice) as ws:
            assert ws.receive_text() == "hello"
    with (
        pytest.raises(WebSocketDenialResponse) as denied,
        http.websocket_connect("/ws", headers=alice),
    ):
        pass
    assert denied.value.status_code == 429
    assert "rpm" in denied.value.json()["error"]["message"]
    assert denied.value.headers["X-RateLimit-Limit"] == "3"
    assert int(denied.value.headers["Retry-After"]) >= 1


def test_a_refused_websocket_is_closed_with_4429_otherwise() -> None:
    http, alice = client(denial_responses=False), as_user("rpm3")
    for _ in range(3):
        with http.websocket_connect("/ws", headers=alice) as ws:
            assert ws.receive_text() == "hello"
    with pytest.raises(WebSocketDisconnect) as closed, http.websocket_connect("/ws", headers=alice):
        pass
    assert closed.value.code == 4429
    assert "rpm" in closed.value.reason
