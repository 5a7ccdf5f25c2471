"""The response cache alone: the key, the memory bound, and CacheMiddleware in front of
someone else's chat endpoint (Starlette's TestClient; the e2e tests use real processes)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from robota_client.messages import (
    AssistantMessage,
    ChatRequest,
    FunctionCall,
    ResponseMetadata,
    ToolCall,
    Usage,
)
from robota_proxy import CacheMiddleware
from robota_proxy.call_record import CallRecord, call_record
from robota_proxy.chat_body import chat_request
from robota_proxy.middleware.cache import CachedAnswer, cache_key, is_cacheable
from robota_proxy.policy.principals import Principal
from robota_proxy.scope import CALL, PRINCIPAL
from robota_proxy.storage.response_cache import MemoryResponseCache


def request(**options: Any) -> ChatRequest:
    return ChatRequest.model_validate(
        {
            "provider": "openai",
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi", "id": "m1", "timestamp": "t1"}],
            "options": options,
        }
    )


# --- the key ---------------------------------------------------------------------------------


def test_the_key_ignores_what_does_not_change_the_answer() -> None:
    base = cache_key("user:a", request(temperature=0))
    assert len(base) == 64
    assert cache_key("user:a", request(temperature=0, cache=True, timeout=5)) == base
    other_ids = request(temperature=0)
    other_ids.messages[0].id, other_ids.messages[0].timestamp = "m2", "t2"
    assert cache_key("user:a", other_ids) == base


def test_the_key_changes_with_scope_model_messages_and_options() -> None:
    base = cache_key("user:a", request(temperature=0))
    assert cache_key("user:b", request(temperature=0)) != base
    assert cache_key("shared", request(temperature=0)) != base
    assert cache_key("user:a", request(temperature=0, max_tokens=5)) != base
    other_model = request(temperature=0)
    other_model.model = "gpt-4o"
    assert cache_key("user:a", other_model) != base
    other_text = request(temperature=0)
    other_text.messages[0].content = "hi!"
    assert cache_key("user:a", other_text) != base


def test_what_is_cacheable() -> None:
    assert is_cacheable(request(temperature=0))
    assert not is_cacheable(request())
    assert not is_cacheable(request(temperature=0.7))
    assert is_cacheable(request(temperature=0.7, cache=True))
    assert not is_cacheable(request(temperature=0, cache=False))


# --- the memory backend ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_memory_cache_holds_at_most_max_bytes() -> None:
    cache = MemoryResponseCache(ttl=60, max_bytes=1000)
    for number in range(10):
        await cache.set(f"k{number}", bytes(300))
        assert cache.size_bytes <= 1000
    assert len(cache) == 3
    assert await cache.get("k0") is None
    assert await cache.get("k9") == bytes(300)
    await cache.set("huge", bytes(1001))
    assert await cache.get("huge") is None
    assert cache.size_bytes <= 1000


@pytest.mark.anyio
async def test_memory_cache_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    cache = MemoryResponseCache(ttl=10, max_bytes=1000, timer=clock)
    await cache.set("k", b"v")
    clock.now = 9.9
    assert await cache.get("k") == b"v"
    clock.now = 10.1
    assert await cache.get("k") is None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- stored answers --------------------------------------------------------------------------


def test_a_stored_message_replays_as_the_events_a_stream_would_carry() -> None:
    message = AssistantMessage(
        content="Hello",
        tool_calls=[ToolCall(id="c1", function=FunctionCall(name="f", arguments='{"a":1}'))],
        usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5, cost=0.5),
        metadata=ResponseMetadata(
            provider="openai", model="gpt-4o-mini", finish_reason="tool_calls", request_id="r0"
        ),
    )
    answer = CachedAnswer.from_bytes(CachedAnswer(message).to_bytes())
    assert answer is not None
    replayed, events = answer.replay("r1")
    assert [event.type for event in events] == ["delta", "tool_call", "usage", "done"]
    assert replayed.metadata.cached and replayed.metadata.request_id == "r1"
    assert replayed.usage is not None and replayed.usage.cost == 0
    assert replayed.tool_calls == message.tool_calls
    assert CachedAnswer.from_bytes(b'{"v": 99}') is None


# --- the middleware in front of someone else's endpoint ----------------------------------------

calls: list[dict[str, Any]] = []


async def chat(http: Request) -> Response:
    # The parsed body, as the middleware in front left it in the scope (robota_proxy.scope).
    body = await chat_request(http, 1 << 20)
    calls.append(body.to_wire())
    record = call_record(http.scope, "req")
    if body.messages[0].content == "fail":
        record.status = "upstream_error"
        return JSONResponse({"error": {"code": "upstream_error", "message": "x"}}, 502)
    usage = Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
    record.settle_usage("openai", "gpt-4o-mini", usage)
    message = AssistantMessage(
        content=f"answer {len(calls)}",
        usage=usage,
        metadata=ResponseMetadata(provider="openai", model="gpt-4o-mini", finish_reason="stop"),
    )
    return JSONResponse(message.to_wire())


async def stream(http: Request) -> Response:
    calls.append((await chat_request(http, 1 << 20)).to_wire())

    async def frames() -> Any:
        yield b'id: 1\nevent: delta\ndata: {"content":"cut"}\n\n'
        yield b'id: 2\nevent: error\ndata: {"code":"upstream_error","message":"x"}\n\n'

    return StreamingResponse(frames(), media_type="text/event-stream")


class Principals:
    """Puts the principal named by the X-User header in the scope, as auth would."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            user = dict(scope["headers"]).get(b"x-user", b"a").decode()
            scope[PRINCIPAL] = Principal(user)
            scope[CALL] = CallRecord("req")
            records.append(scope[CALL])
        await self.app(scope, receive, send)


records: list[CallRecord] = []


@pytest.fixture
def client() -> TestClient:
    calls.clear()
    records.clear()
    app = Starlette(
        routes=[
            Route("/ai/chat", chat, methods=["POST"]),
            Route("/ai/chat/stream", stream, methods=["POST"]),
        ],
        middleware=[Middleware(Principals), Middleware(CacheMiddleware)],
    )
    return TestClient(app)


def body(text: str = "hi", **options: Any) -> dict[str, Any]:
    return {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
        "options": {"temperature": 0, **options},
    }


def test_miss_then_hit_for_the_same_user(client: TestClient) -> None:
    first = client.post("/ai/chat", json=body())
    second = client.post("/ai/chat", json=body())
    assert first.headers["x-robota-cache"] == "MISS"
    assert second.headers["x-robota-cache"] == "HIT"
    assert len(calls) == 1
    assert second.json()["content"] == first.json()["content"] == "answer 1"
    assert second.json()["metadata"]["cached"] is True
    assert second.json()["usage"]["cost"] == 0
    hit = records[-1]
    assert hit.cached and hit.cost == Decimal(0) and not hit.upstream_called
    assert (hit.provider, hit.model) == ("openai", "gpt-4o-mini")
    assert hit.usage is not None and hit.usage.total_tokens == 3


def test_not_shared_between_users_and_no_header_when_not_cacheable(client: TestClient) -> None:
    client.post("/ai/chat", json=body(), headers={"X-User": "a"})
    other = client.post("/ai/chat", json=body(), headers={"X-User": "b"})
    assert other.headers["x-robota-cache"] == "MISS" and len(calls) == 2
    hot = body()
    hot["options"] = {"temperature": 1}
    assert "x-robota-cache" not in client.post("/ai/chat", json=hot).headers


def test_errors_and_cut_streams_are_never_stored(client: TestClient) -> None:
    for _ in range(2):
        assert client.post("/ai/chat", json=body("fail")).status_code == 502
    for _ in range(2):
        client.post("/ai/chat/stream", json=body("cut"))
    assert len(calls) == 4


def test_bad_body_is_a_4xx_from_the_middleware(client: TestClient) -> None:
    response = client.post("/ai/chat", content=b"{not json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
