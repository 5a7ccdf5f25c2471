"""The floor: the least any Python ASGI proxy can cost, run as a system of the benchmark.

A bare ASGI app under uvicorn (the HTTP stack ``robota-proxy serve`` runs: uvicorn, uvloop,
httptools, one worker, no access log) that forwards ``POST /v1/chat/completions``, ``/ai/chat``
and ``/ai/chat/stream`` bodies, unread, to the fake upstream's chat completions path with one
pooled ``aiohttp.ClientSession``, and passes the reply back: a JSON reply whole, a stream chunk
by chunk as aiohttp receives it. No parsing, no authentication, no logs, no metrics. Whatever
our proxy costs above this is the price of what it does; what this costs is the price of
speaking HTTP twice in Python (issue 13 sets our targets as multiples of it).

Its connection pool has no upper bound (``--max-connections 0``), so that when it holds
thousands of streams the floor is never the one queueing.

    python -m benchmarks.floor_forwarder --port 9200 --upstream http://127.0.0.1:9100
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The paths forwarded: our two surfaces' chat routes, all to the upstream's one.
FORWARDED = frozenset({"/v1/chat/completions", "/ai/chat", "/ai/chat/stream"})
_JSON = [(b"content-type", b"application/json")]


class Forwarder:
    """The ASGI app: one session, opened in the lifespan, shared by every request."""

    def __init__(self, upstream: str, max_connections: int = 0) -> None:
        self.target = upstream.rstrip("/") + "/v1/chat/completions"
        self.max_connections = max_connections
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                connector = aiohttp.TCPConnector(
                    limit=self.max_connections, limit_per_host=0, ttl_dns_cache=None
                )
                self.session = aiohttp.ClientSession(
                    connector=connector,
                    # Generous: thousands of connections opened at once to the fake upstream
                    # wait in its accept queue (a 5 s limit failed a quarter of 5000).
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=60),
                    auto_decompress=False,
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/health":
            await _answer(send, 200, b'{"status":"ok"}')
            return
        if method != "POST" or path not in FORWARDED:
            await _answer(send, 404, b'{"error":"not found"}')
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        assert self.session is not None
        try:
            async with self.session.post(
                self.target, data=bytes(body), headers={"content-type": "application/json"}
            ) as upstream:
                kind = upstream.headers.get("content-type", "application/json").encode()
                if not kind.startswith(b"text/event-stream"):
                    await _answer(send, upstream.status, await upstream.read(), kind)
                    return
                await send(
                    {
                        "type": "http.response.start",
                        "status": upstream.status,
                        "headers": [(b"content-type", kind), (b"cache-control", b"no-cache")],
                    }
                )
                async for chunk in upstream.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Before the reply started: a 502; after it, uvicorn closes the connection.
            with contextlib.suppress(RuntimeError, OSError):
                await _answer(send, 502, f'{{"error":"{type(exc).__name__}"}}'.encode())


async def _answer(send: Send, status: int, body: bytes, kind: bytes = b"application/json") -> None:
    headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL of the fake upstream")
    parser.add_argument(
        "--max-connections", type=int, default=0, help="upstream pool size (0: unbounded)"
    )
    args = parser.parse_args(argv)
    # The flags ``robota-proxy serve`` gives uvicorn (robota_proxy/cli.py), less what is ours:
    # its guarded httptools protocol becomes uvicorn's own, its queued log config goes.
    uvicorn.run(
        Forwarder(args.upstream, args.max_connections),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        proxy_headers=False,  # serve's default (no ROBOTA_FORWARDED_ALLOW_IPS)
        log_level="warning",
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
