"""client -> proxy (uvicorn process) -> official SDK / REST -> fake vendor, for each vendor:
chat, stream, and full tool-call round trips, plain and streamed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from robota_client import RemoteAIProvider
from robota_client.messages import (
    AssistantMessage,
    DeltaEvent,
    DoneEvent,
    ToolCallEvent,
    ToolSchema,
    UsageEvent,
)
from robota_proxy.testing import FakeVendors, Reply, ToolCallSpec
from tests.e2e.conftest import USER_KEY, VENDOR_KEY, ProxyProcess

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

VENDORS = {
    "openai": "gpt-4o-mini",
    "anthropic": "claude-3-5-haiku-latest",
    "google": "gemini-2.5-flash",
}

WEATHER = ToolSchema(
    name="get_weather",
    description="Current weather for a city",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
)
CLOCK = ToolSchema(
    name="get_time",
    description="Current time in a time zone",
    parameters={"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
)


def run_tool(name: str, arguments: dict[str, Any]) -> str:
    """The application's own tool code: runs on the client side, never on the proxy."""
    if name == "get_weather":
        return json.dumps({"city": arguments["city"], "temp_c": 21})
    return json.dumps({"tz": arguments["tz"], "time": "12:00"})


@pytest.fixture(params=sorted(VENDORS))
async def remote(request: pytest.FixtureRequest, proxy: ProxyProcess) -> AsyncIterator[Any]:
    vendor: str = request.param
    async with RemoteAIProvider(proxy.url, USER_KEY, vendor, VENDORS[vendor], max_retries=0) as p:
        yield p


def last_vendor_request(fake: FakeVendors, vendor: str) -> Any:
    calls = [recorded for recorded in fake.requests if recorded.vendor == vendor]
    assert calls, f"{vendor} was never called"
    return calls[-1]


def assert_vendor_key_used(recorded: Any) -> None:
    headers = {name.lower(): value for name, value in recorded.headers.items()}
    sent = (
        headers.get("authorization", "")
        + headers.get("x-api-key", "")
        + headers.get("x-goog-api-key", "")
    )
    assert VENDOR_KEY in sent
    assert USER_KEY not in json.dumps(recorded.headers)


async def test_chat(remote: RemoteAIProvider, fake: FakeVendors) -> None:
    fake.script(Reply(text="Paris is the capital of France."), match="capital of France")
    answer = await remote.chat(
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        {"temperature": 0, "maxTokens": 50},
    )
    assert answer.content == "Paris is the capital of France."
    assert answer.tool_calls is None
    assert answer.metadata.provider == remote.target_provider
    assert answer.metadata.finish_reason == "stop"
    assert answer.metadata.request_id and answer.metadata.request_id.startswith("req_")
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 6  # words in the reply
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 6

    recorded = last_vendor_request(fake, remote.target_provider)
    assert_vendor_key_used(recorded)
    body = recorded.body
    if remote.target_provider == "openai":
        assert body["messages"][0] == {"role": "system", "content": "Answer briefly."}
        assert body["temperature"] == 0
    elif remote.target_provider == "anthropic":
        assert "Answer briefly." in json.dumps(body["system"])
        assert body["max_tokens"] == 50
    else:
        assert body["systemInstruction"]["parts"][0]["text"] == "Answer briefly."
        assert body["generationConfig"]["maxOutputTokens"] == 50


async def test_chat_stream_yields_text_in_pieces(
    remote: RemoteAIProvider, fake: FakeVendors
) -> None:
    text = "Streaming works one word at a time"
    fake.script(Reply(text=text), match="stream please")
    chunks = [
        chunk async for chunk in remote.chat_stream([{"role": "user", "content": "stream please"}])
    ]
    assert len(chunks) > 1
    assert "".join(chunks) == text
    assert last_vendor_request(fake, remote.target_provider).stream


async def test_stream_events_end_with_usage_and_done(
    remote: RemoteAIProvider, fake: FakeVendors
) -> None:
    fake.script(Reply(text="all the events", completion_tokens=3), match="events")
    stream = remote.stream([{"role": "user", "content": "events"}])
    events = [event async for event in stream]
    kinds = [type(event) for event in events]
    assert kinds[0] is DeltaEvent
    assert UsageEvent in kinds
    assert kinds[-1] is DoneEvent
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.message.content == "all the events"
    assert done.message.usage is not None and done.message.usage.completion_tokens == 3
    assert stream.message is not None
    assert stream.message.content == "all the events"
    if remote.target_provider == "openai":
        body = last_vendor_request(fake, "openai").body
        assert body["stream_options"] == {"include_usage": True}


async def _agent_turns(
    remote: RemoteAIProvider, *, streaming: bool, prompt: str
) -> tuple[AssistantMessage, AssistantMessage]:
    """A tool-calling loop written the way an application writes it against a local
    provider: ask, run the requested tools locally, send the results, get the answer."""
    messages: list[Any] = [{"role": "user", "content": prompt}]

    async def ask() -> AssistantMessage:
        if not streaming:
            return await remote.chat(messages, tools=[WEATHER, CLOCK])
        stream = remote.stream(messages, tools=[WEATHER, CLOCK])
        seen_tool_events = [event async for event in stream if isinstance(event, ToolCallEvent)]
        assert stream.message is not None
        if stream.message.tool_calls:
            assert seen_tool_events, "tool calls must arrive as tool_call events"
        return stream.message

    first = await ask()
    assert first.metadata.finish_reason == "tool_calls"
    assert first.tool_calls
    messages.append(first)
    for call in first.tool_calls:
        result = run_tool(call.function.name, call.parsed_arguments())
        messages.append({"role": "tool", "toolCallId": call.id, "content": result})
    return first, await ask()


@pytest.mark.parametrize("streaming", [False, True], ids=["chat", "stream"])
async def test_tool_round_trip(
    remote: RemoteAIProvider, fake: FakeVendors, streaming: bool
) -> None:
    fake.script(
        Reply(tool_calls=[ToolCallSpec("get_weather", {"city": "Paris"})]),
        match="weather in Paris",
    )
    fake.script(Reply(text="It is 21 degrees in Paris."), match="temp_c")
    first, final = await _agent_turns(remote, streaming=streaming, prompt="weather in Paris?")

    assert first.tool_calls is not None and len(first.tool_calls) == 1
    call = first.tool_calls[0]
    assert call.function.name == "get_weather"
    assert call.parsed_arguments() == {"city": "Paris"}
    assert call.id
    assert final.content == "It is 21 degrees in Paris."
    assert final.metadata.finish_reason == "stop"

    # The vendor received the tool result in its own format, tied to its call.
    body = last_vendor_request(fake, remote.target_provider).body
    if remote.target_provider == "openai":
        assert body["messages"][-1]["role"] == "tool"
        assert body["messages"][-1]["tool_call_id"] == call.id
        assert body["messages"][-2]["tool_calls"][0]["function"]["name"] == "get_weather"
        assert body["tools"][0]["function"]["name"] == "get_weather"
    elif remote.target_provider == "anthropic":
        block = body["messages"][-1]["content"][0]
        assert block["type"] == "tool_result"
        assert block["tool_use_id"] == call.id
        assert body["tools"][0]["input_schema"]["required"] == ["city"]
    else:
        part = body["contents"][-1]["parts"][0]
        assert part["functionResponse"]["name"] == "get_weather"
        assert part["functionResponse"]["response"]["temp_c"] == 21
        declarations = body["tools"][0]["functionDeclarations"]
        assert [d["name"] for d in declarations] == ["get_weather", "get_time"]


@pytest.mark.parametrize("streaming", [False, True], ids=["chat", "stream"])
async def test_parallel_tool_calls(
    remote: RemoteAIProvider, fake: FakeVendors, streaming: bool
) -> None:
    fake.script(
        Reply(
            tool_calls=[
                ToolCallSpec("get_weather", {"city": "Oslo"}),
                ToolCallSpec("get_time", {"tz": "CET"}),
            ]
        ),
        match="weather and time",
    )
    fake.script(Reply(text="Oslo: 21C at 12:00."), match="12:00")
    first, final = await _agent_turns(remote, streaming=streaming, prompt="weather and time?")
    assert first.tool_calls is not None
    assert [c.function.name for c in first.tool_calls] == ["get_weather", "get_time"]
    assert [c.parsed_arguments() for c in first.tool_calls] == [{"city": "Oslo"}, {"tz": "CET"}]
    assert len({c.id for c in first.tool_calls}) == 2
    assert final.content == "Oslo: 21C at 12:00."


async def test_tool_choice_names_a_tool(remote: RemoteAIProvider, fake: FakeVendors) -> None:
    fake.script(Reply(tool_calls=[ToolCallSpec("get_time", {"tz": "UTC"})]), match="time now")
    answer = await remote.chat(
        [{"role": "user", "content": "time now"}],
        {"toolChoice": "get_time"},
        tools=[WEATHER, CLOCK],
    )
    assert answer.tool_calls is not None
    body = last_vendor_request(fake, remote.target_provider).body
    if remote.target_provider == "openai":
        assert body["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    elif remote.target_provider == "anthropic":
        assert body["tool_choice"] == {"type": "tool", "name": "get_time"}
    else:
        config = body["toolConfig"]["functionCallingConfig"]
        assert config["mode"] == "ANY"
        assert config["allowedFunctionNames"] == ["get_time"]


async def test_length_finish_reason(remote: RemoteAIProvider, fake: FakeVendors) -> None:
    fake.script(Reply(text="cut short", finish="length"), match="long story")
    answer = await remote.chat([{"role": "user", "content": "a long story"}], {"maxTokens": 2})
    assert answer.metadata.finish_reason == "length"
