"""UsageStore on a real SQLite file and a real PostgreSQL database: the in-flight row and its
lease are written with the reservation, reservations hold under concurrency, settles keep the
counters equal to the ledger, expired leases are reclaimed exactly once (also by two
reclaimers racing), a failed settle releases its hold, and old databases upgrade."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import anyio
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from robota_proxy.storage import tables
from robota_proxy.storage.database import MIGRATIONS, Database
from robota_proxy.storage.usage_store import (
    IN_FLIGHT,
    INTERRUPTED,
    SETTLE_FAILED,
    LedgerEntry,
    Refusal,
    Reservation,
    UsageStore,
    period_of,
)
from tests.unit import usage_store_support as support
from tests.unit.usage_store_support import (
    LEDGER,
    OWNER,
    assert_adds_up,
    entry,
    flush_older_leases,
    open_call,
    opening,
    rows_of,
    unique,
)

# The shared fixtures, used by name.
anyio_backend = support.anyio_backend
database_url = support.database_url
fresh_statements = support.fresh_statements
store = support.store


@pytest.mark.anyio
async def test_reserve_refuses_past_the_limit_and_says_which(store: UsageStore) -> None:
    user = unique("alice")
    when = datetime(2030, 1, 5, tzinfo=UTC)
    period = period_of(when)

    async def attempt(tokens: int, cost: int) -> Reservation | Refusal:
        call = opening(user, when=when, prompt=tokens, completion=0, cost=cost)
        return await store.open(call, token_limit=100, cost_limit_pico=1000)

    first = await attempt(60, 600)
    assert isinstance(first, Reservation)
    tokens_refusal = await attempt(41, 1)
    assert isinstance(tokens_refusal, Refusal) and tokens_refusal.limit == "tokens"
    assert tokens_refusal.counters.tokens_reserved == 60
    cost_refusal = await attempt(1, 401)
    assert isinstance(cost_refusal, Refusal) and cost_refusal.limit == "cost"
    # A refused call has no row; the accepted one is in flight.
    assert [row["status"] for row in await rows_of(store, user)] == [IN_FLIGHT]
    await store.abandon(first)
    counters = await store.counters(user, period)
    assert (counters.tokens_reserved, counters.cost_reserved_pico, counters.requests) == (0, 0, 0)
    assert await rows_of(store, user) == []


@pytest.mark.anyio
async def test_concurrent_reservations_never_exceed_the_limit(store: UsageStore) -> None:
    user = unique("racer")
    when = datetime(2030, 2, 3, tzinfo=UTC)
    results: list[Reservation | Refusal] = []

    async def one() -> None:
        call = opening(user, when=when, prompt=1, completion=0, cost=100)
        results.append(await store.open(call, token_limit=None, cost_limit_pico=1000))

    async with anyio.create_task_group() as group:
        for _ in range(40):
            group.start_soon(one)
    assert sum(isinstance(result, Reservation) for result in results) == 10
    counters = await store.counters(user, "2030-02")
    assert counters.cost_reserved_pico == 1000
    assert len(await rows_of(store, user)) == 10
    await assert_adds_up(store, user, "2030-02")


@pytest.mark.anyio
async def test_open_writes_the_lease_with_the_row(store: UsageStore) -> None:
    user = unique("lease")
    when = datetime(2030, 3, 1, 8, 0, tzinfo=UTC)
    held = await open_call(store, opening(user, when=when, request_id=f"req_{user}"))
    free = await open_call(
        store, opening(user, when=when, request_id=f"req_{user}_free"), cost_limit=None
    )
    assert (held.tokens, held.cost_pico) == (100, 7_000)
    assert (free.tokens, free.cost_pico) == (0, 0)  # no limits: written, nothing held
    rows = await rows_of(store, user)
    assert [
        (
            row["request_id"],
            row["status"],
            row["lease_owner"],
            row["reserved_tokens"],
            row["reserved_cost_pico"],
            row["estimate_prompt_tokens"],
            row["estimate_completion_tokens"],
            row["estimate_cost_pico"],
            row["correlation_id"],
            row["cost_pico"],
        )
        for row in rows
    ] == [
        (f"req_{user}", IN_FLIGHT, OWNER, 100, 7_000, 40, 60, 7_000, "theirs-1", 0),
        (f"req_{user}_free", IN_FLIGHT, OWNER, 0, 0, 40, 60, 7_000, "theirs-1", 0),
    ]
    expires = rows[0]["lease_expires_at"]
    assert isinstance(expires, datetime)
    assert expires.replace(tzinfo=UTC) == when + timedelta(seconds=30)
    counters = await store.counters(user, "2030-03")
    assert (counters.tokens_reserved, counters.cost_reserved_pico, counters.requests) == (
        100,
        7_000,
        0,
    )
    await assert_adds_up(store, user, "2030-03")
    # The ledger key is unique: a second row with the same key is refused by the database.
    with pytest.raises(IntegrityError):
        await store.open(
            opening(user, when=when, request_id=f"req_{user}"),
            token_limit=None,
            cost_limit_pico=None,
        )


@pytest.mark.anyio
async def test_settle_keeps_counters_equal_to_the_ledger(store: UsageStore) -> None:
    user = unique("bob")
    when = datetime(2030, 3, 14, 12, 0, tzinfo=UTC)
    period = period_of(when)
    held = await open_call(
        store, opening(user, when=when, request_id=f"a_{user}"), token_limit=1000
    )
    await store.settle(entry(user, when=when, cost=1234, request_id=f"a_{user}"), held)
    # A caller without limits: a row, nothing held; the counters row is created by the settle.
    free = await open_call(store, opening(user, when=when, request_id=f"b_{user}"), cost_limit=None)
    await store.settle(entry(user, when=when, cost=66, model="m2", request_id=f"b_{user}"), free)
    # A call that was never opened (a host's own metering): inserted by its settle.
    await store.settle(entry(user, when=when, cost=0, cached=True, request_id=f"c_{user}"), None)
    counters = await store.counters(user, period)
    assert counters.tokens_reserved == 0 and counters.cost_reserved_pico == 0
    assert counters.cost_used_pico == 1300
    assert counters.tokens_used == 30  # the cache hit spends no quota
    assert counters.requests == 3
    await assert_adds_up(store, user, period)
    rows = await rows_of(store, user)
    assert [
        (row["status"], row["model"], row["cost_pico"], row["lease_expires_at"]) for row in rows
    ] == [
        ("ok", "m1", 1234, None),
        ("ok", "m2", 66, None),
        ("ok", "m1", 0, None),
    ]


@pytest.mark.anyio
async def test_expired_leases_are_reclaimed_with_their_worst_case(store: UsageStore) -> None:
    user = unique("crashed")
    when = datetime(2030, 6, 1, 10, 0, tzinfo=UTC)
    period = period_of(when)
    now = when + timedelta(seconds=31)
    await flush_older_leases(store, now)
    dead = await open_call(store, opening(user, when=when, request_id=f"dead_{user}"))
    unpriced = await open_call(
        store, opening(user, when=when, request_id=f"unpriced_{user}", cost=None), cost_limit=None
    )
    alive = await open_call(
        store, opening(user, when=when, request_id=f"alive_{user}", lease=timedelta(minutes=10))
    )
    assert (dead.cost_pico, unpriced.cost_pico, alive.cost_pico) == (7_000, 0, 7_000)
    assert await store.reclaim(now) == 2
    assert await store.reclaim(now) == 0  # closed once only
    rows = {row["request_id"]: row for row in await rows_of(store, user)}
    closed = [
        (
            rows[key]["status"],
            rows[key]["prompt_tokens"],
            rows[key]["completion_tokens"],
            rows[key]["cost_pico"],
            rows[key]["priced"],
            rows[key]["estimated"],
            rows[key]["lease_expires_at"],
        )
        for key in (f"dead_{user}", f"unpriced_{user}")
    ]
    assert closed == [
        (INTERRUPTED, 40, 60, 7_000, True, True, None),
        (INTERRUPTED, 40, 60, 0, False, True, None),
    ]
    assert rows[f"alive_{user}"]["status"] == IN_FLIGHT
    counters = await store.counters(user, period)
    assert counters == type(counters)(
        tokens_used=200,
        tokens_reserved=100,
        cost_used_pico=7_000,
        cost_reserved_pico=7_000,
        requests=2,
    )
    await assert_adds_up(store, user, period)


@pytest.mark.anyio
async def test_two_reclaimers_close_each_lease_exactly_once(database_url: str) -> None:
    """Two stores on two engines (two processes, as far as the database can tell) reclaim
    the same 120 expired leases at once, twice each: every lease is closed by one of them."""
    user = unique("race")
    when = datetime(2030, 7, 1, tzinfo=UTC)
    first, second = Database(database_url), Database(database_url)
    await first.open()
    await second.open()
    try:
        stores = [UsageStore(first), UsageStore(second)]
        await flush_older_leases(stores[0], when + timedelta(minutes=1))
        # Opened all at once, so that each store writes them in a few batches (120 one by
        # one cost seconds on PostgreSQL, in every run of this test under mutation testing).
        async with anyio.create_task_group() as group:
            for index in range(120):
                call = opening(user, when=when, cost=1_000 + index)
                group.start_soon(open_call, stores[index % 2], call)
        counts: list[int] = []

        async def reclaim(store: UsageStore) -> None:
            counts.append(await store.reclaim(when + timedelta(minutes=1)))

        async with anyio.create_task_group() as group:
            for index in range(4):
                group.start_soon(reclaim, stores[index % 2])
        assert sum(counts) == 120
        counters = await stores[0].counters(user, "2030-07")
        assert (counters.requests, counters.tokens_used, counters.cost_used_pico) == (
            120,
            120 * 100,
            sum(1_000 + index for index in range(120)),
        )
        assert (counters.tokens_reserved, counters.cost_reserved_pico) == (0, 0)
        await assert_adds_up(stores[1], user, "2030-07")
    finally:
        await first.aclose()
        await second.aclose()


@pytest.mark.anyio
async def test_a_settle_after_its_lease_was_reclaimed_corrects_the_row(store: UsageStore) -> None:
    """A process that was only slow: its row was closed with the worst case, its settle then
    writes the real usage and moves the counters by the difference."""
    user = unique("slow")
    when = datetime(2030, 8, 1, tzinfo=UTC)
    held = await open_call(store, opening(user, when=when, request_id=f"slow_{user}"))
    assert await store.reclaim(when + timedelta(minutes=1)) >= 1
    await store.settle(entry(user, when=when, cost=1_234, request_id=f"slow_{user}"), held)
    [row] = await rows_of(store, user)
    assert (row["status"], row["prompt_tokens"], row["cost_pico"], row["estimated"]) == (
        "ok",
        10,
        1_234,
        False,
    )
    counters = await store.counters(user, "2030-08")
    assert (counters.requests, counters.tokens_used, counters.cost_used_pico) == (1, 15, 1_234)
    assert (counters.tokens_reserved, counters.cost_reserved_pico) == (0, 0)
    await assert_adds_up(store, user, "2030-08")
    # A call abandoned after its row was reclaimed: the charge is taken back with the row.
    late = await open_call(store, opening(user, when=when, request_id=f"late_{user}"))
    assert await store.reclaim(when + timedelta(minutes=1)) >= 1
    await store.abandon(late)
    assert [row["request_id"] for row in await rows_of(store, user)] == [f"slow_{user}"]
    await assert_adds_up(store, user, "2030-08")


async def _blocked_by(conn: AsyncConnection, pid: int) -> list[int]:
    result = await conn.execute(
        text("SELECT pid FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
        {"pid": pid},
    )
    return [int(row.pid) for row in result]


@pytest.mark.anyio
async def test_two_settles_of_one_reclaimed_call_move_the_counters_once(
    postgres_url: str,
) -> None:
    """The same late settle arriving twice at once from two processes (a retried write):
    each correction must read the row the other left, or both take the reclaimed estimate
    back and the counters drift from the ledger. A third connection holds the user's counter
    row so that both settles are inside their transactions before either commits."""
    user = unique("twice")
    when = datetime(2031, 2, 1, tzinfo=UTC)
    databases = [Database(postgres_url) for _ in range(3)]
    for database in databases:
        await database.open()
    try:
        first, second = UsageStore(databases[0]), UsageStore(databases[1])
        await flush_older_leases(first, when + timedelta(minutes=1))
        held = await open_call(first, opening(user, when=when, request_id=f"twice_{user}"))
        assert await first.reclaim(when + timedelta(minutes=1)) == 1
        final = entry(user, when=when, cost=1_234, request_id=f"twice_{user}")
        async with databases[2].engine.connect() as locker:
            await locker.execute(
                text(
                    "SELECT 1 FROM usage_counters WHERE user_id = :user AND period = :period "
                    "FOR UPDATE"
                ),
                {"user": user, "period": "2031-02"},
            )
            pid = int((await locker.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            async with anyio.create_task_group() as group:
                group.start_soon(first.settle, final, held)
                group.start_soon(second.settle, final, held)
                with anyio.fail_after(10):
                    while True:  # one settle waits on the counters, the other on the first
                        waiting = await _blocked_by(locker, pid)
                        if waiting and await _blocked_by(locker, waiting[0]):
                            break
                        await anyio.sleep(0.02)
                await locker.rollback()
        counters = await first.counters(user, "2031-02")
        assert (counters.requests, counters.tokens_used, counters.cost_used_pico) == (1, 15, 1_234)
        assert (counters.tokens_reserved, counters.cost_reserved_pico) == (0, 0)
        await assert_adds_up(first, user, "2031-02")
    finally:
        for database in databases:
            await database.aclose()


@pytest.mark.anyio
async def test_a_failed_write_tells_the_metrics_whether_the_database_refused_it(
    store: UsageStore, database_url: str
) -> None:
    """The ledger-failure hook (robota_database_errors_total counts the True ones): asyncpg's
    refusal of a value no BIGINT holds is the database's (a DBAPIError); sqlite3 refuses it
    in its own bind, before the database sees it (an OverflowError). Queued writes are
    counted up and down around each job."""
    failures: list[bool] = []
    pending: list[int] = []
    store.on_failed, store.on_pending = failures.append, pending.append
    user = unique("hooked")
    when = datetime(2030, 9, 2, tzinfo=UTC)
    held = await open_call(store, opening(user, when=when, request_id=f"hook_{user}"))
    broken = entry(user, when=when, cost=5, prompt=2**70, request_id=f"hook_{user}")
    with pytest.raises((OverflowError, DBAPIError)):
        await store.settle(broken, held)
    assert failures == [database_url.startswith("postgresql")]
    assert pending == [1, -1, 1, -1]


async def test_a_failed_settle_releases_the_reservation_and_records_the_failure(
    store: UsageStore,
) -> None:
    user = unique("failing")
    when = datetime(2030, 9, 1, tzinfo=UTC)
    held = await open_call(store, opening(user, when=when, request_id=f"bad_{user}"))
    # A usage no BIGINT can hold: the settle's transaction fails on either engine.
    broken = entry(user, when=when, cost=5, prompt=2**70, request_id=f"bad_{user}")
    with pytest.raises((OverflowError, DBAPIError)):  # sqlite3's bind, asyncpg's
        await store.settle(broken, held)
    [row] = await rows_of(store, user)
    assert (row["status"], row["prompt_tokens"], row["cost_pico"], row["estimated"]) == (
        SETTLE_FAILED,
        40,
        7_000,
        True,
    )
    counters = await store.counters(user, "2030-09")
    assert (counters.tokens_reserved, counters.cost_reserved_pico) == (0, 0)
    assert (counters.requests, counters.tokens_used, counters.cost_used_pico) == (1, 100, 7_000)
    await assert_adds_up(store, user, "2030-09")
    # Settled in a batch with good ones, the bad one does not take them down.
    good = await open_call(store, opening(user, when=when, request_id=f"good_{user}"))
    worse = await open_call(store, opening(user, when=when, request_id=f"worse_{user}"))
    outcomes: list[str] = []

    async def settle(one: LedgerEntry, reservation: Reservation) -> None:
        try:
            await store.settle(one, reservation)
            outcomes.append("ok")
        except Exception:
            outcomes.append("failed")

    async with anyio.create_task_group() as group:
        group.start_soon(settle, entry(user, when=when, cost=9, request_id=f"good_{user}"), good)
        group.start_soon(settle, replace(broken, request_id=f"worse_{user}"), worse)
    assert sorted(outcomes) == ["failed", "ok"]
    statuses = {row["request_id"]: row["status"] for row in await rows_of(store, user)}
    assert statuses == {
        f"bad_{user}": SETTLE_FAILED,
        f"good_{user}": "ok",
        f"worse_{user}": SETTLE_FAILED,
    }
    await assert_adds_up(store, user, "2030-09")


@pytest.mark.anyio
async def test_text_longer_than_its_column_is_clipped_not_lost(store: UsageStore) -> None:
    """A 300-character model name (PostgreSQL enforces varchar(200)) still gets its row."""
    user = unique("long")
    when = datetime(2030, 10, 1, tzinfo=UTC)
    model = "m" * 300
    held = await open_call(store, opening(user, when=when, request_id=f"long_{user}", model=model))
    await store.settle(entry(user, when=when, cost=3, model=model, request_id=f"long_{user}"), held)
    [row] = await rows_of(store, user)
    assert (row["status"], row["model"]) == ("ok", "m" * 200)
    await assert_adds_up(store, user, "2030-10")


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
    for index in range(60):
        call = opening(users[index % 2], when=when, request_id=f"req_{users[index % 2]}_{index}")
        # The first 20 are held against a limit, the others are callers without limits.
        held.append(await open_call(store, call, cost_limit=10**15 if index < 20 else None))

    async def one(index: int) -> None:
        await store.settle(
            entry(users[index % 2], when=when, cost=index, request_id=held[index].request_id),
            held[index],
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


# --- migration 2 on a database created before it -----------------------------------------------

#: The ledger as migration 1 created it before the leases (what existing installs have).
_OLD_LEDGER = """
CREATE TABLE usage_ledger (
    id {id_type} PRIMARY KEY{autoincrement},
    request_id VARCHAR(100) NOT NULL,
    created_at {timestamp} NOT NULL,
    user_id VARCHAR(200) NOT NULL,
    key_id VARCHAR(64),
    provider VARCHAR(100) NOT NULL,
    model VARCHAR(200) NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cached_prompt_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    cost_pico BIGINT NOT NULL,
    latency_ms INTEGER NOT NULL,
    status VARCHAR(40) NOT NULL,
    streamed BOOLEAN NOT NULL,
    cached BOOLEAN NOT NULL,
    priced BOOLEAN NOT NULL,
    estimated BOOLEAN NOT NULL
)
"""
_OLD_ROW = (
    "INSERT INTO usage_ledger (request_id, created_at, user_id, provider, model, prompt_tokens, "
    "completion_tokens, cached_prompt_tokens, cache_write_tokens, reasoning_tokens, cost_pico, "
    "latency_ms, status, streamed, cached, priced, estimated) VALUES "
    "(:rid, :at, 'old', 'openai', 'm1', 1, 2, 0, 0, 0, 30, 5, 'ok', false, false, true, false)"
)


@pytest.mark.anyio
async def test_a_database_from_before_the_leases_is_upgraded(empty_database_url: str) -> None:
    """Rows keyed by a caller's X-Request-ID shared it; after the upgrade each has a unique
    key, the duplicates keep the caller's id as their correlation id, and the new columns
    are there with their defaults."""
    database = Database(empty_database_url)
    sqlite_db = database.is_sqlite
    when = datetime(2029, 12, 31, tzinfo=UTC)
    try:
        async with database.engine.begin() as conn:
            await conn.execute(text("CREATE TABLE schema_version (version INTEGER NOT NULL)"))
            await conn.execute(text("INSERT INTO schema_version (version) VALUES (1)"))
            await conn.execute(
                text(
                    _OLD_LEDGER.format(
                        id_type="INTEGER" if sqlite_db else "BIGSERIAL",
                        autoincrement=" AUTOINCREMENT" if sqlite_db else "",
                        timestamp="DATETIME" if sqlite_db else "TIMESTAMP WITH TIME ZONE",
                    )
                )
            )
            await conn.run_sync(
                lambda sync: tables.usage_counters.create(sync)  # unchanged since step 1
            )
            for rid in ("client-7", "client-7", "req_unique", "client-7"):
                await conn.execute(text(_OLD_ROW), {"rid": rid, "at": when})
        await database.open()
        async with database.engine.connect() as conn:
            version = (await conn.execute(text("SELECT version FROM schema_version"))).scalar()
            rows = (
                await conn.execute(
                    select(
                        LEDGER.c.id,
                        LEDGER.c.request_id,
                        LEDGER.c.correlation_id,
                        LEDGER.c.reserved_tokens,
                        LEDGER.c.lease_expires_at,
                        LEDGER.c.estimate_cost_pico,
                        LEDGER.c.surface,
                    ).order_by(LEDGER.c.id)
                )
            ).all()
        assert version == len(MIGRATIONS)  # and every later step runs on it too
        ids = [row.id for row in rows]
        assert [tuple(row)[1:] for row in rows] == [
            ("client-7", None, 0, None, None, "robota"),
            (f"client-7~{ids[1]}", "client-7", 0, None, None, "robota"),
            ("req_unique", None, 0, None, None, "robota"),
            (f"client-7~{ids[3]}", "client-7", 0, None, None, "robota"),
        ]  # rows from before migration 4 came in on the only surface there was: /ai/*
        # The upgraded ledger takes new rows, settles them, and keys them uniquely.
        store = UsageStore(database)
        held = await open_call(store, opening("old", when=when, request_id="req_new"))
        await store.settle(entry("old", when=when, cost=1, request_id="req_new"), held)
        with pytest.raises(IntegrityError):
            await store.settle(entry("old", when=when, cost=1, request_id="client-7"), None)
    finally:
        await database.aclose()
