"""``robota-proxy keys`` / ``users`` in process (the e2e tests run the real subprocess): exit
codes, error messages, the key shown once only, the database named and never created by
accident."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from robota_proxy.cli import main
from robota_proxy.preflight import probe_database
from robota_proxy.storage.database import Database
from robota_proxy.storage.key_store import KeyStore


@pytest.fixture(autouse=True)
def existing_database(_own_database: None) -> Path:
    """The test's SQLite file, created the way ``serve`` creates it: the commands refuse
    to create one themselves (see the tests at the end)."""
    asyncio.run(probe_database(os.environ["ROBOTA_DATABASE_URL"]))
    return Path(os.environ["ROBOTA_DATABASE_URL"].removeprefix("sqlite:///"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def create(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = run(capsys, "keys", "create", *argv, "--json")
    assert code == 0, err
    created: dict[str, Any] = json.loads(out)
    return created


def test_create_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    created = create(
        capsys,
        "--user",
        "alice",
        "--providers",
        "openai,anthropic",
        "--models",
        "gpt-4o*,claude-*",
        "--features",
        "chat,stream",
        "--rpm",
        "10",
        "--tpm",
        "1000",
        "--daily-requests",
        "100",
        "--monthly-tokens",
        "50000",
        "--monthly-budget-usd",
        "12.50",
        "--expires",
        "30d",
        "--name",
        "laptop",
    )
    assert created["key"].startswith(f"rk_{created['id']}_")
    assert created["user"] == "alice" and created["name"] == "laptop"
    assert created["permissions"] == {
        "allowedProviders": ["openai", "anthropic"],
        "allowedModels": ["gpt-4o*", "claude-*"],
        "allowedFeatures": ["chat", "stream"],
        "rpm": 10,
        "tpm": 1000,
        "dailyRequestLimit": 100,
        "monthlyTokenLimit": 50000,
        "monthlyBudgetUsd": "12.50",
    }
    assert created["expiresAt"] is not None


def test_plain_create_prints_the_key_on_stdout_only(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "keys", "create", "--user", "bob")
    assert code == 0
    assert out.strip().startswith("rk_") and out.strip() not in err
    assert "not shown again" in err


def test_the_key_is_never_shown_again(capsys: pytest.CaptureFixture[str]) -> None:
    created = create(capsys, "--user", "alice")
    for argv in (
        ("keys", "list"),
        ("keys", "list", "--json"),
        ("keys", "list", "--user", "alice"),
        ("keys", "show", created["id"]),
        ("keys", "show", created["id"], "--json"),
        ("users", "show", "alice"),
        ("users", "show", "alice", "--json"),
        ("keys", "revoke", created["id"]),
    ):
        code, out, err = run(capsys, *argv)
        assert code == 0, err
        assert created["id"] in out
        assert created["key"] not in out + err
    code, out, _ = run(capsys, "keys", "show", created["id"], "--json")
    assert json.loads(out)["status"] == "revoked"


@pytest.mark.parametrize(
    "flags",
    [
        ("--expires", "soon"),
        ("--expires", "2001-01-01"),
        ("--expires", "0d"),
        ("--features", "chat,video"),
        ("--rpm", "lots"),
        ("--rpm", "-3"),
        ("--monthly-budget-usd", "a lot"),
        ("--monthly-budget-usd", "-1"),
        ("--user", " "),
    ],
)
def test_bad_values_exit_2_with_a_message(
    capsys: pytest.CaptureFixture[str], flags: tuple[str, ...]
) -> None:
    code, out, err = run(capsys, "keys", "create", "--user", "alice", *flags, "--json")
    assert code == 2
    assert out == ""
    assert "error" in err


def test_missing_user_flag_and_unknown_ids(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "keys", "create")[0] == 2
    code, _, err = run(capsys, "keys", "show", "nosuchid")
    assert code == 1 and "nosuchid" in err
    code, _, err = run(capsys, "keys", "revoke", "nosuchid")
    assert code == 1 and "nosuchid" in err
    code, _, err = run(capsys, "users", "show", "nobody")
    assert code == 1 and "nobody" in err


def test_users_set_replaces_permissions(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "users", "set", "carol", "--rpm", "5", "--providers", "mock")
    assert code == 0, err
    code, out, _ = run(capsys, "users", "set", "carol", "--tpm", "7", "--json")
    assert code == 0
    assert json.loads(out)["permissions"] == {"tpm": 7}
    code, out, _ = run(capsys, "users", "show", "carol", "--json")
    assert json.loads(out)["permissions"] == {"tpm": 7}


def test_bad_database_url_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROBOTA_DATABASE_URL", "mysql://somewhere/db")
    code, _, err = run(capsys, "keys", "list")
    assert code == 2
    assert err == (
        "robota-proxy: error: ROBOTA_DATABASE_URL is 'mysql://somewhere/db': unsupported "
        "database 'mysql': use sqlite:///path.db or postgresql://...\n"
    )


def test_the_command_line_does_not_import_the_app() -> None:
    # A fresh interpreter: this one has imported the app already.
    heavy = ["robota_proxy.app", "starlette.applications", "openai", "anthropic", "uvicorn"]
    probe = (
        f"import sys, robota_proxy.cli; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""
    # The public names still resolve, on first use.
    names = "from robota_proxy import create_app, mount, AuthMiddleware, Settings, RateLimiter"
    subprocess.run([sys.executable, "-c", names], check=True)


#: What ``robota-proxy --help`` must not import: each costs tens to hundreds of milliseconds
#: (issue 13: --help under 0.25 s), and none is needed to print the usage.
HELP_NEVER_IMPORTS = [
    "asyncio",
    "cryptography",
    "httpx",
    "jwt",
    "pydantic",
    "robota_client",
    "robota_proxy.config_errors",
    "robota_proxy.errors",
    "robota_proxy.preflight",
    "robota_proxy.settings",
    "robota_proxy.storage",
    "sqlalchemy",
    "starlette",
]

HELP_PROBE = """
import sys
from robota_proxy.launcher import main
try:
    main(["--help"])
except SystemExit as exc:
    print("exit", exc.code, file=sys.stderr)
print(",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
"""


def test_help_imports_only_the_command_line() -> None:
    # A fresh interpreter, entered the way the console script enters (launcher.main).
    probe = HELP_PROBE.format(heavy=HELP_NEVER_IMPORTS)
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.startswith("usage: robota-proxy [-h] {serve,keys,users,usage} ...\n")
    assert done.stderr == "exit 0\n\n"


def test_every_command_names_its_database_on_stderr(
    capsys: pytest.CaptureFixture[str], existing_database: Path
) -> None:
    for argv in (("keys", "list"), ("users", "show", "nobody"), ("usage", "--json")):
        _, out, err = run(capsys, *argv)
        assert err.splitlines()[0] == f"database: {existing_database}"
        assert "database:" not in out


def test_a_missing_sqlite_file_is_refused_not_created(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The trap: ``sqlite:///robota.db`` from another directory is another, empty database."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("ROBOTA_DATABASE_URL", "sqlite:///robota.db")
    for argv in (
        ("keys", "create", "--user", "alice"),
        ("keys", "list"),
        ("keys", "show", "abcdefgh"),
        ("keys", "revoke", "abcdefgh"),
        ("users", "set", "alice", "--rpm", "3"),
        ("users", "show", "alice"),
        ("usage",),
    ):
        code, out, err = run(capsys, *argv)
        assert code == 1, argv
        assert out == ""
        assert f"no database at {elsewhere / 'robota.db'}" in err
        assert "relative to the current directory" in err
        assert "--create-database" in err
    assert list(elsewhere.iterdir()) == []


def test_create_database_flag_starts_a_new_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = tmp_path / "new" / "robota.db"
    monkeypatch.setenv("ROBOTA_DATABASE_URL", f"sqlite:///{target}")
    code, _, err = run(capsys, "users", "set", "alice", "--rpm", "3", "--create-database")
    assert code == 0, err
    assert target.exists()
    created = create(capsys, "--user", "alice", "--create-database")
    code, out, _ = run(capsys, "keys", "list", "--json")
    assert [key["id"] for key in json.loads(out)["keys"]] == [created["id"]]


def test_bad_flags_are_reported_before_the_database_is_looked_at(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ROBOTA_DATABASE_URL", f"sqlite:///{tmp_path / 'absent.db'}")
    code, _, err = run(capsys, "keys", "create", "--user", "a", "--expires", "soon")
    assert code == 2 and "expiry 'soon'" in err and "database" not in err
    code, _, err = run(capsys, "users", "set", "a", "--features", "video")
    assert code == 2 and "video" in err and "database" not in err


def test_keys_list_has_a_header_and_last_use(
    capsys: pytest.CaptureFixture[str], existing_database: Path
) -> None:
    used = create(capsys, "--user", "alice", "--name", "laptop")
    unused = create(capsys, "--user", "bob")
    last_use = datetime(2030, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)

    async def touch() -> None:
        database = Database(f"sqlite:///{existing_database}")
        try:
            await KeyStore(database).touch({used["id"]: last_use})
        finally:
            await database.aclose()

    asyncio.run(touch())
    code, out, _ = run(capsys, "keys", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "USER", "STATUS", "EXPIRES", "LAST", "USED", "NAME"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[used["id"]] == [
        used["id"],
        "alice",
        "active",
        "-",
        "2030-01-02T03:04:05+00:00",
        "laptop",
    ]
    assert rows[unused["id"]] == [unused["id"], "bob", "active", "-", "-", "-"]
    # Columns line up: every row's user starts where the header's USER does.
    column = lines[0].index("USER")
    assert all(line[column:].startswith(("alice", "bob")) for line in lines[1:])


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ((), ("serve",), ("keys",), ("keys", "create"), ("users", "set"), ("usage",)):
        code, out, _ = run(capsys, *argv, "--help")
        assert code == 0
        assert "usage: robota-proxy" in out
        assert "``" not in out and "robota_proxy" not in out and ":class:" not in out
    _, out, _ = run(capsys, "--help")
    for command in ("serve", "keys", "users", "usage"):
        assert f"  {command}  " in out


def test_closed_stdout_ends_quietly_with_141(existing_database: Path) -> None:
    """``robota-proxy keys list --json | head -0``: the reader is gone before the write."""
    env = {**os.environ, "ROBOTA_DATABASE_URL": f"sqlite:///{existing_database}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "robota_proxy", "keys", "list", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    code = process.wait(timeout=60)
    err = process.stderr.read().decode()
    process.stderr.close()
    assert code == 141
    assert err == f"database: {existing_database}\n"
