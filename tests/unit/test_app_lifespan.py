"""Resources are opened and closed exactly once, standalone and in each way of mounting."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.testclient import TestClient

from robota_proxy import ProxyApp, create_app, mount
from robota_proxy.policy.principals import UserPermissions
from robota_proxy.settings import Settings

KEY = "unit-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = {"provider": "mock", "model": "mock-1", "messages": [{"role": "user", "content": "hi"}]}


class Counter:
    def __init__(self, proxy: ProxyApp) -> None:
        self.opened = 0
        self.closed = 0
        registry = proxy.resources.registry
        original_open, original_close = registry.open, registry.aclose

        def counted_open() -> None:
            self.opened += 1
            original_open()

        async def counted_close() -> None:
            self.closed += 1
            await original_close()

        registry.open = counted_open  # type: ignore[method-assign]
        registry.aclose = counted_close  # type: ignore[method-assign]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def proxy() -> ProxyApp:
    return create_app(Settings(api_keys=[KEY], _env_file=None))  # type: ignore[call-arg]


def test_standalone(proxy: ProxyApp) -> None:
    counter = Counter(proxy)
    with TestClient(proxy) as client:
        assert counter.opened == 1
        assert client.post("/ai/chat", json=BODY, headers=AUTH).status_code == 200
    assert (counter.opened, counter.closed) == (1, 1)


def test_mount_helper_ties_resources_to_the_host(proxy: ProxyApp) -> None:
    counter = Counter(proxy)
    host = FastAPI()

    @host.get("/own")
    async def own() -> dict[str, bool]:
        return {"own": True}

    mount(host, "/llm", proxy)
    with TestClient(host) as client:
        assert counter.opened == 1
        assert client.get("/own").json() == {"own": True}
        assert client.post("/llm/ai/chat", json=BODY, headers=AUTH).status_code == 200
        assert client.post("/llm/ai/chat", json=BODY, headers=AUTH).status_code == 200
        assert counter.opened == 1
    assert (counter.opened, counter.closed) == (1, 1)


def test_host_lifespan_entering_proxy_lifespan(proxy: ProxyApp) -> None:
    counter = Counter(proxy)
    host = FastAPI(lifespan=proxy.lifespan)
    host.mount("/llm", proxy)
    with TestClient(host) as client:
        assert client.post("/llm/ai/chat", json=BODY, headers=AUTH).status_code == 200
    assert (counter.opened, counter.closed) == (1, 1)


def test_bare_mount_opens_once_on_first_requests(
    proxy: ProxyApp, caplog: pytest.LogCaptureFixture
) -> None:
    counter = Counter(proxy)
    host = Starlette()
    host.mount("/llm", proxy)
    with TestClient(host) as client:
        assert counter.opened == 0
        with ThreadPoolExecutor(8) as pool:
            statuses = list(
                pool.map(
                    lambda _: client.post("/llm/ai/chat", json=BODY, headers=AUTH).status_code,
                    range(16),
                )
            )
        assert statuses == [200] * 16
        # Nothing closes a bare mount; the test does, on the loop that opened it, so that no
        # pooled database connection is left to be finalised on a closed loop later.
        client.portal.call(proxy.resources.close)  # type: ignore[union-attr]
    assert counter.opened == 1
    assert "mounted without its lifespan" in caplog.text


def test_auth_disabled_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    open_proxy = create_app(Settings(auth="disabled", _env_file=None))  # type: ignore[call-arg]
    assert "AUTHENTICATION IS DISABLED" in caplog.text
    with TestClient(open_proxy) as client:
        assert client.post("/ai/chat", json=BODY).status_code == 200
    closed_proxy = create_app(Settings(_env_file=None))  # type: ignore[call-arg]
    with TestClient(closed_proxy) as client:
        assert client.post("/ai/chat", json=BODY).status_code == 401


@pytest.mark.anyio
async def test_every_resource_is_closed_once_at_the_outermost_exit(proxy: ProxyApp) -> None:
    resources = proxy.resources
    owned = {
        "registry": resources.registry,
        "database": resources.database,
        "streams": resources.streams,
        "response_cache": resources.response_cache,
        "limits": resources.limits,
    }
    closed: list[str] = []
    for name, resource in owned.items():
        original = resource.aclose

        async def counted(name: str = name, original: Any = original) -> None:
            closed.append(name)
            await original()

        resource.aclose = counted  # type: ignore[method-assign]

    async with proxy.lifespan():
        async with proxy.lifespan():  # a host entering the lifespan of a standalone app
            pass
        assert closed == []
    assert sorted(closed) == sorted(owned)
    # The app's parts use the very objects the resources close.
    assert proxy.streams is resources.streams and proxy.limits is resources.limits
    assert proxy.response_cache is resources.response_cache


@pytest.mark.anyio
async def test_stop_waits_for_the_last_used_write_of_a_key(proxy: ProxyApp) -> None:
    """The last-used time of a key is written in the background; a stop right after the
    request waits for it instead of closing the database under it."""
    store = proxy.key_store
    original_touch = store.touch

    async def slow_touch(used: Any) -> None:  # a busy database
        await anyio.sleep(0.3)
        await original_touch(used)

    store.touch = slow_touch  # type: ignore[method-assign]
    async with proxy.lifespan():
        key, record = await store.create_key("alice", UserPermissions())
        transport = httpx.ASGITransport(app=proxy)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as http:
            answer = await http.post("/ai/chat", json=BODY, headers=bearer(key))
            assert answer.status_code == 200
    async with proxy.lifespan():
        used = await store.get_key(record.key_id)
    assert used is not None and used.last_used_at is not None


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
