"""UsageStore on a real SQLite file and a real PostgreSQL database: reservations hold under
concurrency, settles keep the counters equal to the ledger, reports group by day and model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

import anyio
import pytest
from sqlalchemy import select

from robota_proxy.storage import tables
from robota_proxy.storage.database import Database
from robota_proxy.storage.usage_store import (
    LedgerEntry,
    Refusal,
    Reservation,
    UsageStore,
    period_of,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'usage.db'}"
    # Looked up only when asked for, and from a plain fixture: it runs asyncio itself.
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def store(database_url: str, anyio_backend: str) -> AsyncIterator[UsageStore]:
    database = Database(database_url)
    await database.open()
    try:
        yield UsageStore(database)
    finally:
        await database.aclose()


def entry(
    user: str,
    *,
    when: datetime,
    cost: int,
    prompt: int = 10,
    completion: int = 5,
    model: str = "m1",
    cached: bool = False,
    request_id: str = "req_1",
) -> LedgerEntry:
    return LedgerEntry(
        request_id=request_id,
        created_at=when,
        user=user,
        key_id="key_1",
        provider="openai",
        model=model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_prompt_tokens=0,
        reasoning_tokens=0,
        cost_pico=cost,
        latency_ms=3,
        status="ok",
        streamed=False,
        cached=cached,
        priced=True,
        estimated=False,
    )


def unique(name: str) -> str:
    # PostgreSQL is shared by the whole session: users of their own per test.
    return f"{name}-{datetime.now(UTC).timestamp()}"


@pytest.mark.anyio
async def test_reserve_refuses_past_the_limit_and_says_which(store: UsageStore) -> None:
    user = unique("alice")
    period = "2030-01"
    first = await store.reserve(
        user, period, tokens=60, cost_pico=600, token_limit=100, cost_limit_pico=1000
    )
    assert isinstance(first, Reservation)
    tokens_refusal = await store.reserve(
        user, period, tokens=41, cost_pico=1, token_limit=100, cost_limit_pico=1000
    )
    assert isinstance(tokens_refusal, Refusal) and tokens_refusal.limit == "tokens"
    assert tokens_refusal.counters.tokens_reserved == 60
    cost_refusal = await store.reserve(
        user, period, tokens=1, cost_pico=401, token_limit=100, cost_limit_pico=1000
    )
    assert isinstance(cost_refusal, Refusal) and cost_refusal.limit == "cost"
    await store.release(first)
    counters = await store.counters(user, period)
    assert (counters.tokens_reserved, counters.cost_reserved_pico, counters.requests) == (0, 0, 0)


@pytest.mark.anyio
async def test_concurrent_reservations_never_exceed_the_limit(store: UsageStore) -> None:
    user = unique("racer")
    results: list[Reservation | Refusal] = []

    async def one() -> None:
        results.append(
            await store.reserve(
                user, "2030-02", tokens=1, cost_pico=100, token_limit=None, cost_limit_pico=1000
            )
        )

    async with anyio.create_task_group() as group:
        for _ in range(40):
            group.start_soon(one)
    assert sum(isinstance(result, Reservation) for result in results) == 10
    counters = await store.counters(user, "2030-02")
    assert counters.cost_reserved_pico == 1000


@pytest.mark.anyio
async def test_settle_keeps_counters_equal_to_the_ledger(store: UsageStore) -> None:
    user = unique("bob")
    when = datetime(2030, 3, 14, 12, 0, tzinfo=UTC)
    period = period_of(when)
    held = await store.reserve(
        user, period, tokens=100, cost_pico=5000, token_limit=1000, cost_limit_pico=None
    )
    assert isinstance(held, Reservation)
    await store.settle(entry(user, when=when, cost=1234), held)
    # A caller without limits: no reservation, the counters row is created by the settle.
    await store.settle(entry(user, when=when, cost=66, model="m2"), None)
    await store.settle(entry(user, when=when, cost=0, cached=True, request_id="req_c"), None)
    counters = await store.counters(user, period)
    assert counters.tokens_reserved == 0 and counters.cost_reserved_pico == 0
    assert counters.cost_used_pico == 1300
    assert counters.tokens_used == 30  # the cache hit spends no quota
    assert counters.requests == 3
    summed = await store.ledger_totals(user, period)
    assert (summed.tokens_used, summed.cost_used_pico, summed.requests) == (30, 1300, 3)


@pytest.mark.anyio
async def test_ledger_row_keeps_every_token_kind(store: UsageStore) -> None:
    """Cache reads, cache writes and reasoning each have a column (and a report sum), so a
    row shows how its cost was made up; writers that predate cache writes record 0."""
    user = unique("erin")
    when = datetime(2030, 5, 6, 7, 8, tzinfo=UTC)
    kinds = replace(
        entry(user, when=when, cost=2_101_600_000, prompt=2007, completion=300),
        cached_prompt_tokens=1200,
        cache_write_tokens=800,
        reasoning_tokens=120,
        request_id="req_kinds",
    )
    await store.settle(kinds, None)
    await store.settle(entry(user, when=when, cost=1, request_id="req_plain"), None)
    ledger = tables.usage_ledger
    async with store.database.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(
                    ledger.c.request_id,
                    ledger.c.prompt_tokens,
                    ledger.c.completion_tokens,
                    ledger.c.cached_prompt_tokens,
                    ledger.c.cache_write_tokens,
                    ledger.c.reasoning_tokens,
                    ledger.c.cost_pico,
                )
                .where(ledger.c.user_id == user)
                .order_by(ledger.c.id)
            )
        ).all()
    assert [tuple(row) for row in rows] == [
        ("req_kinds", 2007, 300, 1200, 800, 120, 2_101_600_000),
        ("req_plain", 10, 5, 0, 0, 0, 1),
    ]
    report = await store.report(date(2030, 5, 6), date(2030, 5, 6), user=user)
    total = report.total
    assert (
        total.prompt_tokens,
        total.cached_prompt_tokens,
        total.cache_write_tokens,
        total.reasoning_tokens,
        total.cost_pico,
    ) == (2017, 1200, 800, 120, 2_101_600_001)
    assert [(row.key, row.cache_write_tokens) for row in report.models] == [(("openai", "m1"), 800)]


@pytest.mark.anyio
async def test_report_totals_per_day_and_model(store: UsageStore) -> None:
    user = unique("carol")
    other = unique("dave")
    day1 = datetime(2030, 4, 1, 23, 59, tzinfo=UTC)
    day2 = datetime(2030, 4, 2, 0, 1, tzinfo=UTC)
    await store.settle(entry(user, when=day1, cost=100), None)
    await store.settle(entry(user, when=day2, cost=200, model="m2"), None)
    await store.settle(entry(user, when=day2, cost=300, model="m2"), None)
    await store.settle(entry(other, when=day2, cost=999), None)
    report = await store.report(date(2030, 4, 1), date(2030, 4, 2), user=user)
    assert report.total.requests == 3 and report.total.cost_pico == 600
    assert [(row.key, row.cost_pico) for row in report.days] == [
        (("2030-04-01",), 100),
        (("2030-04-02",), 500),
    ]
    assert [(row.key, row.requests) for row in report.models] == [
        (("openai", "m1"), 1),
        (("openai", "m2"), 2),
    ]
    only_day2 = await store.report(date(2030, 4, 2), date(2030, 4, 2), user=user)
    assert only_day2.total.cost_pico == 500
    everyone = await store.report(date(2030, 4, 1), date(2030, 4, 2))
    assert {row.key[0]: row.cost_pico for row in everyone.users if row.key[0] in (user, other)} == {
        user: 600,
        other: 999,
    }


@pytest.mark.anyio
async def test_concurrent_settles_are_written_together_and_still_add_up(
    store: UsageStore,
) -> None:
    users = [unique("eve"), unique("frank")]
    when = datetime(2030, 5, 5, tzinfo=UTC)
    period = period_of(when)
    held: list[Reservation] = []
    for index in range(20):
        result = await store.reserve(
            users[index % 2],
            period,
            tokens=50,
            cost_pico=500,
            token_limit=None,
            cost_limit_pico=None,
        )
        assert isinstance(result, Reservation)
        held.append(result)

    async def one(index: int) -> None:
        reservation = held[index] if index < 20 else None
        await store.settle(
            entry(users[index % 2], when=when, cost=index, request_id=f"req_{index}"), reservation
        )

    async with anyio.create_task_group() as group:
        for index in range(60):
            group.start_soon(one, index)
    for number, user in enumerate(users):
        counters = await store.counters(user, period)
        summed = await store.ledger_totals(user, period)
        assert (counters.tokens_reserved, counters.cost_reserved_pico) == (0, 0)
        assert counters.requests == summed.requests == 30
        assert counters.cost_used_pico == summed.cost_used_pico == sum(range(number, 60, 2))
        assert counters.tokens_used == summed.tokens_used == 30 * 15
