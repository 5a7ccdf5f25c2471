"""``robota-proxy serve`` in process, uvicorn replaced: what it checks before starting (each
mistake one line and status 2, uvicorn never started), what it says when it starts (the
banner), and the warning about several workers without Redis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from robota_proxy import serving
from robota_proxy.cli import main
from robota_proxy.policy.principals import UserPermissions
from robota_proxy.storage.database import Database
from robota_proxy.storage.key_store import KeyStore

JWT_SECRET = "jwt-shared-secret-value"


@pytest.fixture(autouse=True)
def _metrics_dir_restored() -> Any:
    """``serve --workers N`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory in its
    own process; run in this one, it must not leave later tests' metrics in multiprocess
    mode."""
    before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    yield
    if before is None:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = before


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    # ``serving.serve`` runs uvicorn (robota_proxy.serving); recorded instead of run.
    monkeypatch.setattr(serving, "serve", lambda *args, **kwargs: calls.append(kwargs) or 0)
    for name in list(os.environ):
        if (name.startswith("ROBOTA_") and name != "ROBOTA_DATABASE_URL") or name.endswith(
            "_API_KEY"
        ):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env from the checkout
    return calls


def serve_error(runs: list[dict[str, Any]], capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Serve must refuse: status 2, uvicorn never started, one line on stderr, no stdout."""
    assert main(["serve", *argv]) == 2
    assert runs == []
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.startswith("robota-proxy: error: ") and err.count("\n") == 1
    return err.removeprefix("robota-proxy: error: ").rstrip("\n")


def public_pem(tmp_path: Path, private: Any, name: str = "public.pem") -> Path:
    path = tmp_path / name
    path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def test_several_workers_without_redis_are_warned(
    runs: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--workers", "3"]) == 0
    assert runs[0]["workers"] == 3
    assert "3 workers without ROBOTA_REDIS_URL" in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_no_warning_with_one_worker_or_with_redis(
    runs: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    workers: str,
) -> None:
    if workers == "2":
        monkeypatch.setenv("ROBOTA_REDIS_URL", "redis://127.0.0.1:6379/0")
    assert main(["serve", "--workers", workers]) == 0
    assert len(runs) == 1
    assert "ROBOTA_REDIS_URL" not in capsys.readouterr().err


def test_banner_says_what_serve_will_use(
    runs: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    database = os.environ["ROBOTA_DATABASE_URL"].removeprefix("sqlite:///")
    assert main(["serve"]) == 0
    assert len(runs) == 1
    banner = capsys.readouterr().err.splitlines()
    assert banner[:4] == [
        f"robota-proxy: database: {database}",
        "robota-proxy: rate limits, cache, resumable streams: memory (this process only)",
        "robota-proxy: providers: mock",
        "robota-proxy: auth: 0 active rk_ keys in the database; 0 static keys (ROBOTA_API_KEYS)",
    ]
    assert banner[4].startswith("robota-proxy: WARNING: NO CREDENTIAL CAN BE ACCEPTED")
    assert "robota-proxy keys create --user NAME" in banner[4]
    assert "ROBOTA_API_KEYS" in banner[4]
    assert len(banner) == 5


@pytest.mark.parametrize("credential", ["static", "jwt", "rk_key", "disabled"])
def test_no_warning_when_some_credential_can_be_accepted(
    runs: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    credential: str,
) -> None:
    expected_auth = {
        "static": "auth: 0 active rk_ keys in the database; 1 static key (ROBOTA_API_KEYS)",
        "jwt": "auth: 0 active rk_ keys in the database; 0 static keys (ROBOTA_API_KEYS); "
        "JWT HS256",
        "rk_key": "auth: 1 active rk_ key in the database; 0 static keys (ROBOTA_API_KEYS)",
        "disabled": "auth: DISABLED (ROBOTA_AUTH=disabled): anyone who can reach this proxy "
        "can spend its vendor keys",
    }[credential]
    if credential == "static":
        monkeypatch.setenv("ROBOTA_API_KEYS", "static-secret-key")
    elif credential == "jwt":
        monkeypatch.setenv("ROBOTA_JWT_SECRET", JWT_SECRET)
    elif credential == "disabled":
        monkeypatch.setenv("ROBOTA_AUTH", "disabled")
    else:
        asyncio.run(_keys(os.environ["ROBOTA_DATABASE_URL"], active=1, revoked=1))
    assert main(["serve"]) == 0
    err = capsys.readouterr().err
    assert f"robota-proxy: {expected_auth}\n" in err
    assert "WARNING" not in err
    assert "static-secret-key" not in err and JWT_SECRET not in err


async def _keys(url: str, *, active: int, revoked: int) -> None:
    database = Database(url)
    try:
        await database.open()
        store = KeyStore(database)
        for _ in range(active):
            await store.create_key("alice", UserPermissions())
        for _ in range(revoked):
            _, record = await store.create_key("bob", UserPermissions())
            await store.revoke_key(record.key_id)
    finally:
        await database.aclose()


def test_log_level_is_passed_on_lower_case(
    runs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROBOTA_LOG_LEVEL", "DEBUG")
    assert main(["serve"]) == 0
    assert runs[0]["log_level"] == "debug"
    assert runs[0]["log_config"]["loggers"]["robota_proxy"]["level"] == "DEBUG"


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"ROBOTA_PORT": "abc"}, "ROBOTA_PORT is 'abc': expected a whole number"),
        ({"ROBOTA_AUTH": "open"}, "ROBOTA_AUTH is 'open': expected 'keys' or 'disabled'"),
        (
            {"ROBOTA_DATABASE_URL": "nonsense"},
            "ROBOTA_DATABASE_URL is 'nonsense': not a database URL: use sqlite:///path.db or "
            "postgresql://user@host/db",
        ),
        (
            {"ROBOTA_REDIS_URL": "127.0.0.1:6379"},
            "ROBOTA_REDIS_URL is '127.0.0.1:6379': expected redis://host:6379/0 (or rediss://, "
            "unix://)",
        ),
    ],
)
def test_configuration_mistakes_stop_serve(
    runs: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    line: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert serve_error(runs, capsys) == line


def test_a_postgres_database_that_does_not_exist(
    runs: list[dict[str, Any]], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "postgresql://postgres:pg-password@127.0.0.1:5432/does_not_exist_xyz"
    monkeypatch.setenv("ROBOTA_DATABASE_URL", url)
    assert serve_error(runs, capsys) == (
        "ROBOTA_DATABASE_URL is postgresql://postgres:***@127.0.0.1:5432/does_not_exist_xyz: "
        'cannot open it: database "does_not_exist_xyz" does not exist'
    )


def test_a_sqlite_directory_that_cannot_be_written(
    runs: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ROBOTA_DATABASE_URL", f"sqlite:///{blocker}/robota.db")
    line = serve_error(runs, capsys)
    assert line.startswith(f"ROBOTA_DATABASE_URL is {blocker}/robota.db: cannot open it: ")


def test_jwt_secret_and_key_file_together(
    runs: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("ROBOTA_JWT_SECRET", JWT_SECRET)
    monkeypatch.setenv(
        "ROBOTA_JWT_PUBLIC_KEY_FILE",
        str(public_pem(tmp_path, rsa.generate_private_key(65537, 2048))),
    )
    line = serve_error(runs, capsys)
    assert line.startswith("set ROBOTA_JWT_SECRET or ROBOTA_JWT_PUBLIC_KEY_FILE, not both")
    assert JWT_SECRET not in line


@pytest.mark.parametrize("content", [None, b"not a pem at all\n"])
def test_jwt_key_file_unreadable(
    runs: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    content: bytes | None,
) -> None:
    path = tmp_path / "public.pem"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setenv("ROBOTA_JWT_PUBLIC_KEY_FILE", str(path))
    line = serve_error(runs, capsys)
    assert line.startswith(f"ROBOTA_JWT_PUBLIC_KEY_FILE '{path}' is not a readable PEM public key")


@pytest.mark.parametrize(
    ("key", "algorithms", "allowed"),
    [
        ("secret", "RS256", "HS256, HS384, HS512"),
        ("rsa", "HS256", "RS256, RS384, RS512, PS256, PS384, PS512"),
        ("ec", "RS256", "ES256, ES384, ES512"),
    ],
)
def test_jwt_algorithm_that_does_not_fit_the_key(
    runs: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    key: str,
    algorithms: str,
    allowed: str,
) -> None:
    if key == "secret":
        monkeypatch.setenv("ROBOTA_JWT_SECRET", JWT_SECRET)
    else:
        private = (
            rsa.generate_private_key(65537, 2048)
            if key == "rsa"
            else ec.generate_private_key(ec.SECP256R1())
        )
        monkeypatch.setenv("ROBOTA_JWT_PUBLIC_KEY_FILE", str(public_pem(tmp_path, private)))
    monkeypatch.setenv("ROBOTA_JWT_ALGORITHMS", algorithms)
    assert serve_error(runs, capsys) == (
        f"ROBOTA_JWT_ALGORITHMS {algorithms} cannot be used with this key; allowed: {allowed}"
    )


def test_jwt_key_of_another_kind(
    runs: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    path = public_pem(tmp_path, ed25519.Ed25519PrivateKey.generate())
    monkeypatch.setenv("ROBOTA_JWT_PUBLIC_KEY_FILE", str(path))
    assert serve_error(runs, capsys) == (
        "ROBOTA_JWT_PUBLIC_KEY_FILE: the JWT public key must be an RSA or EC key"
    )


def test_prices_file_that_does_not_parse(
    runs: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text("{not json")
    monkeypatch.setenv("ROBOTA_PRICES_FILE", str(prices))
    assert serve_error(runs, capsys).startswith(
        f"ROBOTA_PRICES_FILE: cannot read prices file {prices}: "
    )


BLOCKED = """
import sys
sys.modules[{module!r}] = None  # as if the extra were not installed
from robota_proxy import serving
from robota_proxy.cli import main
sys.exit(main(["serve"]))
"""


@pytest.mark.parametrize(
    ("module", "variable", "url", "line"),
    [
        (
            "asyncpg",
            "ROBOTA_DATABASE_URL",
            "postgresql://postgres:pg-password@127.0.0.1:5432/test",
            "ROBOTA_DATABASE_URL is postgresql://postgres:***@127.0.0.1:5432/test but asyncpg "
            'is not installed: pip install "robota-remote[proxy,postgres]"',
        ),
        (
            "redis",
            "ROBOTA_REDIS_URL",
            "redis://:redis-password@127.0.0.1:6379/0",
            "ROBOTA_REDIS_URL is redis://:***@127.0.0.1:6379/0 but redis is not installed: "
            'pip install "robota-remote[proxy,redis]"',
        ),
    ],
)
def test_a_missing_extra_is_named_with_its_install_command(
    tmp_path: Path, module: str, variable: str, url: str, line: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBOTA_")}
    env["ROBOTA_DATABASE_URL"] = f"sqlite:///{tmp_path / 'robota.db'}"
    env[variable] = url
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED.format(module=module)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == f"robota-proxy: error: {line}\n"
    assert done.stdout == ""


def test_in_json_mode_the_banner_lines_are_json_objects(
    runs: list[dict[str, Any]], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROBOTA_LOG_FORMAT", "json")
    database = os.environ["ROBOTA_DATABASE_URL"].removeprefix("sqlite:///")
    assert main(["serve", "--workers", "2"]) == 0
    assert len(runs) == 1
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    for line in lines:
        assert line.pop("time").endswith("+00:00")
    no_credential = lines[4].pop("message")
    assert no_credential.startswith("NO CREDENTIAL CAN BE ACCEPTED: no active key")
    workers = lines[5].pop("message")
    assert workers.startswith("2 workers without ROBOTA_REDIS_URL: each worker keeps")
    common = {"logger": "robota_proxy.banner", "event": "startup"}
    assert lines == [
        {**common, "level": "info", "message": f"database: {database}"},
        {
            **common,
            "level": "info",
            "message": "rate limits, cache, resumable streams: memory (this process only)",
        },
        {**common, "level": "info", "message": "providers: mock"},
        {
            **common,
            "level": "info",
            "message": "auth: 0 active rk_ keys in the database; 0 static keys (ROBOTA_API_KEYS)",
        },
        {**common, "level": "warning"},
        {**common, "level": "warning"},
    ]
