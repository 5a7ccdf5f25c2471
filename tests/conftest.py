"""Every test gets its own SQLite file, so no test writes ``robota.db`` into the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _own_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBOTA_DATABASE_URL", f"sqlite:///{tmp_path / 'robota.db'}")
