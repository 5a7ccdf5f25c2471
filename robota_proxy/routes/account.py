"""``GET /ai/models``, ``GET /ai/usage`` and ``GET /ai/me``: what the proxy serves, what the
caller has used, and who the caller is with what is left of each limit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from robota_client.messages import (
    BudgetAllowance,
    Limits,
    Me,
    MonthUsage,
    RateAllowance,
    TokenAllowance,
)
from robota_proxy import scope as keys
from robota_proxy.errors import Unauthenticated
from robota_proxy.policy.pricing import to_pico, usd_text
from robota_proxy.policy.principals import Principal, UserPermissions
from robota_proxy.responses import WireResponse
from robota_proxy.routes.usage_report import date_range, usage_report
from robota_proxy.storage.usage_store import Counters, UsageStore, period_of
from robota_proxy.upstreams.registry import UpstreamRegistry

#: ``principal -> {"rpm": {"limit", "remaining", "resetSeconds"}, ...}``: what the rate
#: limiter can say about the caller's windows (``RateLimiter.remaining``).
RateStatus = Callable[[Principal], Awaitable[dict[str, dict[str, Any]]]]

# Wire names of the rate limits, as the limiter reports them -> ``Limits`` attributes.
_RATE_FIELDS = {"rpm": "rpm", "dailyRequestLimit": "daily_requests", "tpm": "tpm"}


class AccountRoutes:
    def __init__(
        self,
        registry: UpstreamRegistry,
        usage: UsageStore | None = None,
        *,
        rate_status: RateStatus | None = None,
    ) -> None:
        self.registry = registry
        self.usage = usage
        self.rate_status = rate_status

    def routes(self) -> list[Route]:
        routes = [Route("/ai/models", self.models, methods=["GET"])]
        if self.usage is not None:
            routes += [
                Route("/ai/usage", self.own_usage, methods=["GET"]),
                Route("/ai/me", self.me, methods=["GET"]),
            ]
        return routes

    async def models(self, request: Request) -> Response:
        providers = {name: {"models": models} for name, models in self.registry.catalogue().items()}
        return JSONResponse({"providers": providers})

    async def own_usage(self, request: Request) -> Response:
        assert self.usage is not None
        principal = _principal(request)
        first, last = date_range(request.query_params.get("from"), request.query_params.get("to"))
        return WireResponse(await usage_report(self.usage, first, last, user=principal.user))

    async def me(self, request: Request) -> Response:
        assert self.usage is not None
        principal = _principal(request)
        period = period_of(datetime.now(UTC))
        counters = await self.usage.counters(principal.user, period)
        limits = _money_limits(principal.permissions, counters, period)
        await self._rate_limits(principal, limits)
        return WireResponse(
            Me(
                user=principal.user,
                key_id=principal.key_id,
                permissions=principal.permissions.to_wire(),
                limits=limits,
                month=MonthUsage(
                    requests=counters.requests,
                    tokens=counters.tokens_used,
                    cost_usd=Decimal(usd_text(counters.cost_used_pico)),
                ),
            )
        )

    async def _rate_limits(self, principal: Principal, limits: Limits) -> None:
        permissions = principal.permissions
        configured = {
            "rpm": permissions.rpm,
            "dailyRequestLimit": permissions.daily_requests,
            "tpm": permissions.tpm,
        }
        live = await self.rate_status(principal) if self.rate_status is not None else {}
        for wire, amount in configured.items():
            if amount is None:
                continue
            status = live.get(wire)
            allowance = (
                RateAllowance.model_validate(status)
                if status is not None
                else RateAllowance(limit=amount)
            )
            setattr(limits, _RATE_FIELDS[wire], allowance)


def _principal(request: Request) -> Principal:
    principal = request.scope.get(keys.PRINCIPAL)
    if not isinstance(principal, Principal):
        # Only reachable when the app runs without its authentication middleware.
        raise Unauthenticated("no caller identity on this request")
    return principal


def _money_limits(permissions: UserPermissions, counters: Counters, period: str) -> Limits:
    limits = Limits(period=period)
    if permissions.monthly_tokens is not None:
        limit = permissions.monthly_tokens
        limits.monthly_tokens = TokenAllowance(
            limit=limit,
            used=counters.tokens_used,
            reserved=counters.tokens_reserved,
            remaining=max(0, limit - counters.tokens_used - counters.tokens_reserved),
        )
    if permissions.monthly_budget_usd is not None:
        budget = to_pico(permissions.monthly_budget_usd)
        left = max(0, budget - counters.cost_used_pico - counters.cost_reserved_pico)
        limits.monthly_budget = BudgetAllowance.model_validate(
            {
                "limit_usd": usd_text(budget),
                "used_usd": usd_text(counters.cost_used_pico),
                "reserved_usd": usd_text(counters.cost_reserved_pico),
                "remaining_usd": usd_text(left),
            }
        )
    return limits
