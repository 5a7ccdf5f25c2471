"""JSON logs of real proxy processes (README: Operating it, Logs) at ``debug``: every line
of a proxy's output is one JSON object, none carries a credential or a word of the
conversation, and the access line of a known call has its figures as fields.

The traffic is a realistic mix: a static key, an rk_ key made through the admin API, an
HS256 JWT; chats and streams on ``/ai/*``; a ``/v1/chat/completions`` call through the
openai SDK; a refused key; and a second proxy whose vendor key is wrong (the vendor's 401).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import openai
import pytest

from robota_proxy.policy.static_keys import key_id
from robota_proxy.testing import FakeVendors, Reply
from tests.e2e import log_scan
from tests.e2e.auth_support import ADMIN_KEY, JWT_SECRET, admin
from tests.e2e.conftest import VENDOR_KEY, ProxyProcess, start_proxy, stop_proxy, vendor_env

pytestmark = pytest.mark.e2e

STATIC_KEY = "static-key-for-log-scan-7f3a9c2e51d84b60"
BAD_KEY = "refused-key-for-log-scan-c41d9e8a7b2f"
WRONG_VENDOR_KEY = "sk-wrong-vendor-key-for-log-scan-5e6f7a8b"
# Marked for the session's scan of every e2e log line too (tests/e2e/log_scan.py).
MESSAGE = log_scan.register("a marked message", "my passport number is walrus-ember-93127")
ANSWER = log_scan.register("a marked answer", "noted: orchid-tundra-55810")
log_scan.register("a marked message's word", MESSAGE.split()[-1])
log_scan.register("a marked answer's word", ANSWER.split()[-1])
MODEL = "gpt-4o-mini"
PROMPT_TOKENS, COMPLETION_TOKENS = 1000, 500
COST = 0.00045  # 1000 x 0.15 + 500 x 0.60 USD per million tokens (the prices file)
ISSUER, AUDIENCE = "https://idp.example.test", "robota-log-scan"


def body(model: str = MODEL) -> dict[str, Any]:
    return {
        "provider": "openai",
        "model": model,
        "messages": [{"role": "user", "content": MESSAGE}],
    }


def env(fake: FakeVendors, folder: Path, vendor_key: str = VENDOR_KEY) -> dict[str, str]:
    prices = folder / "prices.json"
    prices.write_text(json.dumps({f"openai/{MODEL}": {"input": "0.15", "output": "0.60"}}))
    return {
        **vendor_env(fake, key=vendor_key),
        "ROBOTA_DATABASE_URL": f"sqlite:///{folder / 'robota.db'}",
        "ROBOTA_API_KEYS": STATIC_KEY,
        "ROBOTA_ADMIN_KEY": ADMIN_KEY,
        "ROBOTA_JWT_SECRET": JWT_SECRET,
        "ROBOTA_JWT_ISSUER": ISSUER,
        "ROBOTA_JWT_AUDIENCE": AUDIENCE,
        "ROBOTA_PRICES_FILE": str(prices),
        "ROBOTA_LOG_FORMAT": "json",
        "ROBOTA_LOG_LEVEL": "debug",
    }


@dataclass
class Traffic:
    logs: list[str]
    secrets: dict[str, str]
    known_request_id: str
    vendor_refused_request_id: str
    refused_request_id: str


def call(url: str, credential: str, path: str = "/ai/chat") -> httpx.Response:
    headers = {"Authorization": f"Bearer {credential}"}
    with httpx.stream("POST", f"{url}{path}", json=body(), headers=headers, timeout=20) as sent:
        sent.read()
    return sent


def scripted(fake: FakeVendors) -> None:
    fake.script(
        Reply(text=ANSWER, prompt_tokens=PROMPT_TOKENS, completion_tokens=COMPLETION_TOKENS),
        vendor="openai",
    )


@pytest.fixture(scope="module")
def traffic(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Traffic]:
    fake_server.reset()
    scripted(fake_server)
    good_dir, bad_dir = tmp_path_factory.mktemp("logs"), tmp_path_factory.mktemp("logs-bad")
    good = start_proxy(env(fake_server, good_dir), good_dir / "proxy.log")
    bad: ProxyProcess | None = None
    try:
        made = admin("POST", good.url, "/admin/keys", json={"user": "lena"})
        assert made.status_code == 201, made.text
        rk_key = log_scan.register("a minted rk_ key", made.json()["key"])
        log_scan.register("a minted rk_ key's secret", rk_key.rsplit("_", 1)[1])
        now = int(time.time())
        token = jwt.encode(
            {"sub": "ivy", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300},
            JWT_SECRET,
            algorithm="HS256",
        )
        log_scan.register("a signed JWT", token)
        known = call(good.url, STATIC_KEY)
        assert known.status_code == 200, known.text
        assert known.json()["content"] == ANSWER
        for credential in (rk_key, token):
            assert call(good.url, credential).status_code == 200
            streamed = call(good.url, credential, "/ai/chat/stream")
            assert streamed.status_code == 200 and "event: done" in streamed.text
        sdk = openai.OpenAI(base_url=f"{good.url}/v1", api_key=rk_key, max_retries=0)
        completion = sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": MESSAGE}]
        )
        assert completion.choices[0].message.content == ANSWER
        chunks = sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": MESSAGE}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
        refused = call(good.url, BAD_KEY)
        assert refused.status_code == 401

        bad = start_proxy(env(fake_server, bad_dir, WRONG_VENDOR_KEY), bad_dir / "proxy.log")
        vendor_refused = call(bad.url, STATIC_KEY)
        assert vendor_refused.status_code == 502, vendor_refused.text
        assert len(fake_server.requests) == 8  # every call above but the refused one
    finally:
        stop_proxy(good)  # the writer thread drains its queue before the process exits
        if bad is not None:
            stop_proxy(bad)
        fake_server.reset()
    yield Traffic(
        logs=[good.log(), bad.log()],
        secrets={
            "static key": STATIC_KEY,
            "refused key": BAD_KEY,
            "rk_ key": rk_key,
            "rk_ secret": rk_key.rsplit("_", 1)[1],
            "JWT": token,
            "JWT signature": token.rsplit(".", 1)[1],
            "admin key": ADMIN_KEY,
            "JWT secret": JWT_SECRET,
            "vendor key": VENDOR_KEY,
            "wrong vendor key": WRONG_VENDOR_KEY,
            "message": MESSAGE,
            "message word": MESSAGE.split()[-1],
            "answer": ANSWER.split()[-1],
        },
        known_request_id=known.headers["x-request-id"],
        vendor_refused_request_id=vendor_refused.headers["x-request-id"],
        refused_request_id=refused.headers["x-request-id"],
    )


def lines(traffic: Traffic) -> list[dict[str, Any]]:
    parsed = []
    for log in traffic.logs:
        for line in log.splitlines():
            entry = json.loads(line)
            assert isinstance(entry, dict), line
            parsed.append(entry)
    return parsed


def test_every_line_of_output_is_one_json_object(traffic: Traffic) -> None:
    entries = lines(traffic)
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
    loggers = {entry["logger"] for entry in entries}
    # The banner, uvicorn's own lines, and ours (the access lines, the upstream attempts,
    # the refused key): all of them went through JSON.
    assert {
        "robota_proxy.banner",
        "uvicorn.error",
        "robota_proxy",
        "robota_proxy.access",
        "robota_proxy.upstream",
        "robota_proxy.auth",
    } <= loggers


def test_no_line_carries_a_credential_or_the_conversation(traffic: Traffic) -> None:
    whole = "\n".join(traffic.logs)
    assert traffic.known_request_id in whole  # the scan reads the real output
    for name, secret in traffic.secrets.items():
        assert secret not in whole, name


def access(traffic: Traffic, request_id: str) -> dict[str, Any]:
    (line,) = [
        entry
        for entry in lines(traffic)
        if entry.get("event") == "request" and entry.get("request_id") == request_id
    ]
    return line


def test_the_access_line_of_a_known_call_has_its_exact_figures(traffic: Traffic) -> None:
    line = access(traffic, traffic.known_request_id)
    assert line.pop("time")
    assert line.pop("latency_ms") > 0
    assert line.pop("message").startswith("POST /ai/chat 200 ")
    assert line == {
        "level": "info",
        "logger": "robota_proxy.access",
        "event": "request",
        "request_id": traffic.known_request_id,
        "trace_id": None,
        "method": "POST",
        "path": "/ai/chat",
        "surface": "robota",
        "status": 200,
        "ttft_ms": None,
        "user": key_id(STATIC_KEY),
        "key_id": key_id(STATIC_KEY),
        "error": None,
        "provider": "openai",
        "model": MODEL,
        "deployment": "openai",
        "outcome": "ok",
        "streamed": False,
        "input_tokens": PROMPT_TOKENS,
        "output_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        "cost_usd": COST,
        "cache": None,
        "attempts": 1,
    }


def test_refusals_are_logged_with_their_codes_and_no_credential(traffic: Traffic) -> None:
    refused = access(traffic, traffic.refused_request_id)
    assert (refused["status"], refused["error"], refused["user"]) == (
        401,
        "unauthenticated",
        None,
    )
    # No vendor was called: the line stops at the error, with no call figures.
    assert list(refused)[-1] == "error" and "provider" not in refused
    vendor = access(traffic, traffic.vendor_refused_request_id)
    assert (vendor["status"], vendor["provider"], vendor["model"], vendor["attempts"]) == (
        502,
        "openai",
        MODEL,
        1,
    )


def test_the_session_scan_reads_these_proxies_output_and_knows_their_secrets(
    traffic: Traffic, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The end-of-session scan (tests/e2e/log_scan.py) covers these proxies: their files are
    among those it reads, it finds a known line in them, and their secrets are registered."""
    logs = log_scan.session_logs(tmp_path_factory.getbasetemp())
    probe = {traffic.known_request_id: "the known request id"}
    found = log_scan.scan(logs, probe)
    assert found and all(finding.path.name == "proxy.log" for finding in found)
    registered = log_scan.registered()
    for name in ("static key", "rk_ key", "JWT", "admin key", "JWT secret", "message"):
        assert traffic.secrets[name] in registered, name
    assert WRONG_VENDOR_KEY in registered  # the second proxy's, from its environment
    assert BAD_KEY not in registered  # a caller's wrong string is no one's secret
