"""``GET /metrics``: every metric in the Prometheus text format, behind the admin key.

Behind the admin key because the numbers say who uses which model how much; an operator who
would rather let Prometheus scrape without a key sets ``ROBOTA_METRICS_ADDR`` to a bind only
Prometheus reaches (``robota_proxy.observability.metrics.MetricsServer``). The text is made
in a worker thread: in multiprocess mode it reads every worker's files.
"""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from robota_proxy.observability.metrics import CONTENT_TYPE, ProxyMetrics
from robota_proxy.routes.admin import AdminGuard

PATH = "/metrics"


class PrometheusRoutes:
    def __init__(self, metrics: ProxyMetrics, guard: AdminGuard) -> None:
        self.metrics = metrics
        self.guard = guard

    def routes(self) -> list[Route]:
        return [Route(PATH, self.scrape, methods=["GET"])]

    async def scrape(self, request: Request) -> Response:
        await self.guard.check(request)
        body = await anyio.to_thread.run_sync(self.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})
