"""The response cache reads the chat routes' answers off the call record, not off their bytes.

The proxy app in process (Starlette's TestClient) in front of the fake OpenAI vendor on a real
socket. What is pinned: the entry stored from the record is exactly the entry the old path
built by parsing the bytes sent (``_stream_answer``, still the path for someone else's
endpoint), so hits replay what they did before; a hit replays the first answer's events; a
stream the cache will not store collects nothing; ``max_entry_bytes`` bounds the entry stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from httpx_sse import EventSource
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from robota_client.messages import AssistantMessage, ResponseMetadata, Usage
from robota_proxy import CacheMiddleware, ProxyApp, create_app
from robota_proxy.call_record import CallRecord, call_record
from robota_proxy.chat_body import chat_request
from robota_proxy.middleware.cache import CachedAnswer, _stream_answer
from robota_proxy.responses import WireResponse
from robota_proxy.scope import CALL
from robota_proxy.settings import Settings
from robota_proxy.storage.response_cache import MemoryResponseCache
from robota_proxy.testing import FakeVendors, Reply, ToolCallSpec

KEY = "unit-cache-record-key-0123456789"
VENDOR_KEY = "sk-unit-cache-record-vendor"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def vendors() -> Iterator[FakeVendors]:
    with FakeVendors(api_key=VENDOR_KEY) as running:
        yield running


class Recorded:
    """The proxy app wrapped to keep each call's record (read after the call) and the cache
    writes (key, entry)."""

    def __init__(self, proxy: ProxyApp) -> None:
        self.proxy = proxy
        self.records: list[CallRecord] = []
        self.stored: list[bytes] = []
        store = proxy.response_cache.set

        async def recorded_set(key: str, value: bytes) -> None:
            self.stored.append(value)
            await store(key, value)

        proxy.response_cache.set = recorded_set  # type: ignore[method-assign]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.proxy(scope, receive, send)
        record = scope.get(CALL)
        if isinstance(record, CallRecord):
            self.records.append(record)


@pytest.fixture
def app(vendors: FakeVendors, tmp_path: Path) -> Iterator[tuple[TestClient, Recorded]]:
    vendors.reset()
    settings = Settings(
        _env_file=None,
        api_keys=[KEY],
        database_url=f"sqlite:///{tmp_path / 'robota.db'}",
        openai_api_key=VENDOR_KEY,
        openai_base_url=vendors.openai_base_url,
    )
    recorded = Recorded(create_app(settings))
    with TestClient(recorded) as client:
        yield client, recorded
    vendors.reset()


def body(text: str, **options: Any) -> dict[str, Any]:
    return {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
        "options": {"temperature": 0, **options},
    }


def events(raw: bytes) -> list[tuple[str, str, str]]:
    """``(id, event, data)`` of an SSE body, parsed with httpx-sse."""
    import httpx

    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=raw)
    return [(sse.id, sse.event, sse.data) for sse in EventSource(response).iter_sse()]


def test_a_stream_is_stored_from_the_record_as_its_bytes_would_have_been(
    app: tuple[TestClient, Recorded], vendors: FakeVendors
) -> None:
    client, recorded = app
    vendors.script(
        Reply(text="Grüße, the tool says", tool_calls=[ToolCallSpec("lookup", {"q": "é"})])
    )
    first = client.post("/ai/chat/stream", json=body("stored stream"), headers=AUTH)
    assert first.status_code == 200 and first.headers["x-robota-cache"] == "MISS"
    assert len(recorded.stored) == 1
    parsed = _stream_answer(first.content)  # what the cache stored before issue 13
    assert parsed is not None
    assert recorded.stored[0] == parsed.to_bytes()
    # The events kept are the very data the client got, up to ``done``.
    sent = events(first.content)
    kept = recorded.records[0].answer_events
    assert kept == [(name, data) for _, name, data in sent[:-1]]
    assert {name for name, _ in kept} == {"delta", "tool_call", "usage"}


def test_a_stream_hit_replays_the_first_answers_events(
    app: tuple[TestClient, Recorded], vendors: FakeVendors
) -> None:
    client, _ = app
    vendors.script(Reply(text="one answer, replayed", tool_calls=[ToolCallSpec("f", {"a": 1})]))
    first = client.post("/ai/chat/stream", json=body("replayed stream"), headers=AUTH)
    hit = client.post("/ai/chat/stream", json=body("replayed stream"), headers=AUTH)
    assert hit.headers["x-robota-cache"] == "HIT"
    assert len(vendors.requests) == 1
    sent, replayed = events(first.content), events(hit.content)
    assert [name for _, name, _ in replayed] == [name for _, name, _ in sent]
    assert [event_id for event_id, _, _ in replayed] == [str(n) for n in range(1, len(sent) + 1)]
    # The same data, byte for byte, but the usage's cost, which a hit zeroes.
    for (_, name, data), (_, _, again) in zip(sent[:-1], replayed[:-1], strict=True):
        if name == "usage":
            usage, usage_again = json.loads(data)["usage"], json.loads(again)["usage"]
            assert usage_again == {**usage, "cost": 0.0}
        else:
            assert again == data
    message = AssistantMessage.model_validate(json.loads(sent[-1][2])["message"])
    message_again = AssistantMessage.model_validate(json.loads(replayed[-1][2])["message"])
    assert message_again.content == message.content == "one answer, replayed"
    assert message_again.tool_calls == message.tool_calls and message.tool_calls
    assert message_again.metadata.cached is True and message.metadata.cached is False
    assert message_again.usage is not None and message_again.usage.cost == 0.0


def test_a_plain_answer_is_stored_from_the_record_as_its_bytes_would_have_been(
    app: tuple[TestClient, Recorded], vendors: FakeVendors
) -> None:
    client, recorded = app
    vendors.script(Reply(text="a plain answer"))
    first = client.post("/ai/chat", json=body("stored plain"), headers=AUTH)
    assert first.headers["x-robota-cache"] == "MISS"
    old = CachedAnswer(AssistantMessage.model_validate_json(first.content)).to_bytes()
    assert recorded.stored == [old]
    assert recorded.records[0].answer_events is None  # a plain call never collects
    hit = client.post("/ai/chat", json=body("stored plain"), headers=AUTH)
    assert hit.headers["x-robota-cache"] == "HIT"
    assert hit.json()["content"] == "a plain answer"


@pytest.mark.parametrize(
    ("options", "headers"),
    [
        ({"temperature": 0.5}, {}),  # not cacheable
        ({}, {"X-Robota-Cache-Control": "no-store"}),  # cacheable, but not to be stored
    ],
)
def test_a_stream_the_cache_will_not_store_collects_no_events(
    app: tuple[TestClient, Recorded],
    vendors: FakeVendors,
    options: dict[str, Any],
    headers: dict[str, str],
) -> None:
    client, recorded = app
    vendors.script(Reply(text="not kept"))
    answer = client.post(
        "/ai/chat/stream", json=body("uncached", **options), headers={**AUTH, **headers}
    )
    assert [name for _, name, _ in events(answer.content)][-1] == "done"
    record = recorded.records[-1]
    assert record.answer_events is None
    assert record.answer is not None and record.answer.content == "not kept"
    assert recorded.stored == []


def test_keep_event_keeps_the_answer_and_forgets_what_a_restart_voids() -> None:
    record = CallRecord("req")
    record.keep_event("delta", '{"content":"lost"}')
    assert record.answer_events is None  # nobody asked
    record.answer_events = []
    record.keep_event("delta", '{"content":"abandoned"}')
    record.keep_event("restart", '{"reason":"x"}')
    record.keep_event("delta", '{"content":"kept"}')
    record.keep_event("usage", '{"usage":{}}')
    record.keep_event("done", "{}")
    assert record.answer_events == [("delta", '{"content":"kept"}'), ("usage", '{"usage":{}}')]


# --- the bound, on an endpoint that leaves its answer on the record ---------------------------

MESSAGE = AssistantMessage(
    content="x" * 100,
    usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
    metadata=ResponseMetadata(provider="openai", model="gpt-4o-mini", finish_reason="stop"),
)


async def recording_chat(http: Request) -> Response:
    await chat_request(http, 1 << 20)
    record = call_record(http.scope, "req")
    record.keeps_answer = True
    record.answer = MESSAGE.model_copy(deep=True)
    return WireResponse(record.answer)


def bounded(max_entry_bytes: int) -> tuple[TestClient, MemoryResponseCache]:
    cache = MemoryResponseCache(ttl=60, max_bytes=1 << 20)
    middleware = [Middleware(CacheMiddleware, cache=cache, max_entry_bytes=max_entry_bytes)]
    app = Starlette(
        routes=[Route("/ai/chat", recording_chat, methods=["POST"])], middleware=middleware
    )
    return TestClient(app), cache


def test_the_entry_stored_is_what_max_entry_bytes_bounds() -> None:
    size = len(CachedAnswer(MESSAGE).to_bytes())
    for limit, hit in ((size, "HIT"), (size - 1, "MISS")):
        client, _ = bounded(limit)
        client.post("/ai/chat", json=body("bounded"))
        assert client.post("/ai/chat", json=body("bounded")).headers["x-robota-cache"] == hit


# --- someone else's endpoint, which knows nothing of the record ------------------------------


async def foreign_stream(http: Request) -> Response:
    await chat_request(http, 1 << 20)
    done = {"finishReason": "stop", "message": MESSAGE.to_wire()}

    async def frames() -> Any:
        yield b'id: 1\nevent: delta\ndata: {"content":"from bytes"}\n\n'
        yield f"id: 2\nevent: done\ndata: {json.dumps(done)}\n\n".encode()

    return StreamingResponse(frames(), media_type="text/event-stream")


def test_an_endpoint_that_does_not_fill_the_record_is_cached_from_its_bytes() -> None:
    cache = MemoryResponseCache(ttl=60, max_bytes=1 << 20)
    app = Starlette(
        routes=[Route("/ai/chat/stream", foreign_stream, methods=["POST"])],
        middleware=[Middleware(CacheMiddleware, cache=cache)],
    )
    client = TestClient(app)
    first = client.post("/ai/chat/stream", json=body("foreign"))
    hit = client.post("/ai/chat/stream", json=body("foreign"))
    assert (first.headers["x-robota-cache"], hit.headers["x-robota-cache"]) == ("MISS", "HIT")
    replayed = events(hit.content)
    assert [(name, data) for _, name, data in replayed[:-1]] == [
        ("delta", '{"content":"from bytes"}')
    ]
    done = json.loads(replayed[-1][2])
    assert done["message"]["content"] == MESSAGE.content and done["message"]["metadata"]["cached"]
