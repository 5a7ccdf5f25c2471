"""The OpenAI adapter against a scripted Chat Completions server on a real socket
(``vendor_stub``): request translation, response normalisation, SSE streaming and every
failure mapped to the wire errors."""

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
from robota_proxy.upstreams import openai as openai_adapter
from robota_proxy.upstreams.base import FinishEvent, UpstreamEvent
from robota_proxy.upstreams.openai import OpenAIUpstream
from tests.unit.vendor_stub import CUT, STALL, Route, VendorStub, vendor_stub

pytestmark = pytest.mark.anyio

KEY = "sk-proj-TESTKEY0123456789abcdefghijklmnop"
URL = "/v1/chat/completions"
MODEL = "gpt-4o-mini"

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


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


api = pytest.fixture(vendor_stub)


@pytest.fixture
async def upstream(api: VendorStub) -> AsyncIterator[OpenAIUpstream]:
    # A short socket-read limit, so that a vendor that stalls ends a test in a moment.
    adapter = OpenAIUpstream(api_key=KEY, base_url=f"{api.url}/v1", name="local", timeout=0.5)
    yield adapter
    await adapter.aclose()


def chat_request(messages: list[dict[str, Any]] | None = None, **extra: Any) -> ChatRequest:
    return ChatRequest.model_validate(
        {
            "provider": "openai",
            "model": MODEL,
            "messages": messages or [{"role": "user", "content": "hi"}],
            **extra,
        }
    )


def sent_body(route: Route) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(route.calls.last.request.content)
    return body


def completion(message: dict[str, Any], finish: str = "stop", **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", **message},
                "finish_reason": finish,
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        **extra,
    }


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
    }


def usage_chunk(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }


def sse(*payloads: dict[str, Any], done: bool = True) -> bytes:
    events = [f"data: {json.dumps(payload)}\n\n" for payload in payloads]
    if done:
        events.append("data: [DONE]\n\n")
    return "".join(events).encode()


SSE_HEADERS = {"content-type": "text/event-stream"}


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


async def test_request_translation(upstream: OpenAIUpstream, api: VendorStub) -> None:
    route = api.post(URL).respond(200, json=completion({"content": "ok"}))
    request = chat_request(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?", "name": "alice"},
            {
                "role": "assistant",
                "content": None,
                "toolCalls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "toolCallId": "call_1", "content": "18C", "name": "get_weather"},
        ],
        tools=[WEATHER],
        options={
            "temperature": 0.2,
            "maxTokens": 100,
            "topP": 0.9,
            "stop": "END",
            "toolChoice": "get_weather",
            "responseFormat": "json",
        },
    )

    await upstream.chat(request)

    assert sent_body(route) == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?", "name": "alice"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        ],
        "tools": [{"type": "function", "function": WEATHER}],
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 100,
        "stop": ["END"],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_object"},
    }
    assert route.calls.last.request.headers["authorization"] == f"Bearer {KEY}"


async def test_official_api_gets_max_completion_tokens(
    api: VendorStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    route = api.post(URL).respond(200, json=completion({"content": "ok"}))
    # No base URL means OpenAI itself; its address is pointed at the stub.
    monkeypatch.setattr(openai_adapter, "OFFICIAL_BASE_URL", f"{api.url}/v1")
    upstream = OpenAIUpstream(api_key=KEY)
    try:
        await upstream.chat(chat_request(options={"maxTokens": 50}))
    finally:
        await upstream.aclose()

    body = sent_body(route)
    assert body["max_completion_tokens"] == 50
    assert "max_tokens" not in body


@pytest.mark.parametrize("choice", ["auto", "none", "required"])
async def test_tool_choice_keywords_pass_through(
    upstream: OpenAIUpstream, api: VendorStub, choice: str
) -> None:
    route = api.post(URL).respond(200, json=completion({"content": "ok"}))

    await upstream.chat(chat_request(tools=[WEATHER], options={"toolChoice": choice}))

    assert sent_body(route)["tool_choice"] == choice


async def test_minimal_request_sends_no_options(upstream: OpenAIUpstream, api: VendorStub) -> None:
    route = api.post(URL).respond(200, json=completion({"content": "ok"}))

    # A tool choice without tools would only earn a vendor 400, so it is not sent.
    await upstream.chat(chat_request(options={"toolChoice": "auto", "responseFormat": "text"}))

    assert sent_body(route) == {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


async def test_stream_asks_for_usage(upstream: OpenAIUpstream, api: VendorStub) -> None:
    route = api.post(URL).respond(
        200, content=sse(chunk({"content": "x"}, "stop")), headers=SSE_HEADERS
    )

    await collect(upstream.stream(chat_request()))

    body = sent_body(route)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


# --- response normalisation ----------------------------------------------------------------


async def test_parallel_tool_calls_and_usage_details(
    upstream: OpenAIUpstream, api: VendorStub
) -> None:
    api.post(URL).respond(
        200,
        json=completion(
            {
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": "{}"},
                    },
                ],
            },
            finish="tool_calls",
            usage={
                "prompt_tokens": 120,
                "completion_tokens": 40,
                "total_tokens": 160,
                "prompt_tokens_details": {"cached_tokens": 100},
                "completion_tokens_details": {"reasoning_tokens": 32},
            },
        ),
    )

    message = await upstream.chat(chat_request(tools=[WEATHER, CLOCK]))

    assert message.content is None
    assert message.tool_calls is not None
    assert [call.model_dump() for call in message.tool_calls] == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        },
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    assert message.usage == Usage(
        prompt_tokens=120,
        completion_tokens=40,
        total_tokens=160,
        cached_prompt_tokens=100,
        reasoning_tokens=32,
    )
    assert message.metadata == ResponseMetadata(
        provider="local", model="gpt-4o-mini-2024-07-18", finish_reason="tool_calls"
    )


async def test_text_answer(upstream: OpenAIUpstream, api: VendorStub) -> None:
    api.post(URL).respond(200, json=completion({"content": "Hello!"}))

    message = await upstream.chat(chat_request())

    assert message.content == "Hello!"
    assert message.tool_calls is None
    assert message.usage == Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15)
    assert message.metadata.finish_reason == "stop"


async def test_refusal_becomes_the_text(upstream: OpenAIUpstream, api: VendorStub) -> None:
    api.post(URL).respond(200, json=completion({"content": None, "refusal": "I can't help."}))

    message = await upstream.chat(chat_request())

    assert message.content == "I can't help."


async def test_requested_model_when_vendor_reports_none(
    upstream: OpenAIUpstream, api: VendorStub
) -> None:
    body = completion({"content": "ok"})
    body["model"] = ""
    api.post(URL).respond(200, json=body)

    message = await upstream.chat(chat_request())

    assert message.metadata.model == MODEL


@pytest.mark.parametrize(
    ("vendor", "wire"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("tool_calls", "tool_calls"),
        ("function_call", "tool_calls"),
        ("content_filter", "content_filter"),
        ("something_new", "stop"),
    ],
)
async def test_finish_reason_mapping(
    upstream: OpenAIUpstream, api: VendorStub, vendor: str, wire: str
) -> None:
    api.post(URL).respond(200, json=completion({"content": "ok"}, finish=vendor))

    message = await upstream.chat(chat_request())

    assert message.metadata.finish_reason == wire


async def test_models() -> None:
    listed = OpenAIUpstream(api_key=KEY, base_url="http://127.0.0.1:9/v1", models=["a", "b"])
    open_ended = OpenAIUpstream(api_key=KEY, base_url="http://127.0.0.1:9/v1")
    try:
        assert listed.models() == ["a", "b"]
        assert open_ended.models() is None
        assert listed.name == "openai"
    finally:
        await listed.aclose()
        await open_ended.aclose()


# --- streaming -----------------------------------------------------------------------------


async def test_stream_event_order(upstream: OpenAIUpstream, api: VendorStub) -> None:
    body = sse(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Let me "}),
        chunk({"content": "check."}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Paris"}'}}]}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": "{}"},
                    }
                ]
            }
        ),
        chunk({}, "tool_calls"),
        usage_chunk(30, 12, cached=8),
    )
    api.post(URL).respond(200, content=body, headers=SSE_HEADERS)

    events = await collect(upstream.stream(chat_request(tools=[WEATHER, CLOCK])))

    assert events == [
        DeltaEvent(content="Let me "),
        DeltaEvent(content="check."),
        ToolCallEvent(index=0, id="call_a", name="get_weather", arguments_delta=""),
        ToolCallEvent(index=0, arguments_delta='{"ci'),
        ToolCallEvent(index=0, arguments_delta='ty":"Paris"}'),
        ToolCallEvent(index=1, id="call_b", name="get_time", arguments_delta="{}"),
        UsageEvent(
            usage=Usage(
                prompt_tokens=30, completion_tokens=12, total_tokens=42, cached_prompt_tokens=8
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
    assert [call.parsed_arguments() for call in calls] == [{"city": "Paris"}, {}]


#: OpenAI's counts nest: the cached tokens are inside prompt_tokens, the reasoning tokens
#: inside completion_tokens, as in the contract. OpenAI reports no cache writes (they are
#: billed as plain input), so ``cache_write_tokens`` stays unknown.
OPENAI_USAGE = {
    "prompt_tokens": 2048,
    "completion_tokens": 700,
    "total_tokens": 2748,
    "prompt_tokens_details": {"cached_tokens": 1536, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 512, "audio_tokens": 0},
}
OPENAI_WIRE_USAGE = {
    "promptTokens": 2048,
    "completionTokens": 700,
    "totalTokens": 2748,
    "cachedPromptTokens": 1536,
    "reasoningTokens": 512,
}


async def test_chat_usage_cached_and_reasoning_tokens(
    upstream: OpenAIUpstream, api: VendorStub
) -> None:
    api.post(URL).respond(200, json=completion({"content": "ok"}, usage=OPENAI_USAGE))

    message = await upstream.chat(chat_request())

    assert message.usage is not None
    assert message.usage.to_wire() == OPENAI_WIRE_USAGE
    assert message.usage.cache_write_tokens is None


async def test_stream_usage_cached_and_reasoning_tokens(
    upstream: OpenAIUpstream, api: VendorStub
) -> None:
    body = sse(
        chunk({"content": "ok"}),
        chunk({}, "stop"),
        {**usage_chunk(0, 0), "usage": OPENAI_USAGE},
    )
    api.post(URL).respond(200, content=body, headers=SSE_HEADERS)

    events = await collect(upstream.stream(chat_request()))

    usage = events[-2]
    assert isinstance(usage, UsageEvent)
    assert usage.usage.to_wire() == OPENAI_WIRE_USAGE
    assert events[-1] == FinishEvent("stop")


async def test_stream_without_usage_ends_with_finish(
    upstream: OpenAIUpstream, api: VendorStub
) -> None:
    body = sse(chunk({"content": "Hi"}), chunk({}, "length"))
    api.post(URL).respond(200, content=body, headers=SSE_HEADERS)

    events = await collect(upstream.stream(chat_request()))

    assert events == [DeltaEvent(content="Hi"), FinishEvent("length")]


async def test_stream_repeated_ids_are_sent_once(upstream: OpenAIUpstream, api: VendorStub) -> None:
    # Some compatible servers repeat id and name on every piece of a call.
    piece = {"index": 0, "id": "call_a", "type": "function"}
    body = sse(
        chunk({"tool_calls": [{**piece, "function": {"name": "get_time", "arguments": "{"}}]}),
        chunk({"tool_calls": [{**piece, "function": {"name": "get_time", "arguments": "}"}}]}),
        chunk({}, "tool_calls"),
    )
    api.post(URL).respond(200, content=body, headers=SSE_HEADERS)

    events = await collect(upstream.stream(chat_request(tools=[CLOCK])))

    assert events[:2] == [
        ToolCallEvent(index=0, id="call_a", name="get_time", arguments_delta="{"),
        ToolCallEvent(index=0, arguments_delta="}"),
    ]


async def test_stream_cut_before_finish_is_an_error(
    upstream: OpenAIUpstream, api: VendorStub
) -> None:
    body = sse(chunk({"content": "Hel"}), done=False)
    api.post(URL).respond(200, content=body, headers=SSE_HEADERS)

    events, error = await events_until_error(upstream.stream(chat_request()))

    assert events == [DeltaEvent(content="Hel")]
    assert isinstance(error, UpstreamError)


async def test_closing_the_stream_early_closes_the_response(
    upstream: OpenAIUpstream, api: VendorStub
) -> None:
    route = api.post(URL).respond(
        200, parts=[sse(chunk({"content": "a"}), done=False), STALL], headers=SSE_HEADERS
    )

    stream = upstream.stream(chat_request())
    assert await anext(stream) == DeltaEvent(content="a")
    await stream.aclose()

    await wait_closed(route)


async def test_cancelling_the_consumer_closes_the_response(
    upstream: OpenAIUpstream, api: VendorStub
) -> None:
    route = api.post(URL).respond(
        200, parts=[sse(chunk({"content": "a"}), done=False), STALL], headers=SSE_HEADERS
    )
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


# --- errors --------------------------------------------------------------------------------


def error_body(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


async def test_unauthorized_never_echoes_the_key(upstream: OpenAIUpstream, api: VendorStub) -> None:
    api.post(URL).respond(401, json=error_body(f"Incorrect API key provided: {KEY}."))

    with pytest.raises(UpstreamError) as caught:
        await upstream.chat(chat_request())

    assert KEY not in caught.value.message
    assert KEY[:12] not in caught.value.message
    assert "401" in caught.value.message


async def test_bad_request_passes_the_reason_on_redacted(
    upstream: OpenAIUpstream, api: VendorStub
) -> None:
    api.post(URL).respond(400, json=error_body(f"Unsupported value 'temperature' for {KEY}"))

    with pytest.raises(InvalidRequest) as caught:
        await upstream.chat(chat_request())

    assert "Unsupported value 'temperature'" in caught.value.message
    assert KEY not in caught.value.message


async def test_rate_limit_carries_retry_after(upstream: OpenAIUpstream, api: VendorStub) -> None:
    api.post(URL).respond(429, json=error_body("slow down"), headers={"retry-after": "7"})

    with pytest.raises(RateLimited) as caught:
        await upstream.chat(chat_request())

    assert caught.value.retry_after == 7.0


@pytest.mark.parametrize(
    ("status", "error"),
    [(404, NotFound), (500, UpstreamError), (503, UpstreamUnavailable), (502, UpstreamUnavailable)],
)
async def test_status_mapping(
    upstream: OpenAIUpstream, api: VendorStub, status: int, error: type[ProxyError]
) -> None:
    api.post(URL).respond(status, json=error_body("nope", "server_error"))

    with pytest.raises(error):
        await upstream.chat(chat_request())


async def test_status_error_before_a_stream(upstream: OpenAIUpstream, api: VendorStub) -> None:
    api.post(URL).respond(429, json=error_body("slow down"), headers={"retry-after-ms": "1500"})

    with pytest.raises(RateLimited) as caught:
        await collect(upstream.stream(chat_request()))

    assert caught.value.retry_after == 1.5


async def test_timeout(upstream: OpenAIUpstream, api: VendorStub) -> None:
    # The vendor takes the request and answers after the adapter's 0.5 s read limit.
    api.post(URL).respond(200, json=completion({"content": "late"}), delay=2)

    with pytest.raises(UpstreamTimeout):
        await upstream.chat(chat_request())


async def test_connect_error(api: VendorStub) -> None:
    await api.stop()  # nothing listens on its port any more: the connection is refused
    upstream = OpenAIUpstream(api_key=KEY, base_url=f"{api.url}/v1")
    try:
        with pytest.raises(UpstreamUnavailable):
            await upstream.chat(chat_request())
        with pytest.raises(UpstreamUnavailable):
            await collect(upstream.stream(chat_request()))
    finally:
        await upstream.aclose()


async def test_malformed_body(upstream: OpenAIUpstream, api: VendorStub) -> None:
    api.post(URL).respond(200, json={"id": "x", "object": "chat.completion", "choices": []})

    with pytest.raises(UpstreamError):
        await upstream.chat(chat_request())


async def test_malformed_chunk_mid_stream(upstream: OpenAIUpstream, api: VendorStub) -> None:
    body = sse(chunk({"content": "Hel"}), done=False) + b'data: {"choices": [\n\n'
    api.post(URL).respond(200, content=body, headers=SSE_HEADERS)

    events, error = await events_until_error(upstream.stream(chat_request()))

    assert events == [DeltaEvent(content="Hel")]
    assert type(error) is UpstreamError


async def test_error_payload_mid_stream(upstream: OpenAIUpstream, api: VendorStub) -> None:
    body = sse(chunk({"content": "Hel"}), error_body(f"server exploded {KEY}"), done=False)
    api.post(URL).respond(200, content=body, headers=SSE_HEADERS)

    events, error = await events_until_error(upstream.stream(chat_request()))

    assert events == [DeltaEvent(content="Hel")]
    assert type(error) is UpstreamError
    assert KEY not in error.message


@pytest.mark.parametrize(
    ("failure", "error"),
    [(CUT, UpstreamError), (STALL, UpstreamTimeout)],
    ids=["connection cut", "read timed out"],
)
async def test_connection_failure_mid_stream(
    upstream: OpenAIUpstream,
    api: VendorStub,
    failure: object,
    error: type[ProxyError],
) -> None:
    api.post(URL).respond(
        200, parts=[sse(chunk({"content": "Hel"}), done=False), failure], headers=SSE_HEADERS
    )

    events, raised = await events_until_error(upstream.stream(chat_request()))

    assert events == [DeltaEvent(content="Hel")]
    assert type(raised) is error
