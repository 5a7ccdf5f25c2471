"""Usage reports and the ledger's own totals, on SQLite and PostgreSQL: a report runs from
midnight to midnight UTC, groups per day, model and user with every sum and the last use, and
leaves calls in flight out; ``ledger_totals`` sums a month (December ending at New Year) the
way the counters count it, so the two are equal; an empty month and an empty report are
zeros."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from robota_proxy.storage.usage_store import (
    Counters,
    LedgerEntry,
    UsageReport,
    UsageRow,
    UsageStore,
    period_of,
)
from tests.unit import usage_store_support as support
from tests.unit.usage_store_support import entry, open_call, opening, unique

pytestmark = pytest.mark.anyio

# The shared fixtures, used by name.
anyio_backend = support.anyio_backend
database_url = support.database_url
fresh_statements = support.fresh_statements
new_york = support.new_york
store = support.store


def call(
    user: str, when: datetime, *, model: str, cost: int, tokens: tuple[int, int, int, int, int]
) -> LedgerEntry:
    """A settled call with the given prompt, completion, cache-read, cache-write and
    reasoning tokens."""
    prompt, completion, cache_read, cache_write, reasoning = tokens
    return replace(
        entry(user, when=when, cost=cost, prompt=prompt, completion=completion, model=model),
        cached_prompt_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
    )


def row(key: tuple[str, ...], *calls: LedgerEntry, last_used: datetime | None = None) -> UsageRow:
    """The report row the calls should add up to."""
    return UsageRow(
        key=key,
        requests=len(calls),
        prompt_tokens=sum(one.prompt_tokens for one in calls),
        completion_tokens=sum(one.completion_tokens for one in calls),
        cached_prompt_tokens=sum(one.cached_prompt_tokens for one in calls),
        reasoning_tokens=sum(one.reasoning_tokens for one in calls),
        cost_pico=sum(one.cost_pico for one in calls),
        cache_write_tokens=sum(one.cache_write_tokens for one in calls),
        last_used=last_used if last_used is not None else max(one.created_at for one in calls),
    )


async def test_a_report_runs_from_midnight_to_midnight_utc_per_day_model_and_user(
    store: UsageStore,
) -> None:
    """The first day starts at 00:00:00 and the last ends just before the next midnight;
    the microsecond before and the midnight after are not in it, nor is a call in flight.
    Each group has every sum and its latest call."""
    user, other = unique("grace"), unique("heidi")
    first = datetime(2030, 4, 1, tzinfo=UTC)
    last = datetime(2030, 4, 2, 23, 59, 59, 999_999, tzinfo=UTC)
    tick = timedelta(microseconds=1)
    at_start = call(user, first, model="m1", cost=10, tokens=(1, 2, 3, 4, 5))
    noon = call(user, first + timedelta(hours=12), model="m2", cost=20, tokens=(10, 20, 3, 0, 0))
    at_end = call(user, last, model="m1", cost=40, tokens=(100, 200, 0, 7, 9))
    theirs = call(other, last - timedelta(hours=1), model="m1", cost=80, tokens=(1, 1, 1, 1, 1))
    outside = [
        call(user, first - tick, model="m1", cost=1_000, tokens=(1, 1, 1, 1, 1)),
        call(user, last + tick, model="m1", cost=2_000, tokens=(1, 1, 1, 1, 1)),
    ]
    for one in [at_start, noon, at_end, theirs, *outside]:
        await store.settle(one, None)
    await open_call(store, opening(user, when=first + timedelta(hours=6)))  # in flight
    report = await store.report(date(2030, 4, 1), date(2030, 4, 2), user=user)
    assert report == UsageReport(
        total=row((), at_start, noon, at_end),
        days=[row(("2030-04-01",), at_start, noon), row(("2030-04-02",), at_end)],
        models=[row(("openai", "m1"), at_start, at_end), row(("openai", "m2"), noon)],
        users=[row((user,), at_start, noon, at_end)],
    )
    everyone = await store.report(date(2030, 4, 1), date(2030, 4, 2))
    assert [one for one in everyone.users if one.key[0] in (user, other)] == sorted(
        [row((user,), at_start, noon, at_end), row((other,), theirs)], key=lambda one: one.key
    )
    one_day = await store.report(date(2030, 4, 2), date(2030, 4, 2), user=user)
    assert (one_day.total, one_day.days) == (row((), at_end), [row(("2030-04-02",), at_end)])


async def test_a_reports_days_are_utc_days_whatever_the_hosts_time_zone(
    store: UsageStore, new_york: None
) -> None:
    """On a host in New York, a day still runs from 00:00 to 24:00 UTC."""
    user = unique("judy")
    day = datetime(2030, 4, 3, tzinfo=UTC)
    tick = timedelta(microseconds=1)
    inside = [
        call(user, day, model="m1", cost=1, tokens=(1, 0, 0, 0, 0)),
        call(user, day + timedelta(days=1) - tick, model="m1", cost=2, tokens=(2, 0, 0, 0, 0)),
    ]
    outside = [
        call(user, day - tick, model="m1", cost=4, tokens=(4, 0, 0, 0, 0)),
        call(user, day + timedelta(days=1), model="m1", cost=8, tokens=(8, 0, 0, 0, 0)),
    ]
    for one in inside + outside:
        await store.settle(one, None)
    report = await store.report(date(2030, 4, 3), date(2030, 4, 3), user=user)
    assert (report.total, report.days) == (
        row((), *inside),
        [row(("2030-04-03",), *inside)],
    )


async def test_an_empty_report_and_an_empty_month_are_zeros(store: UsageStore) -> None:
    """No call in the range: a total of zeros with no last use, and no groups; a month
    without calls sums to zero counters, as the counters of a user never seen read."""
    user = unique("nobody")
    report = await store.report(date(2030, 4, 5), date(2030, 4, 6), user=user)
    zero = UsageRow(
        key=(),
        requests=0,
        prompt_tokens=0,
        completion_tokens=0,
        cached_prompt_tokens=0,
        reasoning_tokens=0,
        cost_pico=0,
        cache_write_tokens=0,
        last_used=None,
    )
    assert report == UsageReport(total=zero, days=[], models=[], users=[])
    nothing = Counters(
        tokens_used=0, tokens_reserved=0, cost_used_pico=0, cost_reserved_pico=0, requests=0
    )
    assert await store.ledger_totals(user, "2030-04") == nothing
    assert await store.counters(user, "2030-04") == nothing


async def test_ledger_totals_of_december_end_at_new_year(store: UsageStore) -> None:
    """December's totals take its first microsecond and its last, not November's last nor
    January's first; settled rows count as used (a cache hit's tokens excepted), rows in
    flight as reserved, and the counters say exactly the same."""
    user = unique("ivan")
    november_last = datetime(2030, 11, 30, 23, 59, 59, 999_999, tzinfo=UTC)
    december_first = datetime(2030, 12, 1, tzinfo=UTC)
    december_last = datetime(2030, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    january_first = datetime(2031, 1, 1, tzinfo=UTC)
    await store.settle(entry(user, when=november_last, cost=1), None)
    await store.settle(entry(user, when=december_first, cost=10, prompt=10, completion=5), None)
    hit = entry(user, when=december_first + timedelta(days=14), cost=0, prompt=100, cached=True)
    await store.settle(hit, None)
    await open_call(store, opening(user, when=december_last), token_limit=1_000)  # held
    await open_call(store, opening(user, when=december_first), cost_limit=None)  # not held
    await store.settle(entry(user, when=january_first, cost=1_000, prompt=7, completion=0), None)
    expected = {
        "2030-11": Counters(15, 0, 1, 0, 1),
        "2030-12": Counters(
            tokens_used=15,
            tokens_reserved=100,
            cost_used_pico=10,
            cost_reserved_pico=7_000,
            requests=2,
        ),
        "2031-01": Counters(7, 0, 1_000, 0, 1),
    }
    for period, counters in expected.items():
        assert await store.ledger_totals(user, period) == counters
        assert await store.counters(user, period) == counters


def test_the_month_of_a_moment_is_its_utc_month() -> None:
    """Counters are per UTC month: 20:00 on New Year's Eve in New York is January in UTC."""
    eve = datetime(2030, 12, 31, 20, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert period_of(eve) == "2031-01"
    assert period_of(datetime(2030, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)) == "2030-12"
