"""``FakeVendors``: the fake vendor app served for real on 127.0.0.1.

A real socket, rather than an in-process transport, so the proxy's own HTTP clients
(connection pools, timeouts, the vendor SDKs) are exercised exactly as in production. The
server runs in a daemon thread on its own event loop so that sync tests, async tests and a
proxy running in another process can all use it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping
from types import TracebackType

import anyio.to_thread
import uvicorn

from robota_proxy.testing.app import FakeVendorApp
from robota_proxy.testing.script import (
    Fault,
    Matcher,
    PrefillMode,
    RecordedRequest,
    Reply,
    Vendor,
)
from robota_proxy.testing.sse import quiet_deliberate_drops
from robota_proxy.testing.state import FakeState

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class FakeVendors:
    """Fake OpenAI, Anthropic and Gemini endpoints on one local port.

    Use as ``with FakeVendors() as fake:`` or ``async with``; script replies with
    :meth:`script`, inspect :attr:`requests`.
    """

    def __init__(
        self,
        api_key: str = "test-vendor-key",
        *,
        port: int = 0,
        max_recorded: int = 10_000,
        log_config: dict[str, object] | None = None,
        prefill: Mapping[Vendor, PrefillMode] | None = None,
    ) -> None:
        """``port=0`` picks a free port. ``log_config`` is handed to uvicorn; the default
        None leaves the embedding process's logging configuration alone. ``prefill``
        overrides, per vendor, what a final assistant turn gets (see :meth:`set_prefill`)."""
        self.api_key = api_key
        self._port = port
        self._log_config = log_config
        self._state = FakeState(max_recorded, prefill)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeVendors:
        if self._thread is not None:
            raise RuntimeError("FakeVendors is already running")
        quiet_deliberate_drops()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            # Binding here, before the thread starts, means the port is known at once and
            # cannot be taken by someone else in between.
            sock.bind((HOST, self._port))
        except OSError:
            sock.close()
            raise
        config = uvicorn.Config(
            FakeVendorApp(self._state, self.api_key).starlette,
            log_level="warning",
            access_log=False,
            log_config=self._log_config,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fake-vendors", daemon=True
        )
        self._server, self._thread, self._socket = server, thread, sock
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the fake vendor server did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        server, thread, sock = self._server, self._thread, self._socket
        self._server = self._thread = self._socket = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(STOP_TIMEOUT)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(STOP_TIMEOUT)
        if sock is not None:
            sock.close()

    def __enter__(self) -> FakeVendors:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> FakeVendors:
        return await anyio.to_thread.run_sync(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await anyio.to_thread.run_sync(self.stop)

    # --- addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("FakeVendors is not running")
        port: int = self._socket.getsockname()[1]
        return port

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.base_url

    @property
    def google_base_url(self) -> str:
        return self.base_url

    # --- scripting and inspection ----------------------------------------------------------

    def script(
        self,
        reply: Reply | Fault,
        *,
        match: Matcher = None,
        times: int | None = None,
        vendor: Vendor | None = None,
    ) -> None:
        """Answer requests that ``match`` with ``reply``; rules are tried in the order given.

        ``match`` is a substring of the last message's text (see
        ``RecordedRequest.last_text``), a predicate, or None for every request; ``times``
        None means unlimited; ``vendor`` limits the rule to one vendor's endpoints.
        """
        self._state.add_rule(reply, match, times, vendor)

    def set_prefill(self, vendor: Vendor, mode: PrefillMode) -> None:
        """What ``vendor`` does with a conversation ending in an assistant turn with text P:
        ``continue`` answers only what follows P in the planned text (Anthropic's default),
        ``ignore`` answers the whole text afresh as OpenAI does (its default), ``reject``
        answers the vendor's 400 (Gemini's default; for OpenAI a wording of the fake's own).
        :meth:`reset` restores the defaults given to the constructor."""
        self._state.set_prefill(vendor, mode)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (a copy)."""
        return self._state.requests

    @property
    def completed_streams(self) -> int:
        """Streams whose every byte, terminator included, was sent."""
        return self._state.completed_streams

    @property
    def aborted_streams(self) -> int:
        """Streams the client went away from before the end."""
        return self._state.aborted_streams

    @property
    def aborted_at(self) -> list[float]:
        """``time.monotonic()`` when each aborted stream saw its client (the proxy) go away:
        with a timestamp taken in the test, the cancellation delay as the vendor saw it."""
        return self._state.aborted_at

    @property
    def abandoned_at(self) -> list[float]:
        """``time.monotonic()`` when a client went away while its answer was held back by
        ``latency`` (or a non-streamed ``first_token_latency``): the wait ended then, so a
        silent vendor leaves no task behind."""
        return self._state.abandoned_at

    @property
    def dropped_streams(self) -> int:
        """Streams cut on purpose by a ``drop_after`` or ``stall_after`` fault."""
        return self._state.dropped_streams

    def reset(self) -> None:
        """Forget every rule, request and counter; the server keeps running."""
        self._state.reset()
