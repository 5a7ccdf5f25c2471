"""Vendor failures arrive at the client as the contract's typed errors, keys never echoed."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from robota_client import RemoteAIProvider
from robota_client.errors import (
    RateLimitedError,
    RemoteError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from robota_proxy.testing import FakeVendors, Fault, Reply
from tests.e2e.conftest import (
    USER_KEY,
    VENDOR_KEY,
    ProxyProcess,
    start_proxy,
    stop_proxy,
    vendor_env,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

VENDORS = {
    "openai": "gpt-4o-mini",
    "anthropic": "claude-3-5-haiku-latest",
    "google": "gemini-2.5-flash",
}


@pytest.fixture(params=sorted(VENDORS))
async def remote(
    request: pytest.FixtureRequest, proxy: ProxyProcess
) -> AsyncIterator[RemoteAIProvider]:
    vendor: str = request.param
    async with RemoteAIProvider(proxy.url, USER_KEY, vendor, VENDORS[vendor], max_retries=0) as p:
        yield p


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_vendor_429_is_rate_limited_with_retry_after(
    remote: RemoteAIProvider, fake: FakeVendors
) -> None:
    fake.script(Fault(status=429, retry_after=7), match="busy")
    with pytest.raises(RateLimitedError) as raised:
        await remote.chat(ask("busy"))
    assert raised.value.status == 429
    assert raised.value.retry_after == 7
    assert raised.value.request_id


async def test_vendor_429_on_stream_is_an_http_error_before_any_event(
    remote: RemoteAIProvider, fake: FakeVendors
) -> None:
    fake.script(Fault(status=429, retry_after=3), match="busy")
    with pytest.raises(RateLimitedError):
        async for _ in remote.chat_stream(ask("busy")):
            pytest.fail("no content expected")


@pytest.mark.parametrize(
    ("status", "error", "code", "proxy_status"),
    [
        (500, UpstreamError, "upstream_error", 502),
        (503, UpstreamUnavailableError, "upstream_unavailable", 503),
    ],
)
async def test_vendor_server_errors(
    remote: RemoteAIProvider,
    fake: FakeVendors,
    status: int,
    error: type[RemoteError],
    code: str,
    proxy_status: int,
) -> None:
    fake.script(Fault(status=status), match="broken")
    with pytest.raises(error) as raised:
        await remote.chat(ask("broken"))
    assert raised.value.code == code
    assert raised.value.status == proxy_status


async def test_vendor_timeout(remote: RemoteAIProvider, fake: FakeVendors) -> None:
    fake.script(Fault(latency=5.0), match="slow")
    started = time.monotonic()
    with pytest.raises(UpstreamTimeoutError) as raised:
        await remote.chat(ask("slow"))
    assert (raised.value.status, raised.value.code) == (504, "upstream_timeout")
    assert len(fake.requests) == 1
    assert time.monotonic() - started < 4.5  # the proxy's upstream timeout is 2 s


async def test_a_stream_cut_midway_is_finished_and_the_caller_gets_it_once(
    remote: RemoteAIProvider, fake: FakeVendors
) -> None:
    """Anthropic continues from the text so far (a prefill, no seam); OpenAI and Gemini take
    no prefill, so the proxy starts the answer again after a ``restart`` event and
    ``chat_stream`` passes on only what the caller has not seen."""
    words = "one two three four five six"
    fake.script(Reply(text=words, fault=Fault(drop_after=3)), match="cut", times=1)
    fake.script(Reply(text=words), match="cut")
    received = [chunk async for chunk in remote.chat_stream(ask("cut"))]
    assert "".join(received) == words
    sent = [request.prefill for request in fake.requests]
    prefill = "one two three" if remote.target_provider == "anthropic" else None
    assert sent == [None, prefill]


async def test_a_stream_that_keeps_breaking_ends_with_an_error_event(
    remote: RemoteAIProvider, fake: FakeVendors
) -> None:
    """Each target continues a stream once: the second cut is the caller's error."""
    fake.script(
        Reply(text=" ".join(f"w{i}" for i in range(12)), fault=Fault(drop_after=3)), match="cut"
    )
    received: list[str] = []
    with pytest.raises(UpstreamError):
        async for chunk in remote.chat_stream(ask("cut"), raw_restarts=True):
            received.append(chunk)
    assert received, "text before the cut reaches the caller"
    assert len(fake.requests) == 2


async def test_a_malformed_chunk_is_skipped_and_the_stream_goes_on(
    remote: RemoteAIProvider, fake: FakeVendors
) -> None:
    """The garbled third chunk ("three ") is dropped; the rest of the answer and its usage
    arrive from the same single vendor call."""
    fake.script(Reply(text="one two three four", fault=Fault(malformed_at=2)), match="garbled")
    received = [chunk async for chunk in remote.chat_stream(ask("garbled"))]
    assert "".join(received) == "one two four"
    assert len(fake.requests) == 1


@pytest.mark.parametrize("vendor", ["openai", "google"])
async def test_vendor_rejecting_the_proxy_key_never_echoes_it(
    broken_proxy: ProxyProcess, vendor: str
) -> None:
    async with RemoteAIProvider(
        broken_proxy.url, USER_KEY, vendor, VENDORS[vendor], max_retries=0
    ) as remote:
        with pytest.raises(UpstreamError) as raised:
            await remote.chat(ask("hello"))
    assert raised.value.status == 502
    text = str(raised.value) + raised.value.message
    assert "wrong" not in text and "sk-" not in text and "9876543210" not in text
    assert "credentials" in raised.value.message


async def test_unreachable_vendor_is_unavailable(broken_proxy: ProxyProcess) -> None:
    async with RemoteAIProvider(
        broken_proxy.url, USER_KEY, "anthropic", VENDORS["anthropic"], max_retries=0
    ) as remote:
        with pytest.raises(UpstreamUnavailableError) as raised:
            await remote.chat(ask("hello"))
    assert raised.value.status == 503


@pytest.fixture(scope="module")
def dead_proxy(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """Every vendor's base URL on a port nothing listens on (bound for its number, then
    closed), with the default number of server-side tries and a short back-off."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {
        **vendor_env(fake_server),
        "ROBOTA_OPENAI_BASE_URL": f"{dead}/v1",
        "ROBOTA_ANTHROPIC_BASE_URL": dead,
        "ROBOTA_GOOGLE_BASE_URL": dead,
        "ROBOTA_API_KEYS": USER_KEY,
        "ROBOTA_UPSTREAM_RETRIES": "2",
        "ROBOTA_RETRY_BACKOFF_BASE": "0.01",
        "ROBOTA_RETRY_BACKOFF_MAX": "0.05",
    }
    running = start_proxy(env, tmp_path_factory.mktemp("dead") / "proxy.log")
    yield running
    stop_proxy(running)


@pytest.mark.parametrize("vendor", sorted(VENDORS))
@pytest.mark.parametrize("streamed", [False, True], ids=["chat", "stream"])
async def test_a_refused_connection_is_unavailable_for_every_vendor(
    dead_proxy: ProxyProcess, vendor: str, streamed: bool
) -> None:
    started = time.monotonic()
    async with RemoteAIProvider(dead_proxy.url, USER_KEY, vendor, VENDORS[vendor]) as remote:
        with pytest.raises(UpstreamUnavailableError) as raised:
            if streamed:
                async for _ in remote.chat_stream(ask("hello")):
                    pytest.fail("no content expected")
            else:
                await remote.chat(ask("hello"))
    elapsed = time.monotonic() - started
    assert (raised.value.status, raised.value.code) == (503, "upstream_unavailable")
    assert raised.value.message == f"could not reach {vendor}"
    # The proxy's three tries, and none by the client on top.
    assert raised.value.upstream_attempts == 3
    assert elapsed < 1.5  # a refused connection is known at once: nothing waits a timeout


async def test_logs_never_contain_keys(
    proxy: ProxyProcess, broken_proxy: ProxyProcess, fake: FakeVendors
) -> None:
    # Produce some traffic of every kind first: success, refusal, vendor errors.
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        await client.post("/ai/chat", json={}, headers={"Authorization": f"Bearer {USER_KEY}"})
        await client.post("/ai/chat", json={}, headers={"Authorization": "Bearer guess-key-123"})
    async with RemoteAIProvider(broken_proxy.url, USER_KEY, "openai", "gpt-4o", max_retries=0) as r:
        with pytest.raises(RemoteError):
            await r.chat(ask("hello"))
    for running in (proxy, broken_proxy):
        log = running.log()
        assert "resources opened" in log, "the log is being captured"
        for secret in (VENDOR_KEY, USER_KEY, "sk-wrong-vendor-key", "guess-key-123"):
            assert secret not in log
