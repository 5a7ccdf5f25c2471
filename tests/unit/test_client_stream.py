"""Streaming: SSE decoding into typed events, the assembled message, and the rule that a
stream is resent only while the caller has seen nothing of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest
import respx

from robota_client import RemoteAIProvider
from robota_client.errors import (
    ProtocolError,
    RateLimitedError,
    RemoteConnectionError,
    UpstreamError,
    UpstreamTimeoutError,
)
from robota_client.messages import (
    AssistantMessage,
    DeltaEvent,
    DoneEvent,
    ResponseMetadata,
    ToolCallEvent,
    UsageEvent,
)
from tests.unit.test_client_support import (
    API_KEY,
    SSE_HEADERS,
    URL,
    BrokenBody,
    RecordingSleep,
    TrackedBody,
    error_event,
    sse,
    tool_stream_events,
)

STREAM = f"{URL}/ai/chat/stream"
MESSAGES = [{"role": "user", "content": "weather in Oslo?"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        yield router


@pytest.fixture
def ai() -> RemoteAIProvider:
    return RemoteAIProvider(URL, API_KEY, "openai", "gpt-4o-mini", sleep=RecordingSleep())


def ok(body: bytes | httpx.AsyncByteStream) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.Response(200, headers=SSE_HEADERS, content=body)
    return httpx.Response(200, headers=SSE_HEADERS, stream=body)


@pytest.mark.anyio
async def test_chat_stream_yields_only_text(mock: respx.MockRouter, ai: RemoteAIProvider) -> None:
    mock.post(STREAM).mock(return_value=ok(sse(tool_stream_events())))
    chunks = [chunk async for chunk in ai.chat_stream(MESSAGES)]
    assert chunks == ["Let me ", "check."]


@pytest.mark.anyio
async def test_stream_yields_typed_events_and_the_final_message(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    route = mock.post(STREAM).mock(return_value=ok(sse(tool_stream_events())))
    tools = [{"name": "weather", "parameters": {"type": "object"}}]
    async with ai.stream(MESSAGES, {"temperature": 0}, tools) as stream:
        kinds = [type(event) async for event in stream]
    assert kinds == [DeltaEvent, DeltaEvent, ToolCallEvent, ToolCallEvent, UsageEvent, DoneEvent]
    message = stream.message
    assert message.content == "Let me check."
    assert message.tool_calls is not None
    assert message.tool_calls[0].function.name == "weather"
    assert message.tool_calls[0].parsed_arguments() == {"city": "Oslo"}
    assert message.metadata.request_id == "req-stream"  # from X-Request-ID
    assert stream.usage is not None and stream.usage.total_tokens == 19
    request = route.calls.last.request
    assert request.headers["accept"] == "text/event-stream"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"


@pytest.mark.anyio
async def test_a_bare_done_is_completed_from_the_deltas(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    events = [event for event in tool_stream_events() if not isinstance(event, DoneEvent)]
    bare = DoneEvent(
        finish_reason="tool_calls",
        message=AssistantMessage.model_construct(
            content=None, tool_calls=None, usage=None, metadata=ResponseMetadata()
        ),
    )
    mock.post(STREAM).mock(return_value=ok(sse([*events, bare])))
    message = await ai.stream(MESSAGES).final_message()
    assert message.content == "Let me check."
    assert message.tool_calls is not None and message.tool_calls[0].id == "call_1"
    assert message.usage is not None and message.usage.total_tokens == 19
    assert message.metadata.finish_reason == "tool_calls"


@pytest.mark.anyio
async def test_message_before_the_end_is_an_error(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    mock.post(STREAM).mock(return_value=ok(sse(tool_stream_events())))
    async with ai.stream(MESSAGES) as stream:
        await anext(stream)
        with pytest.raises(RuntimeError, match="not finished"):
            _ = stream.message


@pytest.mark.anyio
async def test_unknown_event_types_are_skipped(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    body = b": keep-alive\n\nevent: ping\ndata: {}\n\n" + sse(tool_stream_events())
    mock.post(STREAM).mock(return_value=ok(body))
    assert [chunk async for chunk in ai.chat_stream(MESSAGES)] == ["Let me ", "check."]


@pytest.mark.anyio
async def test_error_event_raises_the_typed_error_without_resending(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    body = sse([DeltaEvent(content="Once upon"), error_event("rate_limited", retry_after=1)])
    route = mock.post(STREAM).mock(return_value=ok(body))
    received: list[str] = []
    with pytest.raises(RateLimitedError) as caught:
        async for chunk in ai.chat_stream(MESSAGES):
            received.append(chunk)
    assert received == ["Once upon"]
    assert route.call_count == 1
    assert (caught.value.status, caught.value.request_id) == (429, "req-err")


@pytest.mark.anyio
async def test_error_event_before_any_content_is_retried(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    route = mock.post(STREAM).mock(
        side_effect=[
            ok(sse([error_event("upstream_unavailable")])),
            ok(sse(tool_stream_events())),
        ]
    )
    assert [chunk async for chunk in ai.chat_stream(MESSAGES)] == ["Let me ", "check."]
    assert route.call_count == 2


@pytest.mark.anyio
async def test_non_retryable_error_event_first(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    route = mock.post(STREAM).mock(return_value=ok(sse([error_event("internal_error")])))
    with pytest.raises(Exception, match="internal_error"):
        await ai.stream(MESSAGES).final_message()
    assert route.call_count == 1


@pytest.mark.anyio
async def test_stream_cut_without_done_is_a_protocol_error(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    route = mock.post(STREAM).mock(return_value=ok(sse([DeltaEvent(content="Once")])))
    stream = ai.stream(MESSAGES)
    with pytest.raises(ProtocolError, match="ended early") as caught:
        async for _ in stream:
            pass
    assert caught.value.request_id == "req-stream"
    assert stream.text == "Once"
    assert route.call_count == 1


@pytest.mark.anyio
async def test_empty_stream_is_a_protocol_error(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    mock.post(STREAM).mock(return_value=ok(b""))
    with pytest.raises(ProtocolError):
        await ai.stream(MESSAGES).final_message()


@pytest.mark.anyio
async def test_no_resend_after_content_was_yielded(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    body = BrokenBody([sse([DeltaEvent(content="Once upon")])])
    route = mock.post(STREAM).mock(side_effect=[ok(body), ok(sse(tool_stream_events()))])
    received: list[str] = []
    with pytest.raises(RemoteConnectionError, match="mid-stream") as caught:
        async for chunk in ai.chat_stream(MESSAGES):
            received.append(chunk)
    assert received == ["Once upon"]
    assert route.call_count == 1
    assert caught.value.request_id == "req-stream"
    assert body.closed


@pytest.mark.anyio
async def test_connection_dropped_before_the_first_event_is_resent(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    route = mock.post(STREAM).mock(side_effect=[ok(BrokenBody()), ok(sse(tool_stream_events()))])
    assert [chunk async for chunk in ai.chat_stream(MESSAGES)] == ["Let me ", "check."]
    assert route.call_count == 2


@pytest.mark.anyio
async def test_status_errors_before_the_stream_are_retried_then_raised(
    mock: respx.MockRouter,
) -> None:
    failure = httpx.Response(
        504, json={"error": {"code": "upstream_timeout", "message": "slow", "requestId": "r"}}
    )
    route = mock.post(STREAM).mock(return_value=failure)
    sleep = RecordingSleep()
    ai = RemoteAIProvider(URL, API_KEY, "openai", "m", max_retries=2, sleep=sleep)
    with pytest.raises(UpstreamTimeoutError):
        await ai.stream(MESSAGES).final_message()
    assert route.call_count == 3
    assert len(sleep.waits) == 2


@pytest.mark.anyio
async def test_an_answer_that_is_not_an_event_stream(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    mock.post(STREAM).mock(return_value=httpx.Response(200, json={"content": "hi"}))
    with pytest.raises(ProtocolError, match="text/event-stream"):
        await ai.stream(MESSAGES).final_message()


@pytest.mark.anyio
async def test_unparsable_event_is_a_protocol_error(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    body = sse([DeltaEvent(content="a")]) + b"id: 2\nevent: delta\ndata: {not json\n\n"
    mock.post(STREAM).mock(return_value=ok(body))
    with pytest.raises(ProtocolError, match="unreadable 'delta' event"):
        await ai.stream(MESSAGES).final_message()


@pytest.mark.anyio
async def test_leaving_a_stream_early_closes_the_response(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    body = TrackedBody([sse(tool_stream_events())])
    mock.post(STREAM).mock(return_value=ok(body))
    async with ai.chat_stream(MESSAGES) as chunks:
        assert await anext(chunks) == "Let me "
        assert not body.closed
    assert body.closed
    with pytest.raises(StopAsyncIteration):
        await anext(chunks)


@pytest.mark.anyio
async def test_a_finished_stream_closes_itself(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    body = TrackedBody([sse(tool_stream_events())])
    mock.post(STREAM).mock(return_value=ok(body))
    await ai.stream(MESSAGES).final_message()
    assert body.closed


@pytest.mark.anyio
async def test_a_key_echoed_in_an_error_event_is_redacted(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    body = sse([DeltaEvent(content="a"), error_event("upstream_error", f"vendor saw {API_KEY}")])
    mock.post(STREAM).mock(return_value=ok(body))
    with pytest.raises(UpstreamError) as caught:
        await ai.stream(MESSAGES).final_message()
    assert API_KEY not in str(caught.value)
    assert "[redacted]" in str(caught.value)


@pytest.mark.anyio
async def test_cancelling_a_stream_releases_the_connection(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    body = StalledBody(sse([DeltaEvent(content="first")]))
    mock.post(STREAM).mock(return_value=ok(body))
    received: list[str] = []
    with anyio.move_on_after(0.1):
        async for chunk in ai.chat_stream(MESSAGES):
            received.append(chunk)
    assert received == ["first"]
    assert body.closed


class StalledBody(httpx.AsyncByteStream):
    """One chunk, then a server that goes quiet."""

    def __init__(self, chunk: bytes) -> None:
        self.chunk = chunk
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.chunk
        await anyio.sleep_forever()

    async def aclose(self) -> None:
        self.closed = True
