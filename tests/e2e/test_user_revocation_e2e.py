"""Revoking a user whole, through real proxy processes: a user with two rk_ keys and a JWT is
refused everywhere within one second of the revocation, then accepted again once restored.

- SQLite, one proxy, the CLI (``users revoke`` / ``users restore``), permissions from the
  users table;
- PostgreSQL, two proxies, the admin API (``DELETE /admin/users/{user}``, revoked through one
  process), with ``ROBOTA_JWT_TRUST_CLAIMS`` on: the token brings its own permissions, and
  the revocation holds all the same.

The time is measured from the ``revokedAt`` the database recorded to the last 401 seen, and
printed (``pytest -s``)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt
import pytest

from robota_proxy.testing import FakeVendors
from tests.e2e.auth_support import (
    ADMIN_KEY,
    JWT_SECRET,
    REVOKE_BOUND,
    admin,
    chat,
    cli,
    create_key,
)
from tests.e2e.conftest import ProxyProcess, start_proxy, stop_proxy, vendor_env

pytestmark = pytest.mark.e2e

UNKNOWN = "unknown or revoked key"
TOKEN_REVOKED = "the user's access has been revoked: ask the operator"
NAMESPACE = "https://robota.dev/permissions"


def token(sub: str, jti: str, **extra: Any) -> str:
    now = int(time.time())
    claims = {"sub": sub, "jti": jti, "iat": now, "exp": now + 600, **extra}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def _env(fake: FakeVendors, database_url: str, **extra: str) -> dict[str, str]:
    return {
        **vendor_env(fake),
        "ROBOTA_DATABASE_URL": database_url,
        "ROBOTA_ADMIN_KEY": ADMIN_KEY,
        "ROBOTA_JWT_SECRET": JWT_SECRET,
        "ROBOTA_AUTH_FAILURES_PER_MINUTE": "1000",
        **extra,
    }


def statuses(urls: Sequence[str], credentials: Sequence[str]) -> set[int]:
    return {chat(url, credential).status_code for url in urls for credential in credentials}


def wall_time_when_all_refused(
    urls: Sequence[str], credentials: Sequence[str], limit: float = 5.0
) -> float:
    """Poll every (process, credential) until each answers 401; the wall-clock time at which
    the last one did."""
    pending = [(url, credential) for url in urls for credential in credentials]
    deadline = time.monotonic() + limit
    while pending and time.monotonic() < deadline:
        pending = [(u, c) for u, c in pending if chat(u, c).status_code != 401]
        if pending:
            time.sleep(0.02)
    assert not pending, f"still accepted after {limit}s: {[u for u, _ in pending]}"
    return time.time()


def wait_until_accepted(urls: Sequence[str], credentials: Sequence[str]) -> None:
    deadline = time.monotonic() + 5
    while statuses(urls, credentials) != {200}:
        assert time.monotonic() < deadline, "not accepted again after the restore"
        time.sleep(0.05)


def assert_logged(
    proxy: ProxyProcess, credential: str, message: str, reason: str, ident: str
) -> None:
    refused = chat(proxy.url, credential)
    assert refused.status_code == 401
    error = refused.json()["error"]
    assert (error["code"], error["message"]) == ("unauthenticated", message)
    request = f"request={error['requestId']}"
    log = proxy.log_once_it_has(request)
    (line,) = [entry for entry in log.splitlines() if request in entry]
    assert f"authentication refused: reason={reason} id={ident} client=127.0.0.1 " in line
    assert credential not in log


def revoked_seconds(revoked_at: str, refused_at: float) -> float:
    return refused_at - datetime.fromisoformat(revoked_at).timestamp()


# --- SQLite and the CLI -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('users') / 'robota.db'}"


@pytest.fixture(scope="module")
def sqlite_proxy(
    fake_server: FakeVendors, sqlite_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    running = start_proxy(
        _env(fake_server, sqlite_url), tmp_path_factory.mktemp("users-proxy") / "proxy.log"
    )
    yield running
    stop_proxy(running)


def test_cli_revoked_user_is_refused_within_a_second(
    sqlite_proxy: ProxyProcess, sqlite_url: str
) -> None:
    first = create_key(sqlite_url, "ursula")
    second = create_key(sqlite_url, "ursula", "--name", "second")
    bearer = token("ursula", "u-1")
    credentials = [first["key"], second["key"], bearer]
    urls = [sqlite_proxy.url]
    assert statuses(urls, credentials) == {200}  # each is now cached as valid

    done = cli(sqlite_url, "users", "revoke", "ursula")
    returned = time.monotonic()
    assert done.returncode == 0, done.stderr
    refused_at = wall_time_when_all_refused(urls, credentials)
    after_exit = time.monotonic() - returned
    assert done.stdout.startswith("revoked user ursula at ")
    revoked_at = admin("GET", sqlite_proxy.url, "/admin/users/ursula").json()["revokedAt"]
    elapsed = revoked_seconds(revoked_at, refused_at)
    print(
        f"\nSQLite, CLI: 2 keys and a JWT refused {elapsed:.3f} s after the revocation "
        f"({after_exit:.3f} s after the command exited)"
    )
    assert 0 < elapsed < REVOKE_BOUND

    # Keys read as any revoked key; the token's holder is told; the log tells them apart.
    assert_logged(sqlite_proxy, first["key"], UNKNOWN, "user_revoked", first["id"])
    assert_logged(sqlite_proxy, second["key"], UNKNOWN, "user_revoked", second["id"])
    assert_logged(sqlite_proxy, bearer, TOKEN_REVOKED, "token_user_revoked", "jwt:u-1")
    shown = admin("GET", sqlite_proxy.url, "/admin/users/ursula").json()
    assert [key["status"] for key in shown["keys"]] == ["active", "active"]  # their own state

    done = cli(sqlite_url, "users", "restore", "ursula")
    assert done.returncode == 0, done.stderr
    wait_until_accepted(urls, credentials)
    assert admin("GET", sqlite_proxy.url, "/admin/users/ursula").json()["revokedAt"] is None


# --- PostgreSQL, two processes, the admin API -------------------------------------------------


@pytest.fixture(scope="module")
def pg_pair(
    fake_server: FakeVendors, postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    folder: Path = tmp_path_factory.mktemp("users-pg")
    env = _env(fake_server, postgres_url, ROBOTA_JWT_TRUST_CLAIMS="true")
    with ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(start_proxy, env, folder / name) for name in ("a.log", "b.log")]
    errors = [f.exception() for f in starting if f.exception() is not None]
    started = [f.result() for f in starting if f.exception() is None]
    if errors:
        for proxy in started:
            stop_proxy(proxy)
        raise errors[0]
    first, second = started
    yield first, second
    stop_proxy(second)
    stop_proxy(first)


def test_admin_revoked_user_is_refused_by_both_processes_within_a_second(
    pg_pair: tuple[ProxyProcess, ProxyProcess],
) -> None:
    first, second = pg_pair
    urls = [first.url, second.url]
    keys = [
        admin("POST", first.url, "/admin/keys", json={"user": "ulrich"}).json(),
        admin("POST", second.url, "/admin/keys", json={"user": "ulrich", "name": "b"}).json(),
    ]
    # Trusted claims: the permissions come from the token, no users-table read for them.
    bearer = token("ulrich", "u-2", **{NAMESPACE: {"allowedProviders": ["mock"]}})
    credentials = [keys[0]["key"], keys[1]["key"], bearer]
    assert statuses(urls, credentials) == {200}  # cached as valid by both processes

    revoked = admin("DELETE", first.url, "/admin/users/ulrich")
    assert revoked.status_code == 200, revoked.text
    refused_at = wall_time_when_all_refused(urls, credentials)
    record = revoked.json()
    assert record["user"] == "ulrich" and record["revokedAt"] is not None
    elapsed = revoked_seconds(record["revokedAt"], refused_at)
    print(
        f"\nPostgreSQL, admin API on one of two processes: 2 keys and a JWT refused by both "
        f"{elapsed:.3f} s after the revocation"
    )
    assert 0 < elapsed < REVOKE_BOUND
    for proxy in (first, second):
        assert_logged(proxy, keys[1]["key"], UNKNOWN, "user_revoked", keys[1]["id"])
        assert_logged(proxy, bearer, TOKEN_REVOKED, "token_user_revoked", "jwt:u-2")

    # Idempotent: the first time is kept; GET shows it, with the keys in their own state.
    again = admin("DELETE", second.url, "/admin/users/ulrich").json()
    assert again["revokedAt"] == record["revokedAt"]
    shown = admin("GET", second.url, "/admin/users/ulrich").json()
    assert shown["revokedAt"] == record["revokedAt"]
    assert sorted(key["id"] for key in shown["keys"]) == sorted(key["id"] for key in keys)
    assert admin("DELETE", first.url, "/admin/users/nobody").status_code == 404

    restored = admin("POST", second.url, "/admin/users/ulrich/restore")
    assert restored.status_code == 200 and restored.json()["revokedAt"] is None
    wait_until_accepted(urls, credentials)
