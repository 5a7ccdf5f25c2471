"""Crash-safe money: a proxy SIGKILLed in the middle of 50 budgeted streams leaves no budget
held past its leases, and every vendor call it made has exactly one ledger row.

Each call's ledger row is written ``in_flight`` before the vendor is asked, with a lease that
ends at the request deadline plus ``ROBOTA_LEASE_MARGIN_SECONDS``; after the kill, a proxy
(the same one restarted on SQLite, or the surviving one of two sharing PostgreSQL) closes the
expired leases as ``interrupted``, charging their worst case as an estimate, and releases
their holds. The deadline (``ROBOTA_MAX_REQUEST_TIMEOUT``), margin and reclaim interval are
short here so the whole test takes seconds; ``pytest -s`` prints the measured times.

Every answer of the fake vendor costs exactly the worst case the proxy reserved for it, so a
finished stream and an interrupted one cost the same, and the totals are exact.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
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

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

ADMIN_KEY = "admin-key-for-crash-tests-0123456789"
STREAMS = 50
MAX_TOKENS = 50
INPUT_PRICE = Decimal("1.5")  # USD per million tokens
OUTPUT_PRICE = Decimal("4")
BODY = {
    "provider": "openai",
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "crash during this stream"}],
    "options": {"maxTokens": MAX_TOKENS},
}
PROMPT_BOUND = prompt_token_bound(ChatRequest.model_validate(BODY))
WORST_PICO = to_pico((PROMPT_BOUND * INPUT_PRICE + MAX_TOKENS * OUTPUT_PRICE) / 1_000_000)
#: Room for the 50 streams and 10 more calls.
BUDGET_PICO = (STREAMS + 10) * WORST_PICO
#: A stream takes 12 words x 0.25 s = 3 s; the deadline is 6 s and the margin 1 s, so a
#: lease ends 7 s after its call started.
WORDS = 12
CHUNK_SECONDS = 0.25
DEADLINE = 6.0
MARGIN = 1.0
RECLAIM_EVERY = 0.5
LEASE = DEADLINE + MARGIN


@pytest.fixture
def crash_env(fake: FakeVendors, tmp_path: Path) -> dict[str, str]:
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps({"openai/gpt-4o-mini": {"input": str(INPUT_PRICE), "output": str(OUTPUT_PRICE)}})
    )
    fake.script(
        Reply(
            text=" ".join(f"word{index}" for index in range(WORDS)),
            prompt_tokens=PROMPT_BOUND,
            completion_tokens=MAX_TOKENS,
            fault=Fault(chunk_latency=CHUNK_SECONDS),
        ),
        match="crash during this stream",
    )
    return {
        **vendor_env(fake),
        "ROBOTA_ADMIN_KEY": ADMIN_KEY,
        "ROBOTA_PRICES_FILE": str(prices),
        "ROBOTA_MAX_REQUEST_TIMEOUT": str(DEADLINE),
        "ROBOTA_LEASE_MARGIN_SECONDS": str(MARGIN),
        "ROBOTA_LEASE_RECLAIM_SECONDS": str(RECLAIM_EVERY),
        "ROBOTA_LOG_LEVEL": "warning",
    }


def create_key(proxy: ProxyProcess, user: str) -> str:
    response = httpx.post(
        f"{proxy.url}/admin/keys",
        json={"user": user, "permissions": {"monthlyBudgetUsd": usd_text(BUDGET_PICO)}},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


@dataclass
class Burst:
    """How the streams ended: finished (read to the end) or cut (the proxy died)."""

    finished: int = 0
    cut: int = 0


async def streams_then_kill(
    proxies: list[ProxyProcess], key: str, victim: ProxyProcess, fake: FakeVendors
) -> tuple[Burst, float]:
    """Open the streams across ``proxies``; once every one has its 200 (the vendor call is
    under way) SIGKILL ``victim``; read the others to their end. Returns how they ended and
    ``time.monotonic()`` of the kill."""
    burst = Burst()
    opened = 0
    all_open = asyncio.Event()
    limits = httpx.Limits(max_connections=STREAMS, max_keepalive_connections=STREAMS)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:

        async def one(index: int) -> None:
            nonlocal opened
            proxy = proxies[index % len(proxies)]
            try:
                async with http.stream(
                    "POST",
                    f"{proxy.url}/ai/chat/stream",
                    json=BODY,
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    assert response.status_code == 200
                    opened += 1
                    if opened == STREAMS:
                        all_open.set()
                    async for _ in response.aiter_bytes():
                        pass
                burst.finished += 1
            except httpx.TransportError:
                burst.cut += 1

        tasks = [asyncio.create_task(one(index)) for index in range(STREAMS)]
        await asyncio.wait_for(all_open.wait(), timeout=10)
        assert len(fake.requests) == STREAMS
        victim.process.kill()  # SIGKILL: no shutdown, no settle
        killed_at = time.monotonic()
        victim.process.wait()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=DEADLINE + 5)
    return burst, killed_at


@dataclass(frozen=True)
class Books:
    rows: int
    statuses: dict[str, int]
    ledger_cost: int
    ledger_tokens: int
    estimated: int
    owners: dict[str, int]
    used: int
    reserved: int
    tokens_used: int
    tokens_reserved: int
    requests: int


async def books(database_url: str, user: str) -> Books:
    """The user's ledger (settled and in flight) and counters, read straight from SQL."""
    engine = create_async_engine(async_url(database_url))
    try:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT status, cost_pico, prompt_tokens + completion_tokens AS tokens, "
                        "estimated, lease_owner FROM usage_ledger WHERE user_id = :user"
                    ),
                    {"user": user},
                )
            ).all()
            counters = (
                await conn.execute(
                    text(
                        "SELECT coalesce(sum(cost_used_pico), 0), "
                        "coalesce(sum(cost_reserved_pico), 0), coalesce(sum(tokens_used), 0), "
                        "coalesce(sum(tokens_reserved), 0), coalesce(sum(requests), 0) "
                        "FROM usage_counters WHERE user_id = :user"
                    ),
                    {"user": user},
                )
            ).one()
    finally:
        await engine.dispose()
    statuses: dict[str, int] = {}
    owners: dict[str, int] = {}
    for row in rows:
        statuses[row.status] = statuses.get(row.status, 0) + 1
        owners[row.lease_owner] = owners.get(row.lease_owner, 0) + 1
    used, reserved, tokens_used, tokens_reserved, requests = (int(value) for value in counters)
    return Books(
        rows=len(rows),
        statuses=statuses,
        ledger_cost=sum(int(row.cost_pico) for row in rows),
        ledger_tokens=sum(int(row.tokens) for row in rows),
        estimated=sum(bool(row.estimated) for row in rows),
        owners=owners,
        used=used,
        reserved=reserved,
        tokens_used=tokens_used,
        tokens_reserved=tokens_reserved,
        requests=requests,
    )


async def wait_until_released(database_url: str, user: str, bound: float) -> tuple[Books, float]:
    """The books once nothing is reserved or in flight any more (or as they are after
    ``bound`` seconds), and ``time.monotonic()`` when they were read."""
    started = time.monotonic()
    while True:
        now = await books(database_url, user)
        read_at = time.monotonic()
        if (now.reserved == 0 and IN_FLIGHT not in now.statuses) or read_at - started > bound:
            return now, read_at
        await asyncio.sleep(0.1)


IN_FLIGHT = "in_flight"


def owner_pid(owner: str) -> int:
    """``host:pid:random`` -> pid."""
    return int(owner.split(":")[-2])


def test_sigkill_on_sqlite_then_restart_reclaims_every_lease(
    crash_env: dict[str, str], fake: FakeVendors, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'crash.db'}"
    env = {**crash_env, "ROBOTA_DATABASE_URL": database_url}
    user = "crash-sqlite"
    first = start_proxy(env, tmp_path / "first.log")
    try:
        key = create_key(first, user)
        burst, killed_at = asyncio.run(streams_then_kill([first], key, first, fake))
    finally:
        if first.process.poll() is None:
            stop_proxy(first)
    held = asyncio.run(books(database_url, user))
    # Killed mid-stream: every call is in flight, its worst case held.
    assert (burst.finished, burst.cut) == (0, STREAMS)
    assert held.statuses == {IN_FLIGHT: STREAMS}
    assert held.reserved == STREAMS * WORST_PICO and held.used == 0
    assert held.tokens_reserved == STREAMS * (PROMPT_BOUND + MAX_TOKENS)

    restarted = start_proxy(env, tmp_path / "restarted.log")
    ready = time.monotonic() - killed_at
    try:
        # A lease ends LEASE seconds after its call started (before the kill); the restarted
        # proxy reclaims at start-up, then every RECLAIM_EVERY seconds. On a loaded machine
        # the restart alone may take longer than a lease.
        bound = max(LEASE, ready) + RECLAIM_EVERY + 1.5
        settled, released_at = asyncio.run(wait_until_released(database_url, user, bound=bound))
        since_kill = released_at - killed_at
        vendor_calls = len(fake.requests)
        print(
            f"\n[crash sqlite] {STREAMS} budgeted streams, SIGKILL, restart up {ready:.1f} s "
            f"after the kill: reserved "
            f"${usd_text(held.reserved)} -> ${usd_text(settled.reserved)} {since_kill:.1f} s "
            f"after the kill (lease {LEASE:g} s, reclaim every {RECLAIM_EVERY:g} s); vendor "
            f"calls {vendor_calls}, vendor saw {fake.aborted_streams} aborted / "
            f"{fake.completed_streams} completed; ledger rows {settled.rows} {settled.statuses}, "
            f"ledger ${usd_text(settled.ledger_cost)} = counters ${usd_text(settled.used)}"
        )
        assert settled.reserved == 0 and settled.tokens_reserved == 0
        assert since_kill <= bound
        # Exactly one row per vendor call, each closed as interrupted with its worst case.
        assert vendor_calls == settled.rows == settled.requests == STREAMS
        assert fake.completed_streams == 0
        assert settled.statuses == {"interrupted": STREAMS}
        assert settled.estimated == STREAMS
        assert [owner_pid(owner) for owner in settled.owners] == [first.process.pid]
        assert settled.ledger_cost == settled.used == STREAMS * WORST_PICO
        assert settled.ledger_tokens == settled.tokens_used == STREAMS * (PROMPT_BOUND + MAX_TOKENS)
        # The budget is not blocked: the next call is served, and settles like any other.
        answer = httpx.post(
            f"{restarted.url}/ai/chat",
            json={**BODY, "messages": [{"role": "user", "content": "after the crash"}]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
    finally:
        stop_proxy(restarted)
    after = asyncio.run(books(database_url, user))
    assert (after.rows, after.requests, after.reserved) == (STREAMS + 1, STREAMS + 1, 0)
    assert after.ledger_cost == after.used


@pytest.fixture
def two_proxies(
    crash_env: dict[str, str], postgres_url: str, tmp_path: Path
) -> Iterator[list[ProxyProcess]]:
    env = {**crash_env, "ROBOTA_DATABASE_URL": postgres_url}
    first = start_proxy(env, tmp_path / "proxy1.log")
    try:
        second = start_proxy(env, tmp_path / "proxy2.log")
    except BaseException:
        stop_proxy(first)
        raise
    yield [first, second]
    for proxy in (second, first):
        if proxy.process.poll() is None:
            stop_proxy(proxy)


def test_sigkill_one_of_two_on_postgres_the_other_reclaims(
    two_proxies: list[ProxyProcess], postgres_url: str, fake: FakeVendors
) -> None:
    victim, survivor = two_proxies
    user = "crash-postgres"
    key = create_key(survivor, user)
    burst, killed_at = asyncio.run(streams_then_kill(two_proxies, key, victim, fake))
    bound = LEASE + RECLAIM_EVERY + 1.5
    settled, released_at = asyncio.run(wait_until_released(postgres_url, user, bound=bound))
    since_kill = released_at - killed_at
    vendor_calls = len(fake.requests)
    print(
        f"\n[crash postgres x2] {STREAMS} budgeted streams over two proxies, one SIGKILLed: "
        f"{burst.finished} finished, {burst.cut} cut; nothing reserved {since_kill:.1f} s after "
        f"the kill (lease {LEASE:g} s, reclaim every {RECLAIM_EVERY:g} s); vendor calls "
        f"{vendor_calls}, vendor saw {fake.aborted_streams} aborted / {fake.completed_streams} "
        f"completed; ledger rows {settled.rows} {settled.statuses}, ledger "
        f"${usd_text(settled.ledger_cost)} = counters ${usd_text(settled.used)}"
    )
    half = STREAMS // 2
    assert (burst.finished, burst.cut) == (half, half)
    assert settled.reserved == 0 and settled.tokens_reserved == 0
    assert since_kill <= bound
    assert vendor_calls == settled.rows == settled.requests == STREAMS
    # The survivor's own calls settled normally; the victim's were closed by the survivor.
    assert settled.statuses == {"ok": half, "interrupted": half}
    assert settled.estimated == half
    assert {owner_pid(owner): count for owner, count in settled.owners.items()} == {
        victim.process.pid: half,
        survivor.process.pid: half,
    }
    assert "reclaimed" in survivor.log()
    # Every answer costs its worst case, so finished and interrupted calls cost the same.
    assert settled.ledger_cost == settled.used == STREAMS * WORST_PICO
    assert settled.ledger_tokens == settled.tokens_used == STREAMS * (PROMPT_BOUND + MAX_TOKENS)
