"""JSON responses of the wire contract, shared by routes and middleware."""

from __future__ import annotations

from starlette.responses import Response

from robota_client.messages import WireModel
from robota_proxy.errors import ProxyError


class WireResponse(Response):
    """A contract model rendered camelCase, without a second trip through ``json.dumps``."""

    media_type = "application/json"

    def __init__(self, model: WireModel, status_code: int = 200) -> None:
        super().__init__(model.to_json(), status_code=status_code)


def error_response(
    error: ProxyError, request_id: str | None, *, status: int | None = None
) -> Response:
    response = WireResponse(error.body(request_id), status_code=status or error.status)
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(error.retry_after)))
    return response
