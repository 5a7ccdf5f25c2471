"""The Anthropic dialect alone: a ``messages.create`` body to the universal request and back,
usage by token kind, the SSE sequence and the error shape, with no proxy running."""

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
from robota_proxy.dialects import anthropic as dialect
from robota_proxy.dialects import syntactic_router
from robota_proxy.errors import (
    BudgetExceeded,
    InvalidRequest,
    RateLimited,
    Unauthenticated,
    UpstreamUnavailable,
)

WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def body(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "model": "openai/gpt-4o-mini",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    return json.dumps({**base, **fields}).encode()


def refusal(raw: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        dialect.parse(raw, syntactic_router)
    return caught.value


def test_a_tool_round_trip_becomes_universal_messages() -> None:
    parsed = dialect.parse(
        body(
            system=[
                {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Use tools."},
            ],
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me look."},
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "get_weather",
                            "input": {"city": "Paris"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "content": [{"type": "text", "text": "21C"}],
                        },
                        {"type": "text", "text": "And Oslo?"},
                    ],
                },
            ],
            tools=[WEATHER],
            tool_choice={"type": "any"},
            temperature=0.5,
            top_p=0.9,
            stop_sequences=["END"],
            metadata={"user_id": "u-1"},
            stream=True,
        ),
        syntactic_router,
    )
    request = parsed.request
    assert (request.provider, request.model) == ("openai", "gpt-4o-mini")
    assert parsed.streamed is True and parsed.native is False
    wire = [m.to_wire() for m in request.messages]
    assert wire == [
        {"role": "system", "content": "Be brief.\n\nUse tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "toolCalls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "21C", "toolCallId": "toolu_1"},
        {"role": "user", "content": "And Oslo?"},
    ]
    options = request.options
    assert (options.max_tokens, options.temperature, options.top_p) == (100, 0.5, 0.9)
    assert options.stop == ["END"]
    assert options.tool_choice == "required"
    assert request.tools is not None and request.tools[0].parameters == WEATHER["input_schema"]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "get_weather"}, "get_weather"),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: str) -> None:
    parsed = dialect.parse(body(tools=[WEATHER], tool_choice=choice), syntactic_router)
    assert parsed.request.options.tool_choice == expected


def test_an_error_result_is_marked_in_its_text() -> None:
    messages = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "content": "no such city",
                    "is_error": True,
                }
            ],
        },
    ]
    request = dialect.parse(body(messages=messages, tools=[WEATHER]), syntactic_router).request
    assert request.messages[-1].to_wire() == {
        "role": "tool",
        "content": "Error: no such city",
        "toolCallId": "t1",
    }
    assert request.messages[-2].content is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"top_k": 5}, "top_k"),
        (
            {
                "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
                "tools": [WEATHER],
            },
            "tool_choice.disable_parallel_tool_use",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/png",
                                    "data": "iVBORw0KGgo=",
                                },
                            },
                        ],
                    }
                ]
            },
            "messages.0.content.1",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                            {"type": "text", "text": "Hello"},
                        ],
                    },
                    {"role": "user", "content": "again"},
                ]
            },
            "messages.1.content.0",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "go"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}
                        ],
                    },
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "t1",
                                "content": [
                                    {
                                        "type": "image",
                                        "source": {"type": "url", "url": "https://x/y.png"},
                                    }
                                ],
                            }
                        ],
                    },
                ]
            },
            "messages.2.content.0.content.0",
        ),
    ],
)
def test_what_another_vendor_cannot_honour_is_a_400_naming_it(
    fields: dict[str, Any], param: str
) -> None:
    error = refusal(body(**fields))
    assert error.param == param
    assert error.message.startswith(f"{param}: ")
    assert "'openai'" in error.message


def test_what_never_changes_the_answer_is_let_go() -> None:
    parsed = dialect.parse(
        body(metadata={"user_id": "x"}, service_tier="auto", thinking={"type": "disabled"}),
        syntactic_router,
    )
    assert parsed.request.provider == "openai"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"model": ""}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({"temperature": 1.5}, "temperature"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"tool_choice": {"type": "tool", "name": "nope"}, "tools": [WEATHER]}, "tool_choice"),
        ({"tools": [{"name": "x"}]}, "tools.0.input_schema"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_malformed_bodies_name_the_field(fields: dict[str, Any], param: str) -> None:
    assert refusal(body(**fields)).param == param


def test_a_passthrough_keeps_the_callers_json_and_counts_every_block() -> None:
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
    }
    thinking = {"type": "thinking", "thinking": "Let me think", "signature": "EqQBCkYIBxgC"}
    raw = body(
        model="claude-sonnet-4-5",
        thinking={"type": "enabled", "budget_tokens": 2048},
        top_k=3,
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]},
            {"role": "assistant", "content": [thinking, {"type": "text", "text": "A dot."}]},
            {"role": "user", "content": "Sure?"},
        ],
    )
    parsed = dialect.parse(raw, syntactic_router)
    assert parsed.native is True
    assert parsed.raw == json.loads(raw)
    assert (parsed.request.provider, parsed.request.model) == ("anthropic", "claude-sonnet-4-5")
    contents = [m.content for m in parsed.request.messages]
    assert contents[0] == "What is it?\n\n" + json.dumps(
        image, separators=(",", ":"), sort_keys=True
    )
    assert contents[1] == json.dumps(thinking, separators=(",", ":"), sort_keys=True) + (
        "\n\nA dot."
    )
    forwarded = dialect.passthrough_body(parsed.raw or {}, "claude-sonnet-4-5-20250929")
    assert forwarded["model"] == "claude-sonnet-4-5-20250929"
    assert forwarded["messages"][1]["content"][0] == thinking
    assert dialect.forwarded_headers(
        {"anthropic-version": "2023-06-01", "anthropic-beta": "b1,b2", "x-api-key": "k"}
    ) == {"anthropic-version": "2023-06-01", "anthropic-beta": "b1,b2"}


def test_count_tokens_needs_no_max_tokens_and_refuses_nothing() -> None:
    raw = json.dumps(
        {
            "model": "openai/gpt-4o-mini",
            "messages": [{"role": "user", "content": "Hi"}],
            "thinking": {"type": "enabled", "budget_tokens": 1024},
        }
    ).encode()
    parsed = dialect.parse_count_tokens(raw, syntactic_router)
    assert parsed.request.options.max_tokens is None
    assert parsed.request.messages[0].content == "Hi"


def test_usage_by_token_kind_both_ways() -> None:
    anthropic_usage = {
        "input_tokens": 10,
        "output_tokens": 7,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 20,
        "output_tokens_details": {"thinking_tokens": 3},
    }
    usage = dialect.usage_of(anthropic_usage)
    assert usage == Usage(
        prompt_tokens=130,
        completion_tokens=7,
        total_tokens=137,
        cached_prompt_tokens=100,
        cache_write_tokens=20,
        reasoning_tokens=3,
    )
    assert dialect.usage_json(usage) == {
        "input_tokens": 10,
        "output_tokens": 7,
        "cache_creation_input_tokens": 20,
        "cache_read_input_tokens": 100,
    }


def test_usage_tracker_keeps_start_counts_the_delta_leaves_out() -> None:
    tracker = dialect.UsageTracker()
    tracker.see(
        {
            "type": "message_start",
            "message": {
                "usage": {"input_tokens": 5, "output_tokens": 1, "cache_read_input_tokens": 40}
            },
        }
    )
    tracker.see(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use"},
            "usage": {"output_tokens": 9, "cache_read_input_tokens": None},
        }
    )
    assert not tracker.stopped
    tracker.see({"type": "message_stop"})
    assert tracker.stopped and tracker.stop_reason == "tool_use"
    assert tracker.usage() == Usage(
        prompt_tokens=45, completion_tokens=9, total_tokens=54, cached_prompt_tokens=40
    )
    assert dialect.finish_reason(tracker.stop_reason) == "tool_calls"


def test_message_json() -> None:
    message = AssistantMessage(
        content="Checking.",
        tool_calls=[
            ToolCall(
                id="call_1", function=FunctionCall(name="get_weather", arguments='{"city":"Oslo"}')
            )
        ],
        usage=Usage(
            prompt_tokens=30, completion_tokens=4, total_tokens=34, cached_prompt_tokens=10
        ),
        metadata=ResponseMetadata(finish_reason="tool_calls"),
    )
    assert dialect.message_json(message, model="gpt-4o-mini", request_id="req_abc") == {
        "id": "msg_abc",
        "type": "message",
        "role": "assistant",
        "model": "gpt-4o-mini",
        "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 20,
            "output_tokens": 4,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 10,
        },
    }


def events_of(frames: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for chunk in frames.decode().split("\n\n"):
        if chunk:
            head, data = chunk.split("\n")
            out.append((head.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_event_writer_sequence() -> None:
    writer = dialect.EventWriter(request_id="req_1", model="gemini-2.5-flash")
    frames = writer.start()
    for event in [
        DeltaEvent(content="Let me "),
        DeltaEvent(content="check."),
        ToolCallEvent(index=0, id="c1", name="get_weather", arguments_delta='{"city":'),
        ToolCallEvent(index=0, arguments_delta='"Oslo"}'),
        ToolCallEvent(index=1, id="c2", name="get_time", arguments_delta='{"tz":"CET"}'),
        UsageEvent(usage=Usage(prompt_tokens=12, completion_tokens=8, total_tokens=20)),
        DoneEvent(finish_reason="tool_calls", message=AssistantMessage(content="x")),
    ]:
        frames += writer.event(event)
    events = events_of(frames)
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    assert events[0][1]["message"]["usage"]["input_tokens"] == 0
    assert events[6][1] == {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "c1", "name": "get_weather", "input": {}},
    }
    assert events[8][1]["delta"] == {"type": "input_json_delta", "partial_json": '"Oslo"}'}
    assert events[10][1]["index"] == 2
    assert events[13][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {
            "input_tokens": 12,
            "output_tokens": 8,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def test_a_failure_midway_is_an_error_event() -> None:
    writer = dialect.EventWriter(request_id="req_1", model="m")
    frames = writer.event(ErrorEvent(code="upstream_timeout", message="too slow"))
    assert events_of(frames) == [
        ("error", {"type": "error", "error": {"type": "timeout_error", "message": "too slow"}})
    ]


@pytest.mark.parametrize(
    ("error", "kind", "should_retry"),
    [
        (Unauthenticated("no"), "authentication_error", None),
        (RateLimited("slow down", retry_after=3), "rate_limit_error", None),
        (BudgetExceeded("broke"), "billing_error", "false"),
        (InvalidRequest("bad", param="x"), "invalid_request_error", None),
    ],
)
def test_render_error(error: Any, kind: str, should_retry: str | None) -> None:
    payload, headers = dialect.render_error(error, "req_9")
    assert json.loads(payload) == {
        "type": "error",
        "error": {"type": kind, "message": error.message},
        "request_id": "req_9",
    }
    assert headers.get("request-id") == "req_9"
    assert headers.get("x-should-retry") == should_retry


def test_an_error_the_proxy_already_retried_is_not_retried_by_the_sdk() -> None:
    error = UpstreamUnavailable("down")
    error.upstream_attempts = 3
    payload, headers = dialect.render_error(error, None)
    assert json.loads(payload)["error"]["type"] == "overloaded_error"
    assert headers == {"x-should-retry": "false"}
