"""``GET /ai/models``: what this proxy is configured to serve."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from robota_proxy.upstreams.registry import UpstreamRegistry


class AccountRoutes:
    def __init__(self, registry: UpstreamRegistry) -> None:
        self.registry = registry

    def routes(self) -> list[Route]:
        return [Route("/ai/models", self.models, methods=["GET"])]

    async def models(self, request: Request) -> Response:
        providers = {name: {"models": models} for name, models in self.registry.catalogue().items()}
        return JSONResponse({"providers": providers})
