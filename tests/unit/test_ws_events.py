"""``/ai/ws`` takes a stream's events from the stream response itself (the scope's
``EVENT_SINK``), not by parsing SSE back: its frames are the SSE stream's events.

The proxy app in process (Starlette's TestClient, HTTP and WebSocket) in front of the fake
OpenAI vendor on a real socket; ``deliver`` alone against a memory stream buffer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import EventSource
from starlette.testclient import TestClient, WebSocketTestSession
from starlette.types import Message

from robota_proxy import create_app
from robota_proxy.settings import Settings
from robota_proxy.streams.buffer import Entry
from robota_proxy.streams.memory import MemoryStreamBuffer
from robota_proxy.streams.response import deliver
from robota_proxy.testing import FakeVendors, Reply, ToolCallSpec

KEY = "unit-ws-events-key-0123456789abc"
VENDOR_KEY = "sk-unit-ws-events-vendor"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def vendors() -> Iterator[FakeVendors]:
    with FakeVendors(api_key=VENDOR_KEY) as running:
        yield running


@pytest.fixture
def client(vendors: FakeVendors, tmp_path: Path) -> Iterator[TestClient]:
    vendors.reset()
    settings = Settings(
        _env_file=None,
        api_keys=[KEY],
        database_url=f"sqlite:///{tmp_path / 'robota.db'}",
        openai_api_key=VENDOR_KEY,
        openai_base_url=vendors.openai_base_url,
    )
    with TestClient(create_app(settings)) as running:
        yield running
    vendors.reset()


def body(text: str, temperature: float) -> dict[str, Any]:
    return {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
        "options": {"temperature": temperature},
    }


def sse_events(raw: bytes) -> list[tuple[str, str, str]]:
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=raw)
    return [(sse.id, sse.event, sse.data) for sse in EventSource(response).iter_sse()]


def ws_frames(ws: WebSocketTestSession, request_id: str, payload: dict[str, Any]) -> list[str]:
    ws.send_text(json.dumps({"type": "request", "id": request_id, "body": payload}))
    frames: list[str] = []
    while not frames or json.loads(frames[-1])["event"] not in ("done", "error"):
        frames.append(ws.receive_text())
    return frames


def as_frame(request_id: str, event_id: str, event: str, data: str) -> str:
    """The frame the SSE event makes: what the WS route sent when it parsed SSE back."""
    frame = {"id": request_id, "event": event, "eventId": event_id, "data": json.loads(data)}
    return json.dumps(frame, separators=(",", ":"))


def without_request_id(frame: str) -> Any:
    data = json.loads(frame)
    if data["event"] == "done":
        data["data"]["message"]["metadata"].pop("requestId")
    return data


REPLY = Reply(
    text="Grüße over both transports",
    tool_calls=[ToolCallSpec("look", {"q": "ü"}, id="call_fixed")],
)


def test_a_ws_streams_frames_are_the_sse_streams_events(
    client: TestClient, vendors: FakeVendors
) -> None:
    vendors.script(REPLY)
    payload = body("same request", temperature=0.5)  # not cached: both ask the vendor
    sent = sse_events(client.post("/ai/chat/stream", json=payload, headers=AUTH).content)
    with client.websocket_connect("/ai/ws", headers=AUTH) as ws:
        frames = ws_frames(ws, "r1", payload)
    assert len(vendors.requests) == 2
    assert [json.loads(f)["event"] for f in frames] == [event for _, event, _ in sent]
    assert {event for _, event, _ in sent} == {"delta", "tool_call", "usage", "done"}
    stream_id = json.loads(frames[0])["eventId"].rpartition(":")[0]
    expected = [
        as_frame("r1", f"{stream_id}:{event_id.rpartition(':')[2]}", event, data)
        for event_id, event, data in sent
    ]
    # The same text, byte for byte, once the per-call request id is set aside.
    assert [without_request_id(f) for f in frames] == [without_request_id(f) for f in expected]
    assert frames[:-1] == expected[:-1]


def test_a_cached_stream_replays_over_ws_as_over_sse(
    client: TestClient, vendors: FakeVendors
) -> None:
    vendors.script(REPLY)
    payload = body("cached request", temperature=0)
    first = client.post("/ai/chat/stream", json=payload, headers=AUTH)
    assert first.headers["x-robota-cache"] == "MISS"
    hit = client.post("/ai/chat/stream", json=payload, headers=AUTH)
    assert hit.headers["x-robota-cache"] == "HIT"
    with client.websocket_connect("/ai/ws", headers=AUTH) as ws:
        frames = ws_frames(ws, "r2", payload)
    assert len(vendors.requests) == 1
    expected = [as_frame("r2", *event) for event in sse_events(hit.content)]
    event_ids = [json.loads(f)["eventId"] for f in frames]
    assert event_ids == [str(n) for n in range(1, len(frames) + 1)]
    assert [without_request_id(f) for f in frames] == [without_request_id(f) for f in expected]
    assert json.loads(frames[-1])["data"]["message"]["metadata"]["cached"] is True


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_deliver_hands_the_events_to_a_sink_between_the_response_messages() -> None:
    """Start, one empty body before the first event (the access log's first byte), the
    events to the sink as kept (no SSE), the last body; a resume starts after its seq."""
    buffer = MemoryStreamBuffer(60)
    stream_id = "s_" + "a" * 32
    await buffer.open(stream_id, "u")
    entries = [Entry(1, "delta", '{"content":"hé"}'), Entry(2, "done", '{"finishReason":"stop"}')]
    for entry in entries:
        await buffer.append(stream_id, entry)

    async def run(after: int) -> tuple[list[Message], list[tuple[str, str, str]]]:
        messages: list[Message] = []
        handed: list[tuple[str, str, str]] = []

        async def send(message: Message) -> None:
            messages.append(message)

        async def receive() -> Message:
            await anyio.sleep_forever()
            raise AssertionError

        async def sink(name: str, event_id: str, data: str) -> None:
            handed.append((name, event_id, data))

        outcome = await deliver(buffer, stream_id, after, receive, send, sink=sink)
        assert outcome == "finished"
        return messages, handed

    with anyio.fail_after(10):  # a guard against a hang, not a timing assertion
        messages, handed = await run(0)
        resumed_messages, resumed = await run(1)
    assert [m["type"] for m in messages] == ["http.response.start"] + ["http.response.body"] * 2
    assert [(m["body"], m["more_body"]) for m in messages[1:]] == [(b"", True), (b"", False)]
    assert handed == [(e.event, f"{stream_id}:{e.seq}", e.data) for e in entries]
    assert resumed == handed[1:]
    assert len(resumed_messages) == 3
