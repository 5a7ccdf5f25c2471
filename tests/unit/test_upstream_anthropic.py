"""The Anthropic adapter against a scripted Messages API server on a real socket
(``vendor_stub``): request translation, response normalisation, SSE streaming, the
passthrough's headers and every failure mapped to the wire errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from robota_client.messages import (
    ChatRequest,
    DeltaEvent,
    ResponseMetadata,
    StreamAssembler,
    ToolCallEvent,
    Usage,
    UsageEvent,
)
from robota_proxy.errors import (
    InvalidRequest,
    NotFound,
    ProxyError,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from robota_proxy.upstreams.anthropic import AnthropicUpstream
from robota_proxy.upstreams.base import FinishEvent, UpstreamEvent
from robota_proxy.upstreams.errors import VendorServerError
from tests.unit.vendor_stub import CUT, STALL, Route, VendorStub, vendor_stub

pytestmark = pytest.mark.anyio

KEY = "test-anthropic-key-not-real-0123456789"
URL = "/v1/messages"
MODEL = "claude-sonnet-5"

WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
CLOCK = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


api = pytest.fixture(vendor_stub)


@pytest.fixture
async def upstream(api: VendorStub) -> AsyncIterator[AnthropicUpstream]:
    # A short socket-read limit, so that a vendor that stalls ends a test in a moment.
    adapter = AnthropicUpstream(api_key=KEY, base_url=api.url, timeout=0.5)
    yield adapter
    await adapter.aclose()


def chat_request(messages: list[dict[str, Any]] | None = None, **extra: Any) -> ChatRequest:
    return ChatRequest.model_validate(
        {
            "provider": "anthropic",
            "model": MODEL,
            "messages": messages or [{"role": "user", "content": "hi"}],
            **extra,
        }
    )


def sent_body(route: Route) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(route.calls.last.request.content)
    return body


def message(content: list[dict[str, Any]], stop: str = "end_turn", **usage: Any) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-5-20260115",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5, **usage},
    }


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def tool_use(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


def sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    return "".join(
        f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n" for name, data in events
    ).encode()


def message_start(**usage: Any) -> tuple[str, dict[str, Any]]:
    start = message([], stop="", **usage)
    start["stop_reason"] = None
    return ("message_start", {"message": start})


def block_start(index: int, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return ("content_block_start", {"index": index, "content_block": block})


def text_delta(index: int, text: str) -> tuple[str, dict[str, Any]]:
    return ("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": text}})


def json_delta(index: int, fragment: str) -> tuple[str, dict[str, Any]]:
    delta = {"type": "input_json_delta", "partial_json": fragment}
    return ("content_block_delta", {"index": index, "delta": delta})


def block_stop(index: int) -> tuple[str, dict[str, Any]]:
    return ("content_block_stop", {"index": index})


def message_delta(stop: str, output_tokens: int, **usage: Any) -> tuple[str, dict[str, Any]]:
    return (
        "message_delta",
        {
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens, **usage},
        },
    )


MESSAGE_STOP: tuple[str, dict[str, Any]] = ("message_stop", {})
PING: tuple[str, dict[str, Any]] = ("ping", {})
SSE_HEADERS = {"content-type": "text/event-stream"}
#: A stream that has started and sent the text "a" (and not ended).
STARTED_A = sse(message_start(), block_start(0, text_block("")), text_delta(0, "a"))


async def collect(stream: AsyncIterator[UpstreamEvent]) -> list[UpstreamEvent]:
    return [event async for event in stream]


async def events_until_error(
    stream: AsyncIterator[UpstreamEvent],
) -> tuple[list[UpstreamEvent], ProxyError]:
    events: list[UpstreamEvent] = []
    with pytest.raises(ProxyError) as caught:
        async for event in stream:
            events.append(event)
    return events, caught.value


# --- request translation -------------------------------------------------------------------


async def test_request_translation(upstream: AnthropicUpstream, api: VendorStub) -> None:
    route = api.post(URL).respond(200, json=message([text_block("ok")]))
    request = chat_request(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris"},
            {"role": "user", "content": "and the time?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "toolCalls": [
                    {
                        "id": "toolu_1",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {"id": "toolu_2", "function": {"name": "get_time", "arguments": ""}},
                ],
            },
            {"role": "tool", "toolCallId": "toolu_1", "content": "18C"},
            {"role": "tool", "toolCallId": "toolu_2", "content": "noon"},
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Thanks"},
        ],
        tools=[WEATHER, CLOCK],
        options={
            "temperature": 0.2,
            "topP": 0.9,
            "stop": ["END", "STOP"],
            "toolChoice": "get_weather",
        },
    )

    await upstream.chat(request)

    assert sent_body(route) == {
        "model": MODEL,
        "max_tokens": 4096,
        "system": "Be brief.\n\nAnswer in French.",
        "messages": [
            {
                "role": "user",
                "content": [text_block("Weather in Paris"), text_block("and the time?")],
            },
            {
                "role": "assistant",
                "content": [
                    text_block("Checking."),
                    tool_use("toolu_1", "get_weather", {"city": "Paris"}),
                    tool_use("toolu_2", "get_time", {}),
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "noon"},
                    text_block("Thanks"),
                ],
            },
        ],
        "tools": [
            {
                "name": "get_weather",
                "description": "Current weather for a city",
                "input_schema": WEATHER["parameters"],
            },
            {"name": "get_time", "input_schema": CLOCK["parameters"]},
        ],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "stop_sequences": ["END", "STOP"],
        "temperature": 0.2,
        "top_p": 0.9,
    }
    headers = route.calls.last.request.headers
    assert headers["x-api-key"] == KEY
    assert "authorization" not in headers
    # The version the official SDK (2.14) sends: leaving the SDK changed nothing here.
    assert headers["anthropic-version"] == "2026-10-21"
    assert "anthropic-beta" not in headers
    assert headers["content-type"] == "application/json"


async def test_minimal_request(upstream: AnthropicUpstream, api: VendorStub) -> None:
    route = api.post(URL).respond(200, json=message([text_block("ok")]))

    # JSON mode has no Anthropic equivalent and a tool choice needs tools: neither is sent.
    await upstream.chat(
        chat_request(options={"maxTokens": 64, "responseFormat": "json", "toolChoice": "auto"})
    )

    assert sent_body(route) == {
        "model": MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": [text_block("hi")]}],
    }


async def test_default_max_tokens_is_configurable(api: VendorStub) -> None:
    route = api.post(URL).respond(200, json=message([text_block("ok")]))
    upstream = AnthropicUpstream(api_key=KEY, base_url=api.url, default_max_tokens=1000)
    try:
        await upstream.chat(chat_request())
    finally:
        await upstream.aclose()

    assert sent_body(route)["max_tokens"] == 1000


@pytest.mark.parametrize(
    ("choice", "sent"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
    ],
)
async def test_tool_choice_mapping(
    upstream: AnthropicUpstream, api: VendorStub, choice: str, sent: dict[str, Any]
) -> None:
    route = api.post(URL).respond(200, json=message([text_block("ok")]))

    await upstream.chat(chat_request(tools=[WEATHER], options={"toolChoice": choice}))

    assert sent_body(route)["tool_choice"] == sent


@pytest.mark.parametrize("arguments", ['{"city": "Par', "[1, 2]"])
async def test_tool_arguments_must_be_a_json_object(
    upstream: AnthropicUpstream, api: VendorStub, arguments: str
) -> None:
    route = api.post(URL).respond(200, json=message([text_block("ok")]))
    request = chat_request(
        [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "toolCalls": [
                    {"id": "toolu_1", "function": {"name": "get_weather", "arguments": arguments}}
                ],
            },
            {"role": "tool", "toolCallId": "toolu_1", "content": "18C"},
        ],
        tools=[WEATHER],
    )

    with pytest.raises(InvalidRequest) as caught:
        await upstream.chat(request)
    with pytest.raises(InvalidRequest):
        await collect(upstream.stream(request))

    assert "toolu_1" in caught.value.message
    assert not route.called


async def test_stream_request_body(upstream: AnthropicUpstream, api: VendorStub) -> None:
    body = sse(message_start(), message_delta("end_turn", 1), MESSAGE_STOP)
    route = api.post(URL).respond(200, content=body, headers=SSE_HEADERS)

    await collect(upstream.stream(chat_request()))

    assert sent_body(route)["stream"] is True


# --- response normalisation ----------------------------------------------------------------


async def test_parallel_tool_calls_and_usage(upstream: AnthropicUpstream, api: VendorStub) -> None:
    api.post(URL).respond(
        200,
        json=message(
            [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                tool_use("toolu_a", "get_weather", {"city": "Paris"}),
                tool_use("toolu_b", "get_time", {}),
            ],
            stop="tool_use",
            input_tokens=20,
            output_tokens=40,
            cache_read_input_tokens=100,
            cache_creation_input_tokens=30,
        ),
    )

    answer = await upstream.chat(chat_request(tools=[WEATHER, CLOCK]))

    assert answer.content is None
    assert answer.tool_calls is not None
    assert [call.model_dump() for call in answer.tool_calls] == [
        {
            "id": "toolu_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        },
        {"id": "toolu_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    assert answer.usage == Usage(
        prompt_tokens=150,
        completion_tokens=40,
        total_tokens=190,
        cached_prompt_tokens=100,
        cache_write_tokens=30,
    )
    assert answer.metadata == ResponseMetadata(
        provider="anthropic", model="claude-sonnet-5-20260115", finish_reason="tool_calls"
    )


async def test_text_answer(upstream: AnthropicUpstream, api: VendorStub) -> None:
    api.post(URL).respond(200, json=message([text_block("Hello "), text_block("there")]))

    answer = await upstream.chat(chat_request())

    assert answer.content == "Hello there"
    assert answer.tool_calls is None
    assert answer.usage == Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15)
    assert answer.metadata.finish_reason == "stop"


@pytest.mark.parametrize(
    ("vendor", "wire"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
async def test_finish_reason_mapping(
    upstream: AnthropicUpstream, api: VendorStub, vendor: str, wire: str
) -> None:
    api.post(URL).respond(200, json=message([text_block("ok")], stop=vendor))

    answer = await upstream.chat(chat_request())

    assert answer.metadata.finish_reason == wire


async def test_models() -> None:
    listed = AnthropicUpstream(api_key=KEY, base_url="http://127.0.0.1:9", models=["claude-a"])
    open_ended = AnthropicUpstream(api_key=KEY)
    try:
        assert listed.models() == ["claude-a"]
        assert open_ended.models() is None
        assert listed.name == "anthropic"
    finally:
        await listed.aclose()
        await open_ended.aclose()


# --- streaming -----------------------------------------------------------------------------


async def test_stream_event_order(upstream: AnthropicUpstream, api: VendorStub) -> None:
    body = sse(
        message_start(input_tokens=25, output_tokens=1, cache_read_input_tokens=100),
        PING,
        block_start(0, text_block("")),
        text_delta(0, "Let me "),
        text_delta(0, "check."),
        block_stop(0),
        block_start(1, tool_use("toolu_a", "get_weather", {})),
        json_delta(1, ""),
        json_delta(1, '{"ci'),
        json_delta(1, 'ty": "Paris"}'),
        block_stop(1),
        block_start(2, tool_use("toolu_b", "get_time", {})),
        block_stop(2),
        message_delta("tool_use", 57),
        MESSAGE_STOP,
    )
    api.post(URL).respond(200, content=body, headers=SSE_HEADERS)

    events = await collect(upstream.stream(chat_request(tools=[WEATHER, CLOCK])))

    assert events == [
        DeltaEvent(content="Let me "),
        DeltaEvent(content="check."),
        ToolCallEvent(index=0, id="toolu_a", name="get_weather"),
        ToolCallEvent(index=0, arguments_delta='{"ci'),
        ToolCallEvent(index=0, arguments_delta='ty": "Paris"}'),
        ToolCallEvent(index=1, id="toolu_b", name="get_time"),
        ToolCallEvent(index=1, arguments_delta="{}"),
        UsageEvent(
            usage=Usage(
                prompt_tokens=125,
                completion_tokens=57,
                total_tokens=182,
                cached_prompt_tokens=100,
            )
        ),
        FinishEvent("tool_calls"),
    ]
    assembler = StreamAssembler()
    for event in events:
        if not isinstance(event, FinishEvent):
            assembler.add(event)
    calls = assembler.tool_calls()
    assert calls is not None
    assert [(call.id, call.parsed_arguments()) for call in calls] == [
        ("toolu_a", {"city": "Paris"}),
        ("toolu_b", {}),
    ]


async def test_stream_text_only(upstream: AnthropicUpstream, api: VendorStub) -> None:
    body = sse(
        message_start(input_tokens=5, output_tokens=1),
        block_start(0, text_block("")),
        text_delta(0, "Hi"),
        block_stop(0),
        message_delta("max_tokens", 3),
        MESSAGE_STOP,
    )
    api.post(URL).respond(200, content=body, headers=SSE_HEADERS)

    events = await collect(upstream.stream(chat_request()))

    assert events == [
        DeltaEvent(content="Hi"),
        UsageEvent(usage=Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8)),
        FinishEvent("length"),
    ]


async def test_stream_cut_before_message_stop_is_an_error(
    upstream: AnthropicUpstream, api: VendorStub
) -> None:
    body = sse(message_start(), block_start(0, text_block("")), text_delta(0, "Hel"))
    api.post(URL).respond(200, content=body, headers=SSE_HEADERS)

    events, error = await events_until_error(upstream.stream(chat_request()))

    assert events == [DeltaEvent(content="Hel")]
    assert type(error) is UpstreamError


async def test_closing_the_stream_early_closes_the_response(
    upstream: AnthropicUpstream, api: VendorStub
) -> None:
    route = api.post(URL).respond(200, parts=[STARTED_A, STALL], headers=SSE_HEADERS)

    stream = upstream.stream(chat_request())
    assert await anext(stream) == DeltaEvent(content="a")
    await stream.aclose()

    await wait_closed(route)


async def test_cancelling_the_consumer_closes_the_response(
    upstream: AnthropicUpstream, api: VendorStub
) -> None:
    route = api.post(URL).respond(200, parts=[STARTED_A, STALL], headers=SSE_HEADERS)
    received: list[UpstreamEvent] = []

    async def consume() -> None:
        async for event in upstream.stream(chat_request()):
            received.append(event)

    with anyio.move_on_after(0.2):
        await consume()

    assert received == [DeltaEvent(content="a")]
    await wait_closed(route)


async def wait_closed(route: Route) -> None:
    """Until the stub has seen the connection of its stalled answer closed; a test that
    never closes it fails here after 5 s."""
    with anyio.fail_after(5):
        await route.closed.wait()


# --- usage: every token kind, chat and stream ----------------------------------------------

#: Anthropic's counts are disjoint: 7 plain input + 1200 read from the cache + 800 written to
#: it. The contract's prompt tokens are all 2007, with the two cache kinds named inside.
CACHED_USAGE = {
    "input_tokens": 7,
    "cache_read_input_tokens": 1200,
    "cache_creation_input_tokens": 800,
    "cache_creation": {"ephemeral_5m_input_tokens": 800, "ephemeral_1h_input_tokens": 0},
}
CACHED_WIRE_USAGE = Usage(
    prompt_tokens=2007,
    completion_tokens=300,
    total_tokens=2307,
    cached_prompt_tokens=1200,
    cache_write_tokens=800,
    reasoning_tokens=120,
)


async def test_chat_usage_names_cache_reads_writes_and_thinking(
    upstream: AnthropicUpstream, api: VendorStub
) -> None:
    api.post(URL).respond(
        200,
        json=message(
            [text_block("ok")],
            output_tokens=300,
            output_tokens_details={"thinking_tokens": 120},
            **CACHED_USAGE,
        ),
    )

    answer = await upstream.chat(chat_request())

    assert answer.usage == CACHED_WIRE_USAGE
    assert answer.usage is not None
    assert answer.usage.to_wire() == {
        "promptTokens": 2007,
        "completionTokens": 300,
        "totalTokens": 2307,
        "cachedPromptTokens": 1200,
        "cacheWriteTokens": 800,
        "reasoningTokens": 120,
    }


async def test_chat_usage_without_cache_fields_has_no_cache_counts(
    upstream: AnthropicUpstream, api: VendorStub
) -> None:
    api.post(URL).respond(200, json=message([text_block("ok")], input_tokens=40))

    answer = await upstream.chat(chat_request())

    assert answer.usage is not None
    assert answer.usage.to_wire() == {"promptTokens": 40, "completionTokens": 5, "totalTokens": 45}


async def test_stream_usage_input_from_message_start_output_from_message_delta(
    upstream: AnthropicUpstream, api: VendorStub
) -> None:
    """The older stream shape: the cache counts only in ``message_start``, whose output
    count is a placeholder that ``message_delta`` replaces."""
    body = sse(
        message_start(output_tokens=1, **CACHED_USAGE),
        block_start(0, text_block("")),
        text_delta(0, "ok"),
        block_stop(0),
        message_delta("end_turn", 300, output_tokens_details={"thinking_tokens": 120}),
        MESSAGE_STOP,
    )
    api.post(URL).respond(200, content=body, headers=SSE_HEADERS)

    events = await collect(upstream.stream(chat_request()))

    assert events[-2:] == [UsageEvent(usage=CACHED_WIRE_USAGE), FinishEvent("stop")]


async def test_stream_usage_cumulative_counts_in_message_delta_win(
    upstream: AnthropicUpstream, api: VendorStub
) -> None:
    """The current stream shape: ``message_delta`` repeats every count, cumulatively; its
    numbers are the final ones even where they differ from ``message_start``'s."""
    body = sse(
        message_start(
            input_tokens=7,
            output_tokens=1,
            cache_read_input_tokens=0,
            cache_creation_input_tokens=0,
        ),
        block_start(0, text_block("")),
        text_delta(0, "ok"),
        block_stop(0),
        message_delta(
            "end_turn",
            300,
            input_tokens=7,
            cache_read_input_tokens=1200,
            cache_creation_input_tokens=800,
            output_tokens_details={"thinking_tokens": 120},
        ),
        MESSAGE_STOP,
    )
    api.post(URL).respond(200, content=body, headers=SSE_HEADERS)

    events = await collect(upstream.stream(chat_request()))

    assert events[-2:] == [UsageEvent(usage=CACHED_WIRE_USAGE), FinishEvent("stop")]


# --- errors --------------------------------------------------------------------------------


def error_body(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


async def test_unauthorized_never_echoes_the_key(
    upstream: AnthropicUpstream, api: VendorStub
) -> None:
    api.post(URL).respond(401, json=error_body(f"invalid x-api-key {KEY}", "authentication_error"))

    with pytest.raises(UpstreamError) as caught:
        await upstream.chat(chat_request())

    assert KEY not in caught.value.message
    assert "401" in caught.value.message


async def test_bad_request_passes_the_reason_on_redacted(
    upstream: AnthropicUpstream, api: VendorStub
) -> None:
    api.post(URL).respond(400, json=error_body(f"max_tokens: too large (key {KEY})"))

    with pytest.raises(InvalidRequest) as caught:
        await upstream.chat(chat_request())

    assert "max_tokens: too large" in caught.value.message
    assert KEY not in caught.value.message


async def test_rate_limit_carries_retry_after(upstream: AnthropicUpstream, api: VendorStub) -> None:
    api.post(URL).respond(
        429, json=error_body("slow down", "rate_limit_error"), headers={"retry-after": "12"}
    )

    with pytest.raises(RateLimited) as caught:
        await upstream.chat(chat_request())

    assert caught.value.retry_after == 12.0


@pytest.mark.parametrize(
    ("status", "kind", "error"),
    [
        (404, "not_found_error", NotFound),
        (500, "api_error", UpstreamError),
        (503, "api_error", UpstreamUnavailable),
        (529, "overloaded_error", UpstreamUnavailable),
    ],
)
async def test_status_mapping(
    upstream: AnthropicUpstream,
    api: VendorStub,
    status: int,
    kind: str,
    error: type[ProxyError],
) -> None:
    api.post(URL).respond(status, json=error_body("nope", kind))

    with pytest.raises(error):
        await upstream.chat(chat_request())
    with pytest.raises(error):
        await collect(upstream.stream(chat_request()))


async def test_timeout(upstream: AnthropicUpstream, api: VendorStub) -> None:
    # The vendor takes the request and answers after the adapter's 0.5 s read limit.
    api.post(URL).respond(200, json=message([text_block("late")]), delay=2)

    with pytest.raises(UpstreamTimeout):
        await upstream.chat(chat_request())
    with pytest.raises(UpstreamTimeout):
        await collect(upstream.stream(chat_request()))


async def test_connect_error(api: VendorStub) -> None:
    await api.stop()  # nothing listens on its port any more: the connection is refused
    upstream = AnthropicUpstream(api_key=KEY, base_url=api.url)
    try:
        with pytest.raises(UpstreamUnavailable):
            await upstream.chat(chat_request())
        with pytest.raises(UpstreamUnavailable):
            await collect(upstream.stream(chat_request()))
    finally:
        await upstream.aclose()


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("overloaded_error", UpstreamUnavailable),
        ("api_error", VendorServerError),
        ("rate_limit_error", RateLimited),
        ("something_new", UpstreamError),
    ],
)
async def test_error_event_mid_stream(
    upstream: AnthropicUpstream, api: VendorStub, kind: str, error: type[ProxyError]
) -> None:
    body = sse(
        message_start(),
        block_start(0, text_block("")),
        text_delta(0, "Hel"),
        ("error", error_body(f"trouble {KEY}", kind)),
    )
    api.post(URL).respond(200, content=body, headers=SSE_HEADERS)

    events, raised = await events_until_error(upstream.stream(chat_request()))

    assert events == [DeltaEvent(content="Hel")]
    assert type(raised) is error
    assert KEY not in raised.message


async def test_malformed_event_mid_stream(upstream: AnthropicUpstream, api: VendorStub) -> None:
    body = sse(message_start(), block_start(0, text_block("")), text_delta(0, "Hel"))
    body += b'event: content_block_delta\ndata: {"type": "content_block_delta", \n\n'
    api.post(URL).respond(200, content=body, headers=SSE_HEADERS)

    events, error = await events_until_error(upstream.stream(chat_request()))

    assert events == [DeltaEvent(content="Hel")]
    assert type(error) is UpstreamError


@pytest.mark.parametrize(
    ("failure", "error"),
    [(CUT, UpstreamError), (STALL, UpstreamTimeout)],
    ids=["connection cut", "read timed out"],
)
async def test_connection_failure_mid_stream(
    upstream: AnthropicUpstream,
    api: VendorStub,
    failure: object,
    error: type[ProxyError],
) -> None:
    route = api.post(URL).respond(
        200,
        parts=[sse(message_start(), block_start(0, text_block("")), text_delta(0, "Hel")), failure],
        headers=SSE_HEADERS,
    )

    events, raised = await events_until_error(upstream.stream(chat_request()))

    assert events == [DeltaEvent(content="Hel")]
    assert type(raised) is error
    if failure is STALL:
        await wait_closed(route)  # the stalled response is closed, not left to the pool


# --- passthrough (the Anthropic surface) ---------------------------------------------------


async def test_passthrough_sends_the_callers_json_and_headers(
    upstream: AnthropicUpstream, api: VendorStub
) -> None:
    answer = message(
        [{"type": "thinking", "thinking": "hmm", "signature": "sig"}, text_block("ok")]
    )
    route = api.post("/v1/messages/count_tokens").respond(200, json={"input_tokens": 12})
    messages_route = api.post(URL).respond(200, json=answer)
    body = {
        "model": MODEL,
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    }
    caller = {"anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking"}

    # The answer comes back as Anthropic sent it: thinking block and signature included.
    assert await upstream.passthrough(body, caller) == answer
    counted = await upstream.passthrough(body, {}, path="/v1/messages/count_tokens")

    assert counted == {"input_tokens": 12}
    assert sent_body(messages_route) == body
    sent = messages_route.calls.last.request.headers
    # The caller's version and beta replace the defaults, once each; the key is the proxy's.
    assert sent.getall("anthropic-version") == ["2023-06-01"]
    assert sent.getall("anthropic-beta") == ["interleaved-thinking"]
    assert sent["x-api-key"] == KEY
    assert route.calls.last.request.headers["anthropic-version"] == "2026-10-21"
    assert sent_body(route) == body


async def test_passthrough_stream_leaves_out_pings_and_passes_the_rest_as_sent(
    upstream: AnthropicUpstream, api: VendorStub
) -> None:
    events = (
        message_start(),
        PING,
        block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
        (
            "content_block_delta",
            {"index": 0, "delta": {"type": "signature_delta", "signature": "s"}},
        ),
        block_stop(0),
        message_delta("end_turn", 3),
        MESSAGE_STOP,
    )
    route = api.post(URL).respond(200, content=sse(*events), headers=SSE_HEADERS)
    body = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}

    received = [
        event async for event in upstream.passthrough_stream(body, {"anthropic-beta": "b1,b2"})
    ]

    assert received == [{"type": name, **data} for name, data in events if name != "ping"]
    assert sent_body(route) == {**body, "stream": True}
    headers = route.calls.last.request.headers
    assert headers["anthropic-beta"] == "b1,b2"
    assert headers["anthropic-version"] == "2026-10-21"
    assert headers["accept"] == "text/event-stream"


async def test_unknown_event_type_is_skipped(upstream: AnthropicUpstream, api: VendorStub) -> None:
    body = sse(
        message_start(input_tokens=5, output_tokens=1),
        ("something_new", {"index": 0, "delta": {"type": "text_delta", "text": "ignored"}}),
        block_start(0, text_block("")),
        ("content_block_delta", {"index": 0, "delta": {"type": "new_delta", "text": "no"}}),
        text_delta(0, "Hi"),
        block_stop(0),
        message_delta("end_turn", 3),
        MESSAGE_STOP,
    )
    api.post(URL).respond(200, content=body, headers=SSE_HEADERS)

    events = await collect(upstream.stream(chat_request()))

    assert events == [
        DeltaEvent(content="Hi"),
        UsageEvent(usage=Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8)),
        FinishEvent("stop"),
    ]
