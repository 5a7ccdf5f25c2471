"""``SyncRemoteAIProvider`` against a tiny Starlette app speaking the wire protocol, mounted
in-process through ``httpx.ASGITransport``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import respx
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from robota_client import SyncRemoteAIProvider
from robota_client.errors import ProtocolError, UnauthenticatedError
from robota_client.messages import ChatRequest, DeltaEvent, DoneEvent
from tests.unit.test_client_support import (
    API_KEY,
    SSE_HEADERS,
    TrackedBody,
    sse,
    tool_stream_events,
)

URL = "http://proxy.local"


def authorised(request: Request) -> bool:
    return request.headers.get("authorization") == f"Bearer {API_KEY}"


def unauthenticated() -> Response:
    return JSONResponse(
        {"error": {"code": "unauthenticated", "message": "unknown key", "requestId": "r-1"}},
        status_code=401,
    )


async def chat(request: Request) -> Response:
    if not authorised(request):
        return unauthenticated()
    body = ChatRequest.model_validate(await request.json())
    text = body.messages[-1].content or ""
    return JSONResponse(
        {"role": "assistant", "content": f"echo: {text}", "metadata": {"model": body.model}},
        headers={"X-Request-ID": "r-chat"},
    )


async def chat_stream(request: Request) -> Response:
    if not authorised(request):
        return unauthenticated()
    body = ChatRequest.model_validate(await request.json())
    events = tool_stream_events()
    if body.messages[-1].content == "cut":
        events = [DeltaEvent(content="partial")]

    async def frames() -> AsyncIterator[bytes]:
        for event in events:
            yield sse([event])

    return StreamingResponse(frames(), media_type="text/event-stream")


async def models(request: Request) -> Response:
    return JSONResponse({"providers": {"mock": {"models": None}}})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


APP = Starlette(
    routes=[
        Route("/ai/chat", chat, methods=["POST"]),
        Route("/ai/chat/stream", chat_stream, methods=["POST"]),
        Route("/ai/models", models),
        Route("/health", health),
    ]
)


def in_process_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=APP))


@pytest.fixture
def ai() -> Iterator[SyncRemoteAIProvider]:
    with SyncRemoteAIProvider(
        URL, API_KEY, "mock", "mock-1", http_client=in_process_client()
    ) as provider:
        yield provider


def test_chat(ai: SyncRemoteAIProvider) -> None:
    reply = ai.chat([{"role": "user", "content": "hello"}], {"temperature": 0})
    assert reply.content == "echo: hello"
    assert reply.metadata.request_id == "r-chat"


def test_chat_stream_is_a_plain_iterator(ai: SyncRemoteAIProvider) -> None:
    assert list(ai.chat_stream([{"role": "user", "content": "go"}])) == ["Let me ", "check."]


def test_stream_events_and_message(ai: SyncRemoteAIProvider) -> None:
    with ai.stream([{"role": "user", "content": "go"}]) as stream:
        events = list(stream)
    assert isinstance(events[-1], DoneEvent)
    assert stream.message.tool_calls is not None
    assert stream.message.tool_calls[0].parsed_arguments() == {"city": "Oslo"}
    assert stream.usage is not None and stream.usage.total_tokens == 19


def test_stream_cut_raises_protocol_error(ai: SyncRemoteAIProvider) -> None:
    stream = ai.stream([{"role": "user", "content": "cut"}])
    with pytest.raises(ProtocolError):
        stream.final_message()
    assert stream.text == "partial"


def test_models_and_health(ai: SyncRemoteAIProvider) -> None:
    assert ai.models() == {"mock": None}
    assert ai.health() is True


def test_typed_errors_cross_the_portal() -> None:
    with SyncRemoteAIProvider(URL, "wrong-key", "mock", "m", http_client=in_process_client()) as ai:
        with pytest.raises(UnauthenticatedError) as caught:
            ai.chat([{"role": "user", "content": "hi"}])
        with pytest.raises(UnauthenticatedError):
            list(ai.chat_stream([{"role": "user", "content": "hi"}]))
    assert caught.value.request_id == "r-1"


def test_works_where_an_event_loop_is_already_running() -> None:
    # What a Jupyter cell is: synchronous code on a thread whose event loop is running.
    async def notebook_cell() -> str | None:
        with SyncRemoteAIProvider(URL, API_KEY, "mock", "m", http_client=in_process_client()) as ai:
            return ai.chat([{"role": "user", "content": "from a notebook"}]).content

    assert asyncio.run(notebook_cell()) == "echo: from a notebook"


def test_close_stops_the_portal_thread_and_is_idempotent() -> None:
    before = threading.active_count()
    ai = SyncRemoteAIProvider(URL, API_KEY, "mock", "m", http_client=in_process_client())
    assert threading.active_count() == before + 1
    ai.close()
    ai.close()
    assert threading.active_count() == before
    with pytest.raises(RuntimeError, match="closed"):
        ai.chat([{"role": "user", "content": "hi"}])


def test_invalid_input_raises_in_the_caller(ai: SyncRemoteAIProvider) -> None:
    with pytest.raises(ValidationError):
        ai.chat([{"role": "tool", "content": "no id"}])
    with pytest.raises(ValidationError):
        ai.stream([])


def test_api_key_is_not_in_repr(ai: SyncRemoteAIProvider) -> None:
    assert API_KEY not in repr(ai)


def test_leaving_a_stream_early(ai: SyncRemoteAIProvider) -> None:
    with ai.chat_stream([{"role": "user", "content": "go"}]) as chunks:
        assert next(chunks) == "Let me "
    assert list(chunks) == []
    assert ai.chat([{"role": "user", "content": "still usable"}]).content == "echo: still usable"


def test_breaking_out_of_a_loop_releases_the_connection() -> None:
    body = TrackedBody([sse(tool_stream_events())])
    with respx.mock() as mock:
        mock.post(f"{URL}/ai/chat/stream").mock(
            return_value=httpx.Response(200, headers=SSE_HEADERS, stream=body)
        )
        with SyncRemoteAIProvider(URL, API_KEY, "mock", "m") as ai:
            for chunk in ai.chat_stream([{"role": "user", "content": "go"}]):
                assert chunk == "Let me "
                break
            assert body.closed
