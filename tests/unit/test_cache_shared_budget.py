"""A shared cache scope in the whole app, in process: a budgeted caller (whose vendor call the
metering bounds with ``reserve_max_tokens``) and an unbudgeted one asking the same
deterministic request share one cache entry, because the bound goes on the call record and
not into the parsed request the cache keys on."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from robota_proxy.app import create_app
from robota_proxy.settings import Settings
from robota_proxy.testing import FakeVendors

pytestmark = pytest.mark.anyio

SECRET = "cache-shared-secret-" + "0123456789abcdef" * 4
NS = "https://robota.dev/permissions"
VENDOR_KEY = "sk-vendor-cache-shared"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def vendors() -> Iterator[FakeVendors]:
    with FakeVendors(api_key=VENDOR_KEY) as fake:
        yield fake


def token(user: str, **permissions: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user, "iat": now, "exp": now + 300}
    if permissions:
        claims[NS] = permissions
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
async def proxy(tmp_path: Path, vendors: FakeVendors) -> AsyncIterator[httpx.AsyncClient]:
    vendors.reset()
    settings = Settings(
        jwt_secret=SECRET,
        jwt_trust_claims=True,
        database_url=f"sqlite:///{tmp_path / 'robota.db'}",
        openai_api_key=VENDOR_KEY,
        openai_base_url=vendors.openai_base_url,
        cache_scope="shared",
        reserve_max_tokens=4096,
        upstream_retries=0,
        breaker_enabled=False,
    )
    app = create_app(settings)
    async with (
        app.lifespan(),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://proxy"
        ) as client,
    ):
        yield client


BODY = {
    "provider": "openai",
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "the same question"}],
    "options": {"temperature": 0},
}


async def test_a_budgeted_and_an_unbudgeted_caller_share_one_cache_entry(
    proxy: httpx.AsyncClient, vendors: FakeVendors
) -> None:
    budgeted = {"Authorization": f"Bearer {token('bea', monthlyBudgetUsd='5')}"}
    unbudgeted = {"Authorization": f"Bearer {token('uli')}"}
    first = await proxy.post("/ai/chat", json=BODY, headers=budgeted)
    assert first.status_code == 200, first.text
    assert first.headers["x-robota-cache"] == "MISS"
    second = await proxy.post("/ai/chat", json=BODY, headers=unbudgeted)
    assert second.status_code == 200, second.text
    assert second.headers["x-robota-cache"] == "HIT"
    assert second.json()["content"] == first.json()["content"]
    (call,) = vendors.requests  # one vendor call for both callers
    # The budgeted caller's vendor call was bounded as its reservation assumed.
    assert call.body["max_tokens"] == 4096
    # And the other way round: the unbudgeted caller's entry serves the budgeted one.
    vendors.reset()
    other = {**BODY, "messages": [{"role": "user", "content": "another question"}]}
    assert (await proxy.post("/ai/chat", json=other, headers=unbudgeted)).status_code == 200
    again = await proxy.post("/ai/chat", json=other, headers=budgeted)
    assert again.headers["x-robota-cache"] == "HIT"
    (call,) = vendors.requests
    assert "max_tokens" not in call.body
