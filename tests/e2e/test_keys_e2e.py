"""rk_ keys end to end: issued by the CLI against the proxy's SQLite file, used through a real
proxy process, revoked, expired, refused with a 401 that says why (an unknown and a revoked key
alike) and a log line naming the reason and the key's public id; permissions enforced before
any vendor is called; failed authentications limited per address; no key in the proxy's log."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from robota_proxy.policy.static_keys import key_id
from robota_proxy.testing import FakeVendors
from tests.e2e.auth_support import (
    ADMIN_KEY,
    REVOKE_BOUND,
    admin,
    chat,
    chat_body,
    cli,
    create_key,
    seconds_until_refused,
)
from tests.e2e.conftest import USER_KEY, ProxyProcess, start_proxy, stop_proxy, vendor_env

pytestmark = pytest.mark.e2e

UNKNOWN = "unknown or revoked key"


def assert_refused(
    proxy: ProxyProcess, credential: str, message: str, reason: str, public_id: str
) -> None:
    """401 with ``message``; one log line with the reason and the public id of this very
    request, and nowhere the credential."""
    refused = chat(proxy.url, credential)
    assert refused.status_code == 401
    error = refused.json()["error"]
    assert (error["code"], error["message"]) == ("unauthenticated", message)
    assert credential not in refused.text
    request = f"request={error['requestId']}"
    log = proxy.log_once_it_has(request)
    (line,) = [entry for entry in log.splitlines() if request in entry]
    assert f"authentication refused: reason={reason} id={public_id} client=127.0.0.1 " in line
    assert credential not in log


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('keys') / 'robota.db'}"


@pytest.fixture(scope="module")
def keyed_proxy(
    fake_server: FakeVendors, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    env = {
        **vendor_env(fake_server),
        "ROBOTA_DATABASE_URL": database_url,
        "ROBOTA_API_KEYS": USER_KEY,
        "ROBOTA_ADMIN_KEY": ADMIN_KEY,
        "ROBOTA_AUTH_FAILURES_PER_MINUTE": "1000",
    }
    running = start_proxy(env, tmp_path_factory.mktemp("keyed") / "proxy.log")
    yield running
    stop_proxy(running)


def test_cli_key_works_and_wrong_keys_do_not(keyed_proxy: ProxyProcess, database_url: str) -> None:
    created = create_key(database_url, "alice", "--name", "e2e")
    key = created["key"]
    assert key.startswith(f"rk_{created['id']}_") and created["user"] == "alice"
    answer = chat(keyed_proxy.url, key)
    assert answer.status_code == 200, answer.text
    assert key not in answer.text

    tampered = key[:-3] + ("aaa" if not key.endswith("aaa") else "bbb")
    malformed_key = (
        "malformed key: a proxy key is rk_<8-character id>_<43-character secret>; "
        "check that it was copied whole"
    )
    for wrong, message, reason, public_id in (
        (tampered, UNKNOWN, "wrong_secret", created["id"]),
        ("rk_zzzzzzzz_" + "x" * 43, UNKNOWN, "unknown_key", "zzzzzzzz"),
        ("rk_short", malformed_key, "malformed_key", "-"),
        ("nope", UNKNOWN, "unknown_key", key_id("nope")),
    ):
        assert_refused(keyed_proxy, wrong, message, reason, public_id)
    for headers, message in (
        ({}, "no credential: send 'Authorization: Bearer <key>'"),
        (
            {"Authorization": f"Basic {key}"},
            "malformed Authorization header: expected 'Bearer <key>', one key or token "
            "without spaces",
        ),
    ):
        refused = httpx.post(f"{keyed_proxy.url}/ai/chat", json=chat_body(), headers=headers)
        assert refused.status_code == 401
        assert refused.json()["error"]["message"] == message
    # The static ROBOTA_API_KEYS list keeps working beside the key store.
    assert chat(keyed_proxy.url, USER_KEY).status_code == 200


def test_cli_process_exit_codes(database_url: str) -> None:
    """The real process: a bad value is status 2 with stderr only (every flag is covered in
    tests/unit/test_keys_cli.py)."""
    done = cli(database_url, "keys", "create", "--user", "alice", "--expires", "soon", "--json")
    assert done.returncode == 2
    assert done.stdout == "" and "expiry 'soon'" in done.stderr


def test_revoked_key_is_refused_within_a_second(
    keyed_proxy: ProxyProcess, database_url: str
) -> None:
    created = create_key(database_url, "bob")
    assert chat(keyed_proxy.url, created["key"]).status_code == 200  # now cached
    done = cli(database_url, "keys", "revoke", created["id"])
    assert done.returncode == 0, done.stderr
    assert seconds_until_refused([keyed_proxy.url], created["key"]) < REVOKE_BOUND
    # Told apart in the log only: the caller reads what an unknown key reads.
    assert_refused(keyed_proxy, created["key"], UNKNOWN, "revoked", created["id"])
    shown = admin("GET", keyed_proxy.url, f"/admin/keys/{created['id']}").json()
    assert shown["status"] == "revoked" and shown["lastUsedAt"] is not None


def test_expired_key_is_refused(keyed_proxy: ProxyProcess) -> None:
    created = admin(
        "POST", keyed_proxy.url, "/admin/keys", json={"user": "carol", "expiresIn": 1}
    ).json()
    key = created["key"]
    assert chat(keyed_proxy.url, key).status_code == 200
    time.sleep(1.1)
    assert_refused(
        keyed_proxy, key, "the key has expired: ask for a new one", "expired", created["id"]
    )
    assert admin("GET", keyed_proxy.url, f"/admin/keys/{created['id']}").json()["status"] == (
        "expired"
    )


def test_forbidden_calls_never_reach_the_vendor(
    keyed_proxy: ProxyProcess, database_url: str, fake: FakeVendors
) -> None:
    done = cli(database_url, "users", "set", "dave", "--providers", "openai,mock")
    assert done.returncode == 0, done.stderr
    key = create_key(database_url, "dave", "--models", "gpt-4o*,mock-*", "--features", "chat")[
        "key"
    ]
    tools = [{"name": "lookup", "description": "d", "parameters": {"type": "object"}}]
    cases = [
        ("/ai/chat", chat_body("anthropic", "claude-3-5-haiku-latest"), "provider 'anthropic'"),
        ("/ai/chat", chat_body("openai", "gpt-3.5-turbo"), "model 'gpt-3.5-turbo'"),
        ("/ai/chat/stream", chat_body("openai", "gpt-4o-mini"), "feature 'stream'"),
        ("/ai/chat", chat_body("openai", "gpt-4o-mini", tools=tools), "feature 'tools'"),
    ]
    for path, body, words in cases:
        response = httpx.post(
            f"{keyed_proxy.url}{path}",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "forbidden"
        assert words in response.json()["error"]["message"]
    assert fake.requests == []
    # The allowed call does reach it: the refusals above were the permissions, not a fault.
    allowed = chat(keyed_proxy.url, key, chat_body("openai", "gpt-4o-mini"))
    assert allowed.status_code == 200, allowed.text
    assert [request.model for request in fake.requests] == ["gpt-4o-mini"]


def test_no_key_in_the_proxy_log(keyed_proxy: ProxyProcess, database_url: str) -> None:
    created = create_key(database_url, "erin")
    assert chat(keyed_proxy.url, created["key"]).status_code == 200
    assert chat(keyed_proxy.url, created["key"][:-2] + "zz").status_code == 401
    made = admin("POST", keyed_proxy.url, "/admin/keys", json={"user": "erin"})
    assert made.status_code == 201
    wrong_admin = httpx.get(
        f"{keyed_proxy.url}/admin/keys", headers={"Authorization": "Bearer wrong-admin-key"}
    )
    assert wrong_admin.status_code == 401
    log = keyed_proxy.log_once_it_has("POST /ai/chat 200")
    assert "POST /ai/chat 200" in log  # the log is being written
    for secret in (created["key"], created["key"][:-2], made.json()["key"], ADMIN_KEY, USER_KEY):
        assert secret not in log
    assert "wrong-admin-key" not in log


def test_failed_authentications_are_limited_and_admin_api_off_without_a_key(
    fake_server: FakeVendors, tmp_path: Path
) -> None:
    """One proxy for two things: a low failure limit, and no ROBOTA_ADMIN_KEY."""
    env = {
        **vendor_env(fake_server),
        "ROBOTA_DATABASE_URL": f"sqlite:///{tmp_path / 'limit.db'}",
        "ROBOTA_API_KEYS": USER_KEY,
        "ROBOTA_AUTH_FAILURES_PER_MINUTE": "5",
    }
    limited = start_proxy(env, tmp_path / "proxy.log")
    try:
        off = httpx.get(f"{limited.url}/admin/keys", headers={"Authorization": "Bearer x"})
        assert off.status_code == 403
        assert "ROBOTA_ADMIN_KEY" in off.json()["error"]["message"]
        assert chat(limited.url, USER_KEY).status_code == 200  # successes do not count
        first_failure = time.monotonic()
        for _ in range(5):
            assert chat(limited.url, "rk_guessguess_" + "g" * 41).status_code == 401
        blocked = chat(limited.url, USER_KEY)  # refused before the credential is checked
        assert blocked.status_code == 429
        assert blocked.json()["error"]["code"] == "rate_limited"
        # A moving one-minute window: free again a minute after the first failure.
        assert_frees_a_minute_after(first_failure, blocked.headers["Retry-After"])
        # A WebSocket handshake is refused the same way, with the same JSON 429.
        ws_url = limited.url.replace("http://", "ws://") + "/ai/ws"
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(ws_url, additional_headers={"Authorization": f"Bearer {USER_KEY}"})
        assert refused.value.response.status_code == 429
        assert json.loads(refused.value.response.body)["error"]["code"] == "rate_limited"
        assert_frees_a_minute_after(first_failure, refused.value.response.headers["Retry-After"])
    finally:
        stop_proxy(limited)


def assert_frees_a_minute_after(started: float, retry_after: str) -> None:
    """``Retry-After`` (whole seconds, rounded up) is what is left of the minute that began
    at ``started``, give or take the round trips of the requests in between."""
    left = 60 - (time.monotonic() - started)
    assert left - 1 <= int(retry_after) <= 60, (retry_after, left)
