"""THE race: 200 concurrent requests against a budget that covers exactly 10 worst cases.

Every reply costs exactly its worst case (the fake vendor reports the prompt bound and
``maxTokens`` as its usage), so the budget covers exactly 10 answers whatever the timing:
exactly 10 are served, 190 get 402, and the ledger sums to the counters, to the cent and
below the budget. Once against one proxy on SQLite, once against two proxy processes sharing
PostgreSQL and Redis. ``pytest -s`` prints the numbers.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from robota_client.messages import ChatRequest
from robota_proxy.policy.pricing import prompt_token_bound, to_pico, usd_text
from robota_proxy.storage.database import async_url
from robota_proxy.testing import FakeVendors, Fault, Reply
from tests.e2e.conftest import ProxyProcess, start_proxy, stop_proxy, vendor_env

pytestmark = [pytest.mark.e2e]

ADMIN_KEY = "admin-key-for-race-tests-0123456789"
REQUESTS = 200
COVERED = 10
MAX_TOKENS = 100
# USD per million tokens.
INPUT_PRICE = Decimal("1.5")
OUTPUT_PRICE = Decimal("4")
BODY = {
    "provider": "openai",
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "race for the budget"}],
    "options": {"maxTokens": MAX_TOKENS},
}
PROMPT_BOUND = prompt_token_bound(ChatRequest.model_validate(BODY))
WORST_PICO = to_pico((PROMPT_BOUND * INPUT_PRICE + MAX_TOKENS * OUTPUT_PRICE) / 1_000_000)
BUDGET_PICO = COVERED * WORST_PICO


@pytest.fixture
def race_env(fake: FakeVendors, tmp_path: Path) -> dict[str, str]:
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps({"openai/gpt-4o-mini": {"input": str(INPUT_PRICE), "output": str(OUTPUT_PRICE)}})
    )
    # Each answer costs exactly the worst case the proxy reserved for it; the vendor takes
    # a while, so the requests overlap.
    fake.script(
        Reply(
            text="ok",
            prompt_tokens=PROMPT_BOUND,
            completion_tokens=MAX_TOKENS,
            fault=Fault(latency=0.3),
        ),
        match="race for the budget",
    )
    return {
        **vendor_env(fake),
        "ROBOTA_ADMIN_KEY": ADMIN_KEY,
        "ROBOTA_PRICES_FILE": str(prices),
        "ROBOTA_UPSTREAM_TIMEOUT": "30",
        "ROBOTA_LOG_LEVEL": "warning",
    }


def create_key(proxy: ProxyProcess, user: str) -> str:
    budget = usd_text(BUDGET_PICO)
    response = httpx.post(
        f"{proxy.url}/admin/keys",
        json={"user": user, "permissions": {"monthlyBudgetUsd": budget}},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


async def burst(proxies: list[ProxyProcess], key: str) -> Counter[str]:
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        start = asyncio.Event()

        async def one(index: int) -> str:
            await start.wait()
            proxy = proxies[index % len(proxies)]
            response = await http.post(
                f"{proxy.url}/ai/chat", json=BODY, headers={"Authorization": f"Bearer {key}"}
            )
            if response.status_code == 200:
                return "served"
            return str(response.json()["error"]["code"])

        tasks = [asyncio.create_task(one(index)) for index in range(REQUESTS)]
        await asyncio.sleep(0)
        start.set()
        return Counter(await asyncio.gather(*tasks))


async def ledger_and_counters(database_url: str, user: str) -> tuple[int, int, int, int, int]:
    """(ledger rows, ledger cost, counters cost used, counters cost reserved, requests)."""
    engine = create_async_engine(async_url(database_url))
    try:
        async with engine.connect() as conn:
            rows, cost = (
                await conn.execute(
                    text(
                        "SELECT count(*), coalesce(sum(cost_pico), 0) FROM usage_ledger "
                        "WHERE user_id = :user AND status != 'in_flight'"
                    ),
                    {"user": user},
                )
            ).one()
            used, reserved, requests = (
                await conn.execute(
                    text(
                        "SELECT sum(cost_used_pico), sum(cost_reserved_pico), sum(requests) "
                        "FROM usage_counters WHERE user_id = :user"
                    ),
                    {"user": user},
                )
            ).one()
    finally:
        await engine.dispose()
    return int(rows), int(cost), int(used), int(reserved), int(requests)


async def settled(database_url: str, user: str, served: int) -> tuple[int, int, int, int, int]:
    # Settles are written just after each answer went out: give the last ones a moment.
    for _ in range(100):
        numbers = await ledger_and_counters(database_url, user)
        if numbers[0] >= served:
            break
        await asyncio.sleep(0.05)
    return numbers


def run_race(label: str, proxies: list[ProxyProcess], database_url: str, fake: FakeVendors) -> None:
    user = f"racer-{label}"
    key = create_key(proxies[0], user)
    outcomes = asyncio.run(burst(proxies, key))
    rows, ledger_cost, used, reserved, requests = asyncio.run(
        settled(database_url, user, outcomes["served"])
    )
    others = {code: n for code, n in outcomes.items() if code not in ("served", "budget_exceeded")}
    print(
        f"\n[race {label}] {REQUESTS} concurrent requests, budget ${usd_text(BUDGET_PICO)} = "
        f"{COVERED} worst cases of ${usd_text(WORST_PICO)}: served {outcomes['served']}, "
        f"refused 402 {outcomes['budget_exceeded']}, other {others}; ledger rows {rows}, "
        f"ledger total ${usd_text(ledger_cost)} (counters ${usd_text(used)}, reserved "
        f"{reserved}) vs budget ${usd_text(BUDGET_PICO)}; vendor calls {len(fake.requests)}"
    )
    assert outcomes["served"] <= COVERED
    # Each answer costs exactly its worst case, so the budget serves exactly COVERED.
    assert outcomes["served"] == COVERED
    assert outcomes["budget_exceeded"] == REQUESTS - COVERED
    assert len(fake.requests) == COVERED
    assert rows == requests == COVERED
    assert ledger_cost == used <= BUDGET_PICO
    assert used == COVERED * WORST_PICO
    assert reserved == 0


def test_budget_race_on_sqlite(race_env: dict[str, str], fake: FakeVendors, tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'race.db'}"
    proxy = start_proxy({**race_env, "ROBOTA_DATABASE_URL": database_url}, tmp_path / "proxy.log")
    try:
        run_race("sqlite", [proxy], database_url, fake)
    finally:
        stop_proxy(proxy)


@pytest.fixture
def two_proxies(
    race_env: dict[str, str], postgres_url: str, redis_url: str, tmp_path: Path
) -> Iterator[list[ProxyProcess]]:
    env = {**race_env, "ROBOTA_DATABASE_URL": postgres_url, "ROBOTA_REDIS_URL": redis_url}
    first = start_proxy(env, tmp_path / "proxy1.log")
    try:
        second = start_proxy(env, tmp_path / "proxy2.log")
    except BaseException:
        stop_proxy(first)
        raise
    yield [first, second]
    stop_proxy(second)
    stop_proxy(first)


def test_budget_race_on_postgres_and_redis_with_two_processes(
    two_proxies: list[ProxyProcess], postgres_url: str, fake: FakeVendors
) -> None:
    run_race("postgres+redis x2", two_proxies, postgres_url, fake)
