"""Settings from the environment: both spellings of vendor keys, lists, secrets hidden."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from robota_proxy.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ROBOTA_") or name.endswith("_API_KEY"):
            monkeypatch.delenv(name)


def load() -> Settings:
    return Settings(_env_file=None)  # type: ignore[call-arg]


def test_defaults_are_embedded_and_closed() -> None:
    settings = load()
    assert (settings.host, settings.port) == ("127.0.0.1", 8787)
    assert settings.auth == "keys"
    assert settings.api_keys == []
    assert settings.max_body_bytes == 4 * 1024 * 1024
    assert settings.mock_models == ["mock-1"]


def test_vendor_keys_under_either_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "plain-openai")
    monkeypatch.setenv("ROBOTA_ANTHROPIC_API_KEY", "robota-anthropic")
    monkeypatch.setenv("GOOGLE_API_KEY", "plain-google")
    monkeypatch.setenv("ROBOTA_GOOGLE_BASE_URL", "http://127.0.0.1:1/")
    settings = load()
    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == "plain-openai"
    assert settings.anthropic_api_key is not None
    assert settings.anthropic_api_key.get_secret_value() == "robota-anthropic"
    assert settings.google_base_url == "http://127.0.0.1:1/"
    assert "plain-openai" not in repr(settings) and "plain-google" not in str(settings)


def test_robota_name_wins_over_the_plain_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "plain")
    monkeypatch.setenv("ROBOTA_OPENAI_API_KEY", "robota")
    settings = load()
    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == "robota"


def test_comma_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBOTA_API_KEYS", " one, two ,,three ")
    monkeypatch.setenv("ROBOTA_OPENAI_MODELS", "gpt-4o,gpt-4o-mini")
    settings = load()
    assert [key.get_secret_value() for key in settings.api_keys] == ["one", "two", "three"]
    assert settings.openai_models == ["gpt-4o", "gpt-4o-mini"]
    assert set(settings.secrets()) == {"one", "two", "three"}


def test_env_file(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("ROBOTA_PORT=9999\nROBOTA_AUTH=disabled\n")
    settings = Settings(_env_file=env)  # type: ignore[call-arg]
    assert settings.port == 9999
    assert settings.auth == "disabled"


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBOTA_AUTH", "maybe")
    with pytest.raises(ValueError, match="auth"):
        load()
