"""Alerts from real proxy processes to a real local receiver (``http.server`` in a thread):
a budget's 80% and 100% sent once each, also by two proxies sharing Redis and a database; a
receiver that is down costs the calls nothing and the alert is retried, then dropped with a
log line; a breaker opening and closing sends ``circuit_open`` then ``circuit_closed``.

The fake vendor reports more completion tokens than ``maxTokens`` allowed, which is what lets
a test cross 100% of a budget: the proxy holds each call's worst case before it runs, so a
vendor that keeps to its limits is refused just short of it."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from robota_proxy.observability.alerts import verify
from robota_proxy.testing import FakeVendors, Fault, Reply
from tests.e2e.conftest import ProxyProcess, free_port, start_proxy, stop_proxy, vendor_env

pytestmark = [pytest.mark.e2e]

ADMIN_KEY = "admin-key-for-alert-tests-0123456789"
SECRET = "alert-secret-for-tests-0123456789"
USER_KEY = "user-key-for-alert-tests-0123456789"
MODEL = "gpt-4o-mini"
#: $1000 per million tokens: a token costs $0.001, so a budget of $1 is 1000 tokens.
PRICES = {f"openai/{MODEL}": {"input": "1000", "output": "1000"}}


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


class Receiver:
    """A webhook receiver on 127.0.0.1 that records every POST and answers 204."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                received.append(Received(dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/robota"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def of_user(self, user: str) -> list[dict[str, Any]]:
        return [r.json for r in self.received if r.json["details"].get("user") == user]

    def wait_for(self, count: int, user: str | None = None, timeout: float = 10.0) -> None:
        """Until ``count`` alerts (of ``user``) arrived, then a moment more so that an extra
        one would be seen too."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = len(self.of_user(user)) if user else len(self.received)
            if got >= count:
                break
            time.sleep(0.05)
        time.sleep(0.5)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


def proxy_env(fake: FakeVendors, home: Path, webhook: str, **extra: str) -> dict[str, str]:
    prices = home / "prices.json"
    prices.write_text(json.dumps(PRICES))
    return {
        **vendor_env(fake),
        "ROBOTA_DATABASE_URL": f"sqlite:///{home / 'robota.db'}",
        "ROBOTA_ADMIN_KEY": ADMIN_KEY,
        "ROBOTA_PRICES_FILE": str(prices),
        "ROBOTA_CACHE_ENABLED": "false",
        "ROBOTA_ALERT_WEBHOOK_URL": webhook,
        "ROBOTA_ALERT_WEBHOOK_SECRET": SECRET,
        **extra,
    }


def new_user(proxy: ProxyProcess, permissions: dict[str, Any]) -> tuple[str, str]:
    user = f"alerted-{uuid.uuid4().hex[:10]}"
    response = httpx.post(
        f"{proxy.url}/admin/keys",
        json={"user": user, "permissions": permissions},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert response.status_code == 201, response.text
    return user, response.json()["key"]


def call(
    proxy: ProxyProcess, fake: FakeVendors, key: str, tokens: int, model: str = MODEL
) -> httpx.Response:
    """One chat whose vendor reports 10 prompt tokens and ``tokens - 10`` completion tokens."""
    text = f"alert-call {uuid.uuid4().hex}"
    fake.script(
        Reply(text="ok", prompt_tokens=10, completion_tokens=tokens - 10), match=text, times=1
    )
    return httpx.post(
        f"{proxy.url}/ai/chat",
        json={
            "provider": "openai",
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "options": {"maxTokens": 10},
        },
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


def budget_alert(user: str, key_id: str, threshold: int, used: str) -> dict[str, Any]:
    return {
        "user": user,
        "keyId": key_id,
        "period": time.strftime("%Y-%m", time.gmtime()),
        "threshold": threshold,
        "limitUsd": "1",
        "usedUsd": used,
    }


def key_id_of(key: str) -> str:
    """The public id inside ``rk_<id>_<secret>``."""
    return key.split("_")[1]


@pytest.fixture(scope="module")
def alerted(
    fake_server: FakeVendors, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    home = tmp_path_factory.mktemp("alerts")
    running = start_proxy(proxy_env(fake_server, home, receiver.url), home / "proxy.log")
    yield running
    stop_proxy(running)


def test_a_budget_crossing_80_then_100_percent_sends_one_signed_alert_each(
    alerted: ProxyProcess, receiver: Receiver, fake: FakeVendors
) -> None:
    user, key = new_user(alerted, {"monthlyBudgetUsd": "1"})
    assert call(alerted, fake, key, 410).status_code == 200  # $0.41
    assert call(alerted, fake, key, 300).status_code == 200  # $0.71
    receiver.wait_for(1, user, timeout=1.0)
    assert receiver.of_user(user) == []
    assert call(alerted, fake, key, 110).status_code == 200  # $0.82: 80%
    receiver.wait_for(1, user)
    assert call(alerted, fake, key, 10).status_code == 200  # $0.83: nothing new
    assert call(alerted, fake, key, 170).status_code == 200  # $1.00: 100%
    assert call(alerted, fake, key, 10).status_code == 402  # refused: no alert either
    receiver.wait_for(2, user)
    alerts = receiver.of_user(user)
    assert [(alert["type"], alert["details"]) for alert in alerts] == [
        ("budget_threshold", budget_alert(user, key_id_of(key), 80, "0.82")),
        ("budget_threshold", budget_alert(user, key_id_of(key), 100, "1")),
    ]
    for received in receiver.received:
        if received.json["details"].get("user") == user:
            assert verify(SECRET.encode(), received.headers, received.body) is True
            assert received.headers["Content-Type"] == "application/json"
    # Nothing but ids and numbers: no key, no message text.
    assert key not in repr(alerts) and "alert-call" not in repr(alerts)


def test_two_proxies_sharing_redis_send_each_threshold_once(
    fake_server: FakeVendors,
    fake: FakeVendors,
    receiver: Receiver,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    home = tmp_path_factory.mktemp("alerts_two")
    env = proxy_env(fake_server, home, receiver.url, ROBOTA_REDIS_URL=redis_url)
    first = start_proxy(env, home / "first.log")
    try:
        second = start_proxy(env, home / "second.log")
        try:
            user, key = new_user(first, {"monthlyBudgetUsd": "1"})
            # 80% on the first, then calls above it on both, then 100% on the second.
            plan = [(first, 810), (second, 10), (first, 10), (second, 10), (first, 10)]
            plan += [(second, 150), (first, 10)]
            statuses = [call(proxy, fake, key, tokens).status_code for proxy, tokens in plan]
            assert statuses == [200, 200, 200, 200, 200, 200, 402]
            receiver.wait_for(2, user)
            assert [(alert["type"], alert["details"]) for alert in receiver.of_user(user)] == [
                ("budget_threshold", budget_alert(user, key_id_of(key), 80, "0.81")),
                ("budget_threshold", budget_alert(user, key_id_of(key), 100, "1")),
            ]
        finally:
            stop_proxy(second)
    finally:
        stop_proxy(first)


def test_a_receiver_that_is_down_delays_no_call_and_the_alert_is_dropped_after_retries(
    fake_server: FakeVendors, fake: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = tmp_path_factory.mktemp("alerts_down")
    dead = f"http://127.0.0.1:{free_port()}/hooks/robota"
    env = proxy_env(
        fake_server,
        home,
        dead,
        ROBOTA_ALERT_ATTEMPTS="3",
        ROBOTA_ALERT_BACKOFF_SECONDS="1",
    )
    proxy = start_proxy(env, home / "proxy.log")
    try:
        _, key = new_user(proxy, {"monthlyBudgetUsd": "1"})
        for tokens in (900, 20, 20):  # 80% on the first call, then two more
            started = time.monotonic()
            assert call(proxy, fake, key, tokens).status_code == 200
            assert time.monotonic() - started < 1.0
        # The alert is still being retried (1 s, then 2 s apart) while the calls went on.
        assert "dropped after" not in proxy.log()
        log = proxy.log_once_it_has("dropped after 3 attempts", timeout=10)
    finally:
        stop_proxy(proxy)
    dropped = [line for line in log.splitlines() if "dropped after" in line]
    assert len(dropped) == 1
    assert dropped[0].endswith(
        "(budget_threshold) dropped after 3 attempts: receiver unavailable (ConnectError)"
    )
    assert dead not in log


def test_a_breaker_opening_then_closing_sends_circuit_open_then_circuit_closed(
    fake_server: FakeVendors,
    fake: FakeVendors,
    receiver: Receiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    home = tmp_path_factory.mktemp("alerts_breaker")
    model = f"gpt-alerts-{uuid.uuid4().hex[:6]}"
    env = proxy_env(
        fake_server,
        home,
        receiver.url,
        ROBOTA_API_KEYS=USER_KEY,
        ROBOTA_BREAKER_ENABLED="true",
        ROBOTA_BREAKER_FAILURES="2",
        ROBOTA_BREAKER_COOLDOWN_SECONDS="1",
    )
    proxy = start_proxy(env, home / "proxy.log")
    target = f"openai/{model}"
    try:
        fake.script(Fault(status=503), match="fail-now", vendor="openai")
        for _ in range(2):
            answer = httpx.post(
                f"{proxy.url}/ai/chat",
                json={
                    "provider": "openai",
                    "model": model,
                    "messages": [{"role": "user", "content": "fail-now"}],
                },
                headers={"Authorization": f"Bearer {USER_KEY}"},
                timeout=10,
            )
            assert answer.status_code == 503, answer.text
        time.sleep(1.2)  # the cool-down: the next call is the probe, and it succeeds
        answer = httpx.post(
            f"{proxy.url}/ai/chat",
            json={
                "provider": "openai",
                "model": model,
                "messages": [{"role": "user", "content": "fine now"}],
            },
            headers={"Authorization": f"Bearer {USER_KEY}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            mine = [r.json for r in receiver.received if r.json["details"].get("target") == target]
            if len(mine) >= 2:
                break
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop_proxy(proxy)
    mine = [r.json for r in receiver.received if r.json["details"].get("target") == target]
    assert [(alert["type"], alert["details"]) for alert in mine] == [
        ("circuit_open", {"target": target, "consecutiveFailures": 2}),
        ("circuit_closed", {"target": target}),
    ]
