"""``RequestContextMiddleware``: request id, timing and the one access-log line.

Outermost in the chain so that every response, errors from later middleware included, carries
``X-Request-ID`` and is logged once. The log line holds method, route path, status and
milliseconds only: no headers and no query string, so no key can reach the logs through it.

Every answer also carries ``X-Robota-Overhead-Ms``: the time from the request's arrival to
the start of its answer less the time spent waiting on vendors until then (the call record's
``vendor_seconds``), i.e. what the proxy itself took, the figure operators check our
performance claims with. So does a WebSocket handshake's answer (the ``101`` or its refusal),
and so does the ``500`` of an exception nothing handled: this middleware answers it itself
(the same body as the app's last-resort handler, which still logs it), since Starlette's
``ServerErrorMiddleware`` sits outside every middleware and would answer without our headers.
The proxy's other answers carry it too: the connection guard's refusals
(``robota_proxy.http_guard``) and the metrics bind (``observability.metrics.MetricsServer``).
Given ``metrics`` (``robota_proxy.observability.metrics``), the finished request is counted
there once, from its call record.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING

from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from robota_proxy import scope as keys
from robota_proxy.call_record import CallRecord
from robota_proxy.errors import InternalError
from robota_proxy.observability import tracing
from robota_proxy.observability.logging import fields_wanted, request_fields
from robota_proxy.responses import error_response
from robota_proxy.wire.paths import route_path

if TYPE_CHECKING:
    from robota_proxy.observability.metrics import ProxyMetrics

_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
log = logging.getLogger("robota_proxy.access")


def incoming_request_id(scope: Scope) -> str | None:
    """A caller-supplied ``X-Request-ID``, kept only when it is short and plain, so it can
    be echoed and logged without letting a caller inject anything."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            return candidate if _SAFE_ID.match(candidate) else None
    return None


def _identify(scope: Scope) -> str:
    """The request id: the caller's, echoed so they can correlate, or a fresh one. A
    caller's id is also kept under ``CORRELATION_ID``, so that whoever needs a key unique to
    this request (the usage ledger) knows to mint one: callers reuse ids (retries,
    pipelined clients, fixed values)."""
    theirs = incoming_request_id(scope)
    if theirs is None:
        scope[keys.REQUEST_ID] = created = keys.new_request_id()
        return created
    scope[keys.CORRELATION_ID] = scope[keys.REQUEST_ID] = theirs
    return theirs


OVERHEAD_HEADER = "X-Robota-Overhead-Ms"
_OVERHEAD_RAW = OVERHEAD_HEADER.lower().encode()


def overhead_ms(started: float) -> bytes:
    """``X-Robota-Overhead-Ms``'s value for an answer with no vendor time in it: the
    milliseconds since ``started`` (a ``time.perf_counter()``)."""
    return b"%.2f" % (max(0.0, time.perf_counter() - started) * 1000)


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: ProxyMetrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] != "websocket":
                await self.app(scope, receive, send)
                return
            token = keys.current_request_id.set(_identify(scope))
            try:
                await self.app(scope, receive, _handshake_timed(send, time.perf_counter()))
            finally:
                keys.current_request_id.reset(token)
            return
        request_id = _identify(scope)
        started = time.perf_counter()
        status = 500
        token = keys.current_request_id.set(request_id)
        metrics = self.metrics
        streaming = False
        span = tracing.start_request(scope)
        first_body = 0.0  # when the answer's first bytes went out (a stream's TTFT)
        answered = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, streaming, first_body, answered
            if message["type"] == "http.response.start":
                answered = True
                status = message["status"]
                record = scope.get(keys.CALL)
                vendor = record.vendor_seconds if isinstance(record, CallRecord) else 0.0
                overhead = max(0.0, time.perf_counter() - started - vendor) * 1000
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                headers.append(OVERHEAD_HEADER, f"{overhead:.2f}")
                if metrics is not None:
                    streaming = metrics.stream_started(scope, status)
            elif not first_body and message["type"] == "http.response.body":
                first_body = time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if not answered:  # else the answer is cut short: nothing more can be said
                await _internal_error(scope, request_id)(scope, receive, send_with_id)
            raise  # for the app's last-resort handler (it logs) and the server
        finally:
            keys.current_request_id.reset(token)
            if metrics is not None:
                if streaming:
                    metrics.stream_ended()
                try:
                    metrics.request_done(scope, status, time.perf_counter() - started)
                except Exception:  # a metrics bug must not turn an answer into an error
                    log.exception("metrics of %s not counted", request_id)
            if log.isEnabledFor(logging.INFO):
                elapsed = time.perf_counter() - started
                record = scope.get(keys.CALL)
                streamed = isinstance(record, CallRecord) and record.streamed and first_body
                ttft = first_body - started if streamed else None
                log.info(
                    "%s %s %d %.1fms %s",
                    scope["method"],
                    route_path(scope),
                    status,
                    elapsed * 1000,
                    request_id,
                    extra={"robota": request_fields(scope, status, elapsed, ttft)}
                    if fields_wanted()
                    else None,
                )
            if span is not None:
                span.end(scope, status)


def _internal_error(scope: Scope, request_id: str) -> Response:
    """The answer to an exception nothing handled: the app's last-resort handler's
    (``app._unexpected_error``), sent through this middleware so that it has our headers."""
    return error_response(InternalError("internal proxy error"), request_id, scope=scope)


def _handshake_timed(send: Send, started: float) -> Send:
    """``send`` of a WebSocket connection, whose handshake answer (the ``101`` of
    ``websocket.accept``, or a refusal's ``websocket.http.response.start``) carries
    ``X-Robota-Overhead-Ms``: there is no vendor time before it."""

    async def timed(message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.accept" or kind == "websocket.http.response.start":
            headers = [*message.get("headers", ()), (_OVERHEAD_RAW, overhead_ms(started))]
            message = {**message, "headers": headers}
        await send(message)

    return timed
