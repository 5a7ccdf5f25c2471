"""Monthly counters and the usage ledger, in SQL, written so that they always add up, even
when a proxy process dies in the middle of a call.

A call's money goes through three writes, each one transaction:

- ``open``, before the vendor is asked: the conditional ``UPDATE ... WHERE used + reserved +
  :x <= :limit`` that holds the worst case (for a caller with limits) and the call's ledger
  row, status ``in_flight``, carrying its *lease*: the owning process, an expiry (the request
  deadline plus a margin), what the counters hold for it and the worst case it would cost.
  The database decides, row-locked (PostgreSQL) or under its single writer (SQLite), so any
  number of concurrent requests in any number of processes never reserve past a limit. No
  row, no vendor call: if this write fails, the call is refused.
- ``settle``, after it: the row gets its final status and the real usage, the hold is
  released and the usage added to ``*_used``, together. ``abandon`` is the settle of a call
  that never reached a vendor (404, 400...): the row is deleted and the hold released.
- ``reclaim``, for the calls whose process died: every in-flight row whose lease has expired
  is closed as ``interrupted`` with its worst case as an ``estimated`` usage, and its hold
  released, in one conditional ``UPDATE ... WHERE status = 'in_flight' AND lease_expires_at
  < :now``. Any process may run it at any time: two reclaimers never close a row twice (on
  PostgreSQL the second one's UPDATE waits for the first's row locks, then re-reads the rows
  and finds them closed). A process that was only slow and settles after its row was
  reclaimed corrects the row to the real usage and the counters by the difference.

The invariant, per user and month: ``cost_used_pico`` = sum of ``cost_pico`` over the settled
rows; ``requests`` = their number; ``tokens_used`` = sum of ``prompt_tokens +
completion_tokens`` over the settled rows that are not cache hits (an answer from the cache
costs no quota; its row keeps the tokens it represents, for reports); ``*_reserved`` = sum of
``reserved_*`` over the rows in flight. So no budget stays held longer than a request deadline
plus the lease margin (plus one reclaim interval) after the process holding it died.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    DateTime,
    Integer,
    String,
    and_,
    bindparam,
    case,
    func,
    select,
    true,
    update,
)

from robota_proxy.storage import tables
from robota_proxy.storage.database import DATABASE_OUTAGE, Database

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

log = logging.getLogger("robota_proxy.usage")

counters = tables.usage_counters
ledger = tables.usage_ledger

#: The status of a ledger row between ``open`` and its settle.
IN_FLIGHT = "in_flight"
#: Closed by the reclaimer: the process serving it died (or was too slow to settle in time).
INTERRUPTED = "interrupted"
#: Closed like an interrupted row because its settle could not be written.
SETTLE_FAILED = "settle_failed"


def period_of(moment: datetime) -> str:
    """The counters' month, ``YYYY-MM`` in UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m")


def new_lease_owner() -> str:
    """This process's name on the leases it takes: host, pid and a random part (a pid is
    reused after a restart; the random part tells the two lives apart in the ledger)."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class Counters:
    tokens_used: int = 0
    tokens_reserved: int = 0
    cost_used_pico: int = 0
    cost_reserved_pico: int = 0
    requests: int = 0


@dataclass(frozen=True, slots=True)
class Opening:
    """What is known of a call before its vendor is asked: its in-flight ledger row."""

    request_id: str
    created_at: datetime
    user: str
    key_id: str | None
    provider: str
    model: str
    streamed: bool
    #: The worst case (prompt bound, ``maxTokens``, their price; ``None``: no known price):
    #: held against the limits, and charged as an estimate if the call never settles.
    prompt_tokens: int
    completion_tokens: int
    cost_pico: int | None
    lease_owner: str
    lease_expires_at: datetime
    correlation_id: str | None = None
    #: The surface the call came in on: ``robota`` (``/ai/*``), ``openai``, ``anthropic``.
    surface: str = "robota"


@dataclass(frozen=True, slots=True)
class Reservation:
    """The lease of a call in flight: its ledger row and what the counters hold for it (0
    for a caller without limits, whose row is written all the same)."""

    request_id: str
    user: str
    period: str
    tokens: int
    cost_pico: int


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a reservation was refused, and what was left of the limit it hit."""

    limit: str  # "tokens" | "cost"
    counters: Counters


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    request_id: str
    created_at: datetime
    user: str
    key_id: str | None
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    reasoning_tokens: int
    cost_pico: int
    latency_ms: int
    status: str
    streamed: bool
    cached: bool
    priced: bool
    estimated: bool
    #: Of ``prompt_tokens``, those written to the vendor's prompt cache. Last and defaulted
    #: so that writers which predate it keep working (they record 0: no cache write).
    cache_write_tokens: int = 0
    #: The caller's ``X-Request-ID``, when it sent one.
    correlation_id: str | None = None
    #: The deployment of the provider that answered (its name, never its key).
    deployment: str | None = None
    #: The surface the call came in on; written by the open, so only read for a new row.
    surface: str = "robota"
    #: The ``request_id`` of the call whose earlier vendor call this row is.
    attempt_of: str | None = None

    @property
    def quota_tokens(self) -> int:
        return 0 if self.cached else self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group of a usage report (a day, a model, a user, or the total)."""

    key: tuple[str, ...]
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    reasoning_tokens: int
    cost_pico: int
    cache_write_tokens: int = 0
    last_used: datetime | None = None


@dataclass(frozen=True, slots=True)
class UsageReport:
    total: UsageRow
    days: list[UsageRow]
    models: list[UsageRow]
    users: list[UsageRow]


class UsageStore:
    def __init__(self, database: Database) -> None:
        self.database = database
        self._queue: list[_Job] = []
        self._writing = False
        #: Metrics hooks (``robota_proxy.observability.metrics``): a write queued (+1) or
        #: done (-1); a write failed (whether the database was the cause).
        self.on_pending: Callable[[int], None] | None = None
        self.on_failed: Callable[[bool], None] | None = None

    @property
    def _engine(self) -> Any:
        return self.database.engine

    # --- the hot path -----------------------------------------------------------------------

    async def open(
        self, call: Opening, *, token_limit: int | None, cost_limit_pico: int | None
    ) -> Reservation | Refusal:
        """Write the call's in-flight row with its lease and, for a caller with limits, hold
        its worst case, in one transaction; or say which limit it does not fit (and write
        nothing). Raises when the row cannot be written: then the call must not go ahead.

        Call it shielded from cancellation: a row committed for a caller that was cancelled
        while waiting would be left to the reclaimer, and charged."""
        job = _Open(call, token_limit, cost_limit_pico)
        await self._submit(job)
        assert job.result is not None
        return job.result

    async def settle(
        self,
        entry: LedgerEntry,
        reservation: Reservation | None,
        attempts: Sequence[LedgerEntry] = (),
    ) -> None:
        """Complete the call's row with ``entry`` (its final status and real usage), write a
        row for each of its earlier vendor calls (``attempts``, whose usage is the call's
        too), release the reservation and count the usage, atomically; returns once
        committed. ``reservation`` is ``None`` only for a call that was never opened: its row
        is inserted.

        When the write fails, the row is closed as ``settle_failed`` with its worst case and
        the hold released (another transaction), so a failed settle never leaves a budget
        held; the error is raised for the caller to report."""
        await self._submit(_Settle(entry, reservation, attempts))

    async def abandon(self, reservation: Reservation) -> None:
        """The call never reached a vendor: delete its row and release what it held."""
        await self._submit(_Settle(None, reservation))

    async def _submit(self, job: _Job) -> None:
        """Group commit: jobs that arrive while a transaction is being written wait for it
        and are then written together, opens in one transaction and settles in another (each
        takes its locks in one order: users sorted). Under load that turns hundreds of small
        transactions into a few, which is what SQLite, with its single writer, needs; every
        job is still all-or-nothing. The writing is shielded: whoever happens to write the
        batch may be cancelled, the others' jobs are still written."""
        if self.on_pending is not None:
            self.on_pending(1)
            try:
                await self._queue_and_wait(job)
            finally:
                self.on_pending(-1)
            return
        await self._queue_and_wait(job)

    async def _queue_and_wait(self, job: _Job) -> None:
        self._queue.append(job)
        if not self._writing:
            self._writing = True
            try:
                with anyio.CancelScope(shield=True):
                    while self._queue:
                        batch, self._queue = self._queue, []
                        opens = [one for one in batch if isinstance(one, _Open)]
                        settles = [one for one in batch if isinstance(one, _Settle)]
                        if opens:
                            await self._write(opens)
                        if settles:
                            await self._write(settles)
            finally:
                self._writing = False
        await job.done.wait()
        if job.error is not None:
            raise job.error

    async def _write(self, batch: Sequence[_Job]) -> None:
        try:
            async with self._engine.begin() as conn:
                await _write_batch(conn, batch)
        except Exception as exc:
            if len(batch) == 1:
                await self._failed(batch[0], exc)
                return
            # One bad job must not lose the others: write them one by one.
            for one in batch:
                await self._write([one])
            return
        for one in batch:
            one.finish(None)

    async def _failed(self, job: _Job, error: Exception) -> None:
        if self.on_failed is not None:
            self.on_failed(isinstance(error, DATABASE_OUTAGE))
        if isinstance(job, _Settle) and job.entry is not None and job.reservation is not None:
            # Release the hold and record the failure on the row, as the reclaimer would.
            try:
                closed = await self.reclaim(request_id=job.reservation.request_id)
                log.error(
                    "settle of %s failed (%s: %s); its row closed as %s with its worst case "
                    "(%d row), the reservation released",
                    job.reservation.request_id,
                    type(error).__name__,
                    error,
                    SETTLE_FAILED,
                    closed,
                )
            except Exception as closing:
                log.error(
                    "settle of %s failed and so did closing its row (%s); its lease expiry "
                    "will release it",
                    job.reservation.request_id,
                    type(closing).__name__,
                    exc_info=not isinstance(closing, DATABASE_OUTAGE),
                )
        job.finish(error)

    async def reclaim(self, now: datetime | None = None, *, request_id: str | None = None) -> int:
        """Close the in-flight rows whose lease expired before ``now`` (default: the
        present) as ``interrupted``, charging their worst case as an estimate and releasing
        their holds; or, with ``request_id``, that one row at once, as ``settle_failed``.
        Returns how many rows this call closed. Safe to run in any number of processes at
        once: each row is closed by exactly one of them."""
        if request_id is not None:
            async with self._engine.begin() as conn:
                rows = (
                    await conn.execute(
                        _CLOSE_ONE, {"close_status": SETTLE_FAILED, "close_id": request_id}
                    )
                ).all()
                await _charge_closed(conn, rows)
            return len(rows)
        moment = now if now is not None else datetime.now(UTC)
        closed = 0
        while True:
            async with self._engine.begin() as conn:
                rows = (
                    await conn.execute(
                        _RECLAIM_EXPIRED, {"close_status": INTERRUPTED, "close_now": moment}
                    )
                ).all()
                await _charge_closed(conn, rows)
            closed += len(rows)
            if rows:
                owners = sorted({str(row.lease_owner) for row in rows})
                log.warning(
                    "reclaimed %d expired lease(s) of %s: closed as %s with their worst case",
                    len(rows),
                    ", ".join(owners),
                    INTERRUPTED,
                )
            if len(rows) < _RECLAIM_BATCH:
                return closed

    # --- reading ----------------------------------------------------------------------------

    async def counters(self, user: str, period: str) -> Counters:
        async with self._engine.connect() as conn:
            return await _read_counters(conn, user, period)

    async def report(self, first: date, last: date, *, user: str | None = None) -> UsageReport:
        """Totals, per UTC day, per model and per user between two dates, both included;
        calls still in flight are not in it yet."""
        start = datetime(first.year, first.month, first.day, tzinfo=UTC)
        end = datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1)
        where = [
            ledger.c.created_at >= start,
            ledger.c.created_at < end,
            ledger.c.status != IN_FLIGHT,
        ]
        if user is not None:
            where.append(ledger.c.user_id == user)
        async with self._engine.connect() as conn:
            day = _day(conn)
            days = await _grouped(conn, where, [day])
            models = await _grouped(conn, where, [ledger.c.provider, ledger.c.model])
            users = await _grouped(conn, where, [ledger.c.user_id])
            # An aggregate without GROUP BY is one row, also when no row matches.
            [total] = await _grouped(conn, where, [])
        return UsageReport(total, days, models, users)

    async def ledger_totals(self, user: str, period: str) -> Counters:
        """The ledger summed the way the counters are (settled rows as used, rows in flight
        as reserved), for checking the invariant."""
        year, month = (int(part) for part in period.split("-"))
        start = datetime(year, month, 1, tzinfo=UTC)
        end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        settled = ledger.c.status != IN_FLIGHT
        flying = ledger.c.status == IN_FLIGHT
        tokens = case(
            (settled & ~ledger.c.cached, ledger.c.prompt_tokens + ledger.c.completion_tokens),
            else_=0,
        )
        statement = select(
            func.coalesce(func.sum(tokens), 0),
            func.coalesce(func.sum(case((flying, ledger.c.reserved_tokens), else_=0)), 0),
            func.coalesce(func.sum(case((settled, ledger.c.cost_pico), else_=0)), 0),
            func.coalesce(func.sum(case((flying, ledger.c.reserved_cost_pico), else_=0)), 0),
            func.coalesce(func.sum(case((settled & ledger.c.attempt_of.is_(None), 1), else_=0)), 0),
        ).where(ledger.c.user_id == user, ledger.c.created_at >= start, ledger.c.created_at < end)
        async with self._engine.connect() as conn:
            row = (await conn.execute(statement)).one()
        return Counters(*(int(value) for value in row))


class LeaseReclaimer:
    """Runs ``UsageStore.reclaim`` once at start-up, then every ``interval`` seconds, for as
    long as the app is open: leases left by a process that died are closed within their
    expiry plus one interval, by whichever process gets there first.

    An asyncio task rather than a task group: the app's resources are opened and closed by
    two separate calls (``Resources.open``/``close``), which a task group cannot span."""

    def __init__(self, store: UsageStore, interval: float) -> None:
        self.store = store
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._once()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await anyio.sleep(self.interval)
            await self._once()

    async def _once(self) -> None:
        try:
            await self.store.reclaim()
        except Exception as exc:
            # The database may be down: the leases keep, the next round tries again.
            log.warning(
                "could not reclaim expired leases (%s)",
                type(exc).__name__,
                exc_info=not isinstance(exc, DATABASE_OUTAGE),
            )


# --- the jobs of the group commit ---------------------------------------------------------------


class _Job:
    """One open or settle waiting for the transaction that writes it."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: Exception | None = None

    def finish(self, error: Exception | None) -> None:
        self.error = error
        self.done.set()


class _Open(_Job):
    def __init__(self, call: Opening, token_limit: int | None, cost_limit_pico: int | None) -> None:
        super().__init__()
        self.call = call
        self.token_limit = token_limit
        self.cost_limit_pico = cost_limit_pico
        self.result: Reservation | Refusal | None = None

    @property
    def order(self) -> tuple[str, str]:
        return _counter_user(self.call.user), period_of(self.call.created_at)


class _Settle(_Job):
    def __init__(
        self,
        entry: LedgerEntry | None,
        reservation: Reservation | None,
        attempts: Sequence[LedgerEntry] = (),
    ) -> None:
        super().__init__()
        self.entry = entry
        self.reservation = reservation
        self.attempts = attempts


@dataclass(slots=True)
class _Sums:
    tokens: int = 0
    cost: int = 0
    requests: int = 0
    held_tokens: int = 0
    held_cost: int = 0


async def _write_batch(conn: AsyncConnection, batch: Sequence[_Job]) -> None:
    """A batch is all opens or all settles (see ``UsageStore._submit``)."""
    opens = [one for one in batch if isinstance(one, _Open)]
    if opens:
        await _write_opens(conn, opens)
    settles = [one for one in batch if isinstance(one, _Settle)]
    if settles:
        await _write_settles(conn, settles)


async def _write_opens(conn: AsyncConnection, batch: Sequence[_Open]) -> None:
    opened: list[_Open] = []
    for job in sorted(batch, key=lambda one: one.order):  # sorted: one lock order for all
        job.result = await _hold(conn, job)
        if isinstance(job.result, Reservation):
            opened.append(job)
    if opened:
        await conn.execute(
            _INSERT_LEDGER, [_opening_values(job.call, job.result) for job in opened]
        )


async def _hold(conn: AsyncConnection, job: _Open) -> Reservation | Refusal:
    call = job.call
    user, period = job.order
    token_limit, cost_limit = job.token_limit, job.cost_limit_pico
    if token_limit is None and cost_limit is None:
        return Reservation(call.request_id, user, period, 0, 0)
    tokens = call.prompt_tokens + call.completion_tokens
    cost = call.cost_pico or 0
    statement = _reserve_stmt(token_limit is not None, cost_limit is not None)
    params: dict[str, Any] = {
        "res_user": user,
        "res_period": period,
        "res_tokens": tokens,
        "res_cost": cost,
    }
    if token_limit is not None:
        params["token_limit"] = token_limit
    if cost_limit is not None:
        params["cost_limit"] = cost_limit
    # Update first: the row exists for every user who called this month, so the usual path
    # is one statement. A miss is a new month or a refusal.
    if (await conn.execute(statement, params)).rowcount == 1:
        return Reservation(call.request_id, user, period, tokens, cost)
    await conn.execute(
        _insert_counters_stmt(conn.dialect.name), {"new_user": user, "new_period": period}
    )
    if (await conn.execute(statement, params)).rowcount == 1:
        return Reservation(call.request_id, user, period, tokens, cost)
    current = await _read_counters(conn, user, period)
    over_tokens = (
        token_limit is not None
        and current.tokens_used + current.tokens_reserved + tokens > token_limit
    )
    return Refusal("tokens" if over_tokens else "cost", current)


async def _write_settles(conn: AsyncConnection, batch: Sequence[_Settle]) -> None:
    sums: dict[tuple[str, str], _Sums] = {}

    def add(user: str, period: str, tokens: int, cost: int, requests: int) -> None:
        total = sums.setdefault((_counter_user(user), period), _Sums())
        total.tokens += tokens
        total.cost += cost
        total.requests += requests

    for job in batch:
        entry, reservation = job.entry, job.reservation
        if job.attempts:  # the call's earlier vendor calls: billed, not requests
            await conn.execute(_INSERT_LEDGER, [_ledger_values(one) for one in job.attempts])
            for one in job.attempts:
                add(one.user, period_of(one.created_at), one.quota_tokens, one.cost_pico, 0)
        if reservation is not None:
            if entry is None:
                result = await conn.execute(_DELETE_IN_FLIGHT, {"fin_id": reservation.request_id})
            else:
                values = _final_values(entry)
                result = await conn.execute(
                    _FINISH_IN_FLIGHT, {**values, "fin_id": reservation.request_id}
                )
            if result.rowcount == 1:
                total = sums.setdefault((reservation.user, reservation.period), _Sums())
                total.held_tokens += reservation.tokens
                total.held_cost += reservation.cost_pico
                if entry is not None:
                    add(
                        entry.user,
                        period_of(entry.created_at),
                        entry.quota_tokens,
                        entry.cost_pico,
                        1,
                    )
                continue
        if reservation is None:
            if entry is not None:  # never opened (a host's own metering): a new row
                await conn.execute(_INSERT_LEDGER, [_ledger_values(entry)])
                add(entry.user, period_of(entry.created_at), entry.quota_tokens, entry.cost_pico, 1)
            continue
        # Not in flight any more: the reclaimer closed the row (this process was presumed
        # dead, and its hold was released then). Correct it to what really happened.
        request_id = reservation.request_id
        old = (
            await conn.execute(_for_correction_stmt(conn.dialect.name), {"fin_id": request_id})
        ).first()
        if old is not None:
            old_tokens = 0 if old.cached else int(old.prompt_tokens) + int(old.completion_tokens)
            add(
                str(old.user_id),
                period_of(_utc(old.created_at)),
                -old_tokens,
                -int(old.cost_pico),
                -1,
            )
            if entry is None:
                await conn.execute(_DELETE_ROW, {"fin_id": request_id})
                continue
            await conn.execute(_CORRECT_ROW, {**_final_values(entry), "fin_id": request_id})
        elif entry is None:
            continue
        else:  # the row is gone (deleted by hand?): write it again rather than lose the call
            await conn.execute(_INSERT_LEDGER, [_ledger_values(entry)])
        add(entry.user, period_of(entry.created_at), entry.quota_tokens, entry.cost_pico, 1)
    await _add_usage(conn, sums)


async def _charge_closed(conn: AsyncConnection, rows: Sequence[Any]) -> None:
    """Counters of the rows a reclaim just closed: their estimate used, their hold freed."""
    sums: dict[tuple[str, str], _Sums] = {}
    for row in rows:
        total = sums.setdefault((str(row.user_id), period_of(_utc(row.created_at))), _Sums())
        total.tokens += int(row.prompt_tokens) + int(row.completion_tokens)
        total.cost += int(row.cost_pico)
        total.requests += 1
        total.held_tokens += int(row.reserved_tokens)
        total.held_cost += int(row.reserved_cost_pico)
    await _add_usage(conn, sums)


async def _add_usage(conn: AsyncConnection, sums: dict[tuple[str, str], _Sums]) -> None:
    add_usage = _add_usage_stmt(conn.dialect.name)
    for (user, period), total in sorted(sums.items()):  # sorted: one lock order for all
        await conn.execute(
            add_usage,
            {
                "add_user": user,
                "add_period": period,
                "add_tokens": total.tokens,
                "add_cost": total.cost,
                "add_requests": total.requests,
                "held_tokens": total.held_tokens,
                "held_cost": total.held_cost,
            },
        )


def _utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back without their zone; the ledger stores UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# --- statements ---------------------------------------------------------------------------------


def _reserve_statement(token_limit: bool, cost_limit: bool) -> Any:
    """The conditional UPDATE that holds a reservation, for the limits the user has."""
    tokens = bindparam("res_tokens", type_=BigInteger)
    cost = bindparam("res_cost", type_=BigInteger)
    conditions = [
        counters.c.user_id == bindparam("res_user", type_=String),
        counters.c.period == bindparam("res_period", type_=String),
    ]
    if token_limit:
        conditions.append(
            counters.c.tokens_used + counters.c.tokens_reserved + tokens
            <= bindparam("token_limit", type_=BigInteger)
        )
    if cost_limit:
        conditions.append(
            counters.c.cost_used_pico + counters.c.cost_reserved_pico + cost
            <= bindparam("cost_limit", type_=BigInteger)
        )
    return (
        update(counters)
        .where(and_(*conditions))
        .values(
            tokens_reserved=counters.c.tokens_reserved + tokens,
            cost_reserved_pico=counters.c.cost_reserved_pico + cost,
        )
    )


#: By (has a token limit, has a cost limit).
_reserve_stmt = functools.cache(_reserve_statement)


def _insert_counters_statement(insert: Any) -> Any:
    return (
        insert(counters)
        .values(
            user_id=bindparam("new_user", type_=String),
            period=bindparam("new_period", type_=String),
            **_ZERO,
        )
        .on_conflict_do_nothing(index_elements=[counters.c.user_id, counters.c.period])
    )


_ZERO = {
    "tokens_used": 0,
    "tokens_reserved": 0,
    "cost_used_pico": 0,
    "cost_reserved_pico": 0,
    "requests": 0,
}


def _insert_of(engine: str) -> Any:
    """The engine's ``INSERT``: the two engines' ``ON CONFLICT`` constructs differ. Its
    dialect module is imported here, on first use: PostgreSQL's is ~40 ms of import that a
    SQLite proxy never needs."""
    return importlib.import_module(f"sqlalchemy.dialects.{engine}").insert


#: A user's zeroed counters row for a month, per engine.
_insert_counters_stmt = functools.cache(
    lambda engine: _insert_counters_statement(_insert_of(engine))
)


# The hot path's statements are built once per process, on first use, with bound parameters
# rather than per call: building a statement (and its cache key) costs more CPU than executing
# it on SQLite. First use rather than import, so that mutation testing (``nox -s mutation``)
# can switch a builder's mutant on in a process that imported this module but never ran it.
# Bind names differ from column names, which SQLAlchemy reserves in VALUES and SET.


def _add_usage_statement(insert: Any) -> Any:
    """One upsert: a user without limits may have no counters row yet (and then holds no
    reservation either)."""
    tokens = bindparam("add_tokens", type_=BigInteger)
    cost = bindparam("add_cost", type_=BigInteger)
    requests = bindparam("add_requests", type_=BigInteger)
    statement = insert(counters).values(
        user_id=bindparam("add_user", type_=String),
        period=bindparam("add_period", type_=String),
        tokens_used=tokens,
        tokens_reserved=0,
        cost_used_pico=cost,
        cost_reserved_pico=0,
        requests=requests,
    )
    return statement.on_conflict_do_update(
        index_elements=[counters.c.user_id, counters.c.period],
        set_={
            "tokens_used": counters.c.tokens_used + tokens,
            "tokens_reserved": counters.c.tokens_reserved
            - bindparam("held_tokens", type_=BigInteger),
            "cost_used_pico": counters.c.cost_used_pico + cost,
            "cost_reserved_pico": counters.c.cost_reserved_pico
            - bindparam("held_cost", type_=BigInteger),
            "requests": counters.c.requests + requests,
        },
    )


#: The counters upsert, per engine.
_add_usage_stmt = functools.cache(lambda engine: _add_usage_statement(_insert_of(engine)))

_INSERT_LEDGER = ledger.insert()

#: What a settle writes into a row, as ``fin_<column>`` bind parameters.
_FINAL_COLUMNS: dict[str, Any] = {
    "key_id": String,
    "provider": String,
    "model": String,
    "prompt_tokens": BigInteger,
    "completion_tokens": BigInteger,
    "cached_prompt_tokens": BigInteger,
    "cache_write_tokens": BigInteger,
    "reasoning_tokens": BigInteger,
    "cost_pico": BigInteger,
    "latency_ms": Integer,
    "status": String,
    "streamed": Boolean,
    "cached": Boolean,
    "priced": Boolean,
    "estimated": Boolean,
    "deployment": String,
}
_FINAL_SET: dict[str, Any] = {
    **{name: bindparam(f"fin_{name}", type_=kind) for name, kind in _FINAL_COLUMNS.items()},
    "lease_expires_at": None,
}
_BY_ID = ledger.c.request_id == bindparam("fin_id", type_=String)
_IS_IN_FLIGHT = ledger.c.status == IN_FLIGHT

_FINISH_IN_FLIGHT = update(ledger).where(_BY_ID, _IS_IN_FLIGHT).values(**_FINAL_SET)
_DELETE_IN_FLIGHT = ledger.delete().where(_BY_ID, _IS_IN_FLIGHT)
_CORRECT_ROW = update(ledger).where(_BY_ID).values(**_FINAL_SET)
_DELETE_ROW = ledger.delete().where(_BY_ID)


def _select_for_correction(lock: bool) -> Any:
    statement = select(
        ledger.c.user_id,
        ledger.c.created_at,
        ledger.c.prompt_tokens,
        ledger.c.completion_tokens,
        ledger.c.cost_pico,
        ledger.c.cached,
    ).where(_BY_ID)
    return statement.with_for_update() if lock else statement


#: A settled row about to be corrected; locked on PostgreSQL (SQLite has one writer, and this
#: runs after the transaction's first write took its lock).
_for_correction_stmt = functools.cache(
    lambda engine: _select_for_correction(engine == "postgresql")
)

#: Rows closed per reclaim transaction, so that a backlog never makes one huge transaction.
_RECLAIM_BATCH = 500

#: A row closed without a settle: its worst case charged as an estimate, its lease ended.
_CLOSE_SET: dict[str, Any] = {
    "status": bindparam("close_status", type_=String),
    "prompt_tokens": ledger.c.estimate_prompt_tokens,
    "completion_tokens": ledger.c.estimate_completion_tokens,
    "cost_pico": func.coalesce(ledger.c.estimate_cost_pico, 0),
    "priced": ledger.c.estimate_cost_pico.is_not(None),
    "estimated": true(),
    "lease_expires_at": None,
}
_CLOSED = (
    ledger.c.request_id,
    ledger.c.user_id,
    ledger.c.created_at,
    ledger.c.prompt_tokens,
    ledger.c.completion_tokens,
    ledger.c.cost_pico,
    ledger.c.reserved_tokens,
    ledger.c.reserved_cost_pico,
    ledger.c.lease_owner,
)
_EXPIRED = ledger.c.lease_expires_at < bindparam("close_now", type_=DateTime(timezone=True))

# The status condition is on the UPDATE itself, not only in the sub-select: when two
# reclaimers race on PostgreSQL, the one that waited re-checks it on the committed row.
_RECLAIM_EXPIRED = (
    update(ledger)
    .where(
        ledger.c.id.in_(
            select(ledger.c.id)
            .where(_IS_IN_FLIGHT, _EXPIRED)
            .order_by(ledger.c.id)
            .limit(_RECLAIM_BATCH)
            .scalar_subquery()
        ),
        _IS_IN_FLIGHT,
        _EXPIRED,
    )
    .values(**_CLOSE_SET)
    .returning(*_CLOSED)
)
_CLOSE_ONE = (
    update(ledger)
    .where(ledger.c.request_id == bindparam("close_id", type_=String), _IS_IN_FLIGHT)
    .values(**_CLOSE_SET)
    .returning(*_CLOSED)
)


def _clip(name: str, value: str | None) -> str | None:
    """A text value cut to its column: nothing a caller sends can make a ledger write fail."""
    if value is None:
        return None
    limit = tables.LEDGER_TEXT_LIMITS.get(name)
    return value if limit is None or len(value) <= limit else value[:limit]


def _counter_user(user: str) -> str:
    """The user a counter is kept under: cut like the ledger's user column, so that the row
    and the counter of one call always name the same user (the edge refuses longer ids; this
    keeps a host's own metering from failing a write)."""
    return user[: tables.LEDGER_TEXT_LIMITS["user_id"]]


def _final_values(entry: LedgerEntry) -> dict[str, Any]:
    values = _ledger_values(entry)
    return {f"fin_{name}": values[name] for name in _FINAL_COLUMNS}


def _ledger_values(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "request_id": _clip("request_id", entry.request_id),
        "correlation_id": _clip("correlation_id", entry.correlation_id),
        "created_at": entry.created_at,
        "user_id": _clip("user_id", entry.user),
        "key_id": _clip("key_id", entry.key_id),
        "provider": _clip("provider", entry.provider),
        "model": _clip("model", entry.model),
        "prompt_tokens": entry.prompt_tokens,
        "completion_tokens": entry.completion_tokens,
        "cached_prompt_tokens": entry.cached_prompt_tokens,
        "cache_write_tokens": entry.cache_write_tokens,
        "reasoning_tokens": entry.reasoning_tokens,
        "cost_pico": entry.cost_pico,
        "latency_ms": entry.latency_ms,
        "status": entry.status,
        "streamed": entry.streamed,
        "cached": entry.cached,
        "priced": entry.priced,
        "estimated": entry.estimated,
        "lease_owner": None,
        "lease_expires_at": None,
        "reserved_tokens": 0,
        "reserved_cost_pico": 0,
        "estimate_prompt_tokens": 0,
        "estimate_completion_tokens": 0,
        "estimate_cost_pico": None,
        "deployment": _clip("deployment", entry.deployment),
        "surface": entry.surface,
        "attempt_of": _clip("request_id", entry.attempt_of),
    }


def _opening_values(call: Opening, reservation: Reservation | Refusal | None) -> dict[str, Any]:
    assert isinstance(reservation, Reservation)
    return {
        "request_id": _clip("request_id", call.request_id),
        "correlation_id": _clip("correlation_id", call.correlation_id),
        "surface": call.surface,
        "created_at": call.created_at,
        "user_id": _clip("user_id", call.user),
        "key_id": _clip("key_id", call.key_id),
        "provider": _clip("provider", call.provider),
        "model": _clip("model", call.model),
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cached_prompt_tokens": 0,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "cost_pico": 0,
        "latency_ms": 0,
        "status": IN_FLIGHT,
        "streamed": call.streamed,
        "cached": False,
        "priced": call.cost_pico is not None,
        "estimated": False,
        "lease_owner": _clip("lease_owner", call.lease_owner),
        "lease_expires_at": call.lease_expires_at,
        "reserved_tokens": reservation.tokens,
        "reserved_cost_pico": reservation.cost_pico,
        "estimate_prompt_tokens": call.prompt_tokens,
        "estimate_completion_tokens": call.completion_tokens,
        "estimate_cost_pico": call.cost_pico,
    }


async def _read_counters(conn: AsyncConnection, user: str, period: str) -> Counters:
    row = (
        await conn.execute(
            select(
                counters.c.tokens_used,
                counters.c.tokens_reserved,
                counters.c.cost_used_pico,
                counters.c.cost_reserved_pico,
                counters.c.requests,
            ).where(counters.c.user_id == user, counters.c.period == period)
        )
    ).first()
    return Counters() if row is None else Counters(*(int(value) for value in row))


def _day(conn: AsyncConnection) -> ColumnElement[Any]:
    """The UTC calendar day of a ledger row as ``YYYY-MM-DD`` text, on either engine."""
    if conn.dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", ledger.c.created_at), "YYYY-MM-DD")
    # SQLite keeps the UTC timestamp as ISO text: its first ten characters are the day.
    return func.substr(ledger.c.created_at, 1, 10)


async def _grouped(
    conn: AsyncConnection, where: Sequence[ColumnElement[bool]], keys: Sequence[Any]
) -> list[UsageRow]:
    labelled = [key.label(f"k{index}") for index, key in enumerate(keys)]
    statement = select(
        *labelled,
        # A call's earlier vendor calls are billed, but are no requests of their own.
        (func.count() - func.count(ledger.c.attempt_of)).label("requests"),
        *(func.coalesce(func.sum(ledger.c[name]), 0).label(name) for name in _SUMMED),
        func.max(ledger.c.created_at).label("last_used"),
    ).where(*where)
    if labelled:
        statement = statement.group_by(*labelled).order_by(*labelled)
    rows = (await conn.execute(statement)).all()
    size = len(labelled)
    return [
        UsageRow(
            key=tuple(str(value) for value in row[:size]),
            requests=int(row[size]),
            **{name: int(value) for name, value in zip(_SUMMED, row[size + 1 : -1], strict=True)},
            last_used=_as_utc(row[-1]),
        )
        for row in rows
    ]


def _as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back an aggregate's timestamp without its zone; the ledger stores UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


#: The ledger columns a usage report sums, by their ``UsageRow`` names.
_SUMMED = (
    "prompt_tokens",
    "completion_tokens",
    "cached_prompt_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_pico",
)
