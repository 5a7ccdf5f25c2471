"""A lean fake OpenAI upstream: ``POST /v1/chat/completions``, JSON or SSE, nothing recorded.

Built for speed rather than correctness checks (``robota_proxy.testing`` does those): raw
asyncio protocol, ``httptools`` parser, uvloop when installed, pre-encoded replies, no JSON
parsing of the request. One process serves many thousands of requests per second, so that the
proxy in front of it, not the upstream, is what a benchmark measures.

Streams send a first chunk with the role and the first token at once, then one token chunk
every ``--interval-ms`` (``--chunks`` tokens in all), a finish chunk, a usage chunk when the
request asks ``stream_options.include_usage``, and ``data: [DONE]``. A request can override
both numbers with the marker ``bench:<chunks>x<interval_ms>`` anywhere in its body (a message
text travels through every proxy unchanged), e.g. ``"content": "hi bench:20x50"``.

    python -m benchmarks.fake_upstream --port 9100 --chunks 20 --interval-ms 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import time
from typing import cast

import httptools

_MARKER = re.compile(rb"bench:(\d{1,5})x(\d{1,6}(?:\.\d+)?)")
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_INCLUDE_USAGE = re.compile(rb'"include_usage"\s*:\s*true')
_MODEL = "gpt-4o-mini"
_TOKEN = "tok "


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _usage(completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": 5,
        "completion_tokens": completion_tokens,
        "total_tokens": 5 + completion_tokens,
    }


def completion_body(tokens: int) -> bytes:
    return _json(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": _MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _TOKEN * tokens},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": _usage(tokens),
        }
    )


def _chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": _MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    return b"data: " + _json(body) + b"\n\n"


def _chunked(data: bytes) -> bytes:
    """One HTTP/1.1 chunk of a ``Transfer-Encoding: chunked`` body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


FIRST = _chunked(_chunk({"role": "assistant", "content": ""}) + _chunk({"content": _TOKEN}))
TOKEN = _chunked(_chunk({"content": _TOKEN}))
FINISH = _chunked(_chunk({}, "stop"))
DONE = _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def usage_chunk(tokens: int) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": _MODEL,
        "choices": [],
        "usage": _usage(tokens),
    }
    return _chunked(b"data: " + _json(body) + b"\n\n")


def _response(status: bytes, body: bytes, keep_alive: bool) -> bytes:
    connection = b"keep-alive" if keep_alive else b"close"
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nconnection: "
        + connection
        + b"\r\n\r\n"
        + body
    )


class Upstream(asyncio.Protocol):
    """One client connection. Requests are answered in order; clients do not pipeline."""

    def __init__(self, chunks: int, interval_s: float, replies: dict[int, bytes]) -> None:
        self.chunks = chunks
        self.interval_s = interval_s
        self.replies = replies  # JSON reply bodies by token count, built once each
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.streaming: asyncio.Task[None] | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.cancel()

    # --- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        keep_alive = self.parser.should_keep_alive()
        path = self.url.split(b"?", 1)[0]
        if path.endswith(b"/chat/completions"):
            body = b"".join(self.body)
            chunks, interval_s = self.chunks, self.interval_s
            marker = _MARKER.search(body)
            if marker is not None:
                chunks, interval_s = int(marker[1]), float(marker[2]) / 1000
            if _STREAM.search(body):
                usage = _INCLUDE_USAGE.search(body) is not None
                self.streaming = asyncio.get_running_loop().create_task(
                    self._stream(transport, chunks, interval_s, usage, keep_alive)
                )
                return
            reply = self.replies.get(chunks)
            if reply is None:
                reply = self.replies[chunks] = completion_body(chunks)
            transport.write(_response(b"200 OK", reply, keep_alive))
        elif path.endswith(b"/models"):
            models = _json({"object": "list", "data": [{"id": _MODEL, "object": "model"}]})
            transport.write(_response(b"200 OK", models, keep_alive))
        elif path.startswith(b"/health"):
            transport.write(_response(b"200 OK", b'{"status":"ok"}', keep_alive))
        else:
            transport.write(_response(b"404 Not Found", b'{"error":"not found"}', keep_alive))
        if not keep_alive:
            transport.close()

    async def _stream(
        self,
        transport: asyncio.Transport,
        chunks: int,
        interval_s: float,
        usage: bool,
        keep_alive: bool,
    ) -> None:
        transport.write(STREAM_HEAD + FIRST)
        for _ in range(chunks - 1):
            await asyncio.sleep(interval_s)
            if transport.is_closing():
                return
            transport.write(TOKEN)
        tail = FINISH + (usage_chunk(chunks) if usage else b"") + DONE
        transport.write(tail)
        self.streaming = None
        if not keep_alive:
            transport.close()


def _listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve(host: str, port: int, chunks: int, interval_ms: float) -> None:
    loop = asyncio.get_running_loop()
    replies: dict[int, bytes] = {}
    server = await loop.create_server(
        lambda: Upstream(chunks, interval_ms / 1000, replies),
        sock=_listening_socket(host, port),
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _run(host: str, port: int, chunks: int, interval_ms: float) -> None:
    try:
        import uvloop
    except ImportError:  # plain asyncio still works, only slower
        asyncio.run(serve(host, port, chunks, interval_ms))
    else:
        uvloop.run(serve(host, port, chunks, interval_ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=20, help="tokens per reply (default 20)")
    parser.add_argument(
        "--interval-ms", type=float, default=1.0, help="gap between stream chunks (default 1)"
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )
    args = parser.parse_args()
    children: list[int] = []
    for _ in range(args.processes - 1):
        pid = os.fork()
        if pid == 0:
            _run(args.host, args.port, args.chunks, args.interval_ms)
            os._exit(0)
        children.append(pid)
    try:
        _run(args.host, args.port, args.chunks, args.interval_ms)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


if __name__ == "__main__":
    main()
