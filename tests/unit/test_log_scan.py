"""The e2e suite's log scan (tests/e2e/log_scan.py) can fail: a planted key, a marked message,
a minted key's or a JWT's shape are found, named by file and line, and the report never
repeats the value. (The files here are ``*.txt``: the e2e session sweeps ``*.log``.)"""

from __future__ import annotations

from pathlib import Path

from tests.e2e import log_scan

KEY = "planted-admin-key-0123456789abcdef"
RK_KEY = "rk_AbCd1234_" + "x" * 40 + "_-9"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJpdnkifQ.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"


def test_a_planted_key_is_found_by_file_and_line_and_not_repeated(tmp_path: Path) -> None:
    clean = tmp_path / "clean.txt"
    clean.write_text("INFO robota_proxy.access: POST /ai/chat 200 key rk_AbCd1234\n")
    leaky = tmp_path / "leaky.txt"
    leaky.write_text(f'one\ntwo\n{{"message": "bearer {KEY} refused"}}\nfour {KEY}\n')
    findings = log_scan.scan([clean, leaky], {KEY: "the admin key"})
    assert [(f.path, f.line, f.what) for f in findings] == [
        (leaky.resolve(), 3, "the admin key"),
        (leaky.resolve(), 4, "the admin key"),
    ]
    message = log_scan.report(findings)
    assert f"{leaky.resolve()}:3: the admin key" in message
    assert KEY not in message and KEY[:12] not in message


def test_shapes_are_found_without_being_registered(tmp_path: Path) -> None:
    log = tmp_path / "shapes.txt"
    log.write_text(f"a {RK_KEY} b\nnothing here\nBearer {JWT}\n")
    findings = log_scan.scan([log], {})
    assert [(f.line, f.what) for f in findings] == [(1, "an rk_ key"), (3, "a JWT")]
    assert RK_KEY not in log_scan.report(findings) and JWT not in log_scan.report(findings)


def test_the_longest_registered_value_is_named(tmp_path: Path) -> None:
    log = tmp_path / "both.txt"
    log.write_text("content: my passport number is walrus-ember-93127\n")
    secrets = {
        "walrus-ember-93127": "a marked word",
        "my passport number is walrus-ember-93127": "a marked message",
    }
    assert [(f.line, f.what) for f in log_scan.scan([log], secrets)] == [(1, "a marked message")]


def test_a_clean_file_a_missing_file_and_no_secrets_find_nothing(tmp_path: Path) -> None:
    log = tmp_path / "clean.txt"
    log.write_text("INFO uvicorn.error: Application startup complete.\n" * 1000)
    assert log_scan.scan([log, tmp_path / "gone.txt"], {KEY: "the admin key"}) == []


def test_the_secrets_a_proxy_is_started_with() -> None:
    env = {
        "ROBOTA_OPENAI_API_KEY": "sk-openai-0123456789",
        "ROBOTA_API_KEYS": "user-key-one-0123, user-key-two-4567,short",
        "ROBOTA_ADMIN_KEY": "admin-0123456789",
        "ROBOTA_JWT_SECRET": "jwt-secret-0123456789",
        "ROBOTA_ALERT_WEBHOOK_SECRET": "hmac-0123456789",
        "ROBOTA_DEPLOYMENTS": '[{"name": "eu", "provider": "openai", "api_key": "sk-eu-0123456"}]',
        "ROBOTA_DATABASE_URL": "postgresql://robota:db-password-0123@127.0.0.1:5432/test",
        "ROBOTA_REDIS_URL": "redis://127.0.0.1:6379/0",
        "ROBOTA_KEY_CACHE_SECONDS": "0.5",
        "ROBOTA_LOG_FORMAT": "json",
        "OPENAI_API_KEY": "not-the-proxys-0123456789",
    }
    assert log_scan.secrets_in_env(env) == {
        "sk-openai-0123456789": "ROBOTA_OPENAI_API_KEY",
        "user-key-one-0123": "a key of ROBOTA_API_KEYS",
        "user-key-two-4567": "a key of ROBOTA_API_KEYS",
        "admin-0123456789": "ROBOTA_ADMIN_KEY",
        "jwt-secret-0123456789": "ROBOTA_JWT_SECRET",
        "hmac-0123456789": "ROBOTA_ALERT_WEBHOOK_SECRET",
        "sk-eu-0123456": "a deployment's api_key (ROBOTA_DEPLOYMENTS)",
        "db-password-0123": "the password in ROBOTA_DATABASE_URL",
    }
