"""``GET /health``: liveness for load balancers; needs no credentials and touches no vendor."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


ROUTES = [Route("/health", health, methods=["GET"])]
