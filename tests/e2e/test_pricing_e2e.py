"""Exact prices end to end: a real proxy process, the fake Anthropic and OpenAI vendors
reporting cache reads, cache writes and reasoning tokens, chat and stream. The answer's usage
carries every token kind, and the ledger row's cost is the exact Decimal worked out by hand
from the published per-million prices (checked against genai-prices' data in
tests/unit/test_pricing.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from robota_client import SyncRemoteAIProvider
from robota_proxy.testing import FakeVendors, Reply
from robota_proxy.testing.script import Vendor
from tests.e2e.conftest import ProxyProcess, start_proxy, stop_proxy, vendor_env, wait_for_ledger

pytestmark = [pytest.mark.e2e]

ADMIN_KEY = "admin-key-for-pricing-tests-0123456789"
MTOK = Decimal(1_000_000)

#: Anthropic: 2007 input tokens = 7 plain + 1200 read from the cache + 800 written to it;
#: 300 output tokens, 120 of them thinking.
ANTHROPIC_REPLY = Reply(
    text="cached answer",
    prompt_tokens=2007,
    completion_tokens=300,
    cached_tokens=1200,
    cache_write_tokens=800,
    reasoning_tokens=120,
)
ANTHROPIC_USAGE = {
    "promptTokens": 2007,
    "completionTokens": 300,
    "totalTokens": 2307,
    "cachedPromptTokens": 1200,
    "cacheWriteTokens": 800,
    "reasoningTokens": 120,
}
# claude-3-5-haiku per MTok: input $0.80, cache read $0.08, cache write $1.00, output $4.00:
# (5.6 + 96 + 800 + 1200) / 1e6 = $0.0021016.
ANTHROPIC_COST = (
    7 * Decimal("0.80") + 1200 * Decimal("0.08") + 800 * Decimal("1.00") + 300 * Decimal("4.00")
) / MTOK

#: OpenAI: 2048 input tokens of which 1536 cached; 700 output tokens, 512 of them reasoning.
#: OpenAI reports no cache writes.
OPENAI_REPLY = Reply(
    text="reasoned answer",
    prompt_tokens=2048,
    completion_tokens=700,
    cached_tokens=1536,
    reasoning_tokens=512,
)
OPENAI_USAGE = {
    "promptTokens": 2048,
    "completionTokens": 700,
    "totalTokens": 2748,
    "cachedPromptTokens": 1536,
    "reasoningTokens": 512,
}
# o3-mini per MTok: input $1.10, cache read $0.55, output $4.40:
# (563.2 + 844.8 + 3080) / 1e6 = $0.004488.
OPENAI_COST = (512 * Decimal("1.10") + 1536 * Decimal("0.55") + 700 * Decimal("4.40")) / MTOK


@pytest.fixture(scope="module")
def priced(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Path]]:
    """No prices file: every price comes from genai-prices."""
    home = tmp_path_factory.mktemp("priced")
    database = home / "robota.db"
    env = {
        **vendor_env(fake_server),
        "ROBOTA_DATABASE_URL": f"sqlite:///{database}",
        "ROBOTA_ADMIN_KEY": ADMIN_KEY,
        "ROBOTA_UPSTREAM_TIMEOUT": "5",
    }
    running = start_proxy(env, home / "proxy.log")
    yield running, database
    stop_proxy(running)


def new_key(proxy: ProxyProcess) -> tuple[str, str]:
    user = f"user-{uuid.uuid4().hex[:10]}"
    response = httpx.post(
        f"{proxy.url}/admin/keys",
        json={"user": user, "permissions": {}},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status_code == 201, response.text
    return user, response.json()["key"]


def ledger_rows(database: Path, user: str, count: int) -> list[dict[str, Any]]:
    return wait_for_ledger(database, "user_id = ?", (user,), count=count)


def body(provider: str, model: str, text: str) -> dict[str, Any]:
    return {"provider": provider, "model": model, "messages": [{"role": "user", "content": text}]}


def streamed_usage(proxy: ProxyProcess, key: str, request: dict[str, Any]) -> dict[str, Any]:
    """The ``usage`` event of a stream read to its end, as the wire carries it."""
    usages: list[dict[str, Any]] = []
    names: list[str] = []
    with (
        httpx.Client(base_url=proxy.url, timeout=10) as http,
        connect_sse(
            http,
            "POST",
            "/ai/chat/stream",
            json=request,
            headers={"Authorization": f"Bearer {key}"},
        ) as source,
    ):
        assert source.response.status_code == 200
        for event in source.iter_sse():
            names.append(event.event)
            if event.event == "usage":
                usages.append(event.json()["usage"])
    assert names[-1] == "done" and len(usages) == 1
    return usages[0]


@pytest.mark.parametrize(
    ("provider", "model", "reply", "usage", "cost"),
    [
        ("anthropic", "claude-3-5-haiku", ANTHROPIC_REPLY, ANTHROPIC_USAGE, ANTHROPIC_COST),
        ("openai", "o3-mini", OPENAI_REPLY, OPENAI_USAGE, OPENAI_COST),
    ],
    ids=["anthropic", "openai"],
)
def test_every_token_kind_is_reported_and_priced_exactly(
    priced: tuple[ProxyProcess, Path],
    fake: FakeVendors,
    provider: Vendor,
    model: str,
    reply: Reply,
    usage: dict[str, Any],
    cost: Decimal,
) -> None:
    proxy, database = priced
    user, key = new_key(proxy)
    fake.script(reply, match="price every kind", vendor=provider)

    answer = httpx.post(
        f"{proxy.url}/ai/chat",
        json=body(provider, model, "price every kind (chat)"),
        headers={"Authorization": f"Bearer {key}"},
    )
    assert answer.status_code == 200, answer.text
    chat_usage = answer.json()["usage"]
    assert {name: value for name, value in chat_usage.items() if name != "cost"} == usage
    assert Decimal(str(chat_usage["cost"])) == cost

    stream_usage = streamed_usage(proxy, key, body(provider, model, "price every kind (stream)"))
    assert {name: value for name, value in stream_usage.items() if name != "cost"} == usage
    assert Decimal(str(stream_usage["cost"])) == cost

    rows = ledger_rows(database, user, 2)
    assert [(row["streamed"], row["status"], row["priced"], row["estimated"]) for row in rows] == [
        (0, "ok", 1, 0),
        (1, "ok", 1, 0),
    ]
    for row in rows:
        # Picodollars are exact integers: the ledger holds the cost to the last digit.
        assert Decimal(row["cost_pico"]) / 10**12 == cost
        assert (
            row["prompt_tokens"],
            row["completion_tokens"],
            row["cached_prompt_tokens"],
            row["cache_write_tokens"],
            row["reasoning_tokens"],
        ) == (
            usage["promptTokens"],
            usage["completionTokens"],
            usage["cachedPromptTokens"],
            usage.get("cacheWriteTokens", 0),
            usage["reasoningTokens"],
        )
    # What the vendor was asked for is what was billed: one vendor call per ledger row.
    assert len([r for r in fake.requests if r.vendor == provider]) == 2


def test_the_client_reads_every_token_kind(
    priced: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, _ = priced
    _, key = new_key(proxy)
    fake.script(ANTHROPIC_REPLY, match="through the client", vendor="anthropic")
    messages = [{"role": "user", "content": "through the client"}]
    with SyncRemoteAIProvider(proxy.url, key, "anthropic", "claude-3-5-haiku") as ai:
        answer = ai.chat(messages)
        with ai.stream(messages) as stream:
            streamed = stream.final_message()
    for got in (answer.usage, streamed.usage):
        assert got is not None
        assert (
            got.prompt_tokens,
            got.cached_prompt_tokens,
            got.cache_write_tokens,
            got.reasoning_tokens,
            got.completion_tokens,
        ) == (2007, 1200, 800, 120, 300)
        assert got.cost is not None and Decimal(str(got.cost)) == ANTHROPIC_COST
