"""Helpers shared by the client tests (no tests here): SSE bodies, a recording sleep, and
HTTP bodies that fail part way, as a dropped connection does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import httpx

from robota_client.messages import (
    AssistantMessage,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    FunctionCall,
    ResponseMetadata,
    StreamEvent,
    ToolCall,
    ToolCallEvent,
    Usage,
    UsageEvent,
)

URL = "http://proxy.test"
API_KEY = "rk-secret-client-key-0123456789"
SSE_HEADERS = {"content-type": "text/event-stream", "x-request-id": "req-stream"}


def sse(events: Sequence[StreamEvent], *, start_id: int = 1) -> bytes:
    """Frames exactly as the proxy writes them."""
    return b"".join(
        f"id: {start_id + i}\nevent: {event.type}\ndata: {event.to_json()}\n\n".encode()
        for i, event in enumerate(events)
    )


def tool_stream_events() -> list[StreamEvent]:
    """Text, one tool call in two pieces, usage, done: a whole tool-calling answer."""
    usage = Usage(prompt_tokens=12, completion_tokens=7, total_tokens=19)
    call = ToolCall(id="call_1", function=FunctionCall(name="weather", arguments='{"city":"Oslo"}'))
    return [
        DeltaEvent(content="Let me "),
        DeltaEvent(content="check."),
        ToolCallEvent(index=0, id="call_1", name="weather", arguments_delta='{"city":'),
        ToolCallEvent(index=0, arguments_delta='"Oslo"}'),
        UsageEvent(usage=usage),
        DoneEvent(
            finish_reason="tool_calls",
            message=AssistantMessage(
                content="Let me check.",
                tool_calls=[call],
                usage=usage,
                metadata=ResponseMetadata(
                    provider="openai", model="gpt-4o-mini", finish_reason="tool_calls"
                ),
            ),
        ),
    ]


def error_event(code: str, message: str = "boom", retry_after: float | None = None) -> ErrorEvent:
    return ErrorEvent(code=code, message=message, retry_after=retry_after, request_id="req-err")


class RecordingSleep:
    """Stands in for ``anyio.sleep``: records each back-off instead of waiting it out."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


class BrokenBody(httpx.AsyncByteStream):
    """Sends ``chunks`` and then fails like a connection reset; records whether it was closed."""

    def __init__(self, chunks: Sequence[bytes] = (), error: Exception | None = None) -> None:
        self.chunks = list(chunks)
        self.error = error or httpx.ReadError("connection reset by peer")
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        raise self.error

    async def aclose(self) -> None:
        self.closed = True


class TrackedBody(httpx.AsyncByteStream):
    """A body that completes normally; records whether it was closed."""

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self.chunks = list(chunks)
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk

    async def aclose(self) -> None:
        self.closed = True
