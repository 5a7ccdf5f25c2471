"""The fake vendors, driven by the official SDKs (and plain httpx for Gemini), so the fakes
are known to speak each wire format well enough for the proxy's real clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from httpx_sse import aconnect_sse, connect_sse

from robota_proxy.testing import FakeVendors, Fault, RecordedRequest, Reply, ToolCallSpec

KEY = "sk-test-vendor-key-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[2]
WEATHER_AND_TIME = [
    ToolCallSpec("get_weather", {"city": "Paris"}),
    ToolCallSpec("get_time", {"tz": "CET"}),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeVendors]:
    with FakeVendors(api_key=KEY) as running:
        yield running


@pytest.fixture
def fake(server: FakeVendors) -> Iterator[FakeVendors]:
    server.reset()
    yield server
    server.reset()


def openai_client(fake: FakeVendors, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=fake.openai_base_url, api_key=key, max_retries=0)


def anthropic_client(fake: FakeVendors, key: str = KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=fake.anthropic_base_url, api_key=key, max_retries=0)


def gemini_url(fake: FakeVendors, action: str = "generateContent") -> str:
    return f"{fake.google_base_url}/v1beta/models/gemini-2.5-flash:{action}"


def gemini_body(text: str) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}]}


def wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# --- OpenAI ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_openai_chat_default_echo_and_usage(fake: FakeVendors) -> None:
    async with openai_client(fake) as client:
        completion = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hello there"},
            ],
        )
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    choice = completion.choices[0]
    assert choice.message.content == "Echo: hello there"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 4  # "Be brief." + "hello there"
    assert completion.usage.completion_tokens == 3
    assert completion.usage.total_tokens == 7

    (recorded,) = fake.requests
    assert recorded.vendor == "openai" and recorded.path == "/v1/chat/completions"
    assert recorded.headers["authorization"] == f"Bearer {KEY}"
    assert recorded.last_role == "user" and recorded.last_text == "hello there"
    assert not recorded.stream


@pytest.mark.anyio
async def test_openai_chat_tool_calls_and_usage_details(fake: FakeVendors) -> None:
    fake.script(Reply(tool_calls=WEATHER_AND_TIME, cached_tokens=2, reasoning_tokens=3), match="w")
    async with openai_client(fake) as client:
        completion = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "weather and time"}]
        )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    assert message.tool_calls is not None
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]  # type: ignore[union-attr]
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert all(call.id.startswith("call_") for call in message.tool_calls)
    usage = completion.usage
    assert usage is not None and usage.completion_tokens == 10  # 5 per call
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 2
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 3


@pytest.mark.anyio
async def test_openai_stream_text_tools_and_usage_chunk(fake: FakeVendors) -> None:
    fake.script(Reply(text="Let me check that", tool_calls=WEATHER_AND_TIME), match="weather")
    async with openai_client(fake) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "weather?"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]

    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert texts == ["Let ", "me ", "check ", "that"]
    deltas = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    for index, name in enumerate(["get_weather", "get_time"]):
        pieces = [d for d in deltas if d.index == index]
        assert len(pieces) > 2, "arguments arrive in several fragments"
        assert pieces[0].id and pieces[0].type == "function"
        assert pieces[0].function is not None and pieces[0].function.name == name
        assert all(p.id is None and p.function and p.function.name is None for p in pieces[1:])
        arguments = "".join(p.function.arguments or "" for p in pieces if p.function)
        assert json.loads(arguments) == WEATHER_AND_TIME[index].arguments
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 14
    assert all(c.usage is None for c in chunks[:-1])
    assert fake.requests[-1].stream
    wait_for(lambda: fake.completed_streams == 1)


@pytest.mark.anyio
async def test_openai_stream_helper_assembles_the_message(fake: FakeVendors) -> None:
    fake.script(Reply(text="one two three"))
    async with (
        openai_client(fake) as client,
        client.chat.completions.stream(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "count"}]
        ) as stream,
    ):
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "one two three"
    assert final.choices[0].finish_reason == "stop"


def test_openai_raw_stream_without_usage_ends_with_done(fake: FakeVendors) -> None:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "a b"}]}
    headers = {"authorization": f"Bearer {KEY}"}
    with (
        httpx.Client() as client,
        connect_sse(
            client, "POST", f"{fake.openai_base_url}/chat/completions", json=body, headers=headers
        ) as source,
    ):
        assert source.response.headers["content-type"].startswith("text/event-stream")
        data = [event.data for event in source.iter_sse()]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert all("usage" not in chunk for chunk in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Echo: a b"


@pytest.mark.anyio
async def test_openai_models_list(fake: FakeVendors) -> None:
    async with openai_client(fake) as client:
        models = [model.id async for model in client.models.list()]
    assert "gpt-4o-mini" in models


# --- Anthropic ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_anthropic_create_text_and_tool_use(fake: FakeVendors) -> None:
    fake.script(Reply(text="Checking.", tool_calls=WEATHER_AND_TIME, cached_tokens=1), match="w")
    async with anthropic_client(fake) as client:
        message = await client.messages.create(
            model="claude-3-5-haiku-latest",
            max_tokens=100,
            system="Be brief.",
            messages=[{"role": "user", "content": "weather and time"}],
        )
    assert message.stop_reason == "tool_use"
    text, *tools = message.content
    assert text.type == "text" and text.text == "Checking."
    assert [(t.type, t.name, t.input) for t in tools] == [  # type: ignore[union-attr]
        ("tool_use", "get_weather", {"city": "Paris"}),
        ("tool_use", "get_time", {"tz": "CET"}),
    ]
    assert all(t.id.startswith("toolu_") for t in tools)  # type: ignore[union-attr]
    # 5 prompt words, 1 of them from the cache: Anthropic's input_tokens leaves it out.
    assert message.usage.input_tokens == 4
    assert message.usage.cache_read_input_tokens == 1
    assert message.usage.cache_creation_input_tokens == 0
    assert message.usage.output_tokens == 11
    recorded = fake.requests[-1]
    assert recorded.vendor == "anthropic" and "anthropic-version" in recorded.headers


@pytest.mark.anyio
async def test_anthropic_stream_helper_final_message(fake: FakeVendors) -> None:
    fake.script(Reply(text="Let me look", tool_calls=WEATHER_AND_TIME), match="weather")
    async with (
        anthropic_client(fake) as client,
        client.messages.stream(
            model="claude-3-5-haiku-latest",
            max_tokens=100,
            messages=[{"role": "user", "content": "weather?"}],
        ) as stream,
    ):
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()

    # The helper hides ``ping`` and adds derived events such as ``text`` and ``input_json``.
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert "input_json" in kinds
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 3
    assert final.stop_reason == "tool_use"
    assert final.content[0].type == "text" and final.content[0].text == "Let me look"
    inputs = [block.input for block in final.content[1:]]  # type: ignore[union-attr]
    assert inputs == [{"city": "Paris"}, {"tz": "CET"}]
    assert final.usage.input_tokens == 1
    assert final.usage.output_tokens == 13


@pytest.mark.anyio
async def test_anthropic_stream_text_deltas_in_pieces(fake: FakeVendors) -> None:
    async with (
        anthropic_client(fake) as client,
        client.messages.stream(
            model="claude", max_tokens=10, messages=[{"role": "user", "content": "hi you"}]
        ) as stream,
    ):
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert pieces == ["Echo: ", "hi ", "you"]
    assert final.stop_reason == "end_turn"


def test_anthropic_requires_version_header(fake: FakeVendors) -> None:
    response = httpx.post(
        f"{fake.anthropic_base_url}/v1/messages",
        headers={"x-api-key": KEY},
        json={"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


# --- Gemini ------------------------------------------------------------------------------


def test_gemini_generate_content_text(fake: FakeVendors) -> None:
    response = httpx.post(
        gemini_url(fake),
        headers={"x-goog-api-key": KEY},
        json={
            "systemInstruction": {"parts": [{"text": "Be brief."}]},
            **gemini_body("hello there"),
        },
    )
    assert response.status_code == 200
    payload = response.json()
    candidate = payload["candidates"][0]
    assert candidate["content"] == {"role": "model", "parts": [{"text": "Echo: hello there"}]}
    assert candidate["finishReason"] == "STOP"
    assert payload["usageMetadata"] == {
        "promptTokenCount": 4,
        "candidatesTokenCount": 3,
        "totalTokenCount": 7,
    }
    assert payload["modelVersion"] == "gemini-2.5-flash"
    assert fake.requests[-1].vendor == "google" and fake.requests[-1].model == "gemini-2.5-flash"


def test_gemini_key_in_query_and_max_tokens_finish(fake: FakeVendors) -> None:
    fake.script(Reply(text="cut", finish="length"))
    response = httpx.post(gemini_url(fake), params={"key": KEY}, json=gemini_body("story"))
    assert response.json()["candidates"][0]["finishReason"] == "MAX_TOKENS"


@pytest.mark.anyio
async def test_gemini_stream_sse_pieces_then_finish_and_usage(fake: FakeVendors) -> None:
    fake.script(Reply(text="one two three four", reasoning_tokens=2))
    async with (
        httpx.AsyncClient() as client,
        aconnect_sse(
            client,
            "POST",
            gemini_url(fake, "streamGenerateContent"),
            params={"alt": "sse"},
            headers={"x-goog-api-key": KEY},
            json=gemini_body("count"),
        ) as source,
    ):
        chunks = [json.loads(event.data) async for event in source.aiter_sse()]
    texts = [chunk["candidates"][0]["content"]["parts"][0]["text"] for chunk in chunks]
    assert texts == ["one ", "two ", "three ", "four"]
    assert all("finishReason" not in c["candidates"][0] for c in chunks[:-1])
    assert all("usageMetadata" not in chunk for chunk in chunks[:-1])
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert chunks[-1]["usageMetadata"] == {
        "promptTokenCount": 1,
        "candidatesTokenCount": 2,
        "thoughtsTokenCount": 2,
        "totalTokenCount": 5,
    }


@pytest.mark.anyio
async def test_gemini_stream_function_calls(fake: FakeVendors) -> None:
    fake.script(Reply(tool_calls=WEATHER_AND_TIME))
    async with (
        httpx.AsyncClient() as client,
        aconnect_sse(
            client,
            "POST",
            gemini_url(fake, "streamGenerateContent"),
            params={"alt": "sse"},
            headers={"x-goog-api-key": KEY},
            json=gemini_body("weather"),
        ) as source,
    ):
        chunks = [json.loads(event.data) async for event in source.aiter_sse()]
    (last,) = chunks
    parts = last["candidates"][0]["content"]["parts"]
    assert parts == [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
        {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}},
    ]
    assert last["candidates"][0]["finishReason"] == "STOP"
    assert last["usageMetadata"]["candidatesTokenCount"] == 10


# --- defaults and rules ------------------------------------------------------------------


@pytest.mark.anyio
async def test_tool_results_get_the_default_reply_in_every_format(fake: FakeVendors) -> None:
    async with openai_client(fake) as client:
        completion = await client.chat.completions.create(
            model="gpt-4o",
            messages=[
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "w", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "21C"},
            ],
        )
    assert completion.choices[0].message.content == "Tool said: 21C"

    async with anthropic_client(fake) as aclient:
        message = await aclient.messages.create(
            model="claude",
            max_tokens=50,
            messages=[
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {}}],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "21C"}],
                },
            ],
        )
    assert message.content[0].type == "text" and message.content[0].text == "Tool said: 21C"

    contents = [
        {"role": "user", "parts": [{"text": "weather?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "w", "args": {}}}]},
        {
            "role": "user",
            "parts": [{"functionResponse": {"name": "w", "response": {"result": "21C"}}}],
        },
    ]
    async with httpx.AsyncClient(headers={"x-goog-api-key": KEY}) as http:
        response = await http.post(gemini_url(fake), json={"contents": contents})
    parts = response.json()["candidates"][0]["content"]["parts"]
    assert parts == [{"text": "Tool said: 21C"}]
    assert [r.last_role for r in fake.requests] == ["tool", "tool", "tool"]


def test_rules_match_in_order_with_times_vendor_and_predicates(fake: FakeVendors) -> None:
    fake.script(Reply(text="first"), match="hello", times=1)
    fake.script(Reply(text="google only"), match="hello", vendor="google")
    fake.script(Reply(text="by predicate"), match=lambda r: r.model == "special")

    def ask(text: str, model: str = "gpt-4o") -> str:
        response = httpx.post(
            f"{fake.openai_base_url}/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={"model": model, "messages": [{"role": "user", "content": text}]},
        )
        content: str = response.json()["choices"][0]["message"]["content"]
        return content

    assert ask("hello") == "first"
    assert ask("hello") == "Echo: hello"  # used up; the google rule does not apply here
    assert ask("anything", model="special") == "by predicate"
    google = httpx.post(
        gemini_url(fake), headers={"x-goog-api-key": KEY}, json=gemini_body("hello")
    )
    assert google.json()["candidates"][0]["content"]["parts"][0]["text"] == "google only"
    assert isinstance(fake.requests[0], RecordedRequest)
    fake.reset()
    assert fake.requests == [] and ask("hello") == "Echo: hello"


@pytest.mark.parametrize(
    ("vendor", "body"),
    [
        (
            "openai",
            {"model": "m", "messages": [{"role": "tool", "tool_call_id": "x", "content": "r"}]},
        ),
        (
            "anthropic",
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x"}]}
                ],
            },
        ),
        (
            "google",
            {"contents": [{"role": "user", "parts": [{"functionResponse": {"name": "f"}}]}]},
        ),
    ],
)
def test_tool_results_without_their_call_are_rejected(
    fake: FakeVendors, vendor: str, body: dict[str, Any]
) -> None:
    url, headers = {
        "openai": (f"{fake.openai_base_url}/chat/completions", {"authorization": f"Bearer {KEY}"}),
        "anthropic": (
            f"{fake.anthropic_base_url}/v1/messages",
            {"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        ),
        "google": (gemini_url(fake), {"x-goog-api-key": KEY}),
    }[vendor]
    response = httpx.post(url, headers=headers, json=body)
    assert response.status_code == 400
    assert "error" in response.json()


# --- auth and errors ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_wrong_key_is_refused_in_each_vendor_format(fake: FakeVendors) -> None:
    wrong = "sk-wrong-vendor-key-9876543210fedcba"
    async with openai_client(fake, wrong) as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "invalid_api_key"
    assert error["message"].startswith("Incorrect API key provided: sk-wrong*")
    assert error["message"].endswith("https://platform.openai.com/account/api-keys.")
    # Quoted as OpenAI quotes it: the first 8 and last 4 characters, the rest starred.
    assert f"sk-wrong{'*' * (len(wrong) - 12)}dcba." in error["message"]
    assert wrong not in error["message"]

    async with anthropic_client(fake, wrong) as aclient:
        with pytest.raises(anthropic.AuthenticationError) as denied:
            await aclient.messages.create(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
    assert denied.value.status_code == 401
    assert isinstance(denied.value.body, dict)
    assert denied.value.body["error"]["type"] == "authentication_error"

    async with httpx.AsyncClient() as http:
        google = await http.post(
            gemini_url(fake), headers={"x-goog-api-key": wrong}, json=gemini_body("x")
        )
        keyless = await http.post(gemini_url(fake), json=gemini_body("x"))
    # Google answers a bad key with 400 INVALID_ARGUMENT / API_KEY_INVALID, not a 401.
    assert google.status_code == 400
    assert google.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    assert keyless.status_code == 403


@pytest.mark.parametrize(
    ("vendor", "kind"),
    [
        ("openai", "rate_limit_exceeded"),
        ("anthropic", "rate_limit_error"),
        ("google", "RESOURCE_EXHAUSTED"),
    ],
)
def test_429_with_retry_after_in_vendor_format(fake: FakeVendors, vendor: str, kind: str) -> None:
    fake.script(Fault(status=429, retry_after=2.0), match="busy")
    if vendor == "openai":
        response = httpx.post(
            f"{fake.openai_base_url}/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "busy"}]},
        )
        assert response.json()["error"]["code"] == kind
    elif vendor == "anthropic":
        response = httpx.post(
            f"{fake.anthropic_base_url}/v1/messages",
            headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
            json={"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "busy"}]},
        )
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == kind
    else:
        response = httpx.post(
            gemini_url(fake), headers={"x-goog-api-key": KEY}, json=gemini_body("busy")
        )
        assert response.json()["error"]["status"] == kind
        assert response.json()["error"]["code"] == 429
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"


@pytest.mark.anyio
async def test_sdk_sees_status_faults(fake: FakeVendors) -> None:
    fake.script(Fault(status=529), match="busy")
    async with anthropic_client(fake) as client:
        with pytest.raises(anthropic.APIStatusError) as failed:
            await client.messages.create(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "busy"}]
            )
    assert failed.value.status_code == 529
    assert isinstance(failed.value.body, dict)
    assert failed.value.body["error"]["type"] == "overloaded_error"


# --- stream faults -----------------------------------------------------------------------


def _openai_stream(fake: FakeVendors, text: str, client: httpx.Client) -> Any:
    return connect_sse(
        client,
        "POST",
        f"{fake.openai_base_url}/chat/completions",
        headers={"authorization": f"Bearer {KEY}"},
        json={"model": "m", "stream": True, "messages": [{"role": "user", "content": text}]},
    )


def test_drop_after_cuts_the_connection_mid_body(fake: FakeVendors) -> None:
    fake.script(Reply(text="one two three four five", fault=Fault(drop_after=2)), match="cut")
    received: list[str] = []
    with (
        httpx.Client() as client,
        _openai_stream(fake, "cut", client) as source,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        for event in source.iter_sse():
            received.append(json.loads(event.data)["choices"][0]["delta"].get("content") or "")
    assert "".join(received) == "one two "
    wait_for(lambda: fake.dropped_streams == 1)
    assert fake.completed_streams == 0


def test_drop_after_applies_to_content_chunks_of_every_vendor(fake: FakeVendors) -> None:
    fake.script(Reply(text="one two three four", fault=Fault(drop_after=1)))
    names: list[str] = []
    with (
        httpx.Client() as client,
        connect_sse(
            client,
            "POST",
            f"{fake.anthropic_base_url}/v1/messages",
            headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
            json={
                "model": "m",
                "max_tokens": 9,
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
            },
        ) as source,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        for event in source.iter_sse():
            names.append(event.event)
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta"]


def test_malformed_at_replaces_one_chunk_with_non_json(fake: FakeVendors) -> None:
    fake.script(Reply(text="one two three four", fault=Fault(malformed_at=2)), match="garble")
    with httpx.Client() as client, _openai_stream(fake, "garble", client) as source:
        data = [event.data for event in source.iter_sse()]
    broken = []
    for item in data[:-1]:
        try:
            json.loads(item)
        except ValueError:
            broken.append(item)
    assert len(broken) == 1
    assert data.index(broken[0]) == 3  # the role chunk, then "one ", "two ", then this
    assert data[-1] == "[DONE]"
    wait_for(lambda: fake.completed_streams == 1)


def test_client_leaving_mid_stream_is_counted_as_aborted(fake: FakeVendors) -> None:
    fake.script(Reply(text="a b c d e f g h i j", fault=Fault(chunk_latency=0.05)), match="slow")
    with httpx.Client() as client, _openai_stream(fake, "slow", client) as source:
        for position, _ in enumerate(source.iter_sse()):
            if position == 2:
                break
    wait_for(lambda: fake.aborted_streams == 1)
    assert fake.completed_streams == 0 and fake.dropped_streams == 0


def test_latency_delays_the_answer_and_can_time_out(fake: FakeVendors) -> None:
    fake.script(Fault(latency=0.3), match="slow")
    body = {"model": "m", "messages": [{"role": "user", "content": "slow"}]}
    headers = {"authorization": f"Bearer {KEY}"}
    url = f"{fake.openai_base_url}/chat/completions"
    started = time.monotonic()
    response = httpx.post(url, headers=headers, json=body)
    assert time.monotonic() - started >= 0.3
    assert response.json()["choices"][0]["message"]["content"] == "Echo: slow"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, headers=headers, json=body, timeout=0.1)


def test_stream_faults_do_not_affect_a_json_request(fake: FakeVendors) -> None:
    fake.script(Reply(text="fine", fault=Fault(drop_after=0, malformed_at=0)))
    response = httpx.post(gemini_url(fake), headers={"x-goog-api-key": KEY}, json=gemini_body("x"))
    assert response.json()["candidates"][0]["content"]["parts"] == [{"text": "fine"}]


# --- lifecycle ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_context_manager_starts_and_stops() -> None:
    async with FakeVendors(api_key="k") as fake:
        url = fake.openai_base_url
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{url}/models", headers={"authorization": "Bearer k"})
        assert response.status_code == 200
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{url}/models")


def test_command_line_serves_until_interrupted() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "robota_proxy.testing", "--port", "0", "--api-key", "cli-key"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert process.stdout is not None
        # All four lines first: SIGINT while the server is still printing would interrupt
        # the print, not the wait that is meant to end cleanly.
        lines = [process.stdout.readline() for _ in range(4)]
        assert lines[0].startswith("OpenAI:") and lines[3].startswith("API key:")
        base = lines[0].split()[-1]
        assert base.endswith("/v1")
        response = httpx.get(f"{base}/models", headers={"authorization": "Bearer cli-key"})
        assert response.status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
