"""The Gemini adapter against a scripted Gemini REST server on a real socket
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
    StreamAssembler,
    ToolCallEvent,
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
from robota_proxy.upstreams.base import FinishEvent, UpstreamEvent
from robota_proxy.upstreams.errors import VendorServerError
from robota_proxy.upstreams.google import SKIP_SIGNATURE, GoogleUpstream
from tests.unit.vendor_stub import CUT, STALL, Route, VendorStub, vendor_stub

pytestmark = pytest.mark.anyio

KEY = "test-google-key-not-real-0123456789"
MODEL = "gemini-2.5-flash"
CHAT_URL = f"/v1beta/models/{MODEL}:generateContent"
STREAM_URL = f"/v1beta/models/{MODEL}:streamGenerateContent"

WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
CLOCK = {
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


api = pytest.fixture(vendor_stub)


@pytest.fixture
async def google(api: VendorStub) -> AsyncIterator[GoogleUpstream]:
    # A short socket-read limit, so that a vendor that stalls ends a test in a moment.
    upstream = GoogleUpstream(api_key=KEY, base_url=api.url, models=[MODEL], timeout=0.5)
    yield upstream
    await upstream.aclose()


def chat_request(messages: list[dict[str, Any]], **extra: Any) -> ChatRequest:
    return ChatRequest.model_validate(
        {"provider": "google", "model": MODEL, "messages": messages, **extra}
    )


def hello() -> ChatRequest:
    return chat_request([{"role": "user", "content": "hello"}])


def gemini_reply(parts: list[dict[str, Any]], finish: str = "STOP", **extra: Any) -> dict[str, Any]:
    return {
        "candidates": [
            {"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}
        ],
        "usageMetadata": {
            "promptTokenCount": 12,
            "candidatesTokenCount": 7,
            "thoughtsTokenCount": 30,
            "cachedContentTokenCount": 4,
            "totalTokenCount": 49,
        },
        "modelVersion": "gemini-2.5-flash-001",
        **extra,
    }


def sse_body(*chunks: dict[str, Any] | str) -> bytes:
    """Frames the way Gemini sends them: ``data: <json>`` separated by CRLF blank lines."""
    frames = [c if isinstance(c, str) else json.dumps(c) for c in chunks]
    return "".join(f"data: {frame}\r\n\r\n" for frame in frames).encode()


SSE_HEADERS = {"content-type": "text/event-stream"}


def sse_reply(route: Route, *parts: bytes | object) -> Route:
    """An event stream of ``parts`` (bytes, with ``CUT`` or ``STALL`` among them)."""
    return route.respond(200, parts=parts, headers=SSE_HEADERS)


async def collect(google: GoogleUpstream, request: ChatRequest) -> list[UpstreamEvent]:
    return [event async for event in google.stream(request)]


def sent_body(route: Route) -> Any:
    return json.loads(route.calls.last.request.content)


# --- request translation -------------------------------------------------------------------


async def test_request_translation(google: GoogleUpstream, api: VendorStub) -> None:
    route = api.post(CHAT_URL).respond(json=gemini_reply([{"text": "done"}]))
    request = chat_request(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "weather and time?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "toolCalls": [
                    {
                        "id": "call_a",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    },
                    {"id": "call_b", "function": {"name": "get_time", "arguments": ""}},
                ],
            },
            {"role": "tool", "toolCallId": "call_a", "content": '{"temp_c": 21}'},
            {"role": "tool", "toolCallId": "call_b", "content": "12:00"},
            {"role": "user", "content": "thanks"},
        ],
        tools=[WEATHER, CLOCK],
        options={
            "toolChoice": "get_time",
            "temperature": 0.2,
            "maxTokens": 64,
            "topP": 0.9,
            "stop": "END",
            "responseFormat": "json",
        },
    )
    await google.chat(request)

    sent = route.calls.last.request
    assert sent.headers["x-goog-api-key"] == KEY
    assert KEY not in sent.path and KEY not in str(sent.query)
    body = json.loads(sent.content)
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "weather and time?"}]},
        {
            "role": "model",
            "parts": [
                {"text": "Checking."},
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Oslo"}},
                    "thoughtSignature": SKIP_SIGNATURE,
                },
                {"functionCall": {"name": "get_time", "args": {}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}},
                {"functionResponse": {"name": "get_time", "response": {"result": "12:00"}}},
                {"text": "thanks"},
            ],
        },
    ]
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Current weather for a city",
                    "parametersJsonSchema": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                        "additionalProperties": False,
                    },
                },
                {
                    "name": "get_time",
                    "parametersJsonSchema": {
                        "type": "object",
                        "properties": {"tz": {"type": "string"}},
                    },
                },
            ]
        }
    ]
    assert body["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_time"]}
    }
    assert body["generationConfig"] == {
        "temperature": 0.2,
        "maxOutputTokens": 64,
        "topP": 0.9,
        "stopSequences": ["END"],
        "responseMimeType": "application/json",
    }


@pytest.mark.parametrize(
    ("choice", "mode"), [("auto", "AUTO"), ("none", "NONE"), ("required", "ANY")]
)
async def test_tool_choice_modes(
    google: GoogleUpstream, api: VendorStub, choice: str, mode: str
) -> None:
    route = api.post(CHAT_URL).respond(json=gemini_reply([{"text": "ok"}]))
    await google.chat(
        chat_request(
            [{"role": "user", "content": "hi"}], tools=[CLOCK], options={"toolChoice": choice}
        )
    )
    assert sent_body(route)["toolConfig"] == {"functionCallingConfig": {"mode": mode}}


async def test_plain_request_sends_only_contents(google: GoogleUpstream, api: VendorStub) -> None:
    route = api.post(CHAT_URL).respond(json=gemini_reply([{"text": "ok"}]))
    await google.chat(hello())
    assert sent_body(route) == {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}


async def test_resource_style_model_name(google: GoogleUpstream, api: VendorStub) -> None:
    route = api.post(CHAT_URL).respond(json=gemini_reply([{"text": "ok"}]))
    request = hello()
    request.model = f"models/{MODEL}"
    await google.chat(request)
    assert route.called


async def test_unknown_tool_call_id_is_invalid(google: GoogleUpstream, api: VendorStub) -> None:
    route = api.post(CHAT_URL).respond(json=gemini_reply([{"text": "ok"}]))
    request = chat_request(
        [
            {"role": "user", "content": "hi"},
            {"role": "tool", "toolCallId": "call_ghost", "content": "1"},
        ]
    )
    with pytest.raises(InvalidRequest, match="call_ghost"):
        await google.chat(request)
    with pytest.raises(InvalidRequest, match="call_ghost"):
        await collect(google, request)
    assert not route.called


async def test_invalid_tool_arguments_are_invalid(google: GoogleUpstream, api: VendorStub) -> None:
    route = api.post(CHAT_URL).respond(json=gemini_reply([{"text": "ok"}]))
    request = chat_request(
        [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "toolCalls": [{"id": "c1", "function": {"name": "f", "arguments": "{oops"}}],
            },
            {"role": "tool", "toolCallId": "c1", "content": "1"},
        ]
    )
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        await google.chat(request)
    assert not route.called


# --- response normalisation ----------------------------------------------------------------


async def test_parallel_function_calls_and_usage(google: GoogleUpstream, api: VendorStub) -> None:
    api.post(CHAT_URL).respond(
        json=gemini_reply(
            [
                {"text": "Let me think", "thought": True},
                {"text": "Looking "},
                {"text": "it up."},
                {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}},
                {"functionCall": {"name": "get_time", "args": {"tz": "CET"}, "id": "given-1"}},
            ]
        )
    )
    answer = await google.chat(hello())

    assert answer.content == "Looking it up."
    assert answer.tool_calls is not None
    first, second = answer.tool_calls
    assert first.function.name == "get_weather"
    assert json.loads(first.function.arguments) == {"city": "Oslo"}
    assert first.id.startswith("call_") and len(first.id) == len("call_") + 32
    assert second.id == "given-1"
    assert json.loads(second.function.arguments) == {"tz": "CET"}
    assert answer.metadata.finish_reason == "tool_calls"
    assert answer.metadata.provider == "google"
    assert answer.metadata.model == "gemini-2.5-flash-001"
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == 12
    assert answer.usage.completion_tokens == 37
    assert answer.usage.reasoning_tokens == 30
    assert answer.usage.cached_prompt_tokens == 4
    assert answer.usage.total_tokens == 49


async def test_generated_ids_differ_between_calls(google: GoogleUpstream, api: VendorStub) -> None:
    api.post(CHAT_URL).respond(json=gemini_reply([{"functionCall": {"name": "f", "args": {}}}] * 2))
    answer = await google.chat(hello())
    assert answer.tool_calls is not None
    assert len({call.id for call in answer.tool_calls}) == 2
    assert answer.content is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("IMAGE_SAFETY", "content_filter"),
        ("OTHER", "stop"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
    ],
)
async def test_finish_reasons(
    google: GoogleUpstream, api: VendorStub, raw: str, expected: str
) -> None:
    api.post(CHAT_URL).respond(json=gemini_reply([{"text": "x"}], finish=raw))
    answer = await google.chat(hello())
    assert answer.metadata.finish_reason == expected


async def test_blocked_prompt_is_content_filter(google: GoogleUpstream, api: VendorStub) -> None:
    api.post(CHAT_URL).respond(
        json={
            "promptFeedback": {"blockReason": "SAFETY"},
            "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5},
        }
    )
    answer = await google.chat(hello())
    assert answer.content == ""
    assert answer.tool_calls is None
    assert answer.metadata.finish_reason == "content_filter"
    assert answer.metadata.model == MODEL
    assert answer.usage is not None and answer.usage.total_tokens == 5


async def test_thought_signature_is_replayed(google: GoogleUpstream, api: VendorStub) -> None:
    route = api.post(CHAT_URL).respond(
        json=gemini_reply(
            [
                {"functionCall": {"name": "get_time", "args": {}}, "thoughtSignature": "c2ln"},
                {"functionCall": {"name": "get_weather", "args": {"city": "A"}}},
            ]
        )
    )
    first = await google.chat(hello())
    route.respond(json=gemini_reply([{"text": "ok"}]))
    assert first.tool_calls is not None
    history = [
        {"role": "user", "content": "hello"},
        first.to_message().to_wire(),
        *({"role": "tool", "toolCallId": call.id, "content": "{}"} for call in first.tool_calls),
    ]
    await google.chat(chat_request(history))
    model_turn = sent_body(route)["contents"][1]
    assert model_turn["parts"][0]["thoughtSignature"] == "c2ln"
    assert "thoughtSignature" not in model_turn["parts"][1]


@pytest.mark.parametrize("body", ["<html>proxy page</html>", "[1, 2]"], ids=["html", "array"])
async def test_non_object_success_body_is_an_upstream_error(
    google: GoogleUpstream, api: VendorStub, body: str
) -> None:
    api.post(CHAT_URL).respond(200, content=body)
    with pytest.raises(UpstreamError) as raised:
        await google.chat(hello())
    assert type(raised.value) is UpstreamError
    assert raised.value.message == "google sent a response the proxy could not read"


# --- streaming -----------------------------------------------------------------------------


STREAM_CHUNKS: list[dict[str, Any]] = [
    {
        "candidates": [
            {"content": {"role": "model", "parts": [{"text": "Thinking...", "thought": True}]}}
        ],
        "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
        "modelVersion": MODEL,
    },
    {
        "candidates": [{"content": {"role": "model", "parts": [{"text": "Hello"}]}}],
        "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 1, "totalTokenCount": 10},
    },
    {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {"text": " there."},
                        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
                    ],
                }
            }
        ]
    },
    {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [{"functionCall": {"name": "get_time", "args": {"tz": "CET"}}}],
                },
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 9,
            "candidatesTokenCount": 8,
            "thoughtsTokenCount": 3,
            "totalTokenCount": 20,
        },
    },
]


async def test_stream_events_in_order(google: GoogleUpstream, api: VendorStub) -> None:
    route = sse_reply(api.post(STREAM_URL), sse_body(*STREAM_CHUNKS))
    events = await collect(google, hello())

    sent = route.calls.last.request
    assert sent.query == {"alt": "sse"}
    assert sent.headers["x-goog-api-key"] == KEY
    assert sent.headers["accept"] == "text/event-stream"
    assert [type(event) for event in events] == [
        DeltaEvent,
        DeltaEvent,
        ToolCallEvent,
        ToolCallEvent,
        UsageEvent,
        FinishEvent,
    ]
    assert [e.content for e in events if isinstance(e, DeltaEvent)] == ["Hello", " there."]
    calls = [e for e in events if isinstance(e, ToolCallEvent)]
    assert [(c.index, c.name) for c in calls] == [(0, "get_weather"), (1, "get_time")]
    assert all(c.id and c.id.startswith("call_") for c in calls)
    assert json.loads(calls[0].arguments_delta) == {"city": "Rome"}
    usage = events[-2]
    assert isinstance(usage, UsageEvent)
    assert usage.usage.completion_tokens == 11
    assert usage.usage.reasoning_tokens == 3
    assert usage.usage.total_tokens == 20
    finish = events[-1]
    assert isinstance(finish, FinishEvent) and finish.finish_reason == "tool_calls"


async def test_stream_assembles_like_chat(google: GoogleUpstream, api: VendorStub) -> None:
    sse_reply(api.post(STREAM_URL), sse_body(*STREAM_CHUNKS))
    assembler = StreamAssembler()
    for event in await collect(google, hello()):
        if not isinstance(event, FinishEvent):
            assembler.add(event)
    calls = assembler.tool_calls()
    assert assembler.text == "Hello there."
    assert calls is not None
    assert [c.parsed_arguments() for c in calls] == [{"city": "Rome"}, {"tz": "CET"}]


#: Gemini's promptTokenCount includes the cached content; candidatesTokenCount leaves out
#: the thoughts, which are billed as output, so the contract's completion tokens add them.
GEMINI_USAGE = {
    "promptTokenCount": 3000,
    "cachedContentTokenCount": 2048,
    "candidatesTokenCount": 150,
    "thoughtsTokenCount": 450,
    "totalTokenCount": 3600,
}
GEMINI_WIRE_USAGE = {
    "promptTokens": 3000,
    "completionTokens": 600,
    "totalTokens": 3600,
    "cachedPromptTokens": 2048,
    "reasoningTokens": 450,
}


async def test_chat_usage_cached_and_thought_tokens(
    google: GoogleUpstream, api: VendorStub
) -> None:
    reply = gemini_reply([{"text": "ok"}])
    api.post(CHAT_URL).respond(json={**reply, "usageMetadata": GEMINI_USAGE})

    answer = await google.chat(hello())

    assert answer.usage is not None
    assert answer.usage.to_wire() == GEMINI_WIRE_USAGE
    assert answer.usage.cache_write_tokens is None


async def test_stream_usage_is_the_last_cumulative_report(
    google: GoogleUpstream, api: VendorStub
) -> None:
    early = {"promptTokenCount": 3000, "cachedContentTokenCount": 2048, "totalTokenCount": 3000}
    chunks = [
        {
            "candidates": [{"content": {"role": "model", "parts": [{"text": "o"}]}}],
            "usageMetadata": early,
        },
        {
            "candidates": [
                {"content": {"role": "model", "parts": [{"text": "k"}]}, "finishReason": "STOP"}
            ],
            "usageMetadata": GEMINI_USAGE,
        },
    ]
    sse_reply(api.post(STREAM_URL), sse_body(*chunks))

    events = await collect(google, hello())

    usage = events[-2]
    assert isinstance(usage, UsageEvent)
    assert usage.usage.to_wire() == GEMINI_WIRE_USAGE
    assert events[-1] == FinishEvent("stop")


async def test_stream_text_only_finishes_stop(google: GoogleUpstream, api: VendorStub) -> None:
    sse_reply(
        api.post(STREAM_URL),
        sse_body(
            {"candidates": [{"content": {"parts": [{"text": "a"}]}}]},
            {"candidates": [{"content": {"parts": [{"text": "b"}]}, "finishReason": "MAX_TOKENS"}]},
        ),
    )
    events = await collect(google, hello())
    assert [type(e) for e in events] == [DeltaEvent, DeltaEvent, FinishEvent]
    finish = events[-1]
    assert isinstance(finish, FinishEvent) and finish.finish_reason == "length"


async def test_stream_blocked_prompt(google: GoogleUpstream, api: VendorStub) -> None:
    sse_reply(
        api.post(STREAM_URL),
        sse_body(
            {
                "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                "usageMetadata": {"promptTokenCount": 3, "totalTokenCount": 3},
            }
        ),
    )
    events = await collect(google, hello())
    assert [type(e) for e in events] == [UsageEvent, FinishEvent]
    finish = events[-1]
    assert isinstance(finish, FinishEvent) and finish.finish_reason == "content_filter"


async def wait_closed(route: Route) -> None:
    """Until the stub has seen the connection of its stalled answer closed; a test that
    never closes it fails here after 5 s."""
    with anyio.fail_after(5):
        await route.closed.wait()


async def test_stopping_early_closes_the_response(google: GoogleUpstream, api: VendorStub) -> None:
    route = sse_reply(api.post(STREAM_URL), sse_body(*STREAM_CHUNKS[:2]), STALL)
    events = google.stream(hello())
    first = await anext(events)
    assert first == DeltaEvent(content="Hello")
    await events.aclose()
    await wait_closed(route)


async def test_cancelling_the_consumer_closes_the_response(
    google: GoogleUpstream, api: VendorStub
) -> None:
    route = sse_reply(api.post(STREAM_URL), sse_body(*STREAM_CHUNKS[:2]), STALL)
    received: list[UpstreamEvent] = []

    async def consume() -> None:
        async for event in google.stream(hello()):
            received.append(event)
            scope.cancel()

    with anyio.CancelScope() as scope:
        await consume()

    assert received == [DeltaEvent(content="Hello")]
    await wait_closed(route)


async def test_stream_cut_without_finish_reason_is_broken(
    google: GoogleUpstream, api: VendorStub
) -> None:
    sse_reply(api.post(STREAM_URL), sse_body(*STREAM_CHUNKS[:2]))
    received: list[UpstreamEvent] = []
    with pytest.raises(UpstreamError, match="malformed or truncated"):
        async for event in google.stream(hello()):
            received.append(event)
    assert [type(e) for e in received] == [DeltaEvent]


@pytest.mark.parametrize(
    ("failure", "error", "message"),
    [
        (CUT, UpstreamError, "google sent a malformed or truncated stream"),
        (STALL, UpstreamTimeout, "google did not answer in time"),
    ],
    ids=["connection cut", "read timed out"],
)
async def test_transport_failure_mid_stream(
    google: GoogleUpstream,
    api: VendorStub,
    failure: object,
    error: type[ProxyError],
    message: str,
) -> None:
    route = sse_reply(api.post(STREAM_URL), sse_body(STREAM_CHUNKS[1]), failure)
    received: list[UpstreamEvent] = []
    with pytest.raises(ProxyError) as raised:
        async for event in google.stream(hello()):
            received.append(event)
    assert received == [DeltaEvent(content="Hello")]
    assert type(raised.value) is error
    assert raised.value.message == message
    if failure is STALL:
        await wait_closed(route)  # the adapter hung up on the silent vendor


async def test_malformed_sse_data_is_skipped_and_logged_once(
    google: GoogleUpstream, api: VendorStub, caplog: pytest.LogCaptureFixture
) -> None:
    sse_reply(
        api.post(STREAM_URL), sse_body(STREAM_CHUNKS[1], "{not json", "[1, 2]", STREAM_CHUNKS[3])
    )
    received = await collect(google, hello())
    assert received[0] == DeltaEvent(content="Hello")
    assert [e.name for e in received if isinstance(e, ToolCallEvent) and e.name] == ["get_time"]
    assert received[-1] == FinishEvent("tool_calls")
    skipped = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert skipped == ["request -: skipped 2 malformed chunks in a stream from google"]


async def test_wrong_content_type_is_broken(google: GoogleUpstream, api: VendorStub) -> None:
    api.post(STREAM_URL).respond(200, json=gemini_reply([{"text": "x"}]))
    with pytest.raises(UpstreamError, match="malformed or truncated"):
        await collect(google, hello())


async def test_error_frame_mid_stream(google: GoogleUpstream, api: VendorStub) -> None:
    sse_reply(
        api.post(STREAM_URL),
        sse_body(
            STREAM_CHUNKS[1],
            {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}},
        ),
    )
    with pytest.raises(UpstreamUnavailable):
        await collect(google, hello())


# --- errors --------------------------------------------------------------------------------


def google_error(status: int, message: str, reason: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": status, "message": message, "status": "X"}
    if reason:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason}]
    return {"error": error}


async def fail(google: GoogleUpstream, streaming: bool) -> ProxyError:
    with pytest.raises(ProxyError) as raised:
        if streaming:
            await collect(google, hello())
        else:
            await google.chat(hello())
    return raised.value


def route_for(api: VendorStub, streaming: bool) -> Route:
    return api.post(STREAM_URL if streaming else CHAT_URL)


STREAMING = pytest.mark.parametrize("streaming", [False, True], ids=["chat", "stream"])


@STREAMING
async def test_401_never_echoes_the_key(
    google: GoogleUpstream, api: VendorStub, streaming: bool
) -> None:
    route_for(api, streaming).respond(401, json=google_error(401, f"bad key {KEY}"))
    error = await fail(google, streaming)
    assert type(error) is UpstreamError
    assert error.status == 502
    assert "credentials" in error.message
    assert KEY not in error.message and "bad key" not in error.message


@STREAMING
async def test_invalid_key_400_is_a_credentials_failure(
    google: GoogleUpstream, api: VendorStub, streaming: bool
) -> None:
    body = google_error(400, f"API key not valid: {KEY}", reason="API_KEY_INVALID")
    route_for(api, streaming).respond(400, json=body)
    error = await fail(google, streaming)
    assert type(error) is UpstreamError
    assert "credentials" in error.message
    assert KEY not in error.message


@STREAMING
async def test_400_passes_the_vendor_message_redacted(
    google: GoogleUpstream, api: VendorStub, streaming: bool
) -> None:
    body = google_error(400, f"Invalid JSON payload near {KEY}", reason="BAD_FIELD")
    route_for(api, streaming).respond(400, json=body)
    error = await fail(google, streaming)
    assert type(error) is InvalidRequest
    assert "Invalid JSON payload" in error.message
    assert KEY not in error.message


async def test_404_is_not_found(google: GoogleUpstream, api: VendorStub) -> None:
    api.post(CHAT_URL).respond(404, json=google_error(404, "models/x is not found"))
    error = await fail(google, streaming=False)
    assert type(error) is NotFound


@STREAMING
async def test_429_with_retry_after(
    google: GoogleUpstream, api: VendorStub, streaming: bool
) -> None:
    route_for(api, streaming).respond(
        429, json=google_error(429, "quota"), headers={"retry-after": "17"}
    )
    error = await fail(google, streaming)
    assert type(error) is RateLimited
    assert error.retry_after == 17


@STREAMING
async def test_429_with_retry_info_in_the_body(
    google: GoogleUpstream, api: VendorStub, streaming: bool
) -> None:
    body = google_error(429, "Resource has been exhausted")
    body["error"]["details"] = [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}
    ]
    route_for(api, streaming).respond(429, json=body)
    error = await fail(google, streaming)
    assert type(error) is RateLimited
    assert error.retry_after == 37


async def test_429_frame_mid_stream(google: GoogleUpstream, api: VendorStub) -> None:
    frame = google_error(429, "slow down")
    frame["error"]["details"] = [{"retryDelay": "1.5s"}]
    sse_reply(api.post(STREAM_URL), sse_body(STREAM_CHUNKS[1], frame))
    error = await fail(google, streaming=True)
    assert type(error) is RateLimited
    assert error.retry_after == 1.5


@STREAMING
@pytest.mark.parametrize(("status", "kind"), [(500, VendorServerError), (503, UpstreamUnavailable)])
async def test_server_errors(
    google: GoogleUpstream,
    api: VendorStub,
    streaming: bool,
    status: int,
    kind: type[ProxyError],
) -> None:
    route_for(api, streaming).respond(status, content="<html>oops</html>")
    error = await fail(google, streaming)
    assert type(error) is kind


@STREAMING
async def test_timeout(google: GoogleUpstream, api: VendorStub, streaming: bool) -> None:
    # The vendor takes the request and answers after the adapter's 0.5 s read limit.
    route_for(api, streaming).respond(200, json=gemini_reply([{"text": "late"}]), delay=2)
    error = await fail(google, streaming)
    assert type(error) is UpstreamTimeout


@STREAMING
async def test_connect_error(api: VendorStub, streaming: bool) -> None:
    await api.stop()  # nothing listens on its port any more: the connection is refused
    google = GoogleUpstream(api_key=KEY, base_url=api.url)
    try:
        error = await fail(google, streaming)
    finally:
        await google.aclose()
    assert type(error) is UpstreamUnavailable


# --- lifecycle -----------------------------------------------------------------------------


async def test_models_and_close() -> None:
    listed = GoogleUpstream(api_key=KEY, models=["a", "b"])
    open_ended = GoogleUpstream(api_key=KEY)
    assert listed.models() == ["a", "b"]
    assert open_ended.models() is None
    assert listed.name == "google"
    await listed.aclose()
    await open_ended.aclose()
