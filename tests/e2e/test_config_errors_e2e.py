"""The real ``robota-proxy`` command, as an operator runs it: every configuration mistake is
one line naming the variable and status 2, for ``serve`` and for the database commands; a
good configuration starts with the banner; a closed pipe ends quietly."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robota_proxy.policy.principals import UserPermissions
from robota_proxy.storage.database import Database
from robota_proxy.storage.key_store import KeyStore
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.e2e

JWT_SECRET = "e2e-jwt-secret-value"


def command() -> str:
    """The installed console script next to this interpreter (not ``python -m``)."""
    beside = Path(sys.executable).parent / "robota-proxy"
    found = str(beside) if beside.exists() else shutil.which("robota-proxy")
    assert found is not None, "robota-proxy is not installed (pip install -e '.[dev]')"
    return found


def clean_env(tmp_path: Path, **env: str) -> dict[str, str]:
    base = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ROBOTA_") and not key.endswith("_API_KEY")
    }
    base["ROBOTA_DATABASE_URL"] = f"sqlite:///{tmp_path / 'robota.db'}"
    return {**base, **env}


def run(tmp_path: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [command(), *argv],
        env=clean_env(tmp_path, **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


MISTAKES = [
    ({"ROBOTA_PORT": "abc"}, "ROBOTA_PORT is 'abc': expected a whole number"),
    (
        {"ROBOTA_DATABASE_URL": "nonsense"},
        "ROBOTA_DATABASE_URL is 'nonsense': not a database URL",
    ),
    (
        {"ROBOTA_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/does_not_exist_xyz"},
        "ROBOTA_DATABASE_URL is postgresql://postgres@127.0.0.1:5432/does_not_exist_xyz: "
        'cannot open it: database "does_not_exist_xyz" does not exist',
    ),
    ({"ROBOTA_AUTH": "off"}, "ROBOTA_AUTH is 'off': expected 'keys' or 'disabled'"),
    ({"ROBOTA_LOG_LEVEL": "verbose"}, "ROBOTA_LOG_LEVEL is 'verbose': expected 'critical'"),
    ({"ROBOTA_FALLBACKS": "{oops"}, "ROBOTA_FALLBACKS is '{oops': not valid JSON"),
    (
        {"ROBOTA_JWT_SECRET": JWT_SECRET, "ROBOTA_JWT_ALGORITHMS": "ES256"},
        "ROBOTA_JWT_ALGORITHMS ES256 cannot be used with this key",
    ),
    (
        {"ROBOTA_JWT_PUBLIC_KEY_FILE": "/nonexistent/public.pem"},
        "ROBOTA_JWT_PUBLIC_KEY_FILE '/nonexistent/public.pem' is not a readable PEM public key",
    ),
]


@pytest.mark.parametrize(("env", "start"), MISTAKES)
def test_serve_refuses_a_mistake_in_one_line(
    tmp_path: Path, env: dict[str, str], start: str
) -> None:
    done = run(tmp_path, ["serve", "--port", str(free_port())], **env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(f"robota-proxy: error: {start}")
    assert done.stderr.count("\n") == 1
    assert JWT_SECRET not in done.stderr
    assert "Uvicorn running" not in done.stderr


@pytest.mark.parametrize("argv", [["keys", "list"], ["users", "show", "alice"], ["usage"]])
@pytest.mark.parametrize(("env", "start"), MISTAKES[:6])
def test_the_database_commands_refuse_the_same_way(
    tmp_path: Path, argv: list[str], env: dict[str, str], start: str
) -> None:
    done = run(tmp_path, argv, **env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"robota-proxy: error: {start}" in done.stderr
    assert done.stdout == ""


def test_serve_starts_with_the_banner_then_keys_from_elsewhere_are_refused(
    tmp_path: Path,
) -> None:
    """The whole story of the stray ``robota.db``: serve names its database and warns that
    nothing can sign in; ``keys create`` from another directory refuses to make a second
    database; from the same directory, the key lands where serve reads it."""
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(tmp_path, ROBOTA_DATABASE_URL="sqlite:///robota.db")
    process = subprocess.Popen(
        [command(), "serve", "--port", str(free_port())],
        env=env,
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if "Application startup complete" in line:
                break
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
        process.stderr.close()
    assert lines[0] == f"robota-proxy: database: {home / 'robota.db'}"
    assert lines[2] == "robota-proxy: providers: mock"
    assert lines[4].startswith("robota-proxy: WARNING: NO CREDENTIAL CAN BE ACCEPTED")
    assert any("Application startup complete" in line for line in lines)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    stray = subprocess.run(
        [command(), "keys", "create", "--user", "alice"],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stray.returncode == 1 and stray.stdout == ""
    assert stray.stderr.splitlines()[0] == f"database: {elsewhere / 'robota.db'}"
    assert f"no database at {elsewhere / 'robota.db'}" in stray.stderr
    assert list(elsewhere.iterdir()) == []

    made = subprocess.run(
        [command(), "keys", "create", "--user", "alice", "--json"],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["user"] == "alice"
    assert made.stderr.splitlines()[0] == f"database: {home / 'robota.db'}"


async def _many_keys(url: str, count: int) -> None:
    database = Database(url)
    try:
        await database.open()
        store = KeyStore(database)
        for number in range(count):
            await store.create_key(f"user-{number}", UserPermissions(), name="x" * 100)
    finally:
        await database.aclose()


def test_output_cut_short_by_head_ends_quietly(tmp_path: Path) -> None:
    """More output than a pipe holds, so the write is still going when ``head`` leaves."""
    asyncio.run(_many_keys(f"sqlite:///{tmp_path / 'robota.db'}", 400))
    done = subprocess.run(
        ["bash", "-c", f"set -o pipefail; '{command()}' keys list --json | head -c 100"],
        env=clean_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 141
    assert len(done.stdout) == 100
    assert done.stderr == f"database: {tmp_path / 'robota.db'}\n"
