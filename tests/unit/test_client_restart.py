"""The ``restart`` stream event: the proxy abandoned an answer midway and a fresh one follows
in the same stream. ``stream()`` hands the event over and keeps only the fresh answer;
``chat_stream()`` still joins to one clean answer (or raises ``StreamRestarted``); a resume
across a restart neither loses nor repeats anything. Against a tiny fake proxy over a real
socket, speaking both the SSE and the WebSocket wire."""

from __future__ import annotations

import pickle
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from robota_client import RemoteAIProvider, StreamRestarted, SyncRemoteAIProvider
from robota_client.messages import (
    AssistantMessage,
    DeltaEvent,
    DoneEvent,
    ResponseMetadata,
    RestartEvent,
    StreamAssembler,
    StreamEvent,
    ToolCallEvent,
    Usage,
    UsageEvent,
    parse_event,
)

KEY = "rk-restart-test-key-0123456789"
REASON = "upstream dropped mid-stream; fell back to another deployment"
USAGE = Usage(prompt_tokens=10, completion_tokens=3, total_tokens=13)


def done(content: str | None) -> DoneEvent:
    return DoneEvent(
        finish_reason="stop",
        message=AssistantMessage.model_construct(
            content=content, tool_calls=None, usage=None, metadata=ResponseMetadata()
        ),
    )


def answer(*pieces: str) -> list[StreamEvent]:
    """A whole fresh answer: its deltas, usage, done with the joined text."""
    return [
        *(DeltaEvent(content=p) for p in pieces),
        UsageEvent(usage=USAGE),
        done("".join(pieces)),
    ]


PARTIAL: list[StreamEvent] = [DeltaEvent(content="Hel"), DeltaEvent(content="lo wo")]
RESTART = RestartEvent(reason=REASON)

#: The stream the fake proxy sends, by the user's message.
SCENARIOS: dict[str, list[StreamEvent]] = {
    "same": [*PARTIAL, RESTART, *answer("Hello", " world!")],
    "diverge": [*PARTIAL, RESTART, *answer("Hi ", "there.")],
    "shorter": [*PARTIAL, RESTART, *answer("Hel")],
    "twice": [
        DeltaEvent(content="Hel"),
        RESTART,
        DeltaEvent(content="Hel"),
        DeltaEvent(content="lo"),
        RestartEvent(reason="second try"),
        *answer("Hello world!"),
    ],
    # The abandoned answer had begun a tool call and reported usage; the fresh one has
    # neither a tool call nor a message in ``done``: all from the fresh deltas.
    "tools": [
        DeltaEvent(content="Let me"),
        ToolCallEvent(index=0, id="call_old", name="weather", arguments_delta='{"ci'),
        UsageEvent(usage=Usage(prompt_tokens=10, completion_tokens=90, total_tokens=100)),
        RESTART,
        DeltaEvent(content="Hello world!"),
        UsageEvent(usage=USAGE),
        done(None),
    ],
}


class Dropped(Exception):
    """Raised by the fake proxy's SSE body: uvicorn then cuts the connection mid-stream."""


class FakeProxy:
    """``/ai/chat/stream`` (SSE, resumable), its resume route, and ``/ai/ws``.

    A user message ``break-after-N:<scenario>`` cuts the first SSE connection after event
    ``N``; the resume route sends the events after the ``Last-Event-ID`` it is given."""

    def __init__(self) -> None:
        self.last_event_ids: list[str | None] = []

    @staticmethod
    def scenario(body: dict[str, Any]) -> tuple[list[StreamEvent], int | None]:
        text = body["messages"][-1]["content"]
        cut, _, name = text.rpartition(":")
        return SCENARIOS[name], (int(cut.removeprefix("break-after-")) if cut else None)

    @staticmethod
    def sse(events: list[StreamEvent], first_id: int, cut: int | None) -> AsyncIterator[bytes]:
        async def body() -> AsyncIterator[bytes]:
            for n, event in enumerate(events, start=first_id):
                yield f"id: {n}\nevent: {event.type}\ndata: {event.to_json()}\n\n".encode()
                if n == cut:
                    raise Dropped

        return body()

    async def stream(self, request: Request) -> StreamingResponse:
        events, cut = self.scenario(await request.json())
        headers = {"x-request-id": "req-restart", "x-robota-stream-id": "s1"}
        return StreamingResponse(
            self.sse(events, 1, cut), media_type="text/event-stream", headers=headers
        )

    async def resume(self, request: Request) -> StreamingResponse:
        # The stream id is not looked up: every test's resumed stream is "same".
        last = request.headers.get("last-event-id")
        self.last_event_ids.append(last)
        after = int(last or 0)
        return StreamingResponse(
            self.sse(SCENARIOS["same"][after:], after + 1, None),
            media_type="text/event-stream",
            headers={"x-request-id": "req-restart"},
        )

    async def ws(self, websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            frame = await websocket.receive_json()
            if frame["type"] == "hello":
                await websocket.send_json({"type": "hello", "maxInFlight": 16})
            elif frame["type"] == "request":
                call = frame["id"]
                events, _ = self.scenario(frame["body"])
                for n, event in enumerate(events, start=1):
                    await websocket.send_json(
                        {
                            "id": call,
                            "event": event.type,
                            "eventId": f"{call}:{n}",
                            "data": event.to_wire(),
                        }
                    )

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/ai/chat/stream", self.stream, methods=["POST"]),
                Route("/ai/chat/stream/{stream_id}", self.resume, methods=["GET"]),
                WebSocketRoute("/ai/ws", self.ws),
            ]
        )


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, FakeProxy]]:
    proxy = FakeProxy()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(proxy.app(), log_level="critical", ws="websockets-sansio")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", proxy
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sse", "ws"])
async def ai(
    request: pytest.FixtureRequest, served: tuple[str, FakeProxy]
) -> AsyncIterator[RemoteAIProvider]:
    url, _ = served
    async with RemoteAIProvider(url, KEY, "openai", "m", transport=request.param) as provider:
        yield provider


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def chunks_until_error(ai: RemoteAIProvider, text: str) -> tuple[list[str], StreamRestarted]:
    chunks: list[str] = []
    with pytest.raises(StreamRestarted) as raised:
        async for chunk in ai.chat_stream(user(text)):
            chunks.append(chunk)
    return chunks, raised.value


# --- the contract ---------------------------------------------------------------------------


def test_restart_is_a_contract_event() -> None:
    event = parse_event("restart", '{"reason": "boom"}')
    assert event == RestartEvent(reason="boom")
    assert event.to_wire() == {"reason": "boom"}
    assert event.type == "restart"


def test_the_assembler_keeps_only_the_answer_after_the_last_restart() -> None:
    assembler = StreamAssembler()
    for event in SCENARIOS["tools"][:-1]:
        assembler.add(event)
    message = assembler.message(ResponseMetadata())
    assert message.content == "Hello world!"
    assert message.tool_calls is None
    assert message.usage == USAGE


def test_stream_restarted_survives_pickling() -> None:
    error = StreamRestarted("m", reason="r", delivered="Hel", request_id="req-1")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.message, copy.reason, copy.delivered, copy.request_id, copy.code) == (
        "m",
        "r",
        "Hel",
        "req-1",
        "stream_restarted",
    )


# --- stream(): the event is handed over, the state reset ------------------------------------


@pytest.mark.anyio
async def test_stream_yields_the_restart_and_keeps_only_the_fresh_answer(
    ai: RemoteAIProvider,
) -> None:
    async with ai.stream(user("same")) as stream:
        events = [event async for event in stream]
    assert [type(event) for event in events] == [
        DeltaEvent,
        DeltaEvent,
        RestartEvent,
        DeltaEvent,
        DeltaEvent,
        UsageEvent,
        DoneEvent,
    ]
    assert events[2] == RestartEvent(reason=REASON)
    assert stream.text == "Hello world!"
    assert stream.message.content == "Hello world!"
    assert stream.usage == USAGE
    assert (stream.restarts, stream.restart_reason) == (1, REASON)


@pytest.mark.anyio
async def test_text_before_the_restart_is_forgotten_at_once(ai: RemoteAIProvider) -> None:
    async with ai.stream(user("same")) as stream:
        seen = []
        async for _ in stream:
            seen.append(stream.text)
    assert seen == ["Hel", "Hello wo", "", "Hello", "Hello world!", "Hello world!", "Hello world!"]


@pytest.mark.anyio
async def test_tool_calls_and_usage_of_the_abandoned_answer_are_dropped(
    ai: RemoteAIProvider,
) -> None:
    message = await ai.stream(user("tools")).final_message()
    assert message.content == "Hello world!"
    assert message.tool_calls is None
    assert message.usage == USAGE


# --- chat_stream(): one clean answer --------------------------------------------------------


@pytest.mark.anyio
async def test_chat_stream_splices_a_fresh_answer_that_repeats_the_old(
    ai: RemoteAIProvider,
) -> None:
    chunks = [chunk async for chunk in ai.chat_stream(user("same"))]
    assert chunks == ["Hel", "lo wo", "rld!"]
    assert "".join(chunks) == "Hello world!"


@pytest.mark.anyio
async def test_chat_stream_splices_across_two_restarts(ai: RemoteAIProvider) -> None:
    chunks = [chunk async for chunk in ai.chat_stream(user("twice"))]
    assert chunks == ["Hel", "lo", " world!"]


@pytest.mark.anyio
async def test_a_diverging_fresh_answer_raises_before_any_of_it_is_yielded(
    ai: RemoteAIProvider,
) -> None:
    chunks, error = await chunks_until_error(ai, "diverge")
    assert chunks == ["Hel", "lo wo"]
    assert (error.reason, error.delivered, error.code) == (REASON, "Hello wo", "stream_restarted")
    assert error.message == (
        f"the proxy restarted the answer midway ({REASON}) and the new answer differs from "
        "the 8 characters already streamed, which cannot be taken back; use stream() to "
        "handle restarts, or make the call again"
    )


@pytest.mark.anyio
async def test_a_fresh_answer_shorter_than_the_text_yielded_raises_at_done(
    ai: RemoteAIProvider,
) -> None:
    chunks, error = await chunks_until_error(ai, "shorter")
    assert chunks == ["Hel", "lo wo"]
    assert error.message == (
        f"the proxy restarted the answer midway ({REASON}) and the new answer is shorter "
        "than the 8 characters already streamed, which cannot be taken back; use stream() "
        "to handle restarts, or make the call again"
    )


@pytest.mark.anyio
async def test_raw_restarts_yield_the_fresh_answer_as_it_comes(ai: RemoteAIProvider) -> None:
    stream = ai.chat_stream(user("diverge"), raw_restarts=True)
    chunks = [chunk async for chunk in stream]
    assert chunks == ["Hel", "lo wo", "Hi ", "there."]
    assert stream.stream.restarts == 1


# --- resume across a restart (SSE: Last-Event-ID) -------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("cut", [1, 3])
async def test_a_resume_around_the_restart_neither_loses_nor_repeats_it(
    served: tuple[str, FakeProxy], cut: int
) -> None:
    """Cut after the first delta (the restart comes in the resumed part) and right after the
    restart itself (the resume continues after its id)."""
    url, proxy = served
    proxy.last_event_ids.clear()
    async with RemoteAIProvider(url, KEY, "openai", "m") as ai:
        text = ai.chat_stream(user(f"break-after-{cut}:same"))
        assert [chunk async for chunk in text] == ["Hel", "lo wo", "rld!"]
        assert text.stream.restarts == 1
        assert text.stream.message.content == "Hello world!"
        stream = ai.stream(user(f"break-after-{cut}:same"))
        kinds = [event.type async for event in stream]
    assert kinds == ["delta", "delta", "restart", "delta", "delta", "usage", "done"]
    assert stream.text == "Hello world!"
    assert proxy.last_event_ids == [str(cut), str(cut)]


# --- the sync facade ------------------------------------------------------------------------


def test_sync_chat_stream_and_stream_behave_alike(served: tuple[str, FakeProxy]) -> None:
    url, _ = served
    with SyncRemoteAIProvider(url, KEY, "openai", "m") as ai:
        assert list(ai.chat_stream(user("same"))) == ["Hel", "lo wo", "rld!"]
        assert list(ai.chat_stream(user("diverge"), raw_restarts=True)) == [
            "Hel",
            "lo wo",
            "Hi ",
            "there.",
        ]
        chunks: list[str] = []
        with pytest.raises(StreamRestarted) as raised:
            chunks.extend(ai.chat_stream(user("diverge")))
        assert raised.value.reason == REASON
        with ai.stream(user("same")) as stream:
            message = stream.final_message()
            assert (message.content, stream.text, stream.restarts, stream.restart_reason) == (
                "Hello world!",
                "Hello world!",
                1,
                REASON,
            )
