"""Each adapter, on its production connection pool, against real sockets on 127.0.0.1 that
fail the way networks do: a vendor that cannot be reached (refused connection, unknown host,
connection reset before any answer) is 503 ``upstream_unavailable``; one that takes the
connection but never answers is 504 ``upstream_timeout``.

No mocks: the OpenAI adapter's SDK-on-aiohttp stack names a refused connection a timeout,
which only shows with a real refused connection.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from robota_client.messages import ChatRequest
from robota_proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnavailable
from robota_proxy.upstreams.anthropic import AnthropicUpstream
from robota_proxy.upstreams.base import Upstream
from robota_proxy.upstreams.google import GoogleUpstream
from robota_proxy.upstreams.openai import OpenAIUpstream

pytestmark = pytest.mark.anyio

KEY = "sk-test-network-0123456789abcdef"
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest", "google": "gemini"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def closed_port() -> int:
    """A port nothing listens on: bound to learn a free number, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class _Server:
    """Accepts connections and hands each to ``handle`` on a thread of its own."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._handle = handle
        self.port: int = self._sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self._sock.close()


def _reset(conn: socket.socket) -> None:
    """Read the request, then abort the connection (RST) without a byte of answer."""
    conn.recv(65536)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _silent(conn: socket.socket) -> None:
    """Read the request and never answer (until the client gives up)."""
    with conn:
        while conn.recv(65536):
            pass


@pytest.fixture
def resetting() -> Iterator[_Server]:
    server = _Server(_reset)
    yield server
    server.close()


@pytest.fixture
def silent() -> Iterator[_Server]:
    server = _Server(_silent)
    yield server
    server.close()


@pytest.fixture(params=sorted(MODELS))
def vendor(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def make(vendor: str, base: str, timeout: float = 5.0) -> Upstream:
    if vendor == "openai":
        return OpenAIUpstream(api_key=KEY, base_url=f"{base}/v1", timeout=timeout)
    if vendor == "anthropic":
        return AnthropicUpstream(api_key=KEY, base_url=base, timeout=timeout)
    return GoogleUpstream(api_key=KEY, base_url=base, timeout=timeout)


def request(vendor: str) -> ChatRequest:
    return ChatRequest.model_validate(
        {
            "provider": vendor,
            "model": MODELS[vendor],
            "messages": [{"role": "user", "content": "hi"}],
        }
    )


async def failure(upstream: Upstream, vendor: str, *, streamed: bool) -> ProxyError:
    try:
        if streamed:
            async for _ in upstream.stream(request(vendor)):
                pass
        else:
            await upstream.chat(request(vendor))
    except ProxyError as exc:
        return exc
    finally:
        await upstream.aclose()
    raise AssertionError("the call succeeded against a broken vendor")


@pytest.mark.parametrize("streamed", [False, True], ids=["chat", "stream"])
async def test_refused_connection_is_unavailable(vendor: str, streamed: bool) -> None:
    error = await failure(
        make(vendor, f"http://127.0.0.1:{closed_port()}"), vendor, streamed=streamed
    )
    assert type(error) is UpstreamUnavailable
    assert (error.code, error.status) == ("upstream_unavailable", 503)
    assert error.message == f"could not reach {vendor}"


@pytest.mark.parametrize("streamed", [False, True], ids=["chat", "stream"])
async def test_unknown_host_is_unavailable(vendor: str, streamed: bool) -> None:
    error = await failure(
        make(vendor, "http://robota-no-such-host.invalid"), vendor, streamed=streamed
    )
    assert type(error) is UpstreamUnavailable
    assert error.status == 503


@pytest.mark.parametrize("streamed", [False, True], ids=["chat", "stream"])
async def test_connection_reset_before_an_answer_is_unavailable(
    vendor: str, streamed: bool, resetting: _Server
) -> None:
    error = await failure(
        make(vendor, f"http://127.0.0.1:{resetting.port}"), vendor, streamed=streamed
    )
    assert resetting.accepted >= 1, "the request reached the socket before the reset"
    assert type(error) is UpstreamUnavailable
    assert error.status == 503


@pytest.mark.parametrize("streamed", [False, True], ids=["chat", "stream"])
async def test_no_answer_in_time_is_a_timeout(vendor: str, streamed: bool, silent: _Server) -> None:
    error = await failure(
        make(vendor, f"http://127.0.0.1:{silent.port}", timeout=0.3), vendor, streamed=streamed
    )
    assert silent.accepted == 1
    assert type(error) is UpstreamTimeout
    assert (error.code, error.status) == ("upstream_timeout", 504)
    assert error.message == f"{vendor} did not answer in time"
