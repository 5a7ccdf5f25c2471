"""Usage reports in wire form, shared by ``/ai/usage``, ``/admin/usage`` and the CLI.

Dates are UTC calendar days, ``YYYY-MM-DD``, both ends included; the default is the current
month so far, the period the monthly limits count.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

from robota_client.messages import DayUsage, ModelUsage, UsageReport, UsageTotals, UserUsage
from robota_proxy.errors import InvalidRequest
from robota_proxy.policy.pricing import usd_text
from robota_proxy.storage.usage_store import UsageRow, UsageStore

_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")

#: The days a report may name. The store reads a day as [its midnight, the next midnight), so
#: the last day must have a next one that ``datetime`` can hold: 9999-12-31 was a 500
#: (``OverflowError``). Nothing was metered before 1970.
FIRST_DAY = date(1970, 1, 1)
LAST_DAY = date(9999, 12, 30)


def parse_day(name: str, text: str) -> date:
    """A strict ``YYYY-MM-DD`` within ``FIRST_DAY``..``LAST_DAY``; anything else is a 400
    that names the parameter and shows the expected form."""
    if _DATE.match(text):
        try:
            day = date.fromisoformat(text)
        except ValueError:
            pass
        else:
            if FIRST_DAY <= day <= LAST_DAY:
                return day
            raise InvalidRequest(f"{name!r} must be a day from {FIRST_DAY} to {LAST_DAY}")
    raise InvalidRequest(f"{name!r} must be a date as YYYY-MM-DD (for example 2025-01-31)")


def date_range(
    first: str | None,
    last: str | None,
    *,
    today: date | None = None,
    names: tuple[str, str] = ("from", "to"),
) -> tuple[date, date]:
    """``from`` and ``to`` query values (either may be missing) as an inclusive range."""
    today = today or datetime.now(UTC).date()
    start = parse_day(names[0], first) if first is not None else today.replace(day=1)
    end = parse_day(names[1], last) if last is not None else max(today, start)
    if start > end:
        raise InvalidRequest(f"{names[0]!r} ({start}) is after {names[1]!r} ({end})")
    return start, end


def totals_of(row: UsageRow) -> dict[str, object]:
    return {
        "requests": row.requests,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cached_prompt_tokens": row.cached_prompt_tokens,
        "cache_write_tokens": row.cache_write_tokens,
        "reasoning_tokens": row.reasoning_tokens,
        "total_tokens": row.prompt_tokens + row.completion_tokens,
        "cost_usd": usd_text(row.cost_pico),
        "last_used": row.last_used,
    }


async def usage_report(
    store: UsageStore, first: date, last: date, *, user: str | None, per_user: bool = False
) -> UsageReport:
    report = await store.report(first, last, user=user)
    return UsageReport(
        user=user,
        from_date=first,
        to_date=last,
        totals=UsageTotals.model_validate(totals_of(report.total)),
        days=[
            DayUsage.model_validate({"day": row.key[0], **totals_of(row)}) for row in report.days
        ],
        models=[
            ModelUsage.model_validate(
                {"provider": row.key[0], "model": row.key[1], **totals_of(row)}
            )
            for row in report.models
        ],
        users=[
            UserUsage.model_validate({"user": row.key[0], **totals_of(row)}) for row in report.users
        ]
        if per_user
        else None,
    )
