"""The OpenAI dialect alone: body -> ChatRequest (errors naming the OpenAI field), answers and
stream events -> OpenAI's JSON and chunks, errors -> OpenAI's error shape; and the model
router every surface shares."""

from __future__ import annotations

import json
from typing import Any

import pytest

from robota_client.messages import (
    AssistantMessage,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    FunctionCall,
    ResponseMetadata,
    ToolCall,
    ToolCallEvent,
    Usage,
    UsageEvent,
)
from robota_proxy.dialects import RoutedModel, dialect_of_path, feature_of, syntactic_router
from robota_proxy.dialects import openai as dialect
from robota_proxy.errors import BudgetExceeded, InvalidRequest, RateLimited, UpstreamError
from robota_proxy.upstreams.registry import route_model


def body(**fields: Any) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def to_anthropic(name: str, vendor: str) -> RoutedModel:
    return RoutedModel("anthropic", name, native=False)


def refused(raw: bytes, router: Any = to_anthropic) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        dialect.parse(raw, router)
    return caught.value


def test_translates_every_supported_field() -> None:
    parsed = dialect.parse(
        body(
            model="claude-x",
            messages=[
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "done"},
            ],
            tools=[
                {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
            ],
            tool_choice={"type": "function", "function": {"name": "f"}},
            temperature=0.5,
            top_p=0.9,
            max_completion_tokens=77,
            stop="END",
            stream=True,
            user="u",
            metadata={"k": "v"},
        ),
        to_anthropic,
    )
    request = parsed.request
    assert (request.provider, request.model) == ("anthropic", "claude-x")
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "tool"]
    assert request.messages[1].content == "a\nb"
    assert request.messages[2].tool_calls == [ToolCall(id="c1", function=FunctionCall(name="f"))]
    assert request.messages[3].tool_call_id == "c1"
    assert request.tools is not None and request.tools[0].name == "f"
    options = request.options
    assert (options.temperature, options.top_p, options.max_tokens) == (0.5, 0.9, 77)
    assert (options.stop, options.tool_choice) == (["END"], "f")
    assert parsed.streamed is True and parsed.native is False
    assert parsed.raw is not None and parsed.raw["user"] == "u"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"seed": 3}, "seed"),
        ({"logprobs": True}, "logprobs"),
        ({"n": 3}, "n"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {}}},
            "response_format.json_schema",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content.0",
        ),
        ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]},
            "messages.0.audio",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "strict": True}}]},
            "tools.0.function.strict",
        ),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"tool_choice": "g"}, "tool_choice"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(
    fields: dict[str, Any], param: str
) -> None:
    error = refused(body(model="m", **fields))
    assert error.param == param
    assert error.message.startswith(f"{param}: ")


def test_a_native_target_takes_everything_as_sent() -> None:
    raw = body(
        model="gpt-4o",
        seed=3,
        logprobs=True,
        future_field={"x": 1},
        response_format={"type": "json_schema", "json_schema": {"name": "s"}},
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "see"},
                    {"type": "image_url", "image_url": {"url": "u"}},
                ],
            }
        ],
    )
    parsed = dialect.parse(raw, syntactic_router)
    assert parsed.native is True
    assert parsed.raw == json.loads(raw)
    assert parsed.request.messages[0].content == "see"
    assert parsed.request.options.response_format == "json"


def test_model_is_required() -> None:
    assert refused(body()).param == "model"
    assert refused(b"[]").message == "the request body must be a JSON object"


def test_completion_and_usage_shape() -> None:
    message = AssistantMessage(
        content=None,
        tool_calls=[ToolCall(id="c1", function=FunctionCall(name="f", arguments='{"a":1}'))],
        usage=Usage(
            prompt_tokens=10,
            completion_tokens=5,
            total_tokens=15,
            cached_prompt_tokens=4,
            reasoning_tokens=2,
        ),
        metadata=ResponseMetadata(finish_reason="tool_calls"),
    )
    answer = dialect.completion(message, model="anthropic/x", request_id="req_abc")
    assert answer["id"] == "chatcmpl-abc"
    assert answer["model"] == "anthropic/x"
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    assert answer["choices"][0]["message"]["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    ]
    assert answer["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 2},
    }


def frames(data: bytes) -> list[Any]:
    out = []
    for block in data.decode().split("\n\n"):
        if block:
            payload = block.removeprefix("data: ")
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_chunk_writer_orders_usage_after_finish_then_done() -> None:
    writer = dialect.ChunkWriter(request_id="req_1", model="m", include_usage=True)
    data = writer.start()
    data += writer.event(DeltaEvent(content="Hi"))
    data += writer.event(ToolCallEvent(index=0, id="c", name="f", arguments_delta='{"a"'))
    data += writer.event(ToolCallEvent(index=0, arguments_delta=":1}"))
    assert (
        writer.event(UsageEvent(usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)))
        == b""
    )
    data += writer.event(
        DoneEvent(finish_reason="tool_calls", message=AssistantMessage(content="Hi"))
    )
    chunks = frames(data)
    deltas = [c["choices"][0]["delta"] for c in chunks[:-2] if c != "[DONE]"]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Hi"},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "c",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"a"'},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]},
        {},
    ]
    assert chunks[4]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(c["usage"] is None for c in chunks[:5])
    assert chunks[5]["choices"] == [] and chunks[5]["usage"]["total_tokens"] == 3
    assert chunks[6] == "[DONE]"


def test_chunk_writer_without_include_usage_sends_no_usage() -> None:
    writer = dialect.ChunkWriter(request_id="req_1", model="m", include_usage=False)
    writer.event(UsageEvent(usage=Usage(total_tokens=3)))
    chunks = frames(writer.event(DoneEvent(finish_reason="stop", message=AssistantMessage())))
    assert len(chunks) == 2 and "usage" not in chunks[0] and chunks[1] == "[DONE]"


def test_error_frame_and_error_body() -> None:
    frame = frames(dialect.error_frame(ErrorEvent(code="upstream_error", message="cut")))
    assert frame == [
        {
            "error": {
                "message": "cut",
                "type": "server_error",
                "param": None,
                "code": "upstream_error",
            }
        }
    ]
    limited = RateLimited("slow down", retry_after=3)
    raw, headers = dialect.render_error(limited, "req_1")
    assert json.loads(raw) == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limited",
        }
    }
    assert headers == {}  # the SDK may retry a rate limit after Retry-After
    assert dialect.render_error(BudgetExceeded("broke"), None)[1] == {"x-should-retry": "false"}
    retried = UpstreamError("vendor down")
    retried.upstream_attempts = 3
    assert dialect.render_error(retried, None)[1] == {"x-should-retry": "false"}
    assert (
        json.loads(dialect.render_error(InvalidRequest("m", param="seed"), None)[0])["error"][
            "param"
        ]
        == "seed"
    )


def test_paths_pick_the_dialect_and_the_feature() -> None:
    assert dialect_of_path("/v1/chat/completions").name == "openai"
    assert dialect_of_path("/v1/models").name == "openai"
    assert dialect_of_path("/ai/chat").name == "robota"
    streamed = dialect.parse(body(model="m", stream=True), syntactic_router)
    assert feature_of("/v1/chat/completions", streamed) == "stream"
    assert feature_of("/v1/chat/completions", None) == "chat"
    assert feature_of("/ai/chat/stream", None) == "stream"


CATALOGUE: dict[str, list[str] | None] = {
    "openai": None,
    "anthropic": ["claude-x", "both"],
    "google": ["gemini-y", "both"],
}
WIRES = {"openai": "openai", "anthropic": "anthropic", "google": None}


@pytest.mark.parametrize(
    ("name", "vendor", "expected"),
    [
        ("anthropic/claude-x", "openai", RoutedModel("anthropic", "claude-x", False)),
        ("openai/gpt-4o", "openai", RoutedModel("openai", "gpt-4o", True)),
        ("mock/mock-1", "openai", RoutedModel("mock", "mock-1", False)),  # known, not served
        ("gemini-y", "openai", RoutedModel("google", "gemini-y", False)),
        ("claude-x", "anthropic", RoutedModel("anthropic", "claude-x", True)),
        ("fast", "openai", RoutedModel("auto", "fast", False)),
        ("gpt-4o", "openai", RoutedModel("openai", "gpt-4o", True)),
        ("unclaimed", "anthropic", RoutedModel("anthropic", "unclaimed", True)),
        ("org/llama-3", "openai", RoutedModel("openai", "org/llama-3", True)),
    ],
)
def test_route_model(name: str, vendor: str, expected: RoutedModel) -> None:
    got = route_model(name, vendor, catalogue=CATALOGUE, aliases={"fast"}, dialects=WIRES)
    assert got == expected


def test_route_model_ambiguity_lists_candidates() -> None:
    with pytest.raises(InvalidRequest) as caught:
        route_model("both", "openai", catalogue=CATALOGUE, aliases={"both"}, dialects=WIRES)
    assert caught.value.param == "model"
    assert caught.value.message == (
        "model 'both' is ambiguous: it could be alias both, anthropic/both, google/both; "
        "name one as provider/model"
    )
