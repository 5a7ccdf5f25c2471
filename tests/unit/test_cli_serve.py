"""``robota-proxy serve``: several workers without Redis are warned that limits are per worker."""

from __future__ import annotations

from typing import Any

import pytest
import uvicorn

from robota_proxy.cli import main


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.delenv("ROBOTA_REDIS_URL", raising=False)
    return calls


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
