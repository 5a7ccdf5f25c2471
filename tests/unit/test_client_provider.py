"""``RemoteAIProvider`` as application code sees it: inputs it accepts, what it sends, the
catalogue and health calls, and keeping the API key out of sight."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import respx
from pydantic import ValidationError

from robota_client import AIProvider, RemoteAIProvider
from robota_client.errors import ProtocolError
from robota_client.messages import (
    ChatOptions,
    ToolSchema,
    UniversalMessage,
)
from tests.unit.test_client_support import API_KEY, URL, RecordingSleep

CHAT = f"{URL}/ai/chat"
WEATHER = ToolSchema(
    name="weather",
    description="Current weather for a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}},
)
TOOL_ANSWER = {
    "role": "assistant",
    "content": None,
    "toolCalls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    ],
    "usage": {"promptTokens": 5, "completionTokens": 3, "totalTokens": 8},
    "metadata": {"provider": "openai", "model": "gpt-4o-mini", "finishReason": "tool_calls"},
}


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


def sent(route: respx.Route) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(route.calls.last.request.content)
    return body


def answer(content: str = "ok") -> httpx.Response:
    return httpx.Response(
        200, json={"role": "assistant", "content": content}, headers={"X-Request-ID": "req-9"}
    )


def test_satisfies_the_local_provider_protocol(ai: RemoteAIProvider) -> None:
    assert isinstance(ai, AIProvider)
    assert ai.name == "remote"
    assert ai.supports_tools() is True


@pytest.mark.anyio
async def test_chat_sends_the_wire_request(mock: respx.MockRouter, ai: RemoteAIProvider) -> None:
    route = mock.post(CHAT).mock(return_value=httpx.Response(200, json=TOOL_ANSWER))
    result = await ai.chat(
        [{"role": "user", "content": "weather?"}],
        ChatOptions(temperature=0.2, max_tokens=50),
        [WEATHER],
    )
    assert result.tool_calls is not None and result.tool_calls[0].id == "call_1"
    assert result.usage is not None and result.usage.total_tokens == 8
    request = route.calls.last.request
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["content-type"] == "application/json"
    assert sent(route) == {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "weather?"}],
        "options": {"temperature": 0.2, "maxTokens": 50},
        "tools": [WEATHER.to_wire()],
    }


@pytest.mark.anyio
async def test_request_id_comes_from_the_header_when_the_body_lacks_it(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    mock.post(CHAT).mock(return_value=answer())
    assert (await ai.chat([{"role": "user", "content": "hi"}])).metadata.request_id == "req-9"


@pytest.mark.anyio
@pytest.mark.parametrize("spelling", ["toolCallId", "tool_call_id"])
async def test_dict_messages_in_either_spelling(
    mock: respx.MockRouter, ai: RemoteAIProvider, spelling: str
) -> None:
    route = mock.post(CHAT).mock(return_value=answer())
    history: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "toolCalls": [{"id": "c1", "function": {"name": "weather", "arguments": "{}"}}],
        },
        {"role": "tool", spelling: "c1", "content": "sunny"},
    ]
    await ai.chat(history, {"max_tokens": 10, "toolChoice": "auto"}, [WEATHER.to_wire()])
    body = sent(route)
    assert body["messages"][3] == {"role": "tool", "content": "sunny", "toolCallId": "c1"}
    assert body["messages"][2]["toolCalls"][0]["id"] == "c1"
    assert body["options"] == {"maxTokens": 10, "toolChoice": "auto"}


@pytest.mark.anyio
async def test_an_assistant_answer_can_be_appended_to_the_history(
    mock: respx.MockRouter, ai: RemoteAIProvider
) -> None:
    route = mock.post(CHAT).mock(
        side_effect=[httpx.Response(200, json=TOOL_ANSWER), answer("It is sunny.")]
    )
    history: list[Any] = [UniversalMessage(role="user", content="weather in Oslo?")]
    first = await ai.chat(history, tools=[WEATHER])
    assert first.tool_calls is not None
    history.append(first)
    history.append({"role": "tool", "toolCallId": first.tool_calls[0].id, "content": "sunny"})
    second = await ai.chat(history, tools=[WEATHER])
    assert second.content == "It is sunny."
    messages = sent(route)["messages"]
    assert messages[1]["role"] == "assistant"
    assert messages[1]["toolCalls"][0]["function"] == {"name": "weather", "arguments": "{}"}
    assert "usage" not in messages[1]  # the answer's bookkeeping is not part of the history


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("messages", "options", "tools"),
    [
        ([{"role": "tool", "content": "x"}], None, None),  # no toolCallId
        ([{"role": "wizard", "content": "x"}], None, None),
        ([], None, None),
        ([{"role": "user", "content": "x"}], {"temperature": 7}, None),
        ([{"role": "user", "content": "x"}], {"toolChoice": "search"}, [WEATHER]),
        ([{"role": "user", "content": "x"}], None, [{"description": "no name"}]),
    ],
)
async def test_invalid_input_fails_before_any_network_call(
    mock: respx.MockRouter,
    ai: RemoteAIProvider,
    messages: list[Any],
    options: Any,
    tools: Any,
) -> None:
    route = mock.post(CHAT).mock(return_value=answer())
    stream_route = mock.post(f"{URL}/ai/chat/stream")
    with pytest.raises(ValidationError):
        await ai.chat(messages, options, tools)
    with pytest.raises(ValidationError):
        ai.stream(messages, options, tools)
    with pytest.raises(ValidationError):
        ai.chat_stream(messages, options, tools)
    assert route.call_count == 0
    assert stream_route.call_count == 0


@pytest.mark.anyio
async def test_extra_headers_are_sent(mock: respx.MockRouter) -> None:
    route = mock.post(CHAT).mock(return_value=answer())
    ai = RemoteAIProvider(URL, None, "mock", "mock-1", headers={"X-Tenant": "acme"})
    await ai.chat([{"role": "user", "content": "hi"}])
    headers = route.calls.last.request.headers
    assert headers["x-tenant"] == "acme"
    assert "authorization" not in headers  # no key given: none invented


@pytest.mark.anyio
async def test_server_url_with_a_path_prefix(mock: respx.MockRouter) -> None:
    route = mock.post(f"{URL}/llm/ai/chat").mock(return_value=answer())
    ai = RemoteAIProvider(f"{URL}/llm/", API_KEY, "mock", "mock-1")
    await ai.chat([{"role": "user", "content": "hi"}])
    assert route.call_count == 1


def test_api_key_is_not_in_repr(ai: RemoteAIProvider) -> None:
    assert API_KEY not in repr(ai)
    assert API_KEY not in str(vars(ai))
    assert "gpt-4o-mini" in repr(ai)


@pytest.mark.anyio
async def test_models(mock: respx.MockRouter, ai: RemoteAIProvider) -> None:
    mock.get(f"{URL}/ai/models").mock(
        return_value=httpx.Response(
            200,
            json={"providers": {"openai": {"models": ["gpt-4o-mini"]}, "mock": {"models": None}}},
        )
    )
    assert await ai.models() == {"openai": ["gpt-4o-mini"], "mock": None}


@pytest.mark.anyio
async def test_models_with_the_wrong_shape(mock: respx.MockRouter, ai: RemoteAIProvider) -> None:
    mock.get(f"{URL}/ai/models").mock(
        return_value=httpx.Response(200, json={"providers": {"openai": {"models": "all"}}})
    )
    with pytest.raises(ProtocolError):
        await ai.models()


@pytest.mark.anyio
async def test_health(mock: respx.MockRouter, ai: RemoteAIProvider) -> None:
    route = mock.get(f"{URL}/health").mock(
        side_effect=[httpx.Response(200, json={"status": "ok"}), httpx.Response(503)]
    )
    assert await ai.health() is True
    assert await ai.health() is False
    route.mock(side_effect=httpx.ConnectError("refused"))
    assert await ai.health() is False


@pytest.mark.anyio
async def test_an_injected_client_is_used_and_left_open() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"role": "assistant", "content": "in-process"})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    async with RemoteAIProvider(URL, API_KEY, "mock", "m", http_client=client) as ai:
        reply = await ai.chat([{"role": "user", "content": "hi"}])
    assert reply.content == "in-process"
    assert not client.is_closed
    await client.aclose()


@pytest.mark.anyio
async def test_an_owned_client_is_closed() -> None:
    ai = RemoteAIProvider(URL, API_KEY, "mock", "m")
    await ai.aclose()
    with pytest.raises(RuntimeError):
        await ai.chat([{"role": "user", "content": "hi"}])
