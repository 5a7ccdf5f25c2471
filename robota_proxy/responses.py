"""JSON responses of the wire contract, shared by routes and middleware."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from robota_client.messages import WireModel
from robota_proxy import scope as keys
from robota_proxy.dialects import ROBOTA, dialect_of
from robota_proxy.errors import ProxyError

#: The ASGI extension that lets a WebSocket handshake be answered with a plain HTTP response.
WS_DENIAL = "websocket.http.response"
#: On an error from the upstream layer: the vendor calls made (see ``ProxyError``).
UPSTREAM_ATTEMPTS_HEADER = "X-Robota-Upstream-Attempts"


class WireResponse(Response):
    """A contract model rendered camelCase, without a second trip through ``json.dumps``."""

    media_type = "application/json"

    def __init__(self, model: WireModel, status_code: int = 200) -> None:
        super().__init__(model.to_json(), status_code=status_code)


def error_response(
    error: ProxyError,
    request_id: str | None,
    *,
    status: int | None = None,
    scope: Mapping[str, Any] | None = None,
) -> Response:
    """The error as the caller's dialect has it (``robota_proxy.dialects``): OpenAI's shape
    under ``/v1/``, the Robota contract elsewhere, or when no ``scope`` says where."""
    dialect = dialect_of(scope) if scope is not None else ROBOTA
    if isinstance(scope, dict):  # for the metrics' refusal count (scope.ERROR_CODE)
        scope[keys.ERROR_CODE] = error.code
    if dialect is ROBOTA:
        response: Response = WireResponse(
            error.body(request_id), status_code=status or error.status
        )
    else:
        body, headers = dialect.render_error(error, request_id)
        response = Response(body, status_code=status or error.status, media_type="application/json")
        response.headers.update(headers)
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(error.retry_after)))
    if error.upstream_attempts is not None:
        response.headers[UPSTREAM_ATTEMPTS_HEADER] = str(error.upstream_attempts)
    return response


async def refuse(
    error: ProxyError,
    scope: Scope,
    receive: Receive,
    send: Send,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer a request, or a WebSocket handshake, with the contract's error.

    A refused handshake gets the same JSON response as HTTP when the server offers the
    ``websocket.http.response`` extension (uvicorn does): a close before accept would reach the
    client as a bare 403, hiding 401 from 429. Without it: close code 4000 + the HTTP status.
    """
    request_id = keys.request_id(scope)
    response = error_response(error, request_id, scope=scope)
    response.headers.update(headers or {})
    if scope["type"] == "websocket":
        if WS_DENIAL not in scope.get("extensions", {}):
            code = 4000 + error.status
            await send({"type": "websocket.close", "code": code, "reason": error.message})
            return
        response.headers["X-Request-ID"] = request_id
    await response(scope, receive, send)
