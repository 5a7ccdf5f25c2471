"""Helpers for the keys/JWT/admin end-to-end tests: the CLI as a subprocess, chat calls with a
given credential, and "refused within N seconds" polling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx

from tests.e2e.conftest import ROOT

ADMIN_KEY = "admin-key-for-tests-0123456789abcdef"
JWT_SECRET = "jwt-secret-for-tests-" + "0123456789abcdef" * 4
#: The issue's promise: a revoked key is refused by every process within one second of the
#: revocation (ROBOTA_KEY_CACHE_SECONDS is 0.5 by default; the rest is round trips).
REVOKE_BOUND = 1.0


def chat_body(provider: str = "mock", model: str = "mock-1", **extra: Any) -> dict[str, Any]:
    return {
        "provider": provider,
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBOTA_")}
    env["ROBOTA_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "robota_proxy", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def create_key(database_url: str, user: str, *flags: str) -> dict[str, Any]:
    done = cli(database_url, "keys", "create", "--user", user, *flags, "--json")
    assert done.returncode == 0, done.stderr
    created: dict[str, Any] = json.loads(done.stdout)  # exactly one JSON object
    return created


def chat(url: str, credential: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.post(
        f"{url}/ai/chat",
        json=body or chat_body(),
        headers={"Authorization": f"Bearer {credential}"},
        timeout=10,
    )


def admin(method: str, url: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", **kwargs.pop("headers", {})}
    return httpx.request(method, f"{url}{path}", headers=headers, timeout=10, **kwargs)


def seconds_until_refused(urls: Sequence[str], credential: str, limit: float = 5.0) -> float:
    """Poll every proxy until each answers 401; the time from now until the last did."""
    started = time.monotonic()
    pending = list(urls)
    while pending and time.monotonic() - started < limit:
        pending = [url for url in pending if chat(url, credential).status_code != 401]
        if pending:
            time.sleep(0.05)
    assert not pending, f"still accepted after {limit}s by {pending}"
    return time.monotonic() - started
