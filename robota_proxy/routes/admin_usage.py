"""``GET /admin/usage?user=&from=&to=``: every user's usage, for the operator.

Kept beside ``routes/admin.py`` rather than in it so that keys and money stay separate
concerns; it is guarded by the same ``AdminGuard`` (the admin key).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from robota_proxy.responses import WireResponse
from robota_proxy.routes.admin import AdminGuard, user_filter
from robota_proxy.routes.usage_report import date_range, usage_report
from robota_proxy.storage.usage_store import UsageStore


class AdminUsageRoutes:
    def __init__(self, store: UsageStore, guard: AdminGuard) -> None:
        self.store = store
        self.guard = guard

    def routes(self) -> list[Route]:
        return [Route("/admin/usage", self.usage, methods=["GET"])]

    async def usage(self, request: Request) -> Response:
        await self.guard.check(request)
        query = request.query_params
        first, last = date_range(query.get("from"), query.get("to"))
        user = user_filter(query.get("user") or None)
        report = await usage_report(self.store, first, last, user=user, per_user=True)
        return WireResponse(report)
