"""A scripted vendor HTTP server on 127.0.0.1 for one adapter's unit tests.

The adapters speak the vendors' HTTP APIs on their own aiohttp pool (no SDK), so their tests
answer them over a real socket instead of mocking a client library: each test says what a
path answers (status, JSON or raw bytes, headers, an event stream that is cut or stalls part
way) and reads back exactly what the adapter sent. The names follow respx's (``post(...)
.respond(...)``, ``route.calls.last.request``) so the tests read as before.

The whole-proxy tests use ``robota_proxy.testing.FakeVendors`` instead: it plays the vendors'
real behaviour; this plays whatever a test needs, including what a vendor should never send.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from multidict import CIMultiDictProxy

#: A body part that stands for "the connection is cut here" (the server aborts its socket).
CUT = object()
#: A body part that stands for "nothing more is sent, and the response never ends".
STALL = object()

Part = bytes | object


@dataclass(frozen=True)
class Request:
    """What the adapter sent, as the server received it."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: CIMultiDictProxy[str]
    content: bytes

    def json(self) -> Any:
        return jsonlib.loads(self.content)


@dataclass(frozen=True)
class Call:
    request: Request


class Calls(list[Call]):
    @property
    def last(self) -> Call:
        return self[-1]


@dataclass
class Reply:
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    parts: Sequence[Part] = ()
    #: Seconds before the status line is sent (a vendor slow to answer).
    delay: float = 0.0


class Route:
    """One method and path; answers with its reply (the last ``respond`` wins)."""

    def __init__(self, method: str, path: str) -> None:
        self.method = method
        self.path = path
        self.calls = Calls()
        self.reply = Reply(status=501, parts=(b"no reply scripted",))
        #: Set when the adapter closed a response this route was still sending (a stalled
        #: or unfinished stream it gave up on).
        self.closed = asyncio.Event()

    @property
    def called(self) -> bool:
        return bool(self.calls)

    @property
    def call_count(self) -> int:
        return len(self.calls)

    def respond(
        self,
        status: int = 200,
        *,
        json: Any = None,
        content: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        parts: Sequence[Part] | None = None,
        delay: float = 0.0,
    ) -> Route:
        """``json``, ``content`` or ``parts`` (bytes pieces sent one by one, with ``CUT`` or
        ``STALL`` among them) as the body."""
        sent_headers = dict(headers or {})
        if parts is None:
            if json is not None:
                body = jsonlib.dumps(json).encode()
                sent_headers.setdefault("content-type", "application/json")
            elif isinstance(content, str):
                body = content.encode()
            else:
                body = content or b""
            parts = (body,)
        self.reply = Reply(status=status, headers=sent_headers, parts=tuple(parts), delay=delay)
        return self


class VendorStub:
    """The server; ``url`` is its base (``http://127.0.0.1:PORT``)."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], Route] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    def route(self, method: str, url_or_path: str) -> Route:
        path = urlsplit(url_or_path).path if "://" in url_or_path else url_or_path
        key = (method.upper(), path)
        if key not in self._routes:
            self._routes[key] = Route(key[0], path)
        return self._routes[key]

    def post(self, url_or_path: str) -> Route:
        return self.route("POST", url_or_path)

    @property
    def requests(self) -> list[Request]:
        return [call.request for route in self._routes.values() for call in route.calls]

    async def start(self) -> VendorStub:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that goes away cancels the handler, which is how a
        # stalled answer learns that the adapter closed it.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        route = self._routes.get((request.method, request.path))
        if route is None:
            return web.Response(status=404, text=f"no route for {request.method} {request.path}")
        route.calls.append(
            Call(
                Request(
                    method=request.method,
                    path=request.path,
                    query=dict(request.query),
                    headers=request.headers,
                    content=await request.read(),
                )
            )
        )
        reply = route.reply
        if reply.delay:
            await asyncio.sleep(reply.delay)
        response = web.StreamResponse(status=reply.status, headers=reply.headers)
        parts = list(reply.parts)
        whole = [part for part in parts if isinstance(part, bytes)]
        if len(whole) == len(parts):
            response.content_length = sum(len(part) for part in whole)
        await response.prepare(request)
        transport = request.transport
        for part in parts:
            if part is CUT:
                if transport is not None:
                    transport.abort()
                return response
            if part is STALL:
                try:
                    await asyncio.Event().wait()  # until the client goes away
                except asyncio.CancelledError:
                    route.closed.set()
                    raise
            assert isinstance(part, bytes)
            try:
                await response.write(part)
            except ConnectionError:
                route.closed.set()
                return response
        await response.write_eof()
        return response


async def vendor_stub() -> AsyncIterator[VendorStub]:
    """The body of a fixture: ``vendor = pytest.fixture(vendor_stub)`` in a test module."""
    stub = await VendorStub().start()
    try:
        yield stub
    finally:
        await stub.stop()
