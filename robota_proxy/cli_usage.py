"""``robota-proxy usage [--user U] [--since DATE] [--until DATE] [--json]``: the ledger
summed, straight from ``ROBOTA_DATABASE_URL`` (no running proxy, no admin key needed; the
database must exist, see ``cli_database``).

Without ``--since`` it covers the current month so far (UTC), the period monthly limits
count. Money is printed as exact decimal USD.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from robota_proxy.cli_database import cli_database

if TYPE_CHECKING:
    from robota_client.messages import UsageReport, UsageTotals

USAGE_ERROR = 2


async def _report(args: argparse.Namespace) -> UsageReport:
    # Imported when the command runs: the command line's --help needs neither (cli.py).
    from robota_proxy.routes.usage_report import date_range, usage_report
    from robota_proxy.storage.usage_store import UsageStore

    first, last = date_range(args.since, args.until, names=("--since", "--until"))
    async with cli_database() as database:
        return await usage_report(
            UsageStore(database), first, last, user=args.user, per_user=args.user is None
        )


def _line(label: str, totals: UsageTotals) -> str:
    return (
        f"{label:<40} {totals.requests:>8} {totals.prompt_tokens:>12} "
        f"{totals.completion_tokens:>12} {totals.cost_usd:>16}"
    )


def render(report: UsageReport) -> str:
    header = f"{'':<40} {'requests':>8} {'prompt':>12} {'completion':>12} {'cost USD':>16}"
    who = f"user {report.user}" if report.user else "all users"
    lines = [f"usage of {who}, {report.from_date} to {report.to_date} (UTC)", header]
    lines.append(_line("total", report.totals))
    sections: list[tuple[str, list[tuple[str, UsageTotals]]]] = [
        ("per user", [(row.user, row) for row in report.users or []]),
        ("per model", [(f"{row.provider}/{row.model}", row) for row in report.models]),
        ("per day", [(row.day.isoformat(), row) for row in report.days]),
    ]
    for title, rows in sections:
        if rows:
            lines.append(f"{title}:")
            lines.extend(_line(f"  {label}", totals) for label, totals in rows)
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    # Imported when the command runs: the command line's --help needs neither (cli.py).
    import asyncio

    from robota_proxy.errors import InvalidRequest

    try:
        report = asyncio.run(_report(args))
    except InvalidRequest as exc:
        print(f"robota-proxy: error: {exc.message}", file=sys.stderr)
        return USAGE_ERROR
    print(report.to_json() if args.json else render(report))
    return 0


def add_commands(commands: Any) -> None:
    """Add ``usage`` to the ``robota-proxy`` sub-command parser."""
    usage = commands.add_parser("usage", help="usage and cost from the ledger")
    usage.add_argument("--user", help="only this user (default: every user, with a per-user list)")
    usage.add_argument("--since", help="first UTC day, YYYY-MM-DD (default: first of this month)")
    usage.add_argument("--until", help="last UTC day, YYYY-MM-DD (default: today)")
    usage.add_argument("--json", action="store_true", help="print the report as one JSON object")
    usage.set_defaults(handler=_run)
