"""Metering against a real proxy process and the fake vendors: one ledger row per vendor call
(answered, streamed, failed, abandoned mid-stream), budgets and quotas refusing before any
vendor call, and the usage endpoints, client methods and CLI agreeing with the ledger."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from robota_client import RemoteAIProvider, SyncRemoteAIProvider
from robota_client.errors import RemoteError
from robota_proxy.testing import FakeVendors, Fault, Reply
from tests.e2e.conftest import ProxyProcess, start_proxy, stop_proxy, vendor_env

pytestmark = [pytest.mark.e2e]

ADMIN_KEY = "admin-key-for-metering-tests-0123456789"
PRICES = {"mock/mock-1": {"input": "1000", "output": "2000"}}


@pytest.fixture(scope="module")
def metered(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Path]]:
    home = tmp_path_factory.mktemp("metered")
    database = home / "robota.db"
    prices = home / "prices.json"
    prices.write_text(json.dumps(PRICES))
    env = {
        **vendor_env(fake_server),
        "ROBOTA_DATABASE_URL": f"sqlite:///{database}",
        "ROBOTA_ADMIN_KEY": ADMIN_KEY,
        "ROBOTA_PRICES_FILE": str(prices),
        "ROBOTA_UPSTREAM_TIMEOUT": "5",
    }
    running = start_proxy(env, home / "proxy.log")
    yield running, database
    stop_proxy(running)


def new_key(proxy: ProxyProcess, permissions: dict[str, Any] | None = None) -> tuple[str, str]:
    """A fresh user with one key: (user, key)."""
    user = f"user-{uuid.uuid4().hex[:10]}"
    response = httpx.post(
        f"{proxy.url}/admin/keys",
        json={"user": user, "permissions": permissions or {}},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status_code == 201, response.text
    return user, response.json()["key"]


def ledger(database: Path, user: str) -> list[dict[str, Any]]:
    """The user's settled rows (a row is written ``in_flight`` before its vendor call)."""
    with sqlite3.connect(database) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            "SELECT * FROM usage_ledger WHERE user_id = ? AND status != 'in_flight' ORDER BY id",
            (user,),
        ).fetchall()
    return [dict(row) for row in rows]


def counters(database: Path, user: str) -> dict[str, Any]:
    with sqlite3.connect(database) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute(
            "SELECT * FROM usage_counters WHERE user_id = ? AND period = ?",
            (user, datetime.now(UTC).strftime("%Y-%m")),
        ).fetchone()
    return dict(row) if row else {}


def wait_for_rows(database: Path, user: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        rows = ledger(database, user)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def assert_ledger_adds_up(database: Path, user: str) -> None:
    rows = ledger(database, user)
    totals = counters(database, user)
    assert totals["cost_used_pico"] == sum(row["cost_pico"] for row in rows)
    assert totals["requests"] == len(rows)
    assert totals["tokens_used"] == sum(
        row["prompt_tokens"] + row["completion_tokens"] for row in rows if not row["cached"]
    )
    assert totals["tokens_reserved"] == 0 and totals["cost_reserved_pico"] == 0


def chat_body(text: str, *, provider: str = "openai", model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {"provider": provider, "model": model, "messages": [{"role": "user", "content": text}]}


def test_chat_and_stream_are_ledger_rows_priced_by_genai_prices(
    metered: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = metered
    user, key = new_key(proxy)
    fake.script(
        Reply(text="priced answer", prompt_tokens=1000, completion_tokens=500, cached_tokens=200),
        match="price me",
    )
    # gpt-4o-mini: $0.15/M input, $0.075/M cached input, $0.60/M output.
    expected = (800 * Decimal("0.15") + 200 * Decimal("0.075") + 500 * Decimal("0.6")) / 10**6
    headers = {"Authorization": f"Bearer {key}"}
    answer = httpx.post(f"{proxy.url}/ai/chat", json=chat_body("price me"), headers=headers)
    assert answer.status_code == 200
    assert Decimal(str(answer.json()["usage"]["cost"])) == expected
    with httpx.stream(
        "POST", f"{proxy.url}/ai/chat/stream", json=chat_body("price me too"), headers=headers
    ) as stream:
        assert stream.status_code == 200
        stream.read()
    rows = wait_for_rows(database, user, 2)
    assert [(row["streamed"], row["status"], row["priced"]) for row in rows] == [
        (0, "ok", 1),
        (1, "ok", 1),
    ]
    first = rows[0]
    assert (first["prompt_tokens"], first["completion_tokens"], first["cached_prompt_tokens"]) == (
        1000,
        500,
        200,
    )
    assert Decimal(first["cost_pico"]) / 10**12 == expected
    assert first["key_id"] and first["request_id"] == answer.headers["x-request-id"]
    assert first["estimated"] == 0 and first["latency_ms"] >= 0
    assert_ledger_adds_up(database, user)

    with SyncRemoteAIProvider(proxy.url, key, "openai", "gpt-4o-mini") as ai:
        report = ai.usage()
        me = ai.me()
    assert report.user == user and report.totals.requests == 2
    assert report.totals.cost_usd == sum(
        (Decimal(row["cost_pico"]) / 10**12 for row in rows), Decimal(0)
    )
    assert [(m.provider, m.model, m.requests) for m in report.models] == [
        ("openai", "gpt-4o-mini", 2)
    ]
    assert len(report.days) == 1 and report.days[0].day == datetime.now(UTC).date()
    assert me.user == user and me.key_id == first["key_id"]
    assert me.month.requests == 2 and me.month.cost_usd == report.totals.cost_usd
    assert (
        me.month.tokens
        == report.totals.total_tokens
        == sum(row["prompt_tokens"] + row["completion_tokens"] for row in rows)
    )
    # The seed's UsageMetrics.lastUsed: the time of the latest call in each group.
    last = report.models[0].last_used
    assert last is not None and abs((datetime.now(UTC) - last).total_seconds()) < 60
    assert report.totals.last_used == last
    assert me.limits.monthly_budget is None and me.limits.monthly_tokens is None


def test_failed_vendor_call_is_a_row_and_refusals_before_the_vendor_are_not(
    metered: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = metered
    user, key = new_key(proxy)
    headers = {"Authorization": f"Bearer {key}"}
    fake.script(Fault(status=500), match="vendor breaks")
    failed = httpx.post(f"{proxy.url}/ai/chat", json=chat_body("vendor breaks"), headers=headers)
    assert failed.status_code == 502
    unknown = httpx.post(
        f"{proxy.url}/ai/chat", json=chat_body("x", provider="nope"), headers=headers
    )
    assert unknown.status_code == 404
    invalid = httpx.post(f"{proxy.url}/ai/chat", content=b"{", headers=headers)
    assert invalid.status_code == 400
    rows = wait_for_rows(database, user, 1)
    time.sleep(0.2)  # a wrong extra row would have been written by now
    rows = ledger(database, user)
    assert len(rows) == 1
    assert (rows[0]["status"], rows[0]["prompt_tokens"], rows[0]["cost_pico"]) == (
        "upstream_error",
        0,
        0,
    )
    assert_ledger_adds_up(database, user)


def test_client_disconnect_mid_stream_is_settled_with_what_was_produced(
    metered: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = metered
    user, key = new_key(proxy, {"monthlyBudgetUsd": "5"})
    words = " ".join(f"w{i}" for i in range(200))
    fake.script(Reply(text=words, fault=Fault(chunk_latency=0.05)), match="long answer")
    headers = {"Authorization": f"Bearer {key}"}
    with (
        httpx.Client(base_url=proxy.url, timeout=10) as http,
        http.stream(
            "POST", "/ai/chat/stream", json=chat_body("a long answer"), headers=headers
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    rows = wait_for_rows(database, user, 1)
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "client_disconnected" and row["streamed"] == 1
    assert row["estimated"] == 1
    # Some text was produced, far from all of it (~200 words of ~4 chars).
    assert 0 < row["completion_tokens"] < 200
    assert row["prompt_tokens"] > 0 and row["cost_pico"] > 0
    assert_ledger_adds_up(database, user)


def test_budget_and_quota_refuse_before_the_vendor(
    metered: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = metered
    # mock/mock-1 is priced by the prices file: $1000/M input, $2000/M output.
    _, rich_key = new_key(proxy, {"monthlyBudgetUsd": "100"})
    body = {
        **chat_body("hello there", provider="mock", model="mock-1"),
        "options": {"maxTokens": 5},
    }
    ok = httpx.post(
        f"{proxy.url}/ai/chat", json=body, headers={"Authorization": f"Bearer {rich_key}"}
    )
    assert ok.status_code == 200 and ok.json()["usage"]["cost"] > 0

    user, poor_key = new_key(proxy, {"monthlyBudgetUsd": "0.01"})
    refused = httpx.post(
        f"{proxy.url}/ai/chat", json=body, headers={"Authorization": f"Bearer {poor_key}"}
    )
    assert refused.status_code == 402
    error = refused.json()["error"]
    assert error["code"] == "budget_exceeded"
    assert "$0.01 of $0.01 left" in error["message"]

    _, quota_key = new_key(proxy, {"monthlyTokenLimit": 10})
    too_many = httpx.post(
        f"{proxy.url}/ai/chat", json=body, headers={"Authorization": f"Bearer {quota_key}"}
    )
    assert too_many.status_code == 429
    assert too_many.json()["error"]["code"] == "quota_exceeded"
    assert "10 of 10 tokens left" in too_many.json()["error"]["message"]

    unpriced = httpx.post(
        f"{proxy.url}/ai/chat",
        json=chat_body("x", model="no-such-model-anywhere"),
        headers={"Authorization": f"Bearer {rich_key}"},
    )
    assert unpriced.status_code == 403
    assert (
        "no price known for model openai/no-such-model-anywhere"
        in unpriced.json()["error"]["message"]
    )
    assert ledger(database, user) == []
    assert len(fake.requests) == 0  # none of the refused calls reached a vendor


def test_unpriced_model_without_budget_is_recorded_unpriced(
    metered: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = metered
    user, key = new_key(proxy)
    answer = httpx.post(
        f"{proxy.url}/ai/chat",
        json=chat_body("who prices me", model="my-own-finetune"),
        headers={"Authorization": f"Bearer {key}"},
    )
    assert answer.status_code == 200
    assert answer.json()["usage"].get("cost") is None
    row = wait_for_rows(database, user, 1)[0]
    assert (row["priced"], row["cost_pico"]) == (0, 0)
    assert row["prompt_tokens"] > 0


@pytest.mark.anyio
async def test_me_shows_what_is_left_and_bad_dates_are_400(
    metered: tuple[ProxyProcess, Path],
) -> None:
    proxy, _ = metered
    _, key = new_key(proxy, {"monthlyBudgetUsd": "1", "monthlyTokenLimit": 100000, "rpm": 50})
    async with RemoteAIProvider(proxy.url, key, "mock", "mock-1") as ai:
        await ai.chat([{"role": "user", "content": "one two three"}], {"maxTokens": 3})
        me = await ai.me()
        for _ in range(100):  # the settle is written just after the answer went out
            if me.month.requests:
                break
            await anyio.sleep(0.02)
            me = await ai.me()
        assert me.permissions["monthlyBudgetUsd"] == "1"
        budget = me.limits.monthly_budget
        assert budget is not None and budget.limit_usd == Decimal(1)
        assert budget.used_usd > 0 and budget.reserved_usd == 0
        assert budget.remaining_usd == Decimal(1) - budget.used_usd
        tokens = me.limits.monthly_tokens
        assert tokens is not None and tokens.used > 0 and tokens.remaining == 100000 - tokens.used
        assert me.limits.rpm is not None and me.limits.rpm.limit == 50
        # Read from the rate limiter: the chat call above counted against the minute.
        assert me.limits.rpm.remaining is not None and me.limits.rpm.remaining < 50
        report = await ai.usage(since=datetime.now(UTC).date(), until=datetime.now(UTC).date())
        assert report.totals.cost_usd == budget.used_usd
    with pytest.raises(RemoteError):
        async with RemoteAIProvider(proxy.url, "wrong", "mock", "mock-1", max_retries=0) as ai:
            await ai.me()


def test_bad_dates_are_400(metered: tuple[ProxyProcess, Path]) -> None:
    proxy, _ = metered
    _, key = new_key(proxy)
    headers = {"Authorization": f"Bearer {key}"}
    for query in (
        "from=2025-13-01",
        "to=yesterday",
        "from=2025-02-03&to=2025-02-01",
        "from=20250101",
    ):
        response = httpx.get(f"{proxy.url}/ai/usage?{query}", headers=headers)
        assert response.status_code == 400, query
        assert response.json()["error"]["code"] == "invalid_request"
        assert "YYYY-MM-DD" in response.json()["error"]["message"] or "after" in response.text


def test_admin_usage_and_cli_agree_with_the_ledger(
    metered: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = metered
    user, key = new_key(proxy)
    for text in ("a", "b", "c"):
        assert (
            httpx.post(
                f"{proxy.url}/ai/chat",
                json=chat_body(text, provider="mock", model="mock-1"),
                headers={"Authorization": f"Bearer {key}"},
            ).status_code
            == 200
        )
    rows = wait_for_rows(database, user, 3)
    total = sum(row["cost_pico"] for row in rows)
    assert (
        httpx.get(
            f"{proxy.url}/admin/usage", headers={"Authorization": f"Bearer {key}"}
        ).status_code
        == 401
    )
    admin = httpx.get(
        f"{proxy.url}/admin/usage",
        params={"user": user},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert admin.status_code == 200
    data = admin.json()
    assert data["totals"]["requests"] == 3
    assert Decimal(data["totals"]["costUsd"]) == Decimal(total) / 10**12
    everyone = httpx.get(
        f"{proxy.url}/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert user in {row["user"] for row in everyone.json()["users"]}

    cli = subprocess.run(
        [sys.executable, "-m", "robota_proxy", "usage", "--user", user, "--json"],
        env={"ROBOTA_DATABASE_URL": f"sqlite:///{database}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    printed = json.loads(cli.stdout)
    assert printed["totals"] == data["totals"]
    table = subprocess.run(
        [sys.executable, "-m", "robota_proxy", "usage", "--since", "2020-01-01"],
        env={"ROBOTA_DATABASE_URL": f"sqlite:///{database}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert f"  {user}" in table.stdout and "mock/mock-1" in table.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "robota_proxy", "usage", "--since", "January"],
        env={"ROBOTA_DATABASE_URL": f"sqlite:///{database}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--since" in bad.stderr
