"""A caller that walks away mid-stream: the proxy closes the vendor call promptly, and the
sync facade works over the same real sockets."""

from __future__ import annotations

import time

import httpx
import pytest

from robota_client import SyncRemoteAIProvider
from robota_proxy.testing import FakeVendors, Fault, Reply
from tests.e2e.conftest import USER_KEY, ProxyProcess

pytestmark = [pytest.mark.e2e]


@pytest.mark.parametrize("vendor", ["openai", "anthropic", "google"])
def test_client_disconnect_closes_the_vendor_stream(
    proxy: ProxyProcess, fake: FakeVendors, vendor: str
) -> None:
    words = " ".join(f"w{i}" for i in range(200))
    fake.script(Reply(text=words, fault=Fault(chunk_latency=0.05)), match="long answer")
    body = {
        "provider": vendor,
        "model": "any-model",
        "messages": [{"role": "user", "content": "a long answer"}],
    }
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    with (
        httpx.Client(base_url=proxy.url, timeout=10) as http,
        http.stream("POST", "/ai/chat/stream", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        next(response.iter_lines())
        left_at = time.monotonic()
    # Leaving the block closed the connection; the vendor must see its stream abandoned.
    while fake.aborted_streams == 0 and time.monotonic() - left_at < 3:
        time.sleep(0.02)
    delay = time.monotonic() - left_at
    assert fake.aborted_streams == 1, "the vendor stream was not closed"
    assert fake.completed_streams == 0
    assert delay < 1.0, f"vendor stream closed {delay:.2f}s after the client left"


def test_sync_facade(proxy: ProxyProcess, fake: FakeVendors) -> None:
    fake.script(Reply(text="synchronous answer"), match="sync please")
    with SyncRemoteAIProvider(proxy.url, USER_KEY, "openai", "gpt-4o-mini") as ai:
        answer = ai.chat([{"role": "user", "content": "sync please"}])
        assert answer.content == "synchronous answer"
        assert "".join(ai.chat_stream([{"role": "user", "content": "sync stream"}])) == (
            "Echo: sync stream"
        )
        assert ai.models()["mock"] == ["mock-1"]
