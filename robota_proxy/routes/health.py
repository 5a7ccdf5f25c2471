"""``GET /health`` and ``GET /ready``: liveness and readiness, for load balancers and
orchestrators (README: Operating it, Readiness).

``/health`` says the process is up and its event loop answers; it needs no credentials and
touches nothing, so that a liveness probe never restarts a healthy process because its
database is slow. ``/ready`` says whether this process can serve a call right now: the
database answers (``SELECT 1``), Redis answers (``PING``, only when ``ROBOTA_REDIS_URL`` is
set), at least one provider is configured, and the process is not draining (SIGTERM
received). A balancer takes a process that is not ready out of rotation without killing it.

Anyone may ask ``/ready`` and learn which checks failed, by name only; the admin key
(``Authorization: Bearer <ROBOTA_ADMIN_KEY>``) adds each check's detail: its latency and a
short reason. A reason is an exception's type and the operating system's wording, never the
driver's message, which can carry a URL with its password.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from robota_proxy import drain
from robota_proxy.routes.admin import NO_STORE, AdminGuard
from robota_proxy.storage.database import Database
from robota_proxy.upstreams.registry import UpstreamRegistry

if TYPE_CHECKING:  # the redis extra is imported only when configured
    from redis.asyncio import Redis


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


ROUTES = [Route("/health", health, methods=["GET"])]


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    latency_ms: float
    #: Why it failed, or what it found (the providers); never a secret or a URL.
    note: str | None = None

    def detail(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"ok": self.ok, "latencyMs": self.latency_ms}
        if self.note is not None:
            shown["reason" if not self.ok else "found"] = self.note
        return shown


class _Failed(Exception):
    """A check that ran but found the dependency unusable; its message is the reason."""


def reason_of(exc: BaseException) -> str:
    """``ConnectionError (ConnectionRefusedError: Connection refused)``: the types along the
    chain of causes and the operating system's words for the innermost one's error number,
    which name no host or password (a driver's message may: asyncpg and redis-py put the
    address, the URL or the DSN in theirs)."""
    names = [type(exc).__name__]
    innermost = exc
    seen = {id(exc)}
    while True:
        nested = getattr(innermost, "orig", None) or innermost.__cause__
        if nested is None and not innermost.__suppress_context__:
            nested = innermost.__context__  # raised while handling it (redis-py does so)
        if not isinstance(nested, BaseException) or id(nested) in seen:
            break
        seen.add(id(nested))
        names.append(type(nested).__name__)
        innermost = nested
    number = innermost.errno if isinstance(innermost, OSError) else None
    words = f": {os.strerror(number)}" if isinstance(number, int) else ""
    if len(names) == 1:
        return names[0] + words
    return f"{names[0]} ({names[-1]}{words})"


class ReadinessRoutes:
    """``GET /ready`` over this app's database, Redis (when set) and provider registry."""

    def __init__(
        self,
        database: Database,
        registry: UpstreamRegistry,
        guard: AdminGuard,
        *,
        redis_url: str | None,
        timeout: float,
    ) -> None:
        self.database = database
        self.registry = registry
        self.guard = guard
        self.redis_url = redis_url
        self.timeout = timeout
        self._redis: Redis | None = None

    def routes(self) -> list[Route]:
        return [Route("/ready", self.ready, methods=["GET"])]

    async def aclose(self) -> None:
        """Close the Redis client the checks opened, if any (at the app's stop)."""
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()

    async def ready(self, request: Request) -> Response:
        # A caller who sends credentials wants the detail: a wrong key is refused (and
        # counted as a failed sign-in) rather than silently answered without it.
        admin = "authorization" in request.headers
        if admin:
            await self.guard.check(request)
        results = await self.run_checks()
        failed = [name for name, result in results.items() if not result.ok]
        body: dict[str, Any] = {"status": "not_ready" if failed else "ready"}
        if failed:
            body["failed"] = failed
        if admin:
            body["checks"] = {name: result.detail() for name, result in results.items()}
        return JSONResponse(body, status_code=503 if failed else 200, headers=NO_STORE)

    async def run_checks(self) -> dict[str, CheckResult]:
        """Every check at once, each bounded by ``timeout``; in a fixed order of names."""
        checks: dict[str, Callable[[], Awaitable[str | None]]] = {
            "database": self._database,
            "providers": self._providers,
            "draining": self._draining,
        }
        if self.redis_url is not None:
            checks["redis"] = self._redis_ping
        results: dict[str, CheckResult] = {}

        async def run(name: str, check: Callable[[], Awaitable[str | None]]) -> None:
            results[name] = await self._timed(check)

        async with anyio.create_task_group() as group:
            for name, check in checks.items():
                group.start_soon(run, name, check)
        return {name: results[name] for name in sorted(results)}

    async def _timed(self, check: Callable[[], Awaitable[str | None]]) -> CheckResult:
        started = time.perf_counter()
        ok, note = True, None
        try:
            with anyio.fail_after(self.timeout):
                note = await check()
        except TimeoutError:
            ok, note = False, f"no answer within {self.timeout:g} s"
        except _Failed as exc:
            ok, note = False, str(exc)
        except Exception as exc:
            ok, note = False, reason_of(exc)
        latency = round((time.perf_counter() - started) * 1000, 1)
        return CheckResult(ok, latency, note)

    async def _database(self) -> None:
        async with self.database.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def _redis_ping(self) -> None:
        if self._redis is None:
            from redis.asyncio import Redis

            assert self.redis_url is not None
            self._redis = Redis.from_url(
                self.redis_url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
            )
        # redis-py types ping() for its sync and async clients at once; this one is async.
        await self._redis.ping()  # type: ignore[misc]

    async def _providers(self) -> str:
        names = self.registry.names()
        if not names:
            raise _Failed("no provider configured")
        return ", ".join(names)

    async def _draining(self) -> None:
        if drain.is_draining():
            raise _Failed("shutting down: running calls are finishing")
