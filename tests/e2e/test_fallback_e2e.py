"""Server-side retries, fallback chains and the request deadline in a real proxy process in
front of the fake vendors (the official OpenAI and Anthropic SDKs inside the proxy)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from robota_proxy.testing import FakeVendors, Fault, Reply
from tests.e2e.conftest import (
    USER_KEY,
    VENDOR_KEY,
    ProxyProcess,
    start_proxy,
    stop_proxy,
    vendor_env,
)

pytestmark = [pytest.mark.e2e]

CHAIN = ["openai/gpt-4o-mini", "anthropic/claude-3-5-haiku-latest"]


@pytest.fixture(scope="module")
def resilient(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    home = tmp_path_factory.mktemp("resilient")
    env = {
        **vendor_env(fake_server),
        "ROBOTA_API_KEYS": USER_KEY,
        "ROBOTA_DATABASE_URL": f"sqlite:///{home / 'robota.db'}",
        "ROBOTA_UPSTREAM_RETRIES": "2",
        "ROBOTA_RETRY_BACKOFF_BASE": "0.05",
        "ROBOTA_RETRY_BACKOFF_MAX": "0.2",
        "ROBOTA_RETRY_AFTER_MAX": "3",
        "ROBOTA_FALLBACKS": json.dumps({"fast": CHAIN}),
        "ROBOTA_MAX_REQUEST_TIMEOUT": "20",
        "ROBOTA_UPSTREAM_TIMEOUT": "10",
        # Every request here must reach the vendors.
        "ROBOTA_CACHE_ENABLED": "false",
    }
    running = start_proxy(env, home / "proxy.log")
    yield running
    stop_proxy(running)


def body(
    text: str, *, provider: str = "openai", model: str = "gpt-4o-mini", **options: Any
) -> dict[str, Any]:
    return {
        "provider": provider,
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "options": options,
    }


def post(proxy: ProxyProcess, payload: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{proxy.url}/ai/chat",
        json=payload,
        headers={"Authorization": f"Bearer {USER_KEY}"},
        timeout=30,
    )


def stream(proxy: ProxyProcess, payload: dict[str, Any]) -> tuple[int, list[tuple[str, Any]]]:
    with (
        httpx.Client(timeout=30) as client,
        connect_sse(
            client,
            "POST",
            f"{proxy.url}/ai/chat/stream",
            json=payload,
            headers={"Authorization": f"Bearer {USER_KEY}"},
        ) as source,
    ):
        if source.response.status_code != 200:
            source.response.read()
            return source.response.status_code, [("http", source.response.json())]
        return 200, [(item.event, item.json()) for item in source.iter_sse()]


def calls(fake: FakeVendors, marker: str, vendor: str | None = None) -> int:
    return sum(
        1
        for request in fake.requests
        if marker in request.last_text and (vendor is None or request.vendor == vendor)
    )


def marker() -> str:
    return f"r-{uuid.uuid4().hex[:8]}"


def test_a_vendor_500_is_retried_and_answered_once(
    resilient: ProxyProcess, fake: FakeVendors
) -> None:
    text = marker()
    fake.script(Fault(status=500), match=text, times=1)
    answer = post(resilient, body(text))
    assert answer.status_code == 200, answer.text
    assert answer.json()["content"] == f"Echo: {text}"
    assert answer.json()["metadata"]["attempts"] == 2
    assert calls(fake, text) == 2


def test_a_vendor_429_retry_after_is_waited_for(resilient: ProxyProcess, fake: FakeVendors) -> None:
    text = marker()
    fake.script(Fault(status=429, retry_after=1), match=text, times=1)
    started = time.monotonic()
    answer = post(resilient, body(text, provider="anthropic", model="claude-3-5-haiku-latest"))
    waited = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert calls(fake, text) == 2
    # The back-off alone would be 0.05 s: the vendor's one second was honoured.
    assert waited >= 0.9


def test_a_retry_after_beyond_the_cap_is_passed_on(
    resilient: ProxyProcess, fake: FakeVendors
) -> None:
    text = marker()
    fake.script(Fault(status=429, retry_after=30), match=text)
    answer = post(resilient, body(text))
    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "30"
    assert calls(fake, text) == 1


def test_an_alias_falls_back_to_the_next_pair_and_says_which_served(
    resilient: ProxyProcess, fake: FakeVendors
) -> None:
    text = marker()
    fake.script(Fault(status=503), match=text, vendor="openai")
    answer = post(resilient, body(text, provider="auto", model="fast"))
    assert answer.status_code == 200, answer.text
    metadata = answer.json()["metadata"]
    assert (metadata["provider"], metadata["model"]) == ("anthropic", "claude-3-5-haiku-latest")
    assert metadata["attempts"] == 4
    assert (calls(fake, text, "openai"), calls(fake, text, "anthropic")) == (3, 1)
    # One log line per attempt: provider, model, outcome, time; never a key. The lines go
    # through a queued handler, so they may trail the answer: wait for this call's last one
    # (earlier tests on this proxy wrote the same target's "ok").
    label = f"for {answer.headers['x-request-id']} auto/fast:"
    log = resilient.log_once_it_has(f"{label} anthropic/claude-3-5-haiku-latest ok")
    lines = [line for line in log.splitlines() if "upstream attempt" in line and label in line]
    assert sum("openai/gpt-4o-mini upstream_unavailable" in line for line in lines) >= 3
    assert any("anthropic/claude-3-5-haiku-latest ok" in line for line in lines)
    assert VENDOR_KEY not in log and USER_KEY not in log


def test_an_alias_stream_falls_back_before_its_first_event(
    resilient: ProxyProcess, fake: FakeVendors
) -> None:
    text = marker()
    fake.script(Fault(status=500), match=text, vendor="openai")
    status, events = stream(resilient, body(text, provider="auto", model="fast"))
    assert status == 200
    assert [name for name, _ in events][-1] == "done"
    assert events[-1][1]["message"]["metadata"]["provider"] == "anthropic"
    assert (calls(fake, text, "openai"), calls(fake, text, "anthropic")) == (3, 1)


def test_the_deadline_covers_the_whole_call(resilient: ProxyProcess, fake: FakeVendors) -> None:
    text = marker()
    fake.script(Fault(latency=5), match=text)
    started = time.monotonic()
    answer = post(resilient, body(text, timeout=1))
    elapsed = time.monotonic() - started
    assert answer.status_code == 504
    assert answer.json()["error"]["code"] == "upstream_timeout"
    assert elapsed < 3  # the vendor would take 5 s, and retries more


def test_the_deadline_ends_a_slow_stream_with_an_error_event(
    resilient: ProxyProcess, fake: FakeVendors
) -> None:
    text = marker()
    fake.script(Reply(text="a b c d e f g h", fault=Fault(chunk_latency=0.4)), match=text)
    started = time.monotonic()
    status, events = stream(resilient, body(text, timeout=1.5))
    assert status == 200 and time.monotonic() - started < 4
    assert events[0][0] == "delta"
    assert events[-1][0] == "error" and events[-1][1]["code"] == "upstream_timeout"
    assert calls(fake, text) == 1


def test_a_stream_that_broke_after_text_restarts_and_finishes_the_answer(
    resilient: ProxyProcess, fake: FakeVendors
) -> None:
    """OpenAI takes no prefill: the proxy asks again and says ``restart`` before the fresh
    answer, so the caller's assembled message is the whole answer once."""
    text = marker()
    words = "one two three four five six"
    fake.script(Reply(text=words, fault=Fault(drop_after=2)), match=text, times=1)
    fake.script(Reply(text=words), match=text)
    status, events = stream(resilient, body(text))
    assert status == 200
    names = [name for name, _ in events]
    assert names[:3] == ["delta", "delta", "restart"]
    assert names[-1] == "done" and names.count("restart") == 1
    restart = events[2][1]
    assert restart["reason"] == "upstream_error: openai sent a malformed or truncated stream"
    after = [data["content"] for name, data in events[3:] if name == "delta"]
    assert "".join(after) == words
    assert events[-1][1]["message"]["content"] == words
    assert calls(fake, text) == 2


def test_a_stream_that_breaks_again_after_its_restart_ends_with_an_error(
    resilient: ProxyProcess, fake: FakeVendors
) -> None:
    text = marker()
    fake.script(Reply(text="one two three four five six", fault=Fault(drop_after=2)), match=text)
    status, events = stream(resilient, body(text))
    assert status == 200
    names = [name for name, _ in events]
    assert names == ["delta", "delta", "restart", "delta", "delta", "error"]
    assert events[-1][1]["code"] == "upstream_error"
    assert calls(fake, text) == 2


def test_a_stream_refused_before_its_first_event_is_retried(
    resilient: ProxyProcess, fake: FakeVendors
) -> None:
    text = marker()
    fake.script(Fault(status=503), match=text, times=1)
    status, events = stream(resilient, body(text))
    assert status == 200 and events[-1][0] == "done"
    assert calls(fake, text) == 2
