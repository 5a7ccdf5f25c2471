"""Configuration mistakes as one line: the variable, the value (never a secret), what is
accepted. In process; tests/e2e/test_config_errors_e2e.py runs the real command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from robota_proxy.banner import banner_lines, configured_providers
from robota_proxy.config_errors import (
    ConfigError,
    env_name,
    from_validation_error,
    load_settings,
    redact_url,
)
from robota_proxy.preflight import check_database_url, check_redis_url, describe_database
from robota_proxy.settings import Settings
from robota_proxy.upstreams.registry import build_upstreams


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("ROBOTA_") or name.endswith("_API_KEY"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env from the checkout


def error_of(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    return str(caught.value)


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"ROBOTA_PORT": "abc"}, "ROBOTA_PORT is 'abc': expected a whole number"),
        ({"ROBOTA_AUTH": "maybe"}, "ROBOTA_AUTH is 'maybe': expected 'keys' or 'disabled'"),
        (
            {"ROBOTA_LOG_LEVEL": "loud"},
            "ROBOTA_LOG_LEVEL is 'loud': expected 'critical', 'error', 'warning', 'info', "
            "'debug' or 'trace'",
        ),
        (
            {"ROBOTA_FALLBACKS": "notjson"},
            "ROBOTA_FALLBACKS is 'notjson': not valid JSON; expected "
            '{"alias or provider/model": ["provider/model", ...]}',
        ),
        (
            {"ROBOTA_FALLBACKS": '{"fast": ["gpt-4o"]}'},
            "ROBOTA_FALLBACKS is '{\"fast\": [\"gpt-4o\"]}': fallback 'gpt-4o' for 'fast' "
            "must be 'provider/model'",
        ),
        ({"ROBOTA_FALLBACKS": "[1]"}, "ROBOTA_FALLBACKS is '[1]': expected a JSON object"),
        (
            {"ROBOTA_MOCK_ENABLED": "perhaps"},
            "ROBOTA_MOCK_ENABLED is 'perhaps': expected true or false (also 1/0, yes/no, on/off)",
        ),
        (
            {"ROBOTA_UPSTREAM_TIMEOUT": "0"},
            "ROBOTA_UPSTREAM_TIMEOUT is '0': must be greater than 0",
        ),
        ({"ROBOTA_UPSTREAM_RETRIES": "11"}, "ROBOTA_UPSTREAM_RETRIES is '11': must be at most 10"),
        ({"ROBOTA_RETRY_BACKOFF_BASE": "x"}, "ROBOTA_RETRY_BACKOFF_BASE is 'x': expected a number"),
    ],
)
def test_each_mistake_is_one_line(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], line: str
) -> None:
    assert error_of(monkeypatch, **env) == line


def test_several_mistakes_one_line_each(monkeypatch: pytest.MonkeyPatch) -> None:
    message = error_of(monkeypatch, ROBOTA_PORT="abc", ROBOTA_AUTH="maybe")
    assert sorted(message.splitlines()) == [
        "ROBOTA_AUTH is 'maybe': expected 'keys' or 'disabled'",
        "ROBOTA_PORT is 'abc': expected a whole number",
    ]


def test_log_level_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBOTA_LOG_LEVEL", " WARNING ")
    assert load_settings().log_level == "warning"
    monkeypatch.setenv("ROBOTA_LOG_LEVEL", "Trace")
    assert load_settings().log_level == "trace"


def test_values_named_key_or_secret_are_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    assert error_of(monkeypatch, ROBOTA_KEY_CACHE_SECONDS="99") == (
        "ROBOTA_KEY_CACHE_SECONDS is <hidden>: must be at most 60"
    )


@pytest.mark.parametrize(
    ("values", "line"),
    [
        ({"admin_key": ["sk-admin-secret"]}, "ROBOTA_ADMIN_KEY is <hidden>"),
        ({"jwt_secret": ["sk-jwt-secret"]}, "ROBOTA_JWT_SECRET is <hidden>"),
        ({"api_keys": [["sk-user-secret"]]}, "ROBOTA_API_KEYS is <hidden>"),
        ({"OPENAI_API_KEY": ["sk-openai-secret"]}, "OPENAI_API_KEY is <hidden>"),
        ({"ROBOTA_GOOGLE_API_KEY": ["sk-google-secret"]}, "ROBOTA_GOOGLE_API_KEY is <hidden>"),
    ],
)
def test_secret_fields_are_hidden_and_aliases_named(values: dict[str, object], line: str) -> None:
    """SecretStr fields accept any string from the environment, so their failures are made
    here with values of the wrong type."""
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, **values)  # type: ignore[arg-type]
    message = str(from_validation_error(caught.value))
    assert message == f"{line}: Input should be a valid string"
    assert "secret'" not in message and "sk-" not in message


def test_the_alias_in_use_is_the_one_named(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_name("openai_api_key") == "ROBOTA_OPENAI_API_KEY"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    assert env_name("openai_api_key") == "OPENAI_API_KEY"
    assert env_name("port") == "ROBOTA_PORT"


def test_passwords_in_urls_are_masked() -> None:
    assert redact_url("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("postgres//u:pw@h/db") == "postgres//u:***@h/db"  # unparseable too


def test_database_urls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        check_database_url("nonsense")
    assert str(caught.value) == (
        "ROBOTA_DATABASE_URL is 'nonsense': not a database URL: use sqlite:///path.db or "
        "postgresql://user@host/db"
    )
    with pytest.raises(ConfigError) as caught:
        check_database_url("mysql://root:hunter2@db/x")
    assert "hunter2" not in str(caught.value) and "unsupported database 'mysql'" in str(
        caught.value
    )
    assert describe_database("sqlite:///robota.db") == str(tmp_path / "robota.db")
    assert describe_database("sqlite:///:memory:").startswith("SQLite in memory")
    assert describe_database("postgresql://u:hunter2@h/db") == "postgresql://u:***@h/db"


def test_redis_urls() -> None:
    check_redis_url(None)
    check_redis_url("redis://127.0.0.1:6379/0")
    with pytest.raises(ConfigError) as caught:
        check_redis_url("http://u:hunter2@h")
    assert str(caught.value) == (
        "ROBOTA_REDIS_URL is 'http://u:***@h': expected redis://host:6379/0 (or rediss://, unix://)"
    )


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"ROBOTA_MOCK_ENABLED": "false"},
        {"OPENAI_API_KEY": "sk-1", "GOOGLE_API_KEY": "g-1"},
        {"ROBOTA_OPENAI_BASE_URL": "http://127.0.0.1:1/v1", "ANTHROPIC_API_KEY": "a-1"},
    ],
)
def test_banner_providers_are_the_ones_the_app_builds(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert configured_providers(settings) == list(build_upstreams(settings))


def test_banner_never_shows_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    monkeypatch.setenv("ROBOTA_API_KEYS", "static-secret-1,static-secret-2")
    monkeypatch.setenv("ROBOTA_REDIS_URL", "redis://:redis-secret@127.0.0.1:6379/0")
    monkeypatch.setenv("ROBOTA_DATABASE_URL", "postgresql://u:pg-secret@127.0.0.1/db")
    lines = banner_lines(load_settings(), ["HS256"], 3)
    assert lines == [
        "robota-proxy: database: postgresql://u:***@127.0.0.1/db",
        "robota-proxy: rate limits, cache, resumable streams: Redis redis://:***@127.0.0.1:6379/0",
        "robota-proxy: providers: mock, openai",
        "robota-proxy: auth: 3 active rk_ keys in the database; 2 static keys (ROBOTA_API_KEYS); "
        "JWT HS256",
    ]
