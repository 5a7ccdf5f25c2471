"""``robota-proxy keys`` / ``users`` in process (the e2e tests run the real subprocess): exit
codes, error messages, and the key shown once only."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from robota_proxy.cli import main


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
    assert code == 2 and "unsupported database" in err


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
