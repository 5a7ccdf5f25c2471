"""``robota-proxy serve``'s HTTP/1.1 connections, hardened against slow and huge clients.

uvicorn's httptools protocol has no limit on the size of a request head, no deadline for
receiving it and none for a body that stops arriving, and it accepts connections until the
process runs out of file descriptors. Sixty clients each sending a never-ending 10 MB header
took a proxy from 165 to 784 MB; 1,100 slowloris connections locked every new client out for
45 s. This protocol is uvicorn's own with four guards added:

* the request head (request line and headers) is bounded in bytes and in header count: past
  either, ``431`` (or ``414`` for the request line) and the connection is closed;
* the head must arrive within ``header_timeout`` of the connection opening or of the previous
  request ending (a silent or dribbling client gets ``408`` and is closed);
* a body must keep arriving: ``body_timeout`` seconds without a byte of an unfinished body end
  the connection with ``408``;
* at most ``max_connections`` connections are open; one more is answered ``503`` and closed at
  once, so descriptors never run out and ``/health`` keeps answering.

Each refusal is logged (throttled: one line per kind per interval, with a count). The limits
come from ``ROBOTA_*`` settings; this module is the only place that knows uvicorn internals.

Like every answer of the proxy, a refusal carries ``X-Robota-Overhead-Ms``
(``robota_proxy.middleware.request_context``): here there is no vendor time, and none of the
client's either, so it is the time the proxy itself spent on the refused request: parsing what
had arrived of its head (summed over the reads) plus the step that decided to refuse (the
connection cap's look for an idle connection to evict, the deadline's callback). Measuring it
costs one ``perf_counter()`` per read of a request head, one per request for most requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from robota_proxy.observability.throttled_log import ThrottledLog

log = logging.getLogger("robota_proxy.http")
_throttled = ThrottledLog(log, interval=10.0)

#: Descriptors kept free for everything that is not a client connection (vendor pools, the
#: database, Redis, logs) when the connection cap is derived from the descriptor limit.
RESERVED_DESCRIPTORS = 128


@dataclass(frozen=True)
class ServerLimits:
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_request_line: int = 8 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 4096


def descriptor_bound_connections(requested: int | None) -> int:
    """The connection cap: what was asked for, never closer than ``RESERVED_DESCRIPTORS`` to
    the process's descriptor limit (raised to its hard limit first, as servers do)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    ceiling = max(16, soft - RESERVED_DESCRIPTORS) if soft != resource.RLIM_INFINITY else 65536
    return min(requested, ceiling) if requested is not None else ceiling


@cache
def current_limits() -> ServerLimits:
    """Read once per process: uvicorn workers are separate processes that inherit the
    environment, and the protocol class must be importable by name to reach them."""
    from robota_proxy.settings import Settings

    settings = Settings()
    return ServerLimits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        max_request_line=settings.max_request_line_bytes,
        header_timeout=settings.header_timeout_seconds,
        body_timeout=settings.body_timeout_seconds,
        max_connections=descriptor_bound_connections(settings.max_connections),
    )


def _plain_response(status: int, reason: str, message: str, spent: float) -> bytes:
    """A refusal, ``spent`` being the proxy's own seconds on it (``X-Robota-Overhead-Ms``)."""
    code = "invalid_request" if status < 500 else "upstream_unavailable"
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nx-robota-overhead-ms: {max(0.0, spent) * 1000:.2f}\r\n"
        "connection: close\r\n\r\n"
    ).encode()
    return head + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounded heads, head and body deadlines and a cap on
    open connections (see the module docstring)."""

    limits: ServerLimits | None = None  # tests set one; otherwise read from the settings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = self.limits or current_limits()
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._deadline: asyncio.TimerHandle | None = None
        #: Set once a guard refused: the parser may still call back with what it had buffered,
        #: and none of it may reach the app.
        self._refused = False
        self._opened_at = 0.0
        #: The proxy's seconds on the current request head so far (its reads' parsing), and
        #: when the callback being handled began (0.0 outside one): X-Robota-Overhead-Ms.
        self._spent = 0.0
        self._step = 0.0

    # --- connection --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        started = time.perf_counter()
        if len(self.connections) >= self._limits.max_connections and not self._evict_idlest():
            _throttled.warn(
                "connection-cap",
                "connection refused: %d connections open, the cap (ROBOTA_MAX_CONNECTIONS)",
                len(self.connections),
            )
            spent = time.perf_counter() - started
            transport.write(
                _plain_response(503, "Service Unavailable", "too many open connections", spent)
            )
            transport.close()
            self.transport = transport
            self.parser = None  # type: ignore[assignment]
            return
        super().connection_made(transport)
        self._opened_at = self.loop.time()
        self._arm(self._limits.header_timeout, "header")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.parser is None and self.flow is None:  # refused in connection_made
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.parser is None or self._refused:
            return
        was_in_head = self._in_head
        if was_in_head:
            self._step = time.perf_counter()
        super().data_received(data)
        if not was_in_head:
            return
        # Counted after parsing, and only a read that began and ended inside a head: one read
        # can hold the end of a head and the start of a large body (or the end of a body and
        # the start of the next head), and body bytes are not head bytes. httptools keeps the
        # unfinished head, so at most one read's worth lies past the bound.
        if self._in_head and not self._refused and self.parser is not None:
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.max_header_bytes + self._limits.max_request_line:
                self._refuse(431, "Request Header Fields Too Large", "request head too large")
            else:
                self._spent += time.perf_counter() - self._step
        self._step = 0.0

    def _evict_idlest(self) -> bool:
        """At the cap, a connection that is still waiting for (or dribbling) a request head
        makes room for the new one, the oldest first: slow clients cannot crowd out a client
        that sends whole requests. Only when every connection is busy is the new one refused.
        """
        waiting = [
            conn
            for conn in self.connections
            if isinstance(conn, GuardedHttpToolsProtocol) and conn.is_waiting_for_head()
        ]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda conn: conn._opened_at)
        _throttled.warn(
            "connection-evicted",
            "connection cap reached (%d open): closed the oldest one still waiting for a request",
            len(self.connections),
        )
        oldest._refuse(408, "Request Timeout", "closed to make room for a new connection")
        self.connections.discard(oldest)
        return True

    def is_waiting_for_head(self) -> bool:
        return self._in_head and (self.cycle is None or self.cycle.response_complete)

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # the WebSocket protocol takes the connection over with its own pings
        super().handle_websocket_upgrade()

    # --- parser callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        self._in_head = True
        self._header_count = 0
        self._spent = 0.0
        if self._deadline is None:
            self._arm(self._limits.header_timeout, "header")

    def on_url(self, url: bytes) -> None:
        if self._refused:
            return
        super().on_url(url)
        if len(self.url) > self._limits.max_request_line:
            self._refuse(414, "URI Too Long", "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        self._header_count += 1
        if self._header_count > self._limits.max_headers:
            self._refuse(431, "Request Header Fields Too Large", "too many headers")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        self._head_bytes = 0
        self._spent = 0.0
        self._disarm()
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            self._arm(self._limits.body_timeout, "body")

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        super().on_body(body)
        if self._deadline is not None:
            self._arm(self._limits.body_timeout, "body")

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        super().on_message_complete()
        self._in_head = True  # whatever comes next on this connection is a new head

    # --- helpers -----------------------------------------------------------------------------
    def _arm(self, seconds: float, phase: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, phase: str) -> None:
        started = time.perf_counter()
        self._deadline = None
        if self.transport is None or self.transport.is_closing():
            return
        if phase == "body" and self.cycle is not None and self.cycle.response_started:
            # The app already answered (it did not wait for the body): just end the connection.
            _throttled.warn("body-timeout", "connection closed: request body stalled")
            self.transport.close()
            return
        self._step = started
        self._refuse(408, "Request Timeout", f"request {phase} not received in time")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer ``status`` (unless the app already began an answer) and close. Called
        inside a read or the deadline's callback (``_step`` says since when), or for another
        connection (an eviction: only what this one's head took so far is this request's)."""
        self._refused = True
        self._disarm()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown client"
        _throttled.warn(f"refused-{status}", "%s from %s: %d", message, client, status)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if not self.transport.is_closing():
            if self.cycle is None or not self.cycle.response_started:
                spent = self._spent + (time.perf_counter() - self._step if self._step else 0.0)
                self.transport.write(_plain_response(status, reason, message, spent))
            self.transport.close()
