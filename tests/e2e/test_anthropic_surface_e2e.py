"""The official ``anthropic`` SDK (sync and async, ``base_url=<proxy>``) -> the proxy under
uvicorn -> the fake vendors, for each upstream vendor: chat, the SSE sequence the SDK parses,
tool round trips, thinking passed through with its signature, count_tokens, both credential
headers, every error as the SDK's typed exception, a budget that holds, and ledger rows
whose cost is the hand-computed price of the vendor's reported usage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from robota_proxy.dialects import anthropic as dialect
from robota_proxy.dialects import syntactic_router
from robota_proxy.policy.pricing import prompt_token_bound
from robota_proxy.testing import FakeVendors, Fault, Reply, ToolCallSpec
from tests.e2e.conftest import (
    USER_KEY,
    ProxyProcess,
    ledger_rows,
    start_proxy,
    stop_proxy,
    vendor_env,
    wait_for_ledger,
)

pytestmark = pytest.mark.e2e

ADMIN_KEY = "admin-key-for-anthropic-surface-0123456789"
#: The model each vendor is reached by: a bare Claude name goes to Anthropic (passthrough).
MODELS = {
    "anthropic": "claude-3-5-haiku-latest",
    "openai": "openai/gpt-4o-mini",
    "google": "google/gemini-2.5-flash",
}
#: USD per million tokens, the same for the three models so one formula prices every row.
PRICE = {
    "input": Decimal(3),
    "output": Decimal(15),
    "cache_read": Decimal("0.3"),
    "cache_write": Decimal("3.75"),
}
#: A model priced at $0.001 a token, so that a budget of cents bites within a few calls.
DEAR = "claude-dear-1"
WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
CLOCK = {
    "name": "get_time",
    "description": "Current time in a time zone",
    "input_schema": {
        "type": "object",
        "properties": {"tz": {"type": "string"}},
        "required": ["tz"],
    },
}


@pytest.fixture(scope="module")
def surface(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    home = tmp_path_factory.mktemp("anthropic_surface")
    prices = home / "prices.json"
    text = {key: str(value) for key, value in PRICE.items()}
    prices.write_text(
        json.dumps(
            {
                DEAR: {"input": "1000", "output": "1000"},
                "claude-*": text,
                "gpt-4o-mini": text,
                "gemini-2.5-flash": text,
            }
        )
    )
    env = {
        **vendor_env(fake_server),
        "ROBOTA_API_KEYS": USER_KEY,
        "ROBOTA_ADMIN_KEY": ADMIN_KEY,
        "ROBOTA_PRICES_FILE": str(prices),
        "ROBOTA_UPSTREAM_TIMEOUT": "2",
        "ROBOTA_MAX_BODY_BYTES": str(64 * 1024),
    }
    # Every vendor SDK is imported at start: slow on a machine shared with other test runs.
    running = start_proxy(env, home / "proxy.log", startup_timeout=120)
    yield running
    stop_proxy(running)


def database(proxy: ProxyProcess) -> Path:
    return proxy.log_path.parent / "robota.db"


def client(proxy: ProxyProcess, key: str = USER_KEY, retries: int = 0) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=retries)


def new_key(proxy: ProxyProcess, user: str, permissions: dict[str, Any]) -> str:
    answer = httpx.post(
        f"{proxy.url}/admin/keys",
        json={"user": user, "permissions": permissions},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=10,
    )
    assert answer.status_code == 201, answer.text
    key: str = answer.json()["key"]
    return key


def vendor_calls(fake: FakeVendors, vendor: str | None = None) -> list[Any]:
    return [r for r in fake.requests if vendor is None or r.vendor == vendor]


def tool_results(message: Any) -> list[dict[str, Any]]:
    """The application's own tools, run on the client side."""
    results = []
    for block in message.content:
        if block.type == "tool_use":
            value = {"temp_c": 21} if block.name == "get_weather" else {"time": "12:00"}
            results.append(
                {"type": "tool_result", "tool_use_id": block.id, "content": json.dumps(value)}
            )
    return results


# --- chat, stream, tools, for each vendor -----------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("vendor", sorted(MODELS))
async def test_chat_with_the_async_sdk(
    vendor: str, surface: ProxyProcess, fake: FakeVendors
) -> None:
    fake.script(Reply(text="Paris is the capital of France."), match="capital of France")
    async with anthropic.AsyncAnthropic(
        base_url=surface.url, api_key=USER_KEY, max_retries=0
    ) as ai:
        message = await ai.messages.create(
            model=MODELS[vendor],
            max_tokens=50,
            system=[{"type": "text", "text": "Answer briefly."}],
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            extra_body={"temperature": 0},  # this SDK generation no longer declares it
        )
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "Paris is the capital of France."  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 6
    assert message.model == MODELS[vendor]
    [call] = vendor_calls(fake)
    assert call.vendor == vendor
    if vendor == "anthropic":  # the caller's own JSON, model rewritten (here: the same)
        assert call.body["system"] == [{"type": "text", "text": "Answer briefly."}]
        assert call.body["max_tokens"] == 50
    elif vendor == "openai":
        assert call.body["messages"][0] == {"role": "system", "content": "Answer briefly."}
        assert call.body["temperature"] == 0
    else:
        assert call.body["systemInstruction"]["parts"][0]["text"] == "Answer briefly."


@pytest.mark.parametrize("vendor", sorted(MODELS))
def test_stream_event_sequence_and_final_message(
    vendor: str, surface: ProxyProcess, fake: FakeVendors
) -> None:
    fake.script(Reply(text="one two three", completion_tokens=3), match="count")
    with client(surface).messages.stream(
        model=MODELS[vendor], max_tokens=50, messages=[{"role": "user", "content": "count"}]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "text",
        "content_block_delta",
        "text",
        "content_block_delta",
        "text",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert final.content[0].text == "one two three"  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 3
    assert vendor_calls(fake)[-1].stream


def test_the_raw_stream_has_a_ping_and_a_request_id(
    surface: ProxyProcess, fake: FakeVendors
) -> None:
    for model in MODELS.values():
        with httpx.stream(
            "POST",
            f"{surface.url}/v1/messages",
            json={
                "model": model,
                "max_tokens": 20,
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            },
            headers={"x-api-key": USER_KEY, "anthropic-version": "2023-06-01"},
            timeout=10,
        ) as answer:
            names = [line[7:] for line in answer.iter_lines() if line.startswith("event: ")]
            assert answer.headers["request-id"].startswith("req_")
        assert names[:2] == ["message_start", "ping"], model
        assert names[-2:] == ["message_delta", "message_stop"], model


def tool_round_trip(
    ai: anthropic.Anthropic, model: str, prompt: str, streaming: bool
) -> tuple[Any, Any]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]

    def ask() -> Any:
        kwargs: dict[str, Any] = {
            "model": model,
            "max_tokens": 200,
            "messages": messages,
            "tools": [WEATHER, CLOCK],
        }
        if not streaming:
            return ai.messages.create(**kwargs)
        with ai.messages.stream(**kwargs) as stream:
            partial = [e for e in stream if e.type == "input_json"]
            final = stream.get_final_message()
        if final.stop_reason == "tool_use":
            assert partial, "tool arguments must arrive as input_json_delta"
        return final

    first = ask()
    assert first.stop_reason == "tool_use"
    messages.append({"role": "assistant", "content": [b.model_dump() for b in first.content]})
    messages.append({"role": "user", "content": tool_results(first)})
    return first, ask()


@pytest.mark.parametrize("streaming", [False, True], ids=["chat", "stream"])
@pytest.mark.parametrize("vendor", sorted(MODELS))
def test_tool_round_trip(
    vendor: str, streaming: bool, surface: ProxyProcess, fake: FakeVendors
) -> None:
    fake.script(
        Reply(tool_calls=[ToolCallSpec("get_weather", {"city": "Paris"})]), match="weather in Paris"
    )
    fake.script(Reply(text="It is 21 degrees in Paris."), match="temp_c")
    first, final = tool_round_trip(client(surface), MODELS[vendor], "weather in Paris?", streaming)
    [call] = [block for block in first.content if block.type == "tool_use"]
    assert (call.name, call.input) == ("get_weather", {"city": "Paris"})
    assert final.content[0].text == "It is 21 degrees in Paris."
    assert final.stop_reason == "end_turn"
    body = vendor_calls(fake)[-1].body
    if vendor == "anthropic":
        assert body["messages"][-1]["content"][0]["tool_use_id"] == call.id
    elif vendor == "openai":
        assert body["messages"][-1]["tool_call_id"] == call.id
        assert body["messages"][-2]["tool_calls"][0]["function"]["name"] == "get_weather"
    else:
        part = body["contents"][-1]["parts"][0]
        assert part["functionResponse"]["response"]["temp_c"] == 21


@pytest.mark.parametrize("streaming", [False, True], ids=["chat", "stream"])
@pytest.mark.parametrize("vendor", sorted(MODELS))
def test_parallel_tool_calls(
    vendor: str, streaming: bool, surface: ProxyProcess, fake: FakeVendors
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
    first, final = tool_round_trip(client(surface), MODELS[vendor], "weather and time?", streaming)
    calls = [block for block in first.content if block.type == "tool_use"]
    assert [(c.name, c.input) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {"tz": "CET"}),
    ]
    assert len({c.id for c in calls}) == 2
    assert final.content[0].text == "Oslo: 21C at 12:00."


# --- passthrough to Anthropic ---------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["chat", "stream"])
def test_thinking_signature_cache_control_and_betas_pass_through(
    streaming: bool, surface: ProxyProcess, fake: FakeVendors
) -> None:
    fake.script(Reply(text="42.", thinking="Six times seven is forty-two."), match="answer")
    fake.script(Reply(text="Yes."), match="sure")
    ai = anthropic.Anthropic(
        base_url=surface.url,
        api_key=USER_KEY,
        max_retries=0,
        default_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"},
    )
    system = [{"type": "text", "text": "Think first.", "cache_control": {"type": "ephemeral"}}]
    kwargs: dict[str, Any] = {
        "model": MODELS["anthropic"],
        "max_tokens": 2048,
        "system": system,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    history: list[dict[str, Any]] = [{"role": "user", "content": "the answer?"}]
    if streaming:
        with ai.messages.stream(messages=history, **kwargs) as stream:
            kinds = [event.type for event in stream]
            first = stream.get_final_message()
        assert "thinking" in kinds and "signature" in kinds
    else:
        first = ai.messages.create(messages=history, **kwargs)
    thinking = first.content[0]
    assert thinking.type == "thinking"
    assert thinking.thinking == "Six times seven is forty-two."
    sent = vendor_calls(fake)[-1]
    assert sent.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert sent.body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert sent.body["system"] == system
    # The block goes back as the SDK returned it; the fake refuses an altered signature.
    history += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": "sure?"},
    ]
    second = ai.messages.create(messages=history, **kwargs)
    assert second.content[-1].text == "Yes."  # type: ignore[union-attr]
    returned = vendor_calls(fake)[-1].body["messages"][1]["content"][0]
    assert returned == {
        "type": "thinking",
        "thinking": thinking.thinking,
        "signature": thinking.signature,
    }


@pytest.mark.parametrize("vendor", ["openai", "google"])
def test_thinking_to_another_vendor_is_a_400_naming_it(
    vendor: str, surface: ProxyProcess, fake: FakeVendors
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client(surface).messages.create(
            model=MODELS[vendor],
            max_tokens=2048,
            thinking={"type": "enabled", "budget_tokens": 1024},
            messages=[{"role": "user", "content": "hi"}],
        )
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert caught.value.body["error"]["message"].startswith("thinking: ")  # type: ignore[index]
    assert vendor_calls(fake) == []


def test_count_tokens(surface: ProxyProcess, fake: FakeVendors) -> None:
    ai = client(surface)
    messages = [{"role": "user", "content": "five words in this prompt"}]
    counted = ai.messages.count_tokens(model=MODELS["anthropic"], messages=messages)
    assert counted.input_tokens == 5  # the fake vendor's count: one token a word
    [call] = vendor_calls(fake)
    assert call.path == "/v1/messages/count_tokens"
    for vendor in ("openai", "google"):
        estimate = ai.messages.count_tokens(model=MODELS[vendor], messages=messages)
        body = json.dumps({"model": MODELS[vendor], "messages": messages}).encode()
        expected = prompt_token_bound(dialect.parse_count_tokens(body, syntactic_router).request)
        assert estimate.input_tokens == expected
    assert len(vendor_calls(fake)) == 1  # estimates call no vendor


# --- credentials and errors -----------------------------------------------------------------


def test_x_api_key_and_bearer_are_both_credentials(
    surface: ProxyProcess, fake: FakeVendors
) -> None:
    with_x_api_key = anthropic.Anthropic(
        base_url=surface.url,
        api_key=None,
        auth_token=None,
        max_retries=0,
        default_headers={"x-api-key": USER_KEY},
    )
    with_bearer = anthropic.Anthropic(base_url=surface.url, auth_token=USER_KEY, max_retries=0)
    for ai in (with_x_api_key, with_bearer):
        message = ai.messages.create(
            model=MODELS["anthropic"], max_tokens=20, messages=[{"role": "user", "content": "hi"}]
        )
        assert message.content[0].text == "Echo: hi"  # type: ignore[union-attr]
    for call in vendor_calls(fake):
        assert USER_KEY not in json.dumps(call.headers)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client(surface, key="not-a-key").messages.create(
            model=MODELS["anthropic"], max_tokens=20, messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert caught.value.request_id is not None and caught.value.request_id.startswith("req_")


@pytest.mark.parametrize(
    ("fault", "error", "status", "kind"),
    [
        (Fault(status=429, retry_after=7), anthropic.RateLimitError, 429, "rate_limit_error"),
        (Fault(status=500), anthropic.InternalServerError, 502, "api_error"),
        (Fault(status=529), anthropic.ServiceUnavailableError, 503, "overloaded_error"),
        (Fault(latency=3), anthropic.GatewayTimeoutError, 504, "timeout_error"),
        (Fault(status=400, message="bad"), anthropic.BadRequestError, 400, "invalid_request_error"),
    ],
)
@pytest.mark.parametrize("vendor", ["anthropic", "openai"])
def test_vendor_failures_reach_the_sdk_typed(
    vendor: str,
    fault: Fault,
    error: type[Exception],
    status: int,
    kind: str,
    surface: ProxyProcess,
    fake: FakeVendors,
) -> None:
    fake.script(fault)
    with pytest.raises(error) as caught:
        client(surface).messages.create(
            model=MODELS[vendor], max_tokens=20, messages=[{"role": "user", "content": "hi"}]
        )
    exc = caught.value
    assert isinstance(exc, anthropic.APIStatusError)
    assert exc.status_code == status
    assert exc.body["type"] == "error"  # type: ignore[index]
    assert exc.body["error"]["type"] == kind  # type: ignore[index]
    assert exc.response.headers["x-request-id"] == exc.request_id
    if status == 429:
        assert exc.response.headers["retry-after"] == "7"
    if status != 400:  # the proxy made its tries: the SDK is told not to repeat them
        assert exc.response.headers["x-should-retry"] == "false"


def test_proxy_refusals_reach_the_sdk_typed(surface: ProxyProcess, fake: FakeVendors) -> None:
    mock_only = new_key(surface, "mock-only", {"allowedProviders": ["mock"]})
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.PermissionDeniedError) as forbidden:
        client(surface, mock_only).messages.create(
            model=MODELS["openai"], max_tokens=9, messages=hi
        )
    assert forbidden.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as missing:
        client(surface).messages.create(model="mock/no-such-model", max_tokens=9, messages=hi)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.ContentTooLargeError):
        client(surface).messages.create(
            model=MODELS["openai"],
            max_tokens=9,
            messages=[{"role": "user", "content": "x" * 70_000}],
        )
    assert vendor_calls(fake) == []


@pytest.mark.parametrize("vendor", ["anthropic", "openai"])
def test_a_failure_midway_ends_the_stream_with_an_error_event(
    vendor: str, surface: ProxyProcess, fake: FakeVendors
) -> None:
    """Every attempt is cut after two chunks. An Anthropic target takes a prefill, so the
    answer is continued once (two more words) before the error; an OpenAI one does not, and
    the stream ends at the first cut."""
    fake.script(Reply(text="one two three four five", fault=Fault(drop_after=2)))
    texts: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        client(surface).messages.stream(
            model=MODELS[vendor], max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        texts.extend(stream.text_stream)
    expected = "one two three four " if vendor == "anthropic" else "one two "
    assert "".join(texts) == expected
    assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert len(fake.requests) == (2 if vendor == "anthropic" else 1)


# --- money ------------------------------------------------------------------------------------


def test_a_budget_refusal_is_not_retried(surface: ProxyProcess, fake: FakeVendors) -> None:
    broke = new_key(surface, "broke", {"monthlyBudgetUsd": "0.000001"})
    with pytest.raises(anthropic.PaymentRequiredError) as caught:
        client(surface, broke, retries=3).messages.create(
            model=MODELS["anthropic"], max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 402
    assert caught.value.body["error"]["type"] == "billing_error"  # type: ignore[index]
    assert vendor_calls(fake) == []
    log = surface.log_once_it_has(caught.value.request_id or "?")
    assert log.count("POST /v1/messages 402") == 1


def test_a_budget_holds_over_several_calls(surface: ProxyProcess, fake: FakeVendors) -> None:
    budget = Decimal("0.2")
    key = new_key(surface, "thrifty", {"monthlyBudgetUsd": str(budget)})
    fake.script(Reply(text="ok", prompt_tokens=10, completion_tokens=40))
    messages = [{"role": "user", "content": "spend"}]
    body = json.dumps({"model": DEAR, "max_tokens": 50, "messages": messages}).encode()
    per_token = Decimal("0.001")
    worst = (prompt_token_bound(dialect.parse(body, syntactic_router).request) + 50) * per_token
    expected, used = 0, Decimal(0)
    while used + worst <= budget:  # what the reservation admits, call after call
        expected, used = expected + 1, used + 50 * per_token
    ai = client(surface, key, retries=2)
    served = 0
    for _ in range(expected + 2):
        try:
            ai.messages.create(model=DEAR, max_tokens=50, messages=messages)
            served += 1
        except anthropic.PaymentRequiredError:
            pass
    assert served == expected >= 2
    assert len(vendor_calls(fake)) == expected
    rows = wait_for_ledger(database(surface), "user_id = ?", ("thrifty",), count=expected)
    assert [row["surface"] for row in rows] == ["anthropic"] * expected
    assert sum(Decimal(row["cost_pico"]) for row in rows) / 10**12 == used <= budget


@pytest.mark.parametrize("streaming", [False, True], ids=["chat", "stream"])
@pytest.mark.parametrize("vendor", sorted(MODELS))
def test_ledger_cost_is_the_price_of_the_reported_usage(
    vendor: str, streaming: bool, surface: ProxyProcess, fake: FakeVendors
) -> None:
    fake.script(
        Reply(
            text="priced",
            prompt_tokens=1000,
            completion_tokens=20,
            cached_tokens=600,
            cache_write_tokens=300,
        )
    )
    kwargs: dict[str, Any] = {
        "model": MODELS[vendor],
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "price me"}],
    }
    ai = client(surface)
    if streaming:
        with ai.messages.stream(**kwargs) as stream:
            final = stream.get_final_message()
            request_id = stream.response.headers["request-id"]
    else:
        raw = ai.messages.with_raw_response.create(**kwargs)
        final, request_id = raw.parse(), raw.headers["request-id"]
    # Only Anthropic reports cache writes; the others fold them into plain input.
    writes = 300 if vendor == "anthropic" else 0
    assert final.usage.cache_read_input_tokens == 600
    assert final.usage.cache_creation_input_tokens == writes
    assert final.usage.input_tokens == 1000 - 600 - writes
    [row] = ledger_rows(database(surface), request_id)
    expected = (
        (1000 - 600 - writes) * PRICE["input"]
        + 600 * PRICE["cache_read"]
        + writes * PRICE["cache_write"]
        + 20 * PRICE["output"]
    ) / 1_000_000
    assert Decimal(row["cost_pico"]) / 10**12 == expected
    assert (row["surface"], row["provider"], bool(row["streamed"])) == (
        "anthropic",
        vendor,
        streaming,
    )
    assert (row["prompt_tokens"], row["cached_prompt_tokens"], row["cache_write_tokens"]) == (
        1000,
        600,
        writes,
    )
