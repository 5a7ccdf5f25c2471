"""What the fuzz tests share: a proxy process set up so that the money path runs (an ``rk_``
key with a monthly budget and token quota, made through the admin API), and a watch on its
log that fails a test at the first traceback, so that an error the proxy swallowed into a
4xx (or a WebSocket error frame) is still found."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.e2e.auth_support import ADMIN_KEY
from tests.e2e.conftest import ProxyProcess, start_proxy

#: How long one fuzzed request may take before it counts as a hang.
REQUEST_TIMEOUT = 10.0
#: The longer local run: ``ROBOTA_FUZZ_SCALE=20 pytest -m fuzz`` multiplies every example
#: bound (the CI default, 1, keeps the whole fuzz suite near a minute).
SCALE = max(1, int(os.environ.get("ROBOTA_FUZZ_SCALE", "1")))
#: The fuzzed key's limits: large enough that fuzzing never exhausts them, so the money path
#: (reserve, settle, ledger row) runs on every call that reaches a vendor.
KEY_PERMISSIONS = {"monthlyBudgetUsd": "100000", "monthlyTokenLimit": 10**12}


@dataclass
class LogWatch:
    """Reads the proxy's log from where it last stopped."""

    path: Path
    offset: int = 0
    seen: list[str] = field(default_factory=list)

    def new_text(self) -> str:
        with self.path.open("rb") as log:
            log.seek(self.offset)
            data = log.read()
        self.offset += len(data)
        text = data.decode(errors="replace")
        self.seen.append(text)
        return text

    def assert_no_traceback(self, context: str) -> None:
        text = self.new_text()
        assert "Traceback" not in text, f"the proxy logged a traceback after {context}:\n{text}"


@dataclass
class FuzzTarget:
    proxy: ProxyProcess
    #: An ``rk_`` key of user ``fuzz`` with ``KEY_PERMISSIONS``.
    key: str
    log: LogWatch

    @property
    def url(self) -> str:
        return self.proxy.url

    def auth(self, path: str) -> dict[str, str]:
        """The admin key for ``/admin/...``, the user's key for everything else."""
        secret = ADMIN_KEY if path.startswith("/admin") else self.key
        return {"Authorization": f"Bearer {secret}"}


def start_fuzz_target(env: Mapping[str, str], log_path: Path) -> FuzzTarget:
    proxy = start_proxy(
        {
            "ROBOTA_ADMIN_KEY": ADMIN_KEY,
            # Fuzzed credentials must not lock the fuzzer out of its own proxy.
            "ROBOTA_AUTH_FAILURES_PER_MINUTE": "1000000",
            **env,
        },
        log_path,
    )
    made = httpx.post(
        f"{proxy.url}/admin/keys",
        json={"user": "fuzz", "name": "fuzz", "permissions": KEY_PERMISSIONS},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=REQUEST_TIMEOUT,
    )
    assert made.status_code == 201, made.text
    return FuzzTarget(proxy, made.json()["key"], LogWatch(log_path))
