"""UsageStore's money at its edges, on SQLite and PostgreSQL: a reservation may land exactly on
a limit (and not one token or picodollar past it), a refusal names the limit the call does not
fit, each month (and a new year) has its own counters, every column a settle writes is read
back, a settle the database refuses is reported as failed, and a settle whose caller is
cancelled is still written."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import anyio
import pytest
from sqlalchemy.exc import DBAPIError

from robota_proxy.storage import usage_store
from robota_proxy.storage.usage_store import (
    IN_FLIGHT,
    INTERRUPTED,
    Counters,
    LedgerEntry,
    Refusal,
    Reservation,
    UsageStore,
)
from tests.unit import usage_store_support as support
from tests.unit.usage_store_support import (
    LEDGER,
    OWNER,
    allow_writes,
    assert_adds_up,
    entry,
    flush_older_leases,
    open_call,
    opening,
    refuse_writes_to,
    rows_of,
    unique,
)

pytestmark = pytest.mark.anyio

# The shared fixtures, used by name.
anyio_backend = support.anyio_backend
database_url = support.database_url
fresh_statements = support.fresh_statements
new_york = support.new_york
store = support.store


#: Not this module's: the surrogate key, and the API surface a call came in on (tested with
#: the OpenAI- and Anthropic-compatible routes).
_NOT_HERE = ("id", "surface")


def utc(row: dict[str, object]) -> dict[str, object]:
    """A ledger row without the columns in ``_NOT_HERE``, its timestamps in UTC (SQLite hands
    them back without their zone)."""
    return {
        name: value.replace(tzinfo=UTC)
        if isinstance(value, datetime) and value.tzinfo is None
        else value
        for name, value in row.items()
        if name not in _NOT_HERE
    }


# --- reservations against the limits -------------------------------------------------------------


async def test_a_reservation_may_land_exactly_on_the_token_limit(store: UsageStore) -> None:
    """``used + reserved + call <= limit``: with 15 tokens used and 40 held, a call of 45
    fits a limit of 100 and the next token does not."""
    user = unique("tokens")
    when = datetime(2030, 11, 3, tzinfo=UTC)

    async def attempt(prompt: int, completion: int, cost: int) -> Reservation | Refusal:
        call = opening(user, when=when, prompt=prompt, completion=completion, cost=cost)
        return await store.open(call, token_limit=100, cost_limit_pico=None)

    first = await attempt(20, 10, 1_000)
    assert isinstance(first, Reservation)
    await store.settle(entry(user, when=when, cost=500, request_id=first.request_id), first)
    assert isinstance(await attempt(40, 0, 2_000), Reservation)
    exact = await attempt(30, 15, 3_000)
    assert isinstance(exact, Reservation)
    assert (exact.user, exact.period, exact.tokens, exact.cost_pico) == (user, "2030-11", 45, 3_000)
    # Without a cost limit the worst-case cost is held all the same (it is charged if the
    # call never settles), and never refused.
    assert await attempt(1, 0, 0) == Refusal(
        "tokens",
        Counters(
            tokens_used=15,
            tokens_reserved=85,
            cost_used_pico=500,
            cost_reserved_pico=5_000,
            requests=1,
        ),
    )
    assert len(await rows_of(store, user)) == 3
    await assert_adds_up(store, user, "2030-11")


async def test_a_reservation_may_land_exactly_on_the_cost_limit(store: UsageStore) -> None:
    """With 1,200 pico used and 4,000 held, a call of 4,800 fits a limit of 10,000 and one
    more picodollar does not."""
    user = unique("cost")
    when = datetime(2030, 11, 4, tzinfo=UTC)

    async def attempt(cost: int) -> Reservation | Refusal:
        call = opening(user, when=when, cost=cost)
        return await store.open(call, token_limit=None, cost_limit_pico=10_000)

    first = await attempt(3_000)
    assert isinstance(first, Reservation)
    await store.settle(entry(user, when=when, cost=1_200, request_id=first.request_id), first)
    assert isinstance(await attempt(4_000), Reservation)
    exact = await attempt(4_800)
    assert isinstance(exact, Reservation)
    assert (exact.tokens, exact.cost_pico) == (100, 4_800)
    assert await attempt(1) == Refusal(
        "cost",
        Counters(
            tokens_used=15,
            tokens_reserved=200,
            cost_used_pico=1_200,
            cost_reserved_pico=8_800,
            requests=1,
        ),
    )
    await assert_adds_up(store, user, "2030-11")


async def test_a_refusal_names_the_limit_the_call_does_not_fit(store: UsageStore) -> None:
    """A call exactly on the token limit but over the cost limit is refused for its cost, one
    over the token limit for its tokens; a refused call writes no row and holds nothing."""
    user = unique("refused")
    when = datetime(2030, 11, 5, tzinfo=UTC)
    nothing = Counters(0, 0, 0, 0, 0)

    async def attempt(
        tokens: int, cost: int, token_limit: int | None, cost_limit: int | None
    ) -> Reservation | Refusal:
        call = opening(user, when=when, prompt=tokens, completion=0, cost=cost)
        return await store.open(call, token_limit=token_limit, cost_limit_pico=cost_limit)

    assert await attempt(100, 1_001, 100, 1_000) == Refusal("cost", nothing)
    assert await attempt(101, 1_000, 100, 1_000) == Refusal("tokens", nothing)
    assert await attempt(5, 1_001, None, 1_000) == Refusal("cost", nothing)
    assert await attempt(101, 0, 100, None) == Refusal("tokens", nothing)
    assert await rows_of(store, user) == []
    assert await store.counters(user, "2030-11") == nothing


async def test_an_unpriced_call_holds_its_tokens_and_no_money(store: UsageStore) -> None:
    """A model without a price (worst-case cost unknown) under a token limit: its tokens are
    held, no money is, and its row says it is unpriced."""
    user = unique("unpriced")
    when = datetime(2030, 11, 6, tzinfo=UTC)
    call = opening(user, when=when, cost=None, request_id=f"unpriced_{user}")
    held = await store.open(call, token_limit=1_000, cost_limit_pico=None)
    assert held == Reservation(f"unpriced_{user}", user, "2030-11", 100, 0)
    assert await store.counters(user, "2030-11") == Counters(0, 100, 0, 0, 0)
    [row] = await rows_of(store, user)
    assert (
        row["reserved_tokens"],
        row["reserved_cost_pico"],
        row["estimate_cost_pico"],
        row["priced"],
    ) == (100, 0, None, False)
    await assert_adds_up(store, user, "2030-11")


# --- months --------------------------------------------------------------------------------------


async def test_each_month_has_its_own_counters_across_the_new_year(store: UsageStore) -> None:
    """Calls on both sides of two month boundaries, one of them New Year: each is held and
    charged in the month it started, whenever it settles or is reclaimed, and no month's
    counters move for another month's call."""
    user = unique("months")
    last_nov = datetime(2030, 11, 30, 23, 59, 59, 999_999, tzinfo=UTC)
    first_dec = datetime(2030, 12, 1, tzinfo=UTC)
    last_dec = datetime(2030, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    new_year = datetime(2031, 1, 1, tzinfo=UTC)
    reclaim_at = new_year + timedelta(seconds=31)
    await flush_older_leases(store, reclaim_at)

    async def held(when: datetime, name: str, lease: timedelta) -> Reservation:
        call = opening(user, when=when, request_id=f"{name}_{user}", lease=lease)
        return await open_call(store, call, token_limit=10_000, cost_limit=10**15)

    november = await held(last_nov, "nov", timedelta(seconds=30))
    await store.settle(
        entry(user, when=last_nov, cost=100, request_id=november.request_id), november
    )
    late_dec = await held(last_dec, "late_dec", timedelta(minutes=10))  # December's first
    early_dec = await held(first_dec, "early_dec", timedelta(seconds=30))  # then reclaimed
    january = await held(new_year, "jan", timedelta(minutes=10))
    assert [one.period for one in (november, late_dec, early_dec, january)] == [
        "2030-11",
        "2030-12",
        "2030-12",
        "2031-01",
    ]
    assert await store.counters(user, "2030-12") == Counters(0, 200, 0, 14_000, 0)
    assert await store.counters(user, "2031-01") == Counters(0, 100, 0, 7_000, 0)
    # December's last call settles after January's first began.
    await store.settle(
        entry(user, when=last_dec, cost=300, request_id=late_dec.request_id), late_dec
    )
    assert await store.reclaim(reclaim_at) == 1  # December's first, its process dead
    await store.settle(entry(user, when=new_year, cost=50, request_id=january.request_id), january)
    expected = {
        "2030-11": Counters(15, 0, 100, 0, 1),
        "2030-12": Counters(15 + 100, 0, 300 + 7_000, 0, 2),
        "2031-01": Counters(15, 0, 50, 0, 1),
    }
    for period, counters in expected.items():
        assert await store.counters(user, period) == counters
        assert await store.ledger_totals(user, period) == counters
    statuses = {row["request_id"]: row["status"] for row in await rows_of(store, user)}
    assert statuses == {
        f"nov_{user}": "ok",
        f"late_dec_{user}": "ok",
        f"early_dec_{user}": INTERRUPTED,
        f"jan_{user}": "ok",
    }


async def test_a_calls_month_does_not_depend_on_the_hosts_time_zone(
    store: UsageStore, new_york: None
) -> None:
    """On a host in New York, a call at 23:30 UTC on New Year's Eve is December's, also when
    it is reclaimed and when its late settle corrects it, and one at 00:30 UTC on New Year's
    Day is January's (SQLite hands timestamps back without their zone: read as New York time,
    23:30 would be 04:30 UTC the next day)."""
    user = unique("zone")
    eve = datetime(2030, 12, 31, 23, 30, tzinfo=UTC)
    new_year = datetime(2031, 1, 1, 0, 30, tzinfo=UTC)
    await flush_older_leases(store, eve + timedelta(minutes=1))
    held = await open_call(store, opening(user, when=eve, request_id=f"zone_{user}"))
    assert await store.reclaim(eve + timedelta(minutes=1)) == 1
    assert await store.counters(user, "2030-12") == Counters(100, 0, 7_000, 0, 1)
    await store.settle(entry(user, when=eve, cost=40, request_id=held.request_id), held)
    await store.settle(entry(user, when=new_year, cost=2, prompt=1, completion=1), None)
    assert await store.counters(user, "2030-12") == Counters(15, 0, 40, 0, 1)
    assert await store.counters(user, "2031-01") == Counters(2, 0, 2, 0, 1)
    await assert_adds_up(store, user, "2030-12")
    await assert_adds_up(store, user, "2031-01")


async def test_reclaim_by_default_closes_the_leases_expired_by_now_in_utc(
    store: UsageStore, new_york: None
) -> None:
    """``reclaim()`` without a moment uses the present, as UTC, also on a host in New York: a
    lease that expired an hour ago is closed, one that expires in an hour is not."""
    user = unique("present")
    now = datetime.now(UTC)
    expired = opening(user, when=now - timedelta(hours=2), request_id=f"old_{user}")
    alive = opening(user, when=now, request_id=f"alive_{user}", lease=timedelta(hours=1))
    for call in (expired, alive):
        await open_call(store, call, cost_limit=None)
    await store.reclaim()
    statuses = {row["request_id"]: row["status"] for row in await rows_of(store, user)}
    assert statuses == {f"old_{user}": INTERRUPTED, f"alive_{user}": IN_FLIGHT}


# --- what a settle writes ------------------------------------------------------------------------


def final(user: str, request_id: str, when: datetime, *, flipped: bool) -> LedgerEntry:
    """A settle whose every column differs from what the opening wrote; ``flipped`` turns
    each flag the other way, so that both values of every flag are seen written."""
    return LedgerEntry(
        request_id=request_id,
        created_at=when,
        user=user,
        key_id="key_2",
        provider="anthropic",
        model="m9",
        prompt_tokens=11,
        completion_tokens=22,
        cached_prompt_tokens=3,
        reasoning_tokens=4,
        cost_pico=555,
        latency_ms=321,
        status="upstream_error",
        streamed=flipped,
        cached=flipped,
        priced=flipped,
        estimated=not flipped,
        cache_write_tokens=5,
        correlation_id="theirs-1",
        deployment="openai-east" if flipped else "anthropic",
    )


def final_columns(settled: LedgerEntry) -> dict[str, object]:
    return {
        "key_id": settled.key_id,
        "provider": settled.provider,
        "model": settled.model,
        "prompt_tokens": settled.prompt_tokens,
        "completion_tokens": settled.completion_tokens,
        "cached_prompt_tokens": settled.cached_prompt_tokens,
        "cache_write_tokens": settled.cache_write_tokens,
        "reasoning_tokens": settled.reasoning_tokens,
        "cost_pico": settled.cost_pico,
        "latency_ms": settled.latency_ms,
        "status": settled.status,
        "streamed": settled.streamed,
        "cached": settled.cached,
        "priced": settled.priced,
        "estimated": settled.estimated,
        "deployment": settled.deployment,
    }


async def test_an_opened_row_holds_the_calls_details_and_its_lease(store: UsageStore) -> None:
    """The in-flight row: who, what, its lease and its worst case, and no usage yet."""
    user = unique("opened")
    when = datetime(2030, 11, 7, 9, 30, tzinfo=UTC)
    call = replace(opening(user, when=when, request_id=f"open_{user}"), streamed=False)
    await open_call(store, call, token_limit=1_000)
    plain = replace(call, request_id=f"plain_{user}", correlation_id=None, streamed=True)
    await open_call(store, plain)
    await open_call(store, replace(call, request_id=f"dialect_{user}", surface="anthropic"))
    *raw, dialect = await rows_of(store, user)
    rows = [utc(row) for row in raw]
    # The surface the call came in on is kept (the compatible routes test the rest of it).
    assert (dialect["request_id"], dialect["surface"]) == (f"dialect_{user}", "anthropic")
    in_flight = {
        "request_id": f"open_{user}",
        "correlation_id": "theirs-1",
        "created_at": when,
        "user_id": user,
        "key_id": "key_1",
        "provider": "openai",
        "model": "m1",
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cached_prompt_tokens": 0,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "cost_pico": 0,
        "latency_ms": 0,
        "status": IN_FLIGHT,
        "streamed": False,
        "cached": False,
        "priced": True,
        "estimated": False,
        "lease_owner": OWNER,
        "lease_expires_at": when + timedelta(seconds=30),
        "reserved_tokens": 100,
        "reserved_cost_pico": 7_000,
        "estimate_prompt_tokens": 40,
        "estimate_completion_tokens": 60,
        "estimate_cost_pico": 7_000,
        # Known only once a deployment answered: written by the settle.
        "deployment": None,
        # A call's own row; only the rows of its earlier vendor calls name it.
        "attempt_of": None,
    }
    assert rows == [
        in_flight,
        {**in_flight, "request_id": f"plain_{user}", "correlation_id": None, "streamed": True},
    ]


async def test_every_column_a_settle_writes_is_read_back(store: UsageStore) -> None:
    """Whether the settle completes the in-flight row, inserts the row of a call never
    opened, or corrects a row the reclaimer closed, the row ends with every column of the
    settle; the in-flight row keeps who opened it, its lease owner and its worst case."""
    user = unique("columns")
    when = datetime(2030, 11, 8, 10, 0, tzinfo=UTC)
    reclaim_at = when + timedelta(minutes=1)
    await flush_older_leases(store, reclaim_at)
    finished = await open_call(store, opening(user, when=when, request_id=f"fin_{user}"))
    late = await open_call(store, opening(user, when=when, request_id=f"late_{user}"))
    assert await store.reclaim(reclaim_at) == 2
    # ``finished`` was reclaimed too; a row in flight is needed for the plain path.
    flying = await open_call(
        store, opening(user, when=when, request_id=f"fly_{user}", lease=timedelta(hours=1))
    )
    settles = {
        f"fly_{user}": (final(user, f"fly_{user}", when, flipped=False), flying),
        f"late_{user}": (final(user, f"late_{user}", when, flipped=True), late),
        f"new_{user}": (
            replace(final(user, f"new_{user}", when, flipped=True), correlation_id=None),
            None,
        ),
        f"fin_{user}": (final(user, f"fin_{user}", when, flipped=False), finished),
    }
    for settled, reservation in settles.values():
        await store.settle(settled, reservation)
    opened = {
        "correlation_id": "theirs-1",
        "created_at": when,
        "user_id": user,
        "lease_owner": OWNER,
        "lease_expires_at": None,
        "reserved_tokens": 100,
        "reserved_cost_pico": 7_000,
        "estimate_prompt_tokens": 40,
        "estimate_completion_tokens": 60,
        "estimate_cost_pico": 7_000,
        "attempt_of": None,
    }
    never_opened = {
        **opened,
        "correlation_id": None,
        "lease_owner": None,
        "reserved_tokens": 0,
        "reserved_cost_pico": 0,
        "estimate_prompt_tokens": 0,
        "estimate_completion_tokens": 0,
        "estimate_cost_pico": None,
    }
    rows = {str(row["request_id"]): utc(row) for row in await rows_of(store, user)}
    assert rows == {
        key: {
            "request_id": key,
            **(opened if reservation is not None else never_opened),
            **final_columns(settled),
        }
        for key, (settled, reservation) in settles.items()
    }
    # Two of the four are cache hits (``flipped``): their tokens spend no quota.
    assert await store.counters(user, "2030-11") == Counters(33 * 2, 0, 555 * 4, 0, 4)
    await assert_adds_up(store, user, "2030-11")


async def test_a_second_settle_of_a_call_replaces_the_first(store: UsageStore) -> None:
    """Settled twice (first as a cache hit, then with the vendor's usage, then as a hit
    again): the row and the counters show the last settle only, counted once."""
    user = unique("twice")
    when = datetime(2030, 11, 9, tzinfo=UTC)
    held = await open_call(store, opening(user, when=when, request_id=f"twice_{user}"))
    hit = entry(user, when=when, cost=0, cached=True, request_id=held.request_id)
    await store.settle(hit, held)
    assert await store.counters(user, "2030-11") == Counters(0, 0, 0, 0, 1)
    vendor = entry(user, when=when, cost=900, prompt=30, completion=20, request_id=held.request_id)
    await store.settle(vendor, held)
    assert await store.counters(user, "2030-11") == Counters(50, 0, 900, 0, 1)
    await store.settle(hit, held)
    assert await store.counters(user, "2030-11") == Counters(0, 0, 0, 0, 1)
    [row] = await rows_of(store, user)
    assert (row["prompt_tokens"], row["cost_pico"], row["cached"]) == (10, 0, True)
    await assert_adds_up(store, user, "2030-11")


async def test_a_calls_earlier_attempts_are_rows_of_their_own_billed_but_no_requests(
    store: UsageStore,
) -> None:
    """A call settled with two earlier vendor calls (one failed, one a stream that broke
    after 7 tokens): three rows, the attempts written whole (surface, status, deployment and
    the call they belong to); the counters take every row's tokens and cost and one request;
    reports count one request and sum all three rows; the ledger still adds up to the
    counters. It holds whether the call's row was in flight, reclaimed or never opened."""
    user = unique("attempts")
    when = datetime(2030, 11, 10, 8, 0, tzinfo=UTC)
    reclaim_at = when + timedelta(minutes=1)
    await flush_older_leases(store, reclaim_at)
    flying = await open_call(
        store, opening(user, when=when, request_id=f"fly_{user}", lease=timedelta(hours=1))
    )
    late = await open_call(store, opening(user, when=when, request_id=f"late_{user}"))
    assert await store.reclaim(reclaim_at) == 1  # ``late``: corrected by its settle
    for call_id, reservation in (
        (f"fly_{user}", flying),
        (f"late_{user}", late),
        (f"new_{user}", None),
    ):
        own = entry(user, when=when, cost=900, prompt=30, completion=20, request_id=call_id)
        failed = replace(
            entry(user, when=when, cost=0, prompt=0, completion=0, status="upstream_unavailable"),
            request_id=f"{call_id}/1",
            attempt_of=call_id,
            deployment="openai-east",
            surface="openai",
        )
        broke = replace(
            entry(user, when=when, cost=70, prompt=30, completion=7, status="upstream_error"),
            request_id=f"{call_id}/2",
            attempt_of=call_id,
            provider="anthropic",
            estimated=True,
            streamed=True,
            surface="openai",
        )
        await store.settle(own, reservation, [failed, broke])
        rows = {str(row["request_id"]): row for row in await rows_of(store, user)}
        assert rows[f"{call_id}/1"]["status"] == "upstream_unavailable"
        for attempt in (failed, broke):
            row = rows[attempt.request_id]
            assert {
                name: row[name]
                for name in ("attempt_of", "surface", "provider", "deployment", "status")
            } == {
                "attempt_of": call_id,
                "surface": "openai",
                "provider": attempt.provider,
                "deployment": attempt.deployment,
                "status": attempt.status,
            }
            assert (row["prompt_tokens"], row["completion_tokens"], row["cost_pico"]) == (
                attempt.prompt_tokens,
                attempt.completion_tokens,
                attempt.cost_pico,
            )
            assert (row["estimated"], row["streamed"]) == (attempt.estimated, attempt.streamed)
            assert (row["lease_owner"], row["reserved_tokens"]) == (None, 0)
        assert (rows[call_id]["attempt_of"], rows[call_id]["cost_pico"]) == (None, 900)
    # Three calls, each 50 + 0 + 37 tokens and 900 + 0 + 70 picodollars, three requests.
    assert await store.counters(user, "2030-11") == Counters(87 * 3, 0, 970 * 3, 0, 3)
    await assert_adds_up(store, user, "2030-11")
    report = await store.report(when.date(), when.date(), user=user)
    assert (report.total.requests, report.total.prompt_tokens, report.total.cost_pico) == (
        3,
        60 * 3,
        970 * 3,
    )
    assert [(row.key, row.requests, row.cost_pico) for row in report.models] == [
        (("anthropic", "m1"), 0, 70 * 3),
        (("openai", "m1"), 3, 900 * 3),
    ]


# --- failures and cancellation -------------------------------------------------------------------


async def test_a_settle_whose_caller_is_cancelled_is_still_written(store: UsageStore) -> None:
    """The caller that writes the batch is cancelled as it starts: its settle and the one
    that queued behind it are written all the same (a lost settle would leave the call to
    the reclaimer, charged its worst case)."""
    user = unique("cancelled")
    when = datetime(2030, 11, 10, tzinfo=UTC)
    first = await open_call(store, opening(user, when=when, request_id=f"first_{user}"))
    second = await open_call(store, opening(user, when=when, request_id=f"second_{user}"))

    async def cancelled() -> None:
        with anyio.move_on_after(0):
            await store.settle(entry(user, when=when, cost=100, request_id=first.request_id), first)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            group.start_soon(cancelled)
            group.start_soon(
                store.settle, entry(user, when=when, cost=200, request_id=second.request_id), second
            )
    assert [row["status"] for row in await rows_of(store, user)] == ["ok", "ok"]
    assert await store.counters(user, "2030-11") == Counters(30, 0, 300, 0, 2)


async def test_a_refused_abandon_keeps_its_hold_until_the_lease_expires(
    store: UsageStore,
) -> None:
    """The database refuses to delete an abandoned call's row: the caller hears of it, the
    row stays in flight with its hold (no usage is known to charge), and the reclaimer
    closes it once its lease has expired."""
    user = unique("abandon")
    when = datetime(2030, 11, 11, tzinfo=UTC)
    reclaim_at = when + timedelta(seconds=31)
    await flush_older_leases(store, reclaim_at)
    held = await open_call(store, opening(user, when=when, request_id=f"stuck_{user}"))
    trigger = await refuse_writes_to(store, held.request_id)
    try:
        with pytest.raises(DBAPIError, match="refused by test"):
            await store.abandon(held)
        [row] = await rows_of(store, user)
        assert row["status"] == IN_FLIGHT
        assert await store.counters(user, "2030-11") == Counters(0, 100, 0, 7_000, 0)
    finally:
        await allow_writes(store, trigger)
    assert await store.reclaim(reclaim_at) == 1
    [row] = await rows_of(store, user)
    assert (row["status"], row["prompt_tokens"], row["cost_pico"]) == (INTERRUPTED, 40, 7_000)
    assert await store.counters(user, "2030-11") == Counters(100, 0, 7_000, 0, 1)


async def test_a_settle_refused_by_the_database_is_reported_and_its_hold_released(
    store: UsageStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The settle's write fails: the caller gets the database's error (never a silent
    success), the row is closed as ``settle_failed`` with its worst case, the hold released.
    If closing the row fails too, the row stays in flight for its lease to release."""
    user = unique("refusing")
    when = datetime(2030, 11, 12, tzinfo=UTC)
    reclaim_at = when + timedelta(seconds=31)
    await flush_older_leases(store, reclaim_at)
    closable = await open_call(store, opening(user, when=when, request_id=f"closable_{user}"))
    stuck = await open_call(store, opening(user, when=when, request_id=f"stuck_{user}"))
    triggers = [
        await refuse_writes_to(store, closable.request_id, unless_status="settle_failed"),
        await refuse_writes_to(store, stuck.request_id),
    ]
    caplog.set_level(logging.ERROR, logger="robota_proxy.usage")
    try:
        errors: list[DBAPIError] = []
        for held in (closable, stuck):
            caplog.clear()
            with pytest.raises(DBAPIError, match="refused by test") as raised:
                await store.settle(entry(user, when=when, cost=5, request_id=held.request_id), held)
            errors.append(raised.value)
            [record] = caplog.records
            # A database error is no bug of ours: no traceback in the log.
            assert (record.name, record.levelname, bool(record.exc_info)) == (
                "robota_proxy.usage",
                "ERROR",
                False,
            )
            if held is closable:
                assert record.getMessage() == (
                    f"settle of {held.request_id} failed ({type(raised.value).__name__}: "
                    f"{raised.value}); its row closed as settle_failed with its worst case (1 "
                    "row), the reservation released"
                )
            else:
                assert record.getMessage() == (
                    f"settle of {held.request_id} failed and so did closing its row "
                    f"({type(raised.value).__name__}); its lease expiry will release it"
                )
        statuses = {row["request_id"]: row["status"] for row in await rows_of(store, user)}
        assert statuses == {closable.request_id: "settle_failed", stuck.request_id: IN_FLIGHT}
        assert await store.counters(user, "2030-11") == Counters(100, 100, 7_000, 7_000, 1)
    finally:
        for trigger in triggers:
            await allow_writes(store, trigger)
    assert await store.reclaim(reclaim_at) == 1
    assert await store.counters(user, "2030-11") == Counters(200, 0, 14_000, 0, 2)
    await assert_adds_up(store, user, "2030-11")


# --- reclaiming ----------------------------------------------------------------------------------


async def test_a_lease_is_reclaimed_only_once_it_has_expired(store: UsageStore) -> None:
    """A lease that ends at ``now`` is still good; a microsecond later it has expired."""
    user = unique("edge")
    when = datetime(2030, 11, 13, tzinfo=UTC)
    expiry = when + timedelta(seconds=30)
    await flush_older_leases(store, expiry)
    await open_call(store, opening(user, when=when))
    assert await store.reclaim(expiry) == 0
    assert await store.reclaim(expiry + timedelta(microseconds=1)) == 1
    assert await store.counters(user, "2030-11") == Counters(100, 0, 7_000, 0, 1)


async def test_a_backlog_is_reclaimed_in_batches_of_500_by_one_call(
    store: UsageStore, caplog: pytest.LogCaptureFixture
) -> None:
    """501 expired leases: one ``reclaim`` closes them all, in two transactions (500, then
    1) so that a backlog never makes one huge transaction, each row once with its own worst
    case, and each batch is logged with the owners of its leases."""
    user = unique("backlog")
    when = datetime(2030, 11, 14, tzinfo=UTC)
    reclaim_at = when + timedelta(minutes=1)
    await flush_older_leases(store, reclaim_at)

    async def one(index: int) -> None:
        await open_call(store, opening(user, when=when, cost=1_000 + index))

    async with anyio.create_task_group() as group:
        for index in range(501):
            group.start_soon(one, index)
    caplog.set_level("WARNING", logger="robota_proxy.usage")
    caplog.clear()
    assert await store.reclaim(reclaim_at) == 501
    logged = [(record.name, record.levelname, record.getMessage()) for record in caplog.records]
    assert logged == [
        (
            "robota_proxy.usage",
            "WARNING",
            f"reclaimed {count} expired lease(s) of {OWNER}: closed as interrupted with their "
            "worst case",
        )
        for count in (500, 1)
    ]
    assert await store.reclaim(reclaim_at) == 0
    assert await store.counters(user, "2030-11") == Counters(
        tokens_used=501 * 100,
        tokens_reserved=0,
        cost_used_pico=sum(1_000 + index for index in range(501)),
        cost_reserved_pico=0,
        requests=501,
    )
    costs = sorted(int(str(row["cost_pico"])) for row in await rows_of(store, user))
    assert costs == [1_000 + index for index in range(501)]
    await assert_adds_up(store, user, "2030-11")


async def test_every_text_a_caller_sends_is_cut_to_its_column(store: UsageStore) -> None:
    """Over-long ids and names (a JWT ``sub``, an ``X-Request-ID``, a model name) never make
    the write of an in-flight row or of a never-opened call's row fail: each is cut to its
    column's length (PostgreSQL would refuse it; SQLite would keep it whole)."""
    user = unique("u") + "u" * 300
    when = datetime(2030, 11, 15, tzinfo=UTC)
    call = replace(
        opening(user, when=when, request_id="r" * 150, model="m" * 300),
        correlation_id="c" * 100,
        key_id="k" * 100,
        provider="p" * 150,
        lease_owner="o" * 150,
    )
    await store.open(call, token_limit=None, cost_limit_pico=None)
    [row] = await rows_of(store, user[:200])
    assert (
        row["request_id"],
        row["user_id"],
        row["correlation_id"],
        row["key_id"],
        row["provider"],
        row["model"],
        row["lease_owner"],
    ) == ("r" * 100, user[:200], "c" * 64, "k" * 64, "p" * 100, "m" * 200, "o" * 100)
    plain = unique("plain") + "p" * 300
    never_opened = replace(
        entry(plain, when=when, cost=1, model="m" * 300, request_id="n" * 150),
        correlation_id="c" * 100,
        key_id="k" * 100,
        provider="p" * 150,
        deployment="d" * 100,
    )
    # An earlier vendor call of it names the call's row as that row is written: cut alike.
    attempt = replace(never_opened, request_id="a" * 90, attempt_of=never_opened.request_id)
    await store.settle(never_opened, None, [attempt])
    written = {str(row["request_id"]): row for row in await rows_of(store, plain[:200])}
    assert sorted(written) == ["a" * 90, "n" * 100]
    row, attempt_row = written["n" * 100], written["a" * 90]
    assert (
        row["request_id"],
        row["user_id"],
        row["correlation_id"],
        row["key_id"],
        row["provider"],
        row["model"],
        row["deployment"],
        row["attempt_of"],
    ) == (
        "n" * 100,
        plain[:200],
        "c" * 64,
        "k" * 64,
        "p" * 100,
        "m" * 200,
        "d" * 60,
        None,
    )
    assert (attempt_row["request_id"], attempt_row["attempt_of"]) == ("a" * 90, "n" * 100)


def test_a_lease_owner_names_the_host_the_process_and_its_life(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``host:pid:random``: the host cut to 60 characters (the column holds 100), the pid,
    and 8 hex digits that tell apart two lives of a reused pid."""
    monkeypatch.setattr(usage_store.socket, "gethostname", lambda: "h" * 100)
    owner = usage_store.new_lease_owner()
    assert re.fullmatch(rf"h{{60}}:{os.getpid()}:[0-9a-f]{{8}}", owner)
    assert usage_store.new_lease_owner() != owner


async def test_a_batch_of_settles_is_written_whole_whatever_its_kinds(store: UsageStore) -> None:
    """Settles that queue behind a write are written together: an abandon of a reclaimed
    row, an abandon and a settle of rows deleted by hand, calls never opened and a plain
    settle; each is written, none stops the others."""
    user = unique("batch")
    when = datetime(2030, 11, 16, tzinfo=UTC)
    reclaim_at = when + timedelta(minutes=1)
    await flush_older_leases(store, reclaim_at)
    reclaimed = await open_call(store, opening(user, when=when, request_id=f"reclaimed_{user}"))
    assert await store.reclaim(reclaim_at) == 1
    lasting = timedelta(hours=1)
    gone = [
        await open_call(store, opening(user, when=when, request_id=f"{name}_{user}", lease=lasting))
        for name in ("gone_abandoned", "gone_settled")
    ]
    plain = await open_call(
        store, opening(user, when=when, request_id=f"plain_{user}", lease=lasting)
    )
    async with store.database.engine.begin() as conn:
        await conn.execute(
            LEDGER.delete().where(LEDGER.c.request_id.in_([one.request_id for one in gone]))
        )
    jobs = [
        (entry(user, when=when, cost=1, request_id=f"writer_{user}"), None),
        (None, reclaimed),
        (None, gone[0]),
        (entry(user, when=when, cost=10, request_id=f"never1_{user}"), None),
        (entry(user, when=when, cost=20, request_id=f"never2_{user}"), None),
        (entry(user, when=when, cost=40, request_id=gone[1].request_id), gone[1]),
        (entry(user, when=when, cost=80, request_id=plain.request_id), plain),
    ]

    async def one(settled: LedgerEntry | None, reservation: Reservation | None) -> None:
        if settled is None:
            assert reservation is not None
            await store.abandon(reservation)
        else:
            await store.settle(settled, reservation)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            for settled, reservation in jobs:
                group.start_soon(one, settled, reservation)
    costs = {row["request_id"]: row["cost_pico"] for row in await rows_of(store, user)}
    assert costs == {
        f"writer_{user}": 1,
        f"never1_{user}": 10,
        f"never2_{user}": 20,
        f"gone_settled_{user}": 40,
        f"plain_{user}": 80,
    }
    counters = await store.counters(user, "2030-11")
    # The holds of the rows deleted by hand cannot be told apart from released ones: only
    # the usage is checked here.
    assert (counters.tokens_used, counters.cost_used_pico, counters.requests) == (75, 151, 5)


async def test_one_failing_settle_in_a_batch_does_not_take_the_others_down(
    store: UsageStore,
) -> None:
    """Three settles queue behind a write and are written together; one of them cannot be
    written: the batch is written again one settle at a time, the two good ones are
    committed and the bad one is reported failed, its row closed with its worst case."""
    user = unique("fallback")
    when = datetime(2030, 11, 17, tzinfo=UTC)
    held = [
        await open_call(store, opening(user, when=when, request_id=f"{name}_{user}"))
        for name in ("writer", "good1", "bad", "good2")
    ]
    outcomes: dict[str, str] = {}

    async def settle(reservation: Reservation, prompt: int) -> None:
        settled = entry(user, when=when, cost=3, prompt=prompt, request_id=reservation.request_id)
        try:
            await store.settle(settled, reservation)
            outcomes[reservation.request_id] = "ok"
        except (OverflowError, DBAPIError):  # sqlite3's bind, asyncpg's
            outcomes[reservation.request_id] = "failed"

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            for reservation in held:
                # A usage no BIGINT can hold makes the bad one's transaction fail.
                group.start_soon(
                    settle, reservation, 2**70 if "bad" in reservation.request_id else 10
                )
    assert outcomes == {
        f"writer_{user}": "ok",
        f"good1_{user}": "ok",
        f"bad_{user}": "failed",
        f"good2_{user}": "ok",
    }
    statuses = {row["request_id"]: row["status"] for row in await rows_of(store, user)}
    assert statuses == {
        f"writer_{user}": "ok",
        f"good1_{user}": "ok",
        f"bad_{user}": "settle_failed",
        f"good2_{user}": "ok",
    }
    assert await store.counters(user, "2030-11") == Counters(3 * 15 + 100, 0, 3 * 3 + 7_000, 0, 4)
