"""The offline mock provider: every documented behaviour, streamed and not."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from robota_client.messages import (
    AssistantMessage,
    ChatRequest,
    DeltaEvent,
    StreamAssembler,
    ToolCallEvent,
    UsageEvent,
)
from robota_proxy.upstreams.base import FinishEvent, UpstreamEvent
from robota_proxy.upstreams.mock import MAX_REPLY_WORDS, MockUpstream

pytestmark = pytest.mark.anyio

WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
CLOCK = {
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
}
EVERY_TYPE = {
    "name": "fill_me",
    "parameters": {
        "type": "object",
        "properties": {
            "s": {"type": "string"},
            "i": {"type": "integer"},
            "n": {"type": "number"},
            "b": {"type": "boolean"},
            "a": {"type": "array", "items": {"type": "string"}},
            "o": {"type": "object"},
            "maybe": {"type": ["null", "integer"]},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "untyped": {},
            "optional": {"type": "string"},
        },
        "required": ["s", "i", "n", "b", "a", "o", "maybe", "unit", "untyped"],
    },
}


CITY = {"city": "Paris"}  # what a required string named ``city`` is filled with


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def mock() -> MockUpstream:
    return MockUpstream()


def request(messages: list[dict[str, Any]], **extra: Any) -> ChatRequest:
    return ChatRequest.model_validate(
        {"provider": "mock", "model": "mock-1", "messages": messages, **extra}
    )


def said(text: str, **extra: Any) -> ChatRequest:
    return request([{"role": "user", "content": text}], **extra)


async def events_of(mock: MockUpstream, chat: ChatRequest) -> list[UpstreamEvent]:
    return [event async for event in mock.stream(chat)]


async def assembled(mock: MockUpstream, chat: ChatRequest) -> tuple[AssistantMessage, str]:
    """The streamed answer folded the way the proxy folds it, and its finish reason."""
    assembler = StreamAssembler()
    finish = ""
    for event in await events_of(mock, chat):
        if isinstance(event, FinishEvent):
            finish = event.finish_reason
        else:
            assembler.add(event)
    return assembler.message(AssistantMessage().metadata), finish


def arguments(answer: AssistantMessage) -> list[tuple[str, Any]]:
    assert answer.tool_calls is not None
    return [(call.function.name, call.parsed_arguments()) for call in answer.tool_calls]


# --- plain text ----------------------------------------------------------------------------


async def test_echoes_the_last_user_message(mock: MockUpstream) -> None:
    answer = await mock.chat(
        request(
            [
                {"role": "system", "content": "be nice"},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "You said: first"},
                {"role": "user", "content": "Hello there"},
            ]
        )
    )
    assert answer.content == "You said: Hello there"
    assert answer.tool_calls is None
    assert answer.metadata.finish_reason == "stop"
    assert answer.metadata.provider == "mock"
    assert answer.metadata.model == "mock-1"


async def test_usage_counts_words(mock: MockUpstream) -> None:
    answer = await mock.chat(
        request(
            [
                {"role": "system", "content": "be nice"},
                {"role": "user", "content": "one two  three"},
            ]
        )
    )
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == 5
    assert answer.usage.completion_tokens == 5  # "You said: one two three"
    assert answer.usage.total_tokens == 10


async def test_prompt_tokens_are_at_least_one(mock: MockUpstream) -> None:
    answer = await mock.chat(said(""))
    assert answer.content == "You said: "
    assert answer.usage is not None and answer.usage.prompt_tokens == 1


async def test_names_and_models() -> None:
    assert MockUpstream().models() == ["mock-1"]
    custom = MockUpstream(models=["a", "b"], name="fake")
    assert custom.models() == ["a", "b"]
    answer = await custom.chat(said("hi"))
    assert answer.metadata.provider == "fake"
    await custom.aclose()


# --- streaming -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["Stream this answer", "  spaced   out  words ", "x", ""])
async def test_stream_text_equals_chat_text(mock: MockUpstream, text: str) -> None:
    chat = said(text)
    answer = await mock.chat(chat)
    events = await events_of(mock, chat)
    deltas = [e.content for e in events if isinstance(e, DeltaEvent)]
    assert "".join(deltas) == answer.content
    assert len(deltas) == len((answer.content or "").split())
    assert deltas[0] == "You "


async def test_stream_event_order(mock: MockUpstream) -> None:
    events = await events_of(mock, said("a b"))
    assert [type(e) for e in events] == [DeltaEvent] * 4 + [UsageEvent, FinishEvent]
    usage = events[-2]
    assert isinstance(usage, UsageEvent)
    assert usage.usage == (await mock.chat(said("a b"))).usage
    finish = events[-1]
    assert isinstance(finish, FinishEvent) and finish.finish_reason == "stop"


async def test_chunk_delay_spaces_the_deltas() -> None:
    slow = MockUpstream(chunk_delay=0.02)
    started = time.monotonic()
    events = await events_of(slow, said("one two three"))
    elapsed = time.monotonic() - started
    assert len([e for e in events if isinstance(e, DeltaEvent)]) == 5
    assert elapsed >= 4 * 0.02 * 0.8


# --- tool calls ----------------------------------------------------------------------------


async def test_tool_call_uses_the_json_in_the_text(mock: MockUpstream) -> None:
    answer = await mock.chat(said('weather please {"city": "Paris"}', tools=[WEATHER, CLOCK]))
    assert answer.content is None
    assert answer.metadata.finish_reason == "tool_calls"
    assert answer.tool_calls is not None
    (call,) = answer.tool_calls
    assert call.id == "call_mock_1"
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"city": "Paris"}'
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 5


async def test_skips_braces_that_are_not_json(mock: MockUpstream) -> None:
    answer = await mock.chat(said('set {x} then {"city": "Rome"}', tools=[WEATHER]))
    assert arguments(answer) == [("get_weather", {"city": "Rome"})]


async def test_tool_named_in_the_text_wins(mock: MockUpstream) -> None:
    answer = await mock.chat(said("please call GET_TIME", tools=[WEATHER, CLOCK]))
    assert arguments(answer) == [("get_time", {"tz": "Europe/Paris"})]


async def test_first_tool_otherwise(mock: MockUpstream) -> None:
    answer = await mock.chat(said("do something", tools=[CLOCK, WEATHER]))
    assert arguments(answer) == [("get_time", {"tz": "Europe/Paris"})]


async def test_every_tool_a_word_of_its_name_mentions(mock: MockUpstream) -> None:
    question = "What is the weather in Paris and the time in Tokyo?"
    answer = await mock.chat(said(question, tools=[CLOCK, WEATHER]))
    assert arguments(answer) == [("get_time", {"tz": "Europe/Paris"}), ("get_weather", CITY)]
    assert answer.tool_calls is not None
    assert [call.id for call in answer.tool_calls] == ["call_mock_1", "call_mock_2"]


@pytest.mark.parametrize(
    ("text", "called"),
    [
        ("get me something", ["get_time"]),  # "get" is too short to tell: the first tool
        ("the STOCK price", ["lookup_stock"]),  # a word of the name, any case
        ("stocks please", ["get_time"]),  # only a whole word mentions
        ("which zone", ["getTimeZone"]),  # camelCase names split into words
        ("what time zone", ["get_time", "getTimeZone"]),
        ("call lookup_stock and gettimezone", ["lookup_stock", "getTimeZone"]),  # whole names
    ],
)
async def test_which_words_mention_a_tool(mock: MockUpstream, text: str, called: list[str]) -> None:
    stock = {"name": "lookup_stock", "parameters": {"type": "object"}}
    zone = {"name": "getTimeZone", "parameters": {"type": "object"}}
    answer = await mock.chat(said(text, tools=[CLOCK, stock, zone]))
    assert [name for name, _ in arguments(answer)] == called


async def test_required_properties_are_filled_by_type(mock: MockUpstream) -> None:
    answer = await mock.chat(said("go", tools=[EVERY_TYPE]))
    assert arguments(answer) == [
        (
            "fill_me",
            {
                "s": "mock",
                "i": 1,
                "n": 1,
                "b": True,
                "a": [],
                "o": {},
                "maybe": 1,
                "unit": "celsius",
                "untyped": "mock",
            },
        )
    ]


def tool_with(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "name": "t",
        "parameters": {
            "type": "object",
            "properties": properties,
            "required": list(properties) if required is None else required,
        },
    }


@pytest.mark.parametrize(
    ("schema", "value"),
    [
        ({"const": "fixed", "enum": ["other"]}, "fixed"),
        ({"type": "string", "default": "dflt"}, "dflt"),
        ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, 1),
        ({"oneOf": [{"type": "boolean"}]}, True),
        ({"type": "string", "format": "date-time"}, "2026-01-01T12:00:00Z"),
        ({"type": "string", "format": "date"}, "2026-01-01"),
        ({"type": "string", "format": "email"}, "mock@example.com"),
        ({"type": "string", "format": "uri"}, "https://example.com"),
        ({"type": "string", "format": "uuid"}, "00000000-0000-4000-8000-000000000000"),
        ({"type": "string", "minLength": 6}, "mockxx"),
        ({"type": "string", "maxLength": 2}, "mo"),
        ({"type": "integer", "minimum": 10, "maximum": 20}, 10),
        ({"type": "integer", "maximum": -3}, -3),
        ({"type": "integer", "minimum": 2.5}, 3),
        ({"type": "number", "minimum": 2.5}, 2.5),
        ({"type": "number", "maximum": 0.5}, 0.5),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, [1, 1]),
        ({"type": "array", "items": {"type": "string"}}, []),
        (
            {
                "type": "object",
                "properties": {
                    "inner": {
                        "type": "object",
                        "properties": {"n": {"type": "number"}},
                        "required": ["n"],
                    },
                    "skip": {},
                },
                "required": ["inner"],
            },
            {"inner": {"n": 1}},
        ),
    ],
)
async def test_values_fit_their_schema(
    mock: MockUpstream, schema: dict[str, Any], value: Any
) -> None:
    answer = await mock.chat(said("go", tools=[tool_with({"v": schema})]))
    assert arguments(answer) == [("t", {"v": value})]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("city", "Paris"),
        ("location", "Paris"),
        ("country", "France"),
        ("timezone", "Europe/Paris"),
        ("time_zone", "Europe/Paris"),
        ("tz", "Europe/Paris"),
        ("language", "en"),
        ("currency", "EUR"),
        ("date", "2026-01-01"),
        ("anything_else", "mock"),
    ],
)
async def test_strings_are_filled_by_property_name(
    mock: MockUpstream, name: str, value: str
) -> None:
    answer = await mock.chat(said("go", tools=[tool_with({name: {"type": "string"}})]))
    assert arguments(answer) == [("t", {name: value})]


async def test_a_query_gets_the_user_text(mock: MockUpstream) -> None:
    search = tool_with({"query": {"type": "string"}, "limit": {"type": "integer"}}, ["query"])
    answer = await mock.chat(said("search cheap flights", tools=[search]))
    assert arguments(answer) == [("t", {"query": "search cheap flights"})]


async def test_nesting_is_followed_a_bounded_depth(mock: MockUpstream) -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(6):
        schema = {"type": "object", "properties": {"d": schema}, "required": ["d"]}
    answer = await mock.chat(said("go", tools=[tool_with({"v": schema})]))
    # The top-level property is depth 0; objects below depth 4 are left empty.
    assert arguments(answer) == [("t", {"v": {"d": {"d": {"d": {"d": {}}}}}})]


async def test_parallel_calls_every_tool(mock: MockUpstream) -> None:
    answer = await mock.chat(said("do both in Parallel", tools=[WEATHER, CLOCK]))
    assert arguments(answer) == [("get_weather", CITY), ("get_time", {"tz": "Europe/Paris"})]
    assert answer.tool_calls is not None
    assert [call.id for call in answer.tool_calls] == ["call_mock_1", "call_mock_2"]
    assert answer.usage is not None and answer.usage.completion_tokens == 10


async def test_parallel_must_be_a_word(mock: MockUpstream) -> None:
    answer = await mock.chat(said("unparalleled stuff", tools=[CLOCK, WEATHER]))
    assert arguments(answer) == [("get_time", {"tz": "Europe/Paris"})]


async def test_parallel_calls_get_only_the_written_properties_they_declare(
    mock: MockUpstream,
) -> None:
    """One JSON object in the text, two tools: each gets the part its schema declares (the
    tool agent's ``get_time(tz)`` would fail on a ``city`` argument)."""
    answer = await mock.chat(
        said('in parallel {"city": "Oslo", "tz": "Asia/Tokyo", "x": 1}', tools=[WEATHER, CLOCK])
    )
    assert arguments(answer) == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {"tz": "Asia/Tokyo"}),
    ]
    half = await mock.chat(said('in parallel {"city": "Oslo"}', tools=[WEATHER, CLOCK]))
    assert arguments(half) == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {"tz": "Europe/Paris"}),
    ]


async def test_a_schema_without_properties_takes_the_written_object(mock: MockUpstream) -> None:
    free = {"name": "free", "parameters": {"type": "object"}}
    closed = {"name": "closed", "parameters": {"type": "object", "additionalProperties": False}}
    answer = await mock.chat(said('parallel {"a": [1], "b": null}', tools=[free, closed]))
    assert arguments(answer) == [("free", {"a": [1], "b": None}), ("closed", {})]


async def test_tool_choice_none_disables_calls(mock: MockUpstream) -> None:
    answer = await mock.chat(
        said("get_weather please", tools=[WEATHER], options={"toolChoice": "none"})
    )
    assert answer.content == "You said: get_weather please"
    assert answer.tool_calls is None
    assert answer.metadata.finish_reason == "stop"


async def test_named_tool_choice_forces_that_tool(mock: MockUpstream) -> None:
    answer = await mock.chat(
        said("get_weather in parallel", tools=[WEATHER, CLOCK], options={"toolChoice": "get_time"})
    )
    assert arguments(answer) == [("get_time", {"tz": "Europe/Paris"})]


async def test_ids_count_earlier_tool_calls() -> None:
    mock = MockUpstream()
    chat = request(
        [
            {"role": "user", "content": "in parallel"},
            {
                "role": "assistant",
                "toolCalls": [
                    {"id": "call_mock_1", "function": {"name": "get_weather", "arguments": "{}"}},
                    {"id": "call_mock_2", "function": {"name": "get_time", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "toolCallId": "call_mock_1", "content": "sunny"},
            {"role": "tool", "toolCallId": "call_mock_2", "content": "noon"},
            {"role": "assistant", "content": "done"},
            {"role": "user", "content": "again"},
        ],
        tools=[WEATHER],
    )
    answer = await mock.chat(chat)
    assert answer.tool_calls is not None
    assert [call.id for call in answer.tool_calls] == ["call_mock_3"]


async def test_streamed_tool_calls_come_in_two_fragments(mock: MockUpstream) -> None:
    chat = said('parallel {"city": "Oslo"}', tools=[WEATHER, CLOCK])
    events = await events_of(mock, chat)
    pieces = [e for e in events if isinstance(e, ToolCallEvent)]
    assert [(p.index, p.id, p.name) for p in pieces] == [
        (0, "call_mock_1", "get_weather"),
        (0, None, None),
        (1, "call_mock_2", "get_time"),
        (1, None, None),
    ]
    assert all(p.arguments_delta for p in pieces)
    assert pieces[0].arguments_delta + pieces[1].arguments_delta == '{"city": "Oslo"}'
    assert not any(isinstance(e, DeltaEvent) for e in events)
    assert isinstance(events[-2], UsageEvent)
    message, finish = await assembled(mock, chat)
    answer = await mock.chat(chat)
    assert finish == "tool_calls"
    assert message.tool_calls == answer.tool_calls
    assert message.content is None


# --- tool results --------------------------------------------------------------------------


def after_tools(*results: dict[str, Any]) -> ChatRequest:
    return request(
        [
            {"role": "user", "content": "weather and time"},
            {
                "role": "assistant",
                "toolCalls": [
                    {"id": "c1", "function": {"name": "get_weather", "arguments": "{}"}},
                    {"id": "c2", "function": {"name": "get_time", "arguments": "{}"}},
                ],
            },
            *results,
        ],
        tools=[WEATHER, CLOCK],
    )


async def test_replies_with_the_tool_results(mock: MockUpstream) -> None:
    chat = after_tools(
        {"role": "tool", "toolCallId": "c1", "content": '{"temp_c": 21}'},
        {"role": "tool", "toolCallId": "c2", "content": "12:00"},
    )
    answer = await mock.chat(chat)
    assert (
        answer.content == 'Tool get_weather returned: {"temp_c": 21}; Tool get_time returned: 12:00'
    )
    assert answer.tool_calls is None
    assert answer.metadata.finish_reason == "stop"
    message, finish = await assembled(mock, chat)
    assert message.content == answer.content
    assert finish == "stop"


async def test_unknown_tool_call_id_falls_back_to_the_message_name(mock: MockUpstream) -> None:
    answer = await mock.chat(
        after_tools(
            {"role": "tool", "toolCallId": "zz", "content": "a", "name": "lookup"},
            {"role": "tool", "toolCallId": "yy", "content": "b"},
        )
    )
    assert answer.content == "Tool lookup returned: a; Tool unknown returned: b"


async def test_only_results_since_the_last_assistant_message(mock: MockUpstream) -> None:
    chat = request(
        [
            {"role": "user", "content": "go"},
            {"role": "assistant", "toolCalls": [{"id": "c1", "function": {"name": "f"}}]},
            {"role": "tool", "toolCallId": "c1", "content": "old"},
            {"role": "assistant", "toolCalls": [{"id": "c2", "function": {"name": "g"}}]},
            {"role": "tool", "toolCallId": "c2", "content": "new"},
        ]
    )
    answer = await mock.chat(chat)
    assert answer.content == "Tool g returned: new"


# --- maxTokens -----------------------------------------------------------------------------


async def test_max_tokens_truncates_with_length(mock: MockUpstream) -> None:
    chat = said("one two three four", options={"maxTokens": 3})
    answer = await mock.chat(chat)
    assert answer.content == "You said: one"
    assert answer.metadata.finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    message, finish = await assembled(mock, chat)
    assert message.content == "You said: one"
    assert finish == "length"


async def test_max_tokens_not_reached_is_stop(mock: MockUpstream) -> None:
    answer = await mock.chat(said("one", options={"maxTokens": 3}))
    assert answer.content == "You said: one"
    assert answer.metadata.finish_reason == "stop"


@pytest.mark.parametrize("max_tokens", [None, 5000])
async def test_a_reply_is_never_longer_than_the_mocks_own_limit(
    mock: MockUpstream, max_tokens: int | None
) -> None:
    """A huge prompt is not echoed back as a huge stream, whatever maxTokens says."""
    words = [f"w{n}" for n in range(3000)]
    options = {} if max_tokens is None else {"maxTokens": max_tokens}
    chat = said(" ".join(words), options=options)
    expected = "You said: " + " ".join(words[: MAX_REPLY_WORDS - 2])
    answer = await mock.chat(chat)
    assert answer.content == expected
    assert answer.metadata.finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == MAX_REPLY_WORDS
    message, finish = await assembled(mock, chat)
    assert (message.content, finish) == (expected, "length")


async def test_max_tokens_never_cuts_tool_calls(mock: MockUpstream) -> None:
    answer = await mock.chat(said('{"city": "Lima"}', tools=[WEATHER], options={"maxTokens": 1}))
    assert arguments(answer) == [("get_weather", {"city": "Lima"})]
    assert answer.metadata.finish_reason == "tool_calls"


async def test_arguments_are_json_strings(mock: MockUpstream) -> None:
    answer = await mock.chat(said("x", tools=[WEATHER]))
    assert answer.tool_calls is not None
    assert json.loads(answer.tool_calls[0].function.arguments) == CITY
