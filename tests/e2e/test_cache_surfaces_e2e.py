"""The response cache on the vendor-dialect surfaces, in a real proxy process in front of the
fake vendors, through the official ``openai`` and ``anthropic`` SDKs: for each surface, a
passthrough target and a translated one, plain and streamed, two identical temperature-0
calls reach the vendor once and the SDK parses the hit to the same answer; the hit is its own
ledger row, cached, cost 0, with the miss's token counts; tenants never share; the
directives work; and failures (a vendor error, a stream cut midway) are not stored."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from robota_proxy.testing import FakeVendors, Fault, Reply
from tests.e2e.conftest import (
    USER_KEY,
    ProxyProcess,
    ledger_rows,
    start_proxy,
    stop_proxy,
    vendor_env,
)

pytestmark = [pytest.mark.e2e]

OTHER_KEY = "second-user-key-for-surface-cache-abcdef"
#: USD per million tokens: a miss costs (prompt + 2 * completion) microdollars, i.e. that
#: many million picodollars.
PRICES = {
    "openai/gpt-4o-mini": {"input": "1", "output": "2"},
    "anthropic/claude-3-5-haiku-latest": {"input": "1", "output": "2"},
}
#: (surface, model as the caller names it, provider it routes to); the first of each surface
#: is its passthrough target, the second a translated one.
TARGETS = [
    ("openai", "gpt-4o-mini", "openai"),
    ("openai", "anthropic/claude-3-5-haiku-latest", "anthropic"),
    ("anthropic", "claude-3-5-haiku-latest", "anthropic"),
    ("anthropic", "openai/gpt-4o-mini", "openai"),
]


@pytest.fixture(scope="module")
def cached(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Path]]:
    home = tmp_path_factory.mktemp("cached_surfaces")
    database = home / "robota.db"
    prices = home / "prices.json"
    prices.write_text(json.dumps(PRICES))
    env = {
        **vendor_env(fake_server),
        "ROBOTA_API_KEYS": f"{USER_KEY},{OTHER_KEY}",
        "ROBOTA_DATABASE_URL": f"sqlite:///{database}",
        "ROBOTA_PRICES_FILE": str(prices),
        "ROBOTA_UPSTREAM_TIMEOUT": "5",
    }
    running = start_proxy(env, home / "proxy.log", startup_timeout=120)
    yield running, database
    stop_proxy(running)


@dataclass
class Answer:
    cache: str
    request_id: str
    text: str
    #: (prompt, completion) tokens as the SDK read them from the answer.
    tokens: tuple[int, int]


def marker() -> str:
    return f"q-{uuid.uuid4().hex[:8]}"


def vendor_calls(fake: FakeVendors, text: str) -> int:
    return sum(1 for request in fake.requests if text in request.last_text)


def ask(
    proxy: ProxyProcess,
    surface: str,
    model: str,
    text: str,
    *,
    streamed: bool = False,
    key: str = USER_KEY,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One temperature-0 call through the surface's own SDK (no SDK retries)."""
    messages: Any = [{"role": "user", "content": text}]
    if surface == "openai":
        ai = openai.OpenAI(
            base_url=f"{proxy.url}/v1", api_key=key, max_retries=0, default_headers=headers
        )
        if not streamed:
            raw = ai.chat.completions.with_raw_response.create(
                model=model, messages=messages, temperature=0
            )
            completion = raw.parse()
            assert completion.usage is not None
            usage = (completion.usage.prompt_tokens, completion.usage.completion_tokens)
            content = completion.choices[0].message.content or ""
            return Answer(
                raw.headers["x-robota-cache"], raw.headers["x-request-id"], content, usage
            )
        raw_stream = ai.chat.completions.with_raw_response.create(
            model=model,
            messages=messages,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], (0, 0)
        for chunk in raw_stream.parse():
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        headers_ = raw_stream.headers
        return Answer(headers_["x-robota-cache"], headers_["x-request-id"], "".join(pieces), usage)
    claude = anthropic.Anthropic(
        base_url=proxy.url, api_key=key, max_retries=0, default_headers=headers
    )
    if not streamed:
        raw_message = claude.messages.with_raw_response.create(
            model=model, max_tokens=50, messages=messages, extra_body={"temperature": 0}
        )
        message = raw_message.parse()
        content = "".join(block.text for block in message.content if block.type == "text")
        tokens = (message.usage.input_tokens, message.usage.output_tokens)
        head = raw_message.headers
        return Answer(head["x-robota-cache"], head["x-request-id"], content, tokens)
    raw_events = claude.messages.with_raw_response.create(
        model=model,
        max_tokens=50,
        messages=messages,
        stream=True,
        extra_body={"temperature": 0},
    )
    pieces, prompt, completion_tokens = [], 0, 0
    for event in raw_events.parse():
        if event.type == "message_start":
            prompt = event.message.usage.input_tokens
        elif event.type == "content_block_delta" and event.delta.type == "text_delta":
            pieces.append(event.delta.text)
        elif event.type == "message_delta":
            completion_tokens = event.usage.output_tokens
            prompt = event.usage.input_tokens or prompt
    head = raw_events.headers
    return Answer(
        head["x-robota-cache"], head["x-request-id"], "".join(pieces), (prompt, completion_tokens)
    )


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize(("surface", "model", "provider"), TARGETS)
def test_the_second_identical_call_is_a_hit_metered_cached_at_cost_0(
    cached: tuple[ProxyProcess, Path],
    fake: FakeVendors,
    surface: str,
    model: str,
    provider: str,
    streamed: bool,
) -> None:
    proxy, database = cached
    text = marker()
    fake.script(Reply(text=f"cached answer to {text}"), match=text)
    first = ask(proxy, surface, model, text, streamed=streamed)
    second = ask(proxy, surface, model, text, streamed=streamed)
    assert (first.cache, second.cache) == ("MISS", "HIT")
    assert vendor_calls(fake, text) == 1
    assert first.text == second.text == f"cached answer to {text}"
    assert second.tokens == first.tokens and first.tokens[1] > 0
    miss = ledger_rows(database, first.request_id)
    hit = ledger_rows(database, second.request_id)
    assert len(miss) == len(hit) == 1
    fields = ("provider", "surface", "streamed", "prompt_tokens", "completion_tokens")
    assert [hit[0][name] for name in fields] == [miss[0][name] for name in fields]
    assert (miss[0]["provider"], miss[0]["surface"], miss[0]["streamed"]) == (
        provider,
        surface,
        int(streamed),
    )
    # Priced at $1 and $2 per million tokens: the miss pays its tokens, the hit nothing.
    expected = (miss[0]["prompt_tokens"] + 2 * miss[0]["completion_tokens"]) * 1_000_000
    assert (miss[0]["cached"], miss[0]["cost_pico"]) == (0, expected)
    assert (hit[0]["cached"], hit[0]["cost_pico"], hit[0]["status"]) == (1, 0, "ok")


def raw_post(
    proxy: ProxyProcess, surface: str, body: dict[str, Any], key: str = USER_KEY
) -> httpx.Response:
    path = "/v1/chat/completions" if surface == "openai" else "/v1/messages"
    headers = {"Authorization": f"Bearer {key}"}
    if surface == "anthropic":
        headers["anthropic-version"] = "2023-06-01"
    return httpx.post(f"{proxy.url}{path}", json=body, headers=headers, timeout=10)


@pytest.mark.parametrize(("surface", "model", "provider"), TARGETS)
def test_a_hit_is_the_same_bytes_and_keys_never_mix_plain_and_streamed(
    cached: tuple[ProxyProcess, Path], fake: FakeVendors, surface: str, model: str, provider: str
) -> None:
    proxy, _ = cached
    text = marker()
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 50,
        "temperature": 0,
        "messages": [{"role": "user", "content": text}],
    }
    plain = [raw_post(proxy, surface, body) for _ in range(2)]
    streamed = [raw_post(proxy, surface, {**body, "stream": True}) for _ in range(2)]
    answers = plain + streamed
    assert [a.headers["x-robota-cache"] for a in answers] == ["MISS", "HIT", "MISS", "HIT"]
    assert plain[1].content == plain[0].content
    assert streamed[1].content == streamed[0].content
    assert streamed[1].headers["content-type"].startswith("text/event-stream")
    assert plain[1].headers["content-type"] == "application/json"
    if surface == "anthropic":  # every answer names its own request, a hit too
        assert plain[1].headers["request-id"] == plain[1].headers["x-request-id"]
        assert streamed[1].headers["request-id"] == streamed[1].headers["x-request-id"]
    assert vendor_calls(fake, text) == 2


@pytest.mark.parametrize("surface", ["openai", "anthropic"])
def test_another_tenant_misses_and_the_directives_hold(
    cached: tuple[ProxyProcess, Path], fake: FakeVendors, surface: str
) -> None:
    proxy, _ = cached
    model = "gpt-4o-mini" if surface == "openai" else "claude-3-5-haiku-latest"
    text = marker()
    fake.script(Reply(text="for the first user only"), match=text, times=1)
    mine = ask(proxy, surface, model, text)
    theirs = ask(proxy, surface, model, text, key=OTHER_KEY)
    assert (mine.cache, theirs.cache) == ("MISS", "MISS")
    assert mine.text == "for the first user only" and theirs.text != mine.text
    assert ask(proxy, surface, model, text, key=OTHER_KEY).text == theirs.text  # their own hit
    assert vendor_calls(fake, text) == 2

    text = marker()
    no_store = ask(proxy, surface, model, text, headers={"Cache-Control": "no-store"})
    assert no_store.cache == "MISS"
    assert ask(proxy, surface, model, text).cache == "MISS"  # nothing was stored
    assert ask(proxy, surface, model, text).cache == "HIT"
    assert ask(proxy, surface, model, text, headers={"Cache-Control": "no-cache"}).cache == "MISS"
    assert vendor_calls(fake, text) == 3
    # A stream reads only the proxy's own header, as /ai/chat/stream does.
    directive = {"X-Robota-Cache-Control": "no-cache"}
    assert ask(proxy, surface, model, text, streamed=True).cache == "MISS"
    assert ask(proxy, surface, model, text, streamed=True).cache == "HIT"
    assert ask(proxy, surface, model, text, streamed=True, headers=directive).cache == "MISS"
    assert vendor_calls(fake, text) == 5


@pytest.mark.parametrize(("surface", "model", "provider"), TARGETS)
def test_a_vendor_error_or_a_cut_stream_is_not_cached(
    cached: tuple[ProxyProcess, Path], fake: FakeVendors, surface: str, model: str, provider: str
) -> None:
    proxy, _ = cached
    text = marker()
    fake.script(Fault(status=400, message="nope"), match=text, times=1)
    with pytest.raises((openai.BadRequestError, anthropic.BadRequestError)):
        ask(proxy, surface, model, text)
    assert ask(proxy, surface, model, text).cache == "MISS"
    assert vendor_calls(fake, text) == 2

    # A stream to an Anthropic target is continued from a prefill after a cut: cut its
    # continuation too, so that the caller gets the error that must not be cached.
    continued = provider == "anthropic"
    cuts = 2 if continued else 1
    text = marker()
    fake.script(Fault(drop_after=1), match=text, times=cuts)
    fake.script(Reply(text="one two three four five"), match=text)
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 50,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": text}],
    }
    cut = raw_post(proxy, surface, body)
    assert cut.headers["x-robota-cache"] == "MISS" and b"error" in cut.content
    whole = raw_post(proxy, surface, body)
    assert whole.headers["x-robota-cache"] == "MISS" and b"five" in whole.content
    assert raw_post(proxy, surface, body).headers["x-robota-cache"] == "HIT"
    assert vendor_calls(fake, text) == cuts + 1
