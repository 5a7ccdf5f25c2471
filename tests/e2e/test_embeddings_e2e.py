"""``POST /v1/embeddings`` end to end: the official ``openai`` SDK (sync and async) against
the proxy under uvicorn, which calls the fake OpenAI and Gemini. Vectors are compared exactly
(the fakes' values are float32-exact), and every ledger row's cost is worked out by hand
from the token count and the model's published price per million input tokens."""

from __future__ import annotations

import base64
import json
import math
import sqlite3
import struct
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from robota_proxy.testing import FakeVendors, Reply
from robota_proxy.testing.embeddings import fake_vector
from tests.e2e.conftest import ProxyProcess, start_proxy, stop_proxy, vendor_env

pytestmark = [pytest.mark.e2e]

ADMIN_KEY = "admin-key-for-embeddings-tests-0123456789"
MTOK = Decimal(1_000_000)
#: Published input prices per million tokens (genai-prices); embeddings bill no output.
SMALL_PRICE = Decimal("0.02")  # openai text-embedding-3-small
GEMINI_PRICE = Decimal("0.15")  # google gemini-embedding-001


@pytest.fixture(scope="module")
def served(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Path]]:
    home = tmp_path_factory.mktemp("embeddings")
    database = home / "robota.db"
    env = {
        **vendor_env(fake_server),
        "ROBOTA_DATABASE_URL": f"sqlite:///{database}",
        "ROBOTA_ADMIN_KEY": ADMIN_KEY,
        "ROBOTA_UPSTREAM_TIMEOUT": "5",
    }
    running = start_proxy(env, home / "proxy.log", startup_timeout=60)
    yield running, database
    stop_proxy(running)


def new_key(proxy: ProxyProcess, permissions: dict[str, Any] | None = None) -> tuple[str, str]:
    user = f"user-{uuid.uuid4().hex[:10]}"
    response = httpx.post(
        f"{proxy.url}/admin/keys",
        json={"user": user, "permissions": permissions or {}},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status_code == 201, response.text
    return user, response.json()["key"]


def client(proxy: ProxyProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=key, max_retries=0)


def rows(database: Path, user: str, count: int) -> list[dict[str, Any]]:
    """The user's settled ledger rows, once ``count`` are there (or 5 s passed)."""
    deadline = time.monotonic() + 5
    while True:
        with sqlite3.connect(database) as conn:
            conn.row_factory = sqlite3.Row
            found = [
                dict(row)
                for row in conn.execute(
                    "SELECT * FROM usage_ledger WHERE user_id = ? AND status != 'in_flight' "
                    "ORDER BY id",
                    (user,),
                )
            ]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def pico(usd: Decimal) -> int:
    return int((usd * 10**12).to_integral_value())


def vendor_calls(fake: FakeVendors) -> list[Any]:
    return [r for r in fake.requests if "embed" in r.path]


def test_openai_one_input_sync_sdk_decodes_base64_and_the_row_is_priced(
    served: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = served
    user, key = new_key(proxy)
    # No encoding_format: the SDK asks the proxy for base64 and decodes it.
    answer = client(proxy, key).embeddings.create(
        model="text-embedding-3-small", input="the quick brown fox", user="end-user-7"
    )
    assert [d.embedding for d in answer.data] == [fake_vector("the quick brown fox", 1536)]
    assert answer.data[0].index == 0 and answer.object == "list"
    assert answer.model == "text-embedding-3-small"
    assert (answer.usage.prompt_tokens, answer.usage.total_tokens) == (4, 4)
    (sent,) = vendor_calls(fake)
    assert sent.path == "/v1/embeddings"
    assert sent.body == {
        "model": "text-embedding-3-small",
        "input": "the quick brown fox",
        "encoding_format": "float",
        "user": "end-user-7",
    }
    (row,) = rows(database, user, 1)
    assert (row["provider"], row["model"], row["surface"]) == (
        "openai",
        "text-embedding-3-small",
        "openai",
    )
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (4, 0, 0)
    assert row["status"] == "ok" and row["priced"]
    assert row["cost_pico"] == pico(4 * SMALL_PRICE / MTOK)  # 80,000 picodollars


def test_openai_several_inputs_token_arrays_and_dimensions(
    served: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = served
    user, key = new_key(proxy)
    fake.script(Reply(prompt_tokens=1234), vendor="openai", times=1)
    answer = client(proxy, key).embeddings.create(
        model="openai/text-embedding-3-small",
        input=[[10, 20, 30], [40]],
        dimensions=6,
        encoding_format="float",
    )
    assert [d.embedding for d in answer.data] == [
        fake_vector([10, 20, 30], 6),
        fake_vector([40], 6),
    ]
    assert [d.index for d in answer.data] == [0, 1]
    assert answer.usage.prompt_tokens == 1234
    (sent,) = vendor_calls(fake)
    assert sent.body["input"] == [[10, 20, 30], [40]]
    assert sent.body["dimensions"] == 6
    (row,) = rows(database, user, 1)
    assert row["cost_pico"] == pico(1234 * SMALL_PRICE / MTOK)


def test_explicit_base64_is_little_endian_float32(
    served: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, _ = served
    _, key = new_key(proxy)
    answer = client(proxy, key).embeddings.create(
        model="text-embedding-3-small", input="pack me", dimensions=3, encoding_format="base64"
    )
    packed = base64.b64decode(str(answer.data[0].embedding))
    assert list(struct.unpack("<3f", packed)) == fake_vector("pack me", 3)


@pytest.mark.anyio
async def test_gemini_several_inputs_async_batch_estimated(
    served: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = served
    user, key = new_key(proxy)
    texts = ["a rose by any other name", "would smell as sweet"]
    async with openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=key, max_retries=0) as sdk:
        answer = await sdk.embeddings.create(
            model="google/gemini-embedding-001", input=texts, dimensions=16
        )
    assert [d.embedding for d in answer.data] == [fake_vector(t, 16) for t in texts]
    assert answer.model == "gemini-embedding-001"
    # Gemini reported no count: a token per four characters, rounded up, per input.
    estimate = sum(math.ceil(len(t) / 4) for t in texts)  # 6 + 5
    assert estimate == 11 and answer.usage.prompt_tokens == 11
    (sent,) = vendor_calls(fake)
    assert sent.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert [r["outputDimensionality"] for r in sent.body["requests"]] == [16, 16]
    (row,) = rows(database, user, 1)
    assert (row["provider"], row["model"], row["surface"]) == (
        "google",
        "gemini-embedding-001",
        "openai",
    )
    assert (row["prompt_tokens"], row["estimated"]) == (11, 1)
    assert row["cost_pico"] == pico(11 * GEMINI_PRICE / MTOK)


@pytest.mark.anyio
async def test_gemini_one_input_with_reported_tokens_is_not_estimated(
    served: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = served
    user, key = new_key(proxy)
    fake.script(Reply(prompt_tokens=9), vendor="google", times=1)
    async with openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=key, max_retries=0) as sdk:
        answer = await sdk.embeddings.create(
            model="google/gemini-embedding-001", input="one line", encoding_format="float"
        )
    assert answer.data[0].embedding == fake_vector("one line", 3072)
    (sent,) = vendor_calls(fake)
    assert sent.path == "/v1beta/models/gemini-embedding-001:embedContent"
    assert sent.body == {
        "model": "models/gemini-embedding-001",
        "content": {"parts": [{"text": "one line"}]},
    }
    (row,) = rows(database, user, 1)
    assert (row["prompt_tokens"], row["estimated"]) == (9, 0)
    assert row["cost_pico"] == pico(9 * GEMINI_PRICE / MTOK)


def test_permission_refusals_are_permission_denied_before_any_vendor(
    served: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = served
    # An explicit feature list without "embeddings" does not grant them.
    user, chat_only = new_key(proxy, {"allowedFeatures": ["chat", "stream"]})
    with pytest.raises(openai.PermissionDeniedError) as feature:
        client(proxy, chat_only).embeddings.create(model="text-embedding-3-small", input="x")
    assert "feature 'embeddings' is not allowed" in feature.value.message
    _, gpt_only = new_key(proxy, {"allowedModels": ["gpt-4o*"], "allowedFeatures": ["embeddings"]})
    with pytest.raises(openai.PermissionDeniedError) as model:
        client(proxy, gpt_only).embeddings.create(model="text-embedding-3-small", input="x")
    assert "model 'text-embedding-3-small' is not allowed" in model.value.message
    assert vendor_calls(fake) == []
    assert rows(database, user, 0) == []


def test_anthropic_has_no_embeddings_and_unknown_fields_are_refused(
    served: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = served
    user, key = new_key(proxy)
    sdk = client(proxy, key)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.embeddings.create(model="anthropic/claude-3-5-haiku-latest", input="x")
    assert "provider 'anthropic' has no embeddings API" in refused.value.message
    assert "claude-3-5-haiku-latest" in refused.value.message
    body = refused.value.body
    assert isinstance(body, dict) and body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as unknown:
        sdk.embeddings.create(
            model="text-embedding-3-small", input="x", extra_body={"temperature": 0}
        )
    assert isinstance(unknown.value.body, dict) and unknown.value.body["param"] == "temperature"
    assert vendor_calls(fake) == []
    assert rows(database, user, 0) == []  # no vendor call, no ledger row


def test_budget_refusal_and_quota_holding_input_only(
    served: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = served
    # A budget below the input's worst case: 402, no vendor call.
    _, poor = new_key(proxy, {"monthlyBudgetUsd": "0.0000000001"})
    with pytest.raises(openai.APIStatusError) as refused:
        client(proxy, poor).embeddings.create(model="text-embedding-3-small", input="hello")
    assert refused.value.status_code == 402
    assert "monthly budget reached" in refused.value.message
    assert vendor_calls(fake) == []
    # A 100-token quota: "hello" holds 16 + 8 + 5 = 29 tokens (no output), so it passes
    # where a chat-sized hold (plus 4096 output tokens) would have been refused.
    user, capped = new_key(proxy, {"monthlyTokenLimit": 100})
    answer = client(proxy, capped).embeddings.create(model="text-embedding-3-small", input="hello")
    assert answer.usage.prompt_tokens == 1
    (row,) = rows(database, user, 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (1, 0)


def test_rate_limit_refusal_is_rate_limit_error(
    served: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, _ = served
    _, key = new_key(proxy, {"rpm": 1})
    sdk = client(proxy, key)
    sdk.embeddings.create(model="text-embedding-3-small", input="first")
    with pytest.raises(openai.RateLimitError) as limited:
        sdk.embeddings.create(model="text-embedding-3-small", input="second")
    assert limited.value.response.headers["retry-after"]
    assert len(vendor_calls(fake)) == 1


def test_vendor_failure_is_one_row_per_vendor_call(
    served: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    from robota_proxy.testing import Fault

    proxy, database = served
    user, key = new_key(proxy)
    fake.script(Fault(status=500), vendor="openai", times=1)
    with pytest.raises(openai.InternalServerError):
        client(proxy, key).embeddings.create(model="text-embedding-3-small", input="x")
    (row,) = rows(database, user, 1)
    assert row["status"] == "upstream_error"
    assert (row["prompt_tokens"], row["cost_pico"]) == (0, 0)
    assert len(vendor_calls(fake)) == 1
    assert json.loads(json.dumps(row["surface"])) == "openai"
