"""``GET /admin/metrics``: this process's upstream attempt counts and the state of the circuit
breakers it has used, for the operator.

Each attempt of a call (retries and fallbacks included) is counted by target and outcome, so
an operator can see a vendor failing over before users complain. The counts belong to the
process that answers (several workers each keep their own), and hold no key or user data.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from robota_proxy.routes.admin import AdminGuard
from robota_proxy.upstreams.breakers import Breakers
from robota_proxy.upstreams.resilience import AttemptCounter


class MetricsRoutes:
    def __init__(
        self, attempts: AttemptCounter, guard: AdminGuard, breakers: Breakers | None = None
    ) -> None:
        self.attempts = attempts
        self.guard = guard
        self.breakers = breakers

    def routes(self) -> list[Route]:
        return [Route("/admin/metrics", self.metrics, methods=["GET"])]

    async def metrics(self, request: Request) -> Response:
        await self.guard.check(request)
        attempts = [
            {"target": target, "outcome": outcome, "count": count}
            for (target, outcome), count in sorted(self.attempts.counts.items())
        ]
        breakers = await self.breakers.snapshot() if self.breakers is not None else {}
        return JSONResponse({"upstreamAttempts": attempts, "circuitBreakers": breakers})
