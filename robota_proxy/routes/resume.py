"""``GET /ai/chat/stream/{stream_id}`` with ``Last-Event-ID``: the rest of a stream.

Only the user who started a stream may resume it; anyone else gets the same 404 as for an
unknown or expired stream, so stream ids cannot be probed. A resume never calls a vendor and
leaves the call record's ``upstream_called`` False, so metering writes no second ledger row.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from robota_proxy import scope as keys
from robota_proxy.errors import InvalidRequest, NotFound
from robota_proxy.streams.buffer import StreamBuffer, is_stream_id, parse_event_id, parse_seq
from robota_proxy.streams.response import ResumedStream


class ResumeRoutes:
    def __init__(self, buffer: StreamBuffer) -> None:
        self.buffer = buffer

    def routes(self) -> list[Route]:
        return [Route("/ai/chat/stream/{stream_id}", self.resume, methods=["GET"])]

    async def resume(self, request: Request) -> Response:
        stream_id = request.path_params["stream_id"]
        gone = NotFound("no such stream: unknown, expired, cancelled or not yours")
        if not is_stream_id(stream_id):
            raise gone
        after = _position(stream_id, request.headers.get("last-event-id"))
        principal = request.scope.get(keys.PRINCIPAL)
        user = principal.user if principal is not None else "anonymous"
        owner = await self.buffer.owner(stream_id)
        if owner is None or owner != user or await self.buffer.cancelled(stream_id):
            raise gone
        return ResumedStream(self.buffer, stream_id, after)


def _position(stream_id: str, last_event_id: str | None) -> int:
    """The seq to resume after: ``<stream id>:<seq>``, a bare seq, or none (from the start)."""
    if last_event_id is None or not last_event_id.strip():
        return 0
    seq = parse_seq(last_event_id)
    if seq is not None:
        return seq
    parsed = parse_event_id(last_event_id)
    if parsed is None or parsed[0] != stream_id:
        raise InvalidRequest("Last-Event-ID is not an event id of this stream")
    return parsed[1]
