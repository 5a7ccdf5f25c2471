"""Monthly counters and the usage ledger, in SQL, written so that they always add up.

Two writes matter, and each is one transaction:

- ``reserve``: one conditional ``UPDATE ... WHERE used + reserved + :x <= :limit``. The
  database decides, row-locked (PostgreSQL) or under its single writer (SQLite), so any
  number of concurrent requests, in any number of processes, can never reserve past a
  limit; ``rowcount`` says whether this one got in.
- ``settle``: release the reservation, add the real usage to ``*_used`` and insert the ledger
  row, together. A crash leaves either all three or none, so ``*_used`` always equals the
  ledger's sum for the user and month.

The invariant, per user and month: ``cost_used_pico`` = sum of ``cost_pico``; ``requests`` =
number of rows; ``tokens_used`` = sum of ``prompt_tokens + completion_tokens`` over the rows
that are not cache hits (an answer from the cache costs no quota; its row keeps the tokens it
represents, for reports).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import anyio
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    String,
    and_,
    bindparam,
    case,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from robota_proxy.storage import tables
from robota_proxy.storage.database import Database

counters = tables.usage_counters
ledger = tables.usage_ledger


def period_of(moment: datetime) -> str:
    """The counters' month, ``YYYY-MM`` in UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m")


@dataclass(frozen=True, slots=True)
class Counters:
    tokens_used: int = 0
    tokens_reserved: int = 0
    cost_used_pico: int = 0
    cost_reserved_pico: int = 0
    requests: int = 0


@dataclass(frozen=True, slots=True)
class Reservation:
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
        self._queue: list[_Settle] = []
        self._writing = False

    @property
    def _engine(self) -> Any:
        return self.database.engine

    # --- the hot path -----------------------------------------------------------------------

    async def reserve(
        self,
        user: str,
        period: str,
        *,
        tokens: int,
        cost_pico: int,
        token_limit: int | None,
        cost_limit_pico: int | None,
    ) -> Reservation | Refusal:
        """Hold ``tokens`` and ``cost_pico`` against the limits, or say which one is hit."""
        statement = _RESERVE[token_limit is not None, cost_limit_pico is not None]
        params: dict[str, Any] = {
            "res_user": user,
            "res_period": period,
            "res_tokens": tokens,
            "res_cost": cost_pico,
        }
        if token_limit is not None:
            params["token_limit"] = token_limit
        if cost_limit_pico is not None:
            params["cost_limit"] = cost_limit_pico
        async with self._engine.begin() as conn:
            # Update first: the row exists for every user who called this month, so the
            # usual path is one statement. A miss is a new month or a refusal.
            if (await conn.execute(statement, params)).rowcount == 1:
                return Reservation(user, period, tokens, cost_pico)
            await conn.execute(
                _INSERT_COUNTERS[conn.dialect.name], {"new_user": user, "new_period": period}
            )
            if (await conn.execute(statement, params)).rowcount == 1:
                return Reservation(user, period, tokens, cost_pico)
            current = await _read_counters(conn, user, period)
        over_tokens = (
            token_limit is not None
            and current.tokens_used + current.tokens_reserved + tokens > token_limit
        )
        return Refusal("tokens" if over_tokens else "cost", current)

    async def release(self, reservation: Reservation) -> None:
        """Give back a reservation for a call that never reached a vendor."""
        async with self._engine.begin() as conn:
            await conn.execute(_RELEASE, _release_params(reservation))

    async def settle(self, entry: LedgerEntry, reservation: Reservation | None) -> None:
        """Release the reservation, count the usage and write the ledger row, atomically;
        returns once they are committed.

        Group commit: settles that arrive while a transaction is being written wait for it
        and are then written together, in one transaction (one counters upsert per user and
        month, one multi-row ledger insert). Under load that turns hundreds of small
        transactions into a few, which is what SQLite, with its single writer, needs; every
        settle is still all-or-nothing with its ledger row."""
        waiting = _Settle(entry, reservation)
        self._queue.append(waiting)
        if not self._writing:
            self._writing = True
            try:
                while self._queue:
                    batch, self._queue = self._queue, []
                    await self._write(batch)
            finally:
                self._writing = False
        await waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error

    async def _write(self, batch: list[_Settle]) -> None:
        try:
            async with self._engine.begin() as conn:
                await _write_settles(conn, batch)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].finish(exc)
                return
            # One bad settle must not lose the others: write them one by one.
            for one in batch:
                await self._write([one])
            return
        for one in batch:
            one.finish(None)

    # --- reading ----------------------------------------------------------------------------

    async def counters(self, user: str, period: str) -> Counters:
        async with self._engine.connect() as conn:
            return await _read_counters(conn, user, period)

    async def report(self, first: date, last: date, *, user: str | None = None) -> UsageReport:
        """Totals, per UTC day, per model and per user between two dates, both included."""
        start = datetime(first.year, first.month, first.day, tzinfo=UTC)
        end = datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1)
        where = [ledger.c.created_at >= start, ledger.c.created_at < end]
        if user is not None:
            where.append(ledger.c.user_id == user)
        async with self._engine.connect() as conn:
            day = _day(conn)
            days = await _grouped(conn, where, [day])
            models = await _grouped(conn, where, [ledger.c.provider, ledger.c.model])
            users = await _grouped(conn, where, [ledger.c.user_id])
            totals = await _grouped(conn, where, [])
        total = totals[0] if totals else UsageRow((), 0, 0, 0, 0, 0, 0)
        return UsageReport(total, days, models, users)

    async def ledger_totals(self, user: str, period: str) -> Counters:
        """The ledger summed the way the counters are, for checking the invariant."""
        year, month = (int(part) for part in period.split("-"))
        start = datetime(year, month, 1, tzinfo=UTC)
        end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        tokens = case(
            (ledger.c.cached, 0), else_=ledger.c.prompt_tokens + ledger.c.completion_tokens
        )
        statement = select(
            func.coalesce(func.sum(tokens), 0),
            func.coalesce(func.sum(ledger.c.cost_pico), 0),
            func.count(),
        ).where(ledger.c.user_id == user, ledger.c.created_at >= start, ledger.c.created_at < end)
        async with self._engine.connect() as conn:
            row = (await conn.execute(statement)).one()
        return Counters(tokens_used=int(row[0]), cost_used_pico=int(row[1]), requests=int(row[2]))


class _Settle:
    """One settle waiting for the transaction that writes it."""

    def __init__(self, entry: LedgerEntry, reservation: Reservation | None) -> None:
        self.entry = entry
        self.reservation = reservation
        self.done = anyio.Event()
        self.error: Exception | None = None

    def finish(self, error: Exception | None) -> None:
        self.error = error
        self.done.set()


@dataclass(slots=True)
class _Sums:
    tokens: int = 0
    cost: int = 0
    requests: int = 0
    held_tokens: int = 0
    held_cost: int = 0


async def _write_settles(conn: AsyncConnection, batch: list[_Settle]) -> None:
    sums: dict[tuple[str, str], _Sums] = {}
    for one in batch:
        entry, reservation = one.entry, one.reservation
        period = period_of(entry.created_at)
        if reservation is not None and reservation.period != period:
            # Reserved in one month, settled in the next: give back where it was held.
            await conn.execute(_RELEASE, _release_params(reservation))
            reservation = None
        total = sums.setdefault((entry.user, period), _Sums())
        total.tokens += entry.quota_tokens
        total.cost += entry.cost_pico
        total.requests += 1
        if reservation is not None:
            total.held_tokens += reservation.tokens
            total.held_cost += reservation.cost_pico
    add_usage = _ADD_USAGE[conn.dialect.name]
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
    await conn.execute(_INSERT_LEDGER, [_ledger_values(one.entry) for one in batch])


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
_RESERVE: dict[tuple[bool, bool], Any] = {
    (token_limit, cost_limit): _reserve_statement(token_limit, cost_limit)
    for token_limit in (False, True)
    for cost_limit in (False, True)
}


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

#: A user's zeroed counters row for a month, per dialect (their ``ON CONFLICT`` differ).
_INSERT_COUNTERS: dict[str, Any] = {
    "postgresql": _insert_counters_statement(postgresql.insert),
    "sqlite": _insert_counters_statement(sqlite.insert),
}


def _release_params(reservation: Reservation) -> dict[str, Any]:
    return {
        "rel_user": reservation.user,
        "rel_period": reservation.period,
        "rel_tokens": reservation.tokens,
        "rel_cost": reservation.cost_pico,
    }


# The hot path's statements are built once, with bound parameters, rather than per settle:
# building a statement (and its cache key) costs more CPU than executing it on SQLite. Bind
# names differ from column names, which SQLAlchemy reserves in VALUES and SET.

_RELEASE = (
    update(counters)
    .where(
        counters.c.user_id == bindparam("rel_user", type_=String),
        counters.c.period == bindparam("rel_period", type_=String),
    )
    .values(
        tokens_reserved=counters.c.tokens_reserved - bindparam("rel_tokens", type_=BigInteger),
        cost_reserved_pico=counters.c.cost_reserved_pico - bindparam("rel_cost", type_=BigInteger),
    )
)


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


#: The counters upsert per dialect (their ``ON CONFLICT`` constructs differ).
_ADD_USAGE: dict[str, Any] = {
    "postgresql": _add_usage_statement(postgresql.insert),
    "sqlite": _add_usage_statement(sqlite.insert),
}

_INSERT_LEDGER = ledger.insert()


def _ledger_values(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "request_id": entry.request_id,
        "created_at": entry.created_at,
        "user_id": entry.user,
        "key_id": entry.key_id,
        "provider": entry.provider,
        "model": entry.model,
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
        func.count().label("requests"),
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
