"""The official ``openai`` SDK (sync and async, ``base_url=<proxy>/v1``) against the proxy under
uvicorn calling the fake vendors: for each upstream vendor, chat, streams with usage, tool
round trips plain and streamed, parallel tool calls and JSON mode; /v1/models with
permissions; every refusal reaching the SDK as its typed exception; and the ledger row of a
stream on each vendor priced exactly from the vendor's reported usage, surface ``openai``."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from robota_proxy.testing import FakeVendors, Reply, ToolCallSpec
from tests.e2e.conftest import ProxyProcess, start_proxy, stop_proxy, vendor_env

pytestmark = [pytest.mark.e2e]

ADMIN_KEY = "admin-key-for-openai-surface-0123456789"
STATIC_KEY = "openai-surface-static-key-0123456789"
#: USD per million tokens, so the test can price each call by hand.
PRICES = {
    "openai/gpt-4o-mini": {"input": "0.15", "output": "0.6", "cache_read": "0.075"},
    "anthropic/claude-3-5-haiku-latest": {
        "input": "0.8",
        "output": "4",
        "cache_read": "0.08",
        "cache_write": "1",
    },
    "google/gemini-2.5-flash": {"input": "0.3", "output": "2.5", "cache_read": "0.075"},
}
#: The model name each vendor is reached by: a bare name the OpenAI list claims, and
#: provider/model for the others.
MODELS = {
    "openai": "gpt-4o-mini",
    "anthropic": "anthropic/claude-3-5-haiku-latest",
    "google": "google/gemini-2.5-flash",
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string"}},
            "required": ["tz"],
        },
    },
}


@pytest.fixture(scope="module")
def surface(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Path]]:
    home = tmp_path_factory.mktemp("openai_surface")
    prices = home / "prices.json"
    prices.write_text(json.dumps(PRICES))
    env = {
        **vendor_env(fake_server),
        "ROBOTA_DATABASE_URL": f"sqlite:///{home / 'robota.db'}",
        "ROBOTA_ADMIN_KEY": ADMIN_KEY,
        "ROBOTA_API_KEYS": STATIC_KEY,
        "ROBOTA_PRICES_FILE": str(prices),
        "ROBOTA_OPENAI_MODELS": "gpt-4o-mini,gpt-4o,shared-model",
        "ROBOTA_ANTHROPIC_MODELS": "claude-3-5-haiku-latest",
        "ROBOTA_GOOGLE_MODELS": "gemini-2.5-flash,shared-model",
        "ROBOTA_FALLBACKS": json.dumps({"fast": ["openai/gpt-4o-mini"]}),
        "ROBOTA_UPSTREAM_TIMEOUT": "5",
    }
    # Importing the three vendor SDKs alone takes 15 s on a busy shared machine.
    running = start_proxy(env, home / "proxy.log", startup_timeout=120)
    yield running, home / "robota.db"
    stop_proxy(running)


def client(surface: tuple[ProxyProcess, Path], key: str = STATIC_KEY, **kw: Any) -> openai.OpenAI:
    kw.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=f"{surface[0].url}/v1", api_key=key, **kw)


def async_client(surface: tuple[ProxyProcess, Path], key: str = STATIC_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{surface[0].url}/v1", api_key=key, max_retries=0)


def new_key(surface: tuple[ProxyProcess, Path], permissions: dict[str, Any]) -> tuple[str, str]:
    user = f"user-{uuid.uuid4().hex[:10]}"
    response = httpx.post(
        f"{surface[0].url}/admin/keys",
        json={"user": user, "permissions": permissions},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status_code == 201, response.text
    return user, response.json()["key"]


def ledger(database: Path, user: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        with sqlite3.connect(database) as conn:
            conn.row_factory = sqlite3.Row
            rows = [
                dict(row)
                for row in conn.execute(
                    "SELECT * FROM usage_ledger WHERE user_id = ? AND status != 'in_flight'",
                    (user,),
                )
            ]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def last_body(fake: FakeVendors, vendor: str) -> dict[str, Any]:
    calls = [recorded for recorded in fake.requests if recorded.vendor == vendor]
    assert calls, f"{vendor} was never called"
    return calls[-1].body


# --- per vendor -----------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", sorted(MODELS))
def test_chat(surface: tuple[ProxyProcess, Path], fake: FakeVendors, vendor: str) -> None:
    fake.script(Reply(text="Paris is the capital."), match="capital of France")
    answer = client(surface).chat.completions.create(
        model=MODELS[vendor],
        messages=[
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        temperature=0.2,
        max_completion_tokens=50,
        user="end-user-7",
    )
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.content == "Paris is the capital."
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 4
    assert answer.usage.prompt_tokens == 8  # words of both messages
    body = last_body(fake, vendor)
    if vendor == "openai":  # passed through as sent: the developer role, user and the limit
        assert body["messages"][0] == {"role": "developer", "content": "Answer briefly."}
        assert body["user"] == "end-user-7"
        assert body["max_completion_tokens"] == 50
    elif vendor == "anthropic":
        assert "Answer briefly." in json.dumps(body["system"])
        assert body["max_tokens"] == 50
        assert body["temperature"] == 0.2
    else:
        assert body["systemInstruction"]["parts"][0]["text"] == "Answer briefly."
        assert body["generationConfig"]["maxOutputTokens"] == 50


@pytest.mark.anyio
@pytest.mark.parametrize("vendor", sorted(MODELS))
async def test_stream_with_usage(
    surface: tuple[ProxyProcess, Path], fake: FakeVendors, vendor: str
) -> None:
    text = "Streaming works one word at a time"
    fake.script(Reply(text=text, prompt_tokens=11), match="stream please")
    async with async_client(surface) as ai:
        stream = await ai.chat.completions.create(
            model=MODELS[vendor],
            messages=[{"role": "user", "content": "stream please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([piece for piece in pieces if piece]) > 1
    assert "".join(pieces) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (11, 7)
    assert all(chunk.usage is None for chunk in chunks[:-1])


@pytest.mark.parametrize("vendor", sorted(MODELS))
def test_stream_without_include_usage_has_no_usage_chunk(
    surface: tuple[ProxyProcess, Path], fake: FakeVendors, vendor: str
) -> None:
    fake.script(Reply(text="no usage here"), match="quiet stream")
    chunks = list(
        client(surface).chat.completions.create(
            model=MODELS[vendor],
            messages=[{"role": "user", "content": "quiet stream"}],
            stream=True,
        )
    )
    assert all(chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "no usage here"


@pytest.mark.parametrize("vendor", sorted(MODELS))
def test_tool_round_trip(
    surface: tuple[ProxyProcess, Path], fake: FakeVendors, vendor: str
) -> None:
    fake.script(
        Reply(tool_calls=[ToolCallSpec("get_weather", {"city": "Paris"}, id="call_w1")]),
        match="weather in Paris",
    )
    ai = client(surface)
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = ai.chat.completions.create(
        model=MODELS[vendor], messages=messages, tools=[WEATHER], tool_choice="auto"
    )
    assert first.choices[0].finish_reason == "tool_calls"
    calls = first.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'})
    second = ai.chat.completions.create(model=MODELS[vendor], messages=messages, tools=[WEATHER])
    assert second.choices[0].message.content == 'Tool said: {"temp_c": 21}'
    assert second.choices[0].finish_reason == "stop"


@pytest.mark.anyio
@pytest.mark.parametrize("vendor", sorted(MODELS))
async def test_parallel_tool_calls_streamed(
    surface: tuple[ProxyProcess, Path], fake: FakeVendors, vendor: str
) -> None:
    fake.script(
        Reply(
            tool_calls=[
                ToolCallSpec("get_weather", {"city": "Oslo"}),
                ToolCallSpec("get_time", {"tz": "Asia/Tokyo"}),
            ]
        ),
        match="Oslo and the time",
    )
    ai = async_client(surface)
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo and the time in Tokyo?"}]
    stream = await ai.chat.completions.create(
        model=MODELS[vendor], messages=messages, tools=[WEATHER, CLOCK], stream=True
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for piece in choice.delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            assert piece.function is not None
            if piece.id:
                assert not call["id"]  # id and name only on the first piece of a call
                call["id"], call["name"] = piece.id, piece.function.name or ""
            call["arguments"] += piece.function.arguments or ""
    assert finish == "tool_calls"
    assert sorted(calls) == [0, 1]
    assert [calls[0]["name"], calls[1]["name"]] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Oslo"}
    assert json.loads(calls[1]["arguments"]) == {"tz": "Asia/Tokyo"}
    assert calls[0]["id"] and calls[1]["id"] and calls[0]["id"] != calls[1]["id"]
    messages.append(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {k: c[k] for k in ("name", "arguments")},
                }
                for _, c in sorted(calls.items())
            ],
        }
    )
    messages += [
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "cold"},
        {"role": "tool", "tool_call_id": calls[1]["id"], "content": "noon"},
    ]
    stream = await ai.chat.completions.create(
        model=MODELS[vendor], messages=messages, tools=[WEATHER, CLOCK], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    await ai.close()  # its connection pool belongs to this test's event loop
    assert text == "Tool said: cold\nnoon"


@pytest.mark.parametrize("vendor", ["openai", "google"])
def test_json_mode(surface: tuple[ProxyProcess, Path], fake: FakeVendors, vendor: str) -> None:
    fake.script(Reply(text='{"ok": true}'), match="as JSON")
    answer = client(surface).chat.completions.create(
        model=MODELS[vendor],
        messages=[{"role": "user", "content": "Answer as JSON"}],
        response_format={"type": "json_object"},
    )
    assert json.loads(answer.choices[0].message.content or "") == {"ok": True}
    body = last_body(fake, vendor)
    if vendor == "openai":
        assert body["response_format"] == {"type": "json_object"}
    else:
        assert body["generationConfig"]["responseMimeType"] == "application/json"


def test_json_schema_passes_through_to_openai(
    surface: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": {"type": "object"}, "strict": True},
    }
    client(surface).chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Which city?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            }
        ],
        response_format=schema,  # type: ignore[arg-type]
        seed=42,
        extra_body={"some_future_field": {"x": 1}},
    )
    body = last_body(fake, "openai")
    assert body["response_format"] == schema
    assert body["seed"] == 42
    assert body["some_future_field"] == {"x": 1}
    assert body["messages"][0]["content"][1]["image_url"]["url"] == "data:image/png;base64,AAAA"
    assert body["model"] == "gpt-4o-mini"


# --- refusals as the SDK's typed exceptions ------------------------------------------------


@pytest.mark.parametrize(
    ("model", "extra", "param"),
    [
        ("anthropic/claude-3-5-haiku-latest", {"seed": 1}, "seed"),
        (
            "anthropic/claude-3-5-haiku-latest",
            {"response_format": {"type": "json_object"}},
            "response_format",
        ),
        ("google/gemini-2.5-flash", {"logprobs": True}, "logprobs"),
        ("google/gemini-2.5-flash", {"n": 2}, "n"),
    ],
)
def test_untranslatable_field_is_a_400_naming_it(
    surface: tuple[ProxyProcess, Path],
    fake: FakeVendors,
    model: str,
    extra: dict[str, Any],
    param: str,
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(surface).chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], extra_body=extra
        )
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert caught.value.code == "invalid_request"
    assert caught.value.message.startswith(f"Error code: 400 - {param}: ")
    assert fake.requests == []


def test_image_part_for_anthropic_is_a_400_naming_the_part(
    surface: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(surface).chat.completions.create(
            model="anthropic/claude-3-5-haiku-latest",
            messages=[
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "https://x/cat.png"}},
                    ],
                },
            ],
        )
    assert caught.value.param == "messages.1.content.1"
    assert fake.requests == []


def test_unknown_credential_is_authentication_error(surface: tuple[ProxyProcess, Path]) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client(surface, key="not-a-key").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 401
    assert caught.value.code == "unauthenticated"
    assert caught.value.response.headers["x-request-id"].startswith("req_")


def test_forbidden_provider_is_permission_denied(
    surface: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    _, key = new_key(surface, {"allowedProviders": ["openai"]})
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client(surface, key).chat.completions.create(
            model="google/gemini-2.5-flash", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.message == (
        "Error code: 403 - provider 'google' is not allowed for this key"
    )
    assert fake.requests == []


def test_stream_feature_is_checked_by_the_body(
    surface: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    _, key = new_key(surface, {"allowedFeatures": ["chat"]})
    ai = client(surface, key)
    assert (
        ai.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        .choices[0]
        .message.content
        == "Echo: hi"
    )
    with pytest.raises(openai.PermissionDeniedError) as caught:
        ai.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert "feature 'stream' is not allowed" in caught.value.message


def test_rate_limit_is_rate_limit_error_with_retry_after(
    surface: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    _, key = new_key(surface, {"rpm": 1})
    ai = client(surface, key)
    ai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(openai.RateLimitError) as caught:
        ai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "b"}])
    retry_after = int(caught.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert caught.value.code == "rate_limited"
    assert len([r for r in fake.requests if r.vendor == "openai"]) == 1


def test_budget_refusal_is_402_and_not_retried(
    surface: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    _, key = new_key(surface, {"monthlyBudgetUsd": "0.000001"})
    sent: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    ai = client(surface, key, max_retries=3, http_client=http)
    with pytest.raises(openai.APIStatusError) as caught:
        ai.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 402
    assert caught.value.code == "budget_exceeded"
    assert caught.value.message.startswith("Error code: 402 - monthly budget reached")
    assert len(sent) == 1  # the SDK did not retry
    assert fake.requests == []


def test_unknown_model_is_not_found(surface: tuple[ProxyProcess, Path], fake: FakeVendors) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(surface).chat.completions.create(
            model="gpt-nope", messages=[{"role": "user", "content": "hi"}]
        )
    assert "model 'gpt-nope' is not offered for provider 'openai'" in caught.value.message
    assert fake.requests == []


def test_ambiguous_bare_name_lists_the_candidates(
    surface: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(surface).chat.completions.create(
            model="shared-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.param == "model"
    assert caught.value.message == (
        "Error code: 400 - model 'shared-model' is ambiguous: it could be "
        "google/shared-model, openai/shared-model; name one as provider/model"
    )


def test_alias_goes_through_its_chain(
    surface: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    answer = client(surface).chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "via alias"}]
    )
    assert answer.choices[0].message.content == "Echo: via alias"
    assert last_body(fake, "openai")["model"] == "gpt-4o-mini"


def test_vendor_failure_midway_ends_the_stream_with_an_error_chunk(
    surface: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    from robota_proxy.testing import Fault

    fake.script(Reply(text="one two three four five", fault=Fault(drop_after=2)), match="cut")
    stream = client(surface).chat.completions.create(
        model="anthropic/claude-3-5-haiku-latest",
        messages=[{"role": "user", "content": "cut"}],
        stream=True,
    )
    text = ""
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            text += chunk.choices[0].delta.content or ""
    assert text  # something arrived before the cut
    assert caught.value.code == "upstream_error"


# --- models -------------------------------------------------------------------------------


def test_models_lists_what_the_caller_may_use(surface: tuple[ProxyProcess, Path]) -> None:
    everything = [m.id for m in client(surface).models.list()]
    assert everything == [
        "anthropic/claude-3-5-haiku-latest",
        "google/gemini-2.5-flash",
        "google/shared-model",
        "mock/mock-1",
        "openai/gpt-4o-mini",
        "openai/gpt-4o",
        "openai/shared-model",
        "fast",
    ]
    _, key = new_key(
        surface, {"allowedProviders": ["openai", "mock"], "allowedModels": ["gpt-4o*", "mock-*"]}
    )
    assert [m.id for m in client(surface, key).models.list()] == [
        "mock/mock-1",
        "openai/gpt-4o-mini",
        "openai/gpt-4o",
    ]


# --- the bill ---------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", sorted(MODELS))
def test_streamed_usage_is_priced_exactly_and_marked_openai(
    surface: tuple[ProxyProcess, Path], fake: FakeVendors, vendor: str
) -> None:
    writes = 100 if vendor == "anthropic" else 0  # only Anthropic reports cache writes
    fake.script(
        Reply(
            text="metered answer",
            prompt_tokens=1000,
            completion_tokens=200,
            cached_tokens=400,
            cache_write_tokens=writes,
            reasoning_tokens=50,
        ),
        match="bill me",
    )
    user, key = new_key(surface, {})
    chunks = list(
        client(surface, key).chat.completions.create(
            model=MODELS[vendor],
            messages=[{"role": "user", "content": "bill me"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None and usage.completion_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 400
    assert usage.completion_tokens_details.reasoning_tokens == 50
    price = {k: Decimal(v) for k, v in PRICES[f"{vendor}/{MODELS[vendor].split('/')[-1]}"].items()}
    expected = (
        (1000 - 400 - writes) * price["input"]
        + 400 * price["cache_read"]
        + writes * price.get("cache_write", price["input"])
        + 200 * price["output"]
    ) / 1_000_000
    [row] = ledger(surface[1], user, 1)
    assert row["surface"] == "openai"
    assert row["status"] == "ok"
    assert row["streamed"] == 1
    assert (row["prompt_tokens"], row["completion_tokens"]) == (1000, 200)
    assert (row["cached_prompt_tokens"], row["cache_write_tokens"]) == (400, writes)
    assert row["reasoning_tokens"] == 50
    assert Decimal(row["cost_pico"]) / 10**12 == expected
