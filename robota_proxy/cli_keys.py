"""``robota-proxy keys ...`` and ``robota-proxy users ...``: keys and permissions from a shell.

They work on ``ROBOTA_DATABASE_URL`` directly (applying migrations), so the operator needs no
running proxy and no admin key; they name that database on stderr and never create a SQLite
file unless told to (``cli_database``). A key is printed once, by ``keys create``, and never
again. Bad flags or values exit with status 2 and one line on stderr, checked before the
database is opened; an unknown id exits with 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from robota_proxy.cli_database import CREATE_FLAG, cli_database
from robota_proxy.policy.keys import parse_expiry

if TYPE_CHECKING:
    from robota_proxy.policy.principals import UserPermissions
    from robota_proxy.storage.key_store import KeyRecord, KeyStore, UserRecord

USAGE_ERROR = 2
NOT_FOUND = 1

Command: TypeAlias = "Callable[[argparse.Namespace, KeyStore], Awaitable[int]]"
R = TypeVar("R")


class UsageError(Exception):
    """A bad value the user typed: exit 2 with this message."""


class NotFoundError(Exception):
    """An id or user that does not exist: exit 1 with this message."""


def _found(record: R | None, message: str) -> R:
    if record is None:
        raise NotFoundError(message)
    return record


@contextmanager
def _typed_values() -> Iterator[None]:
    """A ``ValueError`` from parsing or from the store is about a value the user typed."""
    try:
        yield
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _output(args: argparse.Namespace, wire: Any, text: Callable[[], str]) -> None:
    """One JSON object with ``--json``, else the text for people."""
    if args.json:
        _print_json(wire)
    else:
        print(text())


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _add_permission_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("permissions (unset: no restriction)")
    group.add_argument("--providers", help="comma-separated providers, e.g. openai,anthropic")
    group.add_argument("--models", help="comma-separated model globs, e.g. 'gpt-4o*,claude-*'")
    group.add_argument("--features", help="comma-separated features: chat,stream,tools,embeddings")
    group.add_argument("--rpm", type=_non_negative_int, help="requests per minute")
    group.add_argument("--tpm", type=_non_negative_int, help="tokens per minute")
    group.add_argument("--daily-requests", type=_non_negative_int, help="requests per day")
    group.add_argument("--monthly-tokens", type=_non_negative_int, help="tokens per month")
    group.add_argument("--monthly-budget-usd", help="USD per month, e.g. 25.50")


def permissions_from(args: argparse.Namespace) -> UserPermissions:
    # Imported when a command runs: the command line's --help needs neither (cli.py).
    from robota_proxy.errors import InvalidRequest
    from robota_proxy.policy.principals import UserPermissions

    wire: dict[str, Any] = {
        "allowedProviders": args.providers,
        "allowedModels": args.models,
        "allowedFeatures": args.features,
        "rpm": args.rpm,
        "tpm": args.tpm,
        "dailyRequestLimit": args.daily_requests,
        "monthlyTokenLimit": args.monthly_tokens,
        "monthlyBudgetUsd": args.monthly_budget_usd,
    }
    try:
        return UserPermissions.from_wire({k: v for k, v in wire.items() if v is not None})
    except InvalidRequest as exc:
        raise UsageError(exc.message) from None


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=None, sort_keys=True))


def _describe_key(record: KeyRecord) -> str:
    lines = [
        f"id:          {record.key_id}",
        f"user:        {record.user}",
        f"name:        {record.name or '-'}",
        f"status:      {record.status()}",
        f"created:     {record.created_at.isoformat()}",
        f"expires:     {_when(record.expires_at)}",
        f"revoked:     {_when(record.revoked_at)}",
        f"last used:   {_when(record.last_used_at)}",
        f"permissions: {json.dumps(record.permissions.to_wire()) or '{}'}",
    ]
    return "\n".join(lines)


def _when(value: datetime | None) -> str:
    return value.isoformat() if value is not None else "-"


async def _keys_create(args: argparse.Namespace, store: KeyStore) -> int:
    permissions = permissions_from(args)
    with _typed_values():
        expires_at = parse_expiry(args.expires) if args.expires else None
        key, record = await store.create_key(args.user, permissions, expires_at, args.name)
    if args.json:
        _print_json({"key": key, **record.to_wire()})
    else:
        print(key)
        print(
            f"(key {record.key_id} for user {record.user}: store it now, it is not shown again)",
            file=sys.stderr,
        )
    return 0


async def _keys_list(args: argparse.Namespace, store: KeyStore) -> int:
    records = await store.list_keys(args.user)
    if args.json:
        _print_json({"keys": [record.to_wire() for record in records]})
        return 0
    print(key_table(records))
    return 0


KEY_COLUMNS = ("ID", "USER", "STATUS", "EXPIRES", "LAST USED", "NAME")


def key_table(records: list[KeyRecord]) -> str:
    """A header row and one row per key, columns as wide as their widest cell; times to the
    second (the stored microseconds help nobody reading a list)."""
    rows = [KEY_COLUMNS] + [
        (
            record.key_id,
            record.user,
            record.status(),
            _short(record.expires_at),
            _short(record.last_used_at),
            record.name or "-",
        )
        for record in records
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(KEY_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _short(value: datetime | None) -> str:
    return value.replace(microsecond=0).isoformat() if value is not None else "-"


async def _keys_show(args: argparse.Namespace, store: KeyStore) -> int:
    record = _found(await store.get_key(args.id), f"no key with id {args.id!r}")
    _output(args, record.to_wire(), lambda: _describe_key(record))
    return 0


async def _keys_revoke(args: argparse.Namespace, store: KeyStore) -> int:
    record = _found(await store.revoke_key(args.id), f"no key with id {args.id!r}")
    print(f"revoked {record.key_id} (user {record.user}) at {_when(record.revoked_at)}")
    return 0


def _describe_user(record: UserRecord, keys: list[KeyRecord]) -> str:
    return "\n".join(
        [
            f"user:        {record.user}",
            f"status:      {'revoked' if record.revoked_at is not None else 'active'}",
            f"created:     {record.created_at.isoformat()}",
            f"revoked:     {_when(record.revoked_at)}",
            f"permissions: {json.dumps(record.permissions.to_wire())}",
            f"keys:        {', '.join(f'{k.key_id} ({k.status()})' for k in keys) or '-'}",
        ]
    )


async def _users_set(args: argparse.Namespace, store: KeyStore) -> int:
    with _typed_values():
        record = await store.set_user_permissions(args.user, permissions_from(args))
    keys = await store.list_keys(record.user)
    _output(args, record.to_wire(), lambda: _describe_user(record, keys))
    return 0


async def _users_show(args: argparse.Namespace, store: KeyStore) -> int:
    record = _found(await store.get_user(args.user), f"no user {args.user!r}")
    keys = await store.list_keys(record.user)
    wire = {**record.to_wire(), "keys": [key.to_wire() for key in keys]}
    _output(args, wire, lambda: _describe_user(record, keys))
    return 0


def _not_a_user(user: str) -> str:
    return (
        f"no user {user!r} (a JWT subject without a record: "
        f"'robota-proxy users set {user}' creates it)"
    )


async def _users_revoke(args: argparse.Namespace, store: KeyStore) -> int:
    record = _found(await store.revoke_user(args.user), _not_a_user(args.user))
    keys = await store.list_keys(record.user)
    print(
        f"revoked user {record.user} at {_when(record.revoked_at)}: their {len(keys)} key(s) "
        "and their tokens are refused by every process within a second"
    )
    return 0


async def _users_restore(args: argparse.Namespace, store: KeyStore) -> int:
    record = _found(await store.restore_user(args.user), _not_a_user(args.user))
    keys = await store.list_keys(record.user)
    working = sum(1 for key in keys if key.status() == "active")
    print(
        f"restored user {record.user}: their tokens and {working} of their {len(keys)} key(s) "
        "work again (revoked and expired keys stay refused)"
    )
    return 0


async def _with_store(command: Command, args: argparse.Namespace) -> int:
    from robota_proxy.storage.key_store import KeyStore  # when a command runs: see cli.py

    async with cli_database(create=getattr(args, "create_database", False)) as database:
        return await command(args, KeyStore(database))


def _runner(
    command: Command, check: Callable[[argparse.Namespace], object] | None = None
) -> Callable[[argparse.Namespace], int]:
    """``check`` looks at the typed values first, so a bad flag is reported as such
    whatever state the database is in."""

    def run(args: argparse.Namespace) -> int:
        import asyncio  # when the command runs: see cli.py (asyncio alone is 30 ms of --help)

        try:
            if check is not None:
                with _typed_values():
                    check(args)
            return asyncio.run(_with_store(command, args))
        except UsageError as exc:
            print(f"robota-proxy: error: {exc}", file=sys.stderr)
            return USAGE_ERROR
        except NotFoundError as exc:
            print(exc, file=sys.stderr)
            return NOT_FOUND

    return run


def _check_create(args: argparse.Namespace) -> None:
    from robota_proxy.storage.key_store import check_user  # the store's rule, lazily: cli.py

    check_user(args.user)
    permissions_from(args)
    if args.expires:
        parse_expiry(args.expires)


def _add_create_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        CREATE_FLAG,
        action="store_true",
        help="create the SQLite database file if it does not exist (default: refuse, so "
        "that a key never lands in a stray empty database)",
    )


def add_commands(commands: Any) -> None:
    """Add ``keys`` and ``users`` to the ``robota-proxy`` sub-command parser."""
    keys = commands.add_parser("keys", help="create, list, show and revoke API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)

    create = key_commands.add_parser("create", help="issue a key (printed once)")
    create.add_argument("--user", required=True, help="the user the key acts as")
    _add_permission_flags(create)
    create.add_argument("--expires", help="30d, 12h, 90m or an ISO date (default: never)")
    create.add_argument("--name", help="a label for the key")
    create.add_argument("--json", action="store_true", help="print one JSON object")
    _add_create_flag(create)
    create.set_defaults(handler=_runner(_keys_create, _check_create))

    listing = key_commands.add_parser("list", help="list keys (never the secrets)")
    listing.add_argument("--user", help="only this user's keys")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_runner(_keys_list))

    show = key_commands.add_parser("show", help="one key's details")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_runner(_keys_show))

    revoke = key_commands.add_parser("revoke", help="revoke a key (refused within seconds)")
    revoke.add_argument("id")
    revoke.set_defaults(handler=_runner(_keys_revoke))

    users = commands.add_parser("users", help="set, show, revoke and restore users")
    user_commands = users.add_subparsers(dest="users_command", required=True)
    user_set = user_commands.add_parser(
        "set", help="replace a user's permissions (shared by all their keys)"
    )
    user_set.add_argument("user")
    _add_permission_flags(user_set)
    user_set.add_argument("--json", action="store_true")
    _add_create_flag(user_set)
    user_set.set_defaults(handler=_runner(_users_set, permissions_from))

    user_show = user_commands.add_parser("show", help="a user's permissions and keys")
    user_show.add_argument("user")
    user_show.add_argument("--json", action="store_true")
    user_show.set_defaults(handler=_runner(_users_show))

    user_revoke = user_commands.add_parser(
        "revoke", help="refuse all of a user's keys and tokens (within seconds)"
    )
    user_revoke.add_argument("user")
    user_revoke.set_defaults(handler=_runner(_users_revoke))

    user_restore = user_commands.add_parser(
        "restore", help="undo 'users revoke' (keys revoked on their own stay revoked)"
    )
    user_restore.add_argument("user")
    user_restore.set_defaults(handler=_runner(_users_restore))
