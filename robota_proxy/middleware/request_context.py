"""``RequestContextMiddleware``: request id, timing and the one access-log line.

Outermost in the chain so that every response, errors from later middleware included, carries
``X-Request-ID`` and is logged once. The log line holds method, route path, status and
milliseconds only: no headers and no query string, so no key can reach the logs through it.
"""

from __future__ import annotations

import logging
import re
import time

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from robota_proxy import scope as keys
from robota_proxy.middleware.paths import route_path

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


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] != "websocket":
                await self.app(scope, receive, send)
                return
            token = keys.current_request_id.set(_identify(scope))
            try:
                await self.app(scope, receive, send)
            finally:
                keys.current_request_id.reset(token)
            return
        request_id = _identify(scope)
        started = time.perf_counter()
        status = 500
        token = keys.current_request_id.set(request_id)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            keys.current_request_id.reset(token)
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "%s %s %d %.1fms %s",
                    scope["method"],
                    route_path(scope),
                    status,
                    (time.perf_counter() - started) * 1000,
                    request_id,
                )
