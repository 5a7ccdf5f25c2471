"""How many times a vendor is called for one ``RemoteAIProvider`` call, end to end: a real
proxy process with its default retry policy (2 extra tries per target) and a client with its
default one (``max_retries=2``), counted at the fake vendor.

The proxy's tries are the only ones: a vendor that is down sees 3 calls (not 3 x 3), one that
refuses the proxy's key sees 1, and a fallback chain adds exactly its own targets' tries.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest

from robota_client import RemoteAIProvider
from robota_client.errors import (
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from robota_proxy.testing import FakeVendors, Fault
from tests.e2e.conftest import USER_KEY, ProxyProcess, start_proxy, stop_proxy, vendor_env

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

VENDORS = {
    "openai": "gpt-4o-mini",
    "anthropic": "claude-3-5-haiku-latest",
    "google": "gemini-2.5-flash",
}
CHAIN = ["openai/gpt-4o-mini", "anthropic/claude-3-5-haiku-latest"]
UPSTREAM_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def defaults(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    home = tmp_path_factory.mktemp("attempts")
    env = {
        **vendor_env(fake_server),
        "ROBOTA_API_KEYS": USER_KEY,
        "ROBOTA_DATABASE_URL": f"sqlite:///{home / 'robota.db'}",
        # The default number of tries (the e2e fixtures turn them off unless asked); only
        # the back-off is shortened, so that the tests do not wait it out.
        "ROBOTA_UPSTREAM_RETRIES": "2",
        "ROBOTA_RETRY_BACKOFF_BASE": "0.01",
        "ROBOTA_RETRY_BACKOFF_MAX": "0.05",
        "ROBOTA_UPSTREAM_TIMEOUT": str(UPSTREAM_TIMEOUT),
        "ROBOTA_FALLBACKS": json.dumps({"fast": CHAIN}),
        "ROBOTA_CACHE_ENABLED": "false",
    }
    running = start_proxy(env, home / "proxy.log")
    yield running
    stop_proxy(running)


def marker() -> str:
    return f"n-{uuid.uuid4().hex[:8]}"


def calls(fake: FakeVendors, text: str, vendor: str | None = None) -> int:
    return sum(
        1
        for request in fake.requests
        if text in request.last_text and (vendor is None or request.vendor == vendor)
    )


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("vendor", sorted(VENDORS))
async def test_a_vendor_that_is_down_is_called_three_times(
    defaults: ProxyProcess, fake: FakeVendors, vendor: str
) -> None:
    text = marker()
    fake.script(Fault(status=503), match=text)
    async with RemoteAIProvider(defaults.url, USER_KEY, vendor, VENDORS[vendor]) as ai:
        with pytest.raises(UpstreamUnavailableError) as raised:
            await ai.chat(ask(text))
    assert calls(fake, text) == 3
    assert (raised.value.status, raised.value.code) == (503, "upstream_unavailable")
    assert raised.value.upstream_attempts == 3


async def test_a_stream_to_a_vendor_that_is_down_is_called_three_times(
    defaults: ProxyProcess, fake: FakeVendors
) -> None:
    text = marker()
    fake.script(Fault(status=503), match=text)
    async with RemoteAIProvider(defaults.url, USER_KEY, "openai", VENDORS["openai"]) as ai:
        with pytest.raises(UpstreamUnavailableError) as raised:
            async for _ in ai.chat_stream(ask(text)):
                pytest.fail("no content expected")
    assert calls(fake, text) == 3
    assert raised.value.upstream_attempts == 3


@pytest.mark.parametrize("vendor", sorted(VENDORS))
async def test_a_vendor_that_never_answers_is_a_timeout_after_three_calls(
    defaults: ProxyProcess, fake: FakeVendors, vendor: str
) -> None:
    text = marker()
    fake.script(Fault(latency=UPSTREAM_TIMEOUT * 4), match=text)
    started = time.monotonic()
    async with RemoteAIProvider(defaults.url, USER_KEY, vendor, VENDORS[vendor]) as ai:
        with pytest.raises(UpstreamTimeoutError) as raised:
            await ai.chat(ask(text))
    elapsed = time.monotonic() - started
    assert (raised.value.status, raised.value.code) == (504, "upstream_timeout")
    assert calls(fake, text) == 3
    assert raised.value.upstream_attempts == 3
    # Three upstream timeouts and two short back-offs; nine would take three times as long.
    assert 3 * UPSTREAM_TIMEOUT <= elapsed < 6 * UPSTREAM_TIMEOUT


@pytest.mark.parametrize("vendor", sorted(VENDORS))
async def test_a_vendor_refusing_the_proxys_key_is_called_once(
    defaults: ProxyProcess, fake: FakeVendors, vendor: str
) -> None:
    text = marker()
    fake.script(Fault(status=401), match=text)
    async with RemoteAIProvider(defaults.url, USER_KEY, vendor, VENDORS[vendor]) as ai:
        with pytest.raises(UpstreamError) as raised:
            await ai.chat(ask(text))
    assert calls(fake, text) == 1
    assert (raised.value.status, raised.value.code) == (502, "upstream_error")
    assert raised.value.upstream_attempts == 1
    assert "credentials" in raised.value.message


async def test_a_fallback_chain_adds_only_its_own_targets_tries(
    defaults: ProxyProcess, fake: FakeVendors
) -> None:
    text = marker()
    fake.script(Fault(status=503), match=text)
    async with RemoteAIProvider(defaults.url, USER_KEY, "auto", "fast") as ai:
        with pytest.raises(UpstreamUnavailableError) as raised:
            await ai.chat(ask(text))
    assert (calls(fake, text, "openai"), calls(fake, text, "anthropic")) == (3, 3)
    assert calls(fake, text) == 6
    assert raised.value.upstream_attempts == 6
