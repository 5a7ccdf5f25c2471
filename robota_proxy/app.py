"""``create_app``: the proxy as one Starlette app, standalone or mounted in a host app.

Resources (one connection pool per vendor) belong to the app and are opened and closed exactly
once, whichever of three ways the app is run:

1. standalone (``robota-proxy serve``, ``uvicorn``): the app's own lifespan does it;
2. mounted with ``robota_proxy.mount(host, "/llm", proxy)`` or with the host's lifespan
   entering ``proxy.lifespan``: the host's startup and shutdown do it (Starlette and FastAPI
   never run a mounted sub-app's lifespan, which is why this is needed);
3. mounted with a bare ``host.mount("/llm", proxy)``: the first request opens them (once,
   under a lock) and a warning says they will not be closed before the process exits.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from robota_proxy import scope as keys
from robota_proxy.dialects import RoutedModel
from robota_proxy.errors import (
    InternalError,
    InvalidRequest,
    NotFound,
    ProxyError,
    UpstreamUnavailable,
)
from robota_proxy.middleware.auth import AuthMiddleware
from robota_proxy.middleware.cache import CacheMiddleware
from robota_proxy.middleware.metering import MeteringMiddleware
from robota_proxy.middleware.ratelimit import RateLimitMiddleware
from robota_proxy.middleware.request_context import RequestContextMiddleware
from robota_proxy.observability import tracing
from robota_proxy.observability.alerts import Alerts, Webhook
from robota_proxy.observability.metrics import MetricsServer, ProxyMetrics
from robota_proxy.observability.throttled_log import ThrottledLog
from robota_proxy.policy.authenticators import (
    AuthFailureLimiter,
    CompositeAuthenticator,
    build_authenticator,
)
from robota_proxy.policy.pricing import PriceBook
from robota_proxy.policy.principals import Principal
from robota_proxy.policy.ratelimits import RateLimiter
from robota_proxy.policy.static_keys import StaticKeyAuthenticator
from robota_proxy.redis_failure import RedisFailurePolicy
from robota_proxy.responses import error_response
from robota_proxy.routes import health, openapi
from robota_proxy.routes.account import AccountRoutes
from robota_proxy.routes.admin import AdminGuard, AdminRoutes
from robota_proxy.routes.admin_usage import AdminUsageRoutes
from robota_proxy.routes.anthropic_compat import AnthropicRoutes
from robota_proxy.routes.chat import ChatRoutes
from robota_proxy.routes.embeddings import EmbeddingRoutes
from robota_proxy.routes.metrics import MetricsRoutes
from robota_proxy.routes.openai_compat import OpenAIRoutes
from robota_proxy.routes.prometheus import PrometheusRoutes
from robota_proxy.routes.resume import ResumeRoutes
from robota_proxy.routes.ws import WebSocketRoutes
from robota_proxy.settings import Settings
from robota_proxy.storage.database import DATABASE_OUTAGE, Database
from robota_proxy.storage.key_store import KeyStore
from robota_proxy.storage.limits_storage import LimitsStorage
from robota_proxy.storage.response_cache import ResponseCache, response_cache
from robota_proxy.storage.usage_store import LeaseReclaimer, UsageStore
from robota_proxy.streams.buffer import StreamBuffer
from robota_proxy.streams.factory import stream_buffer
from robota_proxy.upstreams.breakers import BreakerPolicy, Breakers, MemoryBreakers, OnChange
from robota_proxy.upstreams.deployments import Balancer
from robota_proxy.upstreams.registry import (
    UpstreamRegistry,
    build_deployments,
    build_upstreams,
)
from robota_proxy.upstreams.resilience import AttemptCounter, Resilience, RetryPolicy
from robota_proxy.upstreams.target_options import PhaseLimits, TargetTable
from robota_proxy.wire.paths import CHAT_PATHS

log = logging.getLogger("robota_proxy")

#: Reads about the caller's own account: never counted against their request rate limits.
UNCOUNTED_PATHS = (
    "/health",
    "/ready",
    "/openapi.json",
    "/ai/me",
    "/ai/usage",
    "/ai/models",
    "/v1/models",
)


class Resources:
    """Everything the app opens at start and closes at stop, guarded to happen once.

    Counted rather than flagged so that nested lifespans (a standalone app also entered by a
    host) close once, at the outermost exit. The registry and the database are opened at
    start; the stream buffer, the response cache and the limits storage connect on first use
    and are only closed here.
    """

    def __init__(
        self,
        registry: UpstreamRegistry,
        database: Database,
        *,
        streams: StreamBuffer,
        response_cache: ResponseCache,
        limits: LimitsStorage,
    ) -> None:
        self.registry = registry
        self.database = database
        self.streams = streams
        self.response_cache = response_cache
        self.limits = limits
        self._lock = anyio.Lock()
        self._users = 0
        self._drains: list[Callable[[], Awaitable[None]]] = []
        self._starts: list[Callable[[], Awaitable[None]]] = []

    def start_after_open(self, start: Callable[[], Awaitable[None]]) -> None:
        """Background work that needs the database (the lease reclaimer) starts once it is
        open; pair it with ``drain_before_close`` to stop it."""
        self._starts.append(start)

    def drain_before_close(self, drain: Callable[[], Awaitable[None]]) -> None:
        """Work that still writes in the background (key last-used times) is waited for at
        stop, before the database closes under it."""
        self._drains.append(drain)

    @property
    def is_open(self) -> bool:
        return self._users > 0

    async def open(self) -> None:
        async with self._lock:
            if self._users == 0:
                await self._start()
            self._users += 1

    async def ensure_open(self) -> None:
        """For a bare mount: open once if no lifespan did, as one user that never leaves."""
        async with self._lock:
            if self._users == 0:
                await self._start()
                self._users = 1

    async def close(self) -> None:
        async with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0:
                await self._stop()
                log.info("resources closed")

    async def _start(self) -> None:
        await self.database.open()
        for start in self._starts:
            await start()
        self.registry.open()
        log.info("resources opened (providers: %s)", ", ".join(self.registry.names()))

    async def _stop(self) -> None:
        """Run after the server's drain (no request is running any more): first the work
        that still writes in the background (drains), then the vendor pools, the Redis-backed
        parts, and the database last, since everything before it may still write a ledger or
        key row. Each one is closed even when closing another fails; the first failure is
        raised. An exit stack runs its callbacks last pushed, first run."""
        async with AsyncExitStack() as stack:
            stack.push_async_callback(self.database.aclose)
            stack.push_async_callback(self.limits.aclose)
            stack.push_async_callback(self.response_cache.aclose)
            stack.push_async_callback(self.streams.aclose)
            stack.push_async_callback(self.registry.aclose)
            for drain in self._drains:  # pushed last: they run first
                stack.push_async_callback(drain)


class ProxyApp(Starlette):
    """The Starlette app ``create_app`` returns. Mount it, or serve it on its own."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        tracing.configure(settings)  # README: Operating it, Traces (off by default)
        database = Database(settings.database_url)
        #: What an unreachable Redis means for limits, cache and streams (README: Bad days).
        redis_failure = RedisFailurePolicy(settings.redis_failure)
        self.streams = stream_buffer(
            settings.redis_url,
            settings.resume_window_seconds,
            max_bytes=settings.stream_buffer_max_bytes,
            on_failure=redis_failure,
            redis_prefix=settings.redis_prefix,
        )
        self.response_cache = response_cache(
            settings.redis_url,
            ttl=settings.cache_ttl_seconds,
            max_bytes=settings.cache_max_bytes,
            on_failure=redis_failure,
            redis_prefix=settings.redis_prefix,
        )
        self.limits = LimitsStorage(settings.redis_url, prefix=settings.redis_prefix)
        registry = UpstreamRegistry(
            lambda: build_upstreams(settings),
            deployments=lambda: build_deployments(settings),
            balancer=Balancer(settings.balancing, self.limits.storage),
        )
        self.resources = Resources(
            registry,
            database,
            streams=self.streams,
            response_cache=self.response_cache,
            limits=self.limits,
        )
        self._warned_lazy = False
        #: Webhook alerts (README: Alerts), or None when ``ROBOTA_ALERT_WEBHOOK_URL`` is unset.
        self.alerts = _alerts(
            settings, database, self.resources, lambda u, p: self.usage_store.counters(u, p)
        )
        breakers, close_breakers = _breakers(
            settings, None if self.alerts is None else self.alerts.circuit_changed
        )
        if close_breakers is not None:
            self.resources.drain_before_close(close_breakers)
        #: Prometheus metrics (README: Operating it, Metrics); None when turned off.
        self.metrics = _metrics(settings, self.resources, redis_failure)
        self.resilience = _resilience(
            registry, settings, breakers, self.metrics.attempts if self.metrics else None
        )
        #: Fallback chains keyed by a bare name: model aliases on every surface.
        self._aliases = frozenset(name for name in settings.fallbacks if "/" not in name)
        #: Upstream attempts by target and outcome, served by ``GET /admin/metrics``.
        self.upstream_attempts = self.resilience.counter
        chat = ChatRoutes(
            registry,
            max_body_bytes=settings.max_body_bytes,
            streams=self.streams,
            resume_grace=settings.resume_grace_seconds,
            stream_max_bytes=settings.stream_max_bytes,
            resilience=self.resilience,
        )
        openai_surface = OpenAIRoutes(
            registry,
            max_body_bytes=settings.max_body_bytes,
            resilience=self.resilience,
            aliases=self._aliases,
        )
        anthropic_surface = AnthropicRoutes(
            registry, max_body_bytes=settings.max_body_bytes, resilience=self.resilience
        )
        embeddings = EmbeddingRoutes(self.resilience, max_body_bytes=settings.max_body_bytes)
        resume = ResumeRoutes(self.streams)
        websockets = WebSocketRoutes(
            max_in_flight=settings.ws_max_in_flight, send_queue=settings.ws_send_queue
        )
        self.usage_store = UsageStore(database)
        if self.metrics is not None:
            self.usage_store.on_pending = self.metrics.ledger_write
            self.usage_store.on_failed = self.metrics.ledger_failed
        # Leases of calls whose process died: closed at start and every few seconds after.
        reclaimer = LeaseReclaimer(self.usage_store, settings.lease_reclaim_seconds)
        self.resources.start_after_open(reclaimer.start)
        self.resources.drain_before_close(reclaimer.stop)
        self.prices = PriceBook.from_file(settings.prices_file)
        #: Per-user rpm / per-day / tpm; ``await proxy.limiter.remaining(principal)`` reads them.
        self.limiter = RateLimiter(self.limits.storage)
        account = AccountRoutes(registry, self.usage_store, rate_status=self.limiter.remaining)
        self.key_store = KeyStore(database)
        failures = AuthFailureLimiter(
            self.limits.storage,
            settings.auth_failures_per_minute,
            on_storage_failure=redis_failure,
        )
        auth = _auth_options(settings, self.key_store, failures)
        if isinstance(auth["authenticator"], CompositeAuthenticator):
            self.resources.drain_before_close(auth["authenticator"].flush)
        admin_guard = AdminGuard(settings.admin_key, failures)
        admin = AdminRoutes(self.key_store, admin_guard)
        admin_usage = AdminUsageRoutes(self.usage_store, admin_guard)
        metrics = MetricsRoutes(self.upstream_attempts, admin_guard, breakers)
        readiness = health.ReadinessRoutes(
            database,
            registry,
            admin_guard,
            redis_url=settings.redis_url,
            timeout=settings.ready_timeout_seconds,
        )
        self.resources.drain_before_close(readiness.aclose)
        super().__init__(
            routes=[
                *health.ROUTES,
                *readiness.routes(),
                *openapi.ROUTES,
                *chat.routes(),
                *embeddings.routes(),
                *openai_surface.routes(),
                *anthropic_surface.routes(),
                *resume.routes(),
                *websockets.routes(),
                *account.routes(),
                *admin.routes(),
                *admin_usage.routes(),
                *metrics.routes(),
                *(PrometheusRoutes(self.metrics, admin_guard).routes() if self.metrics else []),
            ],
            middleware=[
                Middleware(RequestContextMiddleware, metrics=self.metrics),
                Middleware(AuthMiddleware, **auth),
                Middleware(
                    RateLimitMiddleware,
                    limiter=self.limiter,
                    exempt_paths=UNCOUNTED_PATHS,
                    on_storage_failure=redis_failure,
                ),
                Middleware(
                    MeteringMiddleware,
                    store=self.usage_store,
                    prices=self.prices,
                    reserve_max_tokens=settings.reserve_max_tokens,
                    max_body_bytes=settings.max_body_bytes,
                    request_timeout=settings.max_request_timeout,
                    lease_margin=settings.lease_margin_seconds,
                    alerts=self.alerts,
                ),
                Middleware(
                    CacheMiddleware,
                    cache=self.response_cache,
                    scope=settings.cache_scope,
                    enabled=settings.cache_enabled,
                    max_body_bytes=settings.max_body_bytes,
                    max_entry_bytes=min(settings.cache_max_bytes, 4 * 1024 * 1024),
                ),
            ],
            exception_handlers={
                ProxyError: _proxy_error,
                HTTPException: _http_error,
                **dict.fromkeys(DATABASE_OUTAGE, _database_error),
                Exception: _unexpected_error,
            },
            lifespan=self.lifespan,
        )
        if self.metrics is not None:
            self.metrics.bind_routes(self.routes)

    @asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """Enter from a host app's lifespan to open and close the proxy's resources with it:
        ``FastAPI(lifespan=proxy.lifespan)``."""
        await self.resources.open()
        try:
            yield
        finally:
            await self.resources.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan" and not self.resources.is_open:
            if not self._warned_lazy:
                self._warned_lazy = True
                log.warning(
                    "robota proxy mounted without its lifespan: resources opened on first "
                    "request and not closed at shutdown; use robota_proxy.mount(host, path, "
                    "proxy) or enter proxy.lifespan in the host's lifespan"
                )
            await self.resources.ensure_open()
        scope[keys.MODEL_ROUTER] = self._route_model
        await super().__call__(scope, receive, send)

    def _route_model(self, name: str, vendor: str) -> RoutedModel:
        """The model router compatible surfaces parse with (``robota_proxy.dialects``)."""
        return self.resources.registry.route(name, vendor, self._aliases)


def _alerts(
    settings: Settings,
    database: Database,
    resources: Resources,
    counters: Callable[[str, str], Awaitable[Any]],
) -> Alerts | None:
    """Alerts with their once-a-month marks in Redis when one is shared, else in the
    database; their tasks start after the database opens and drain before it closes."""
    if settings.alert_webhook_url is None:
        return None
    from robota_proxy.storage.alert_marks import DatabaseAlertMarks, RedisAlertMarks

    secret = settings.alert_webhook_secret
    webhook = Webhook(
        settings.alert_webhook_url.get_secret_value(),
        None if secret is None else secret.get_secret_value(),
        attempts=settings.alert_attempts,
        backoff=settings.alert_backoff_seconds,
        backoff_max=settings.alert_backoff_max_seconds,
        timeout=settings.alert_timeout_seconds,
    )
    marks: DatabaseAlertMarks | RedisAlertMarks
    if settings.redis_url is None:
        marks = DatabaseAlertMarks(database)
    else:
        from redis.asyncio import Redis  # the [redis] extra: imported only when configured

        client = Redis.from_url(settings.redis_url)
        marks = RedisAlertMarks(client, settings.redis_prefix)
        resources.drain_before_close(client.aclose)
    alerts = Alerts(
        webhook,
        marks,
        counters,
        queue_size=settings.alert_queue_size,
        drain_seconds=settings.alert_drain_seconds,
    )
    resources.start_after_open(alerts.start)
    resources.drain_before_close(alerts.stop)  # pushed after the client's close: runs first
    return alerts


def _breakers(
    settings: Settings, on_change: OnChange | None = None
) -> tuple[Breakers | None, Callable[[], Awaitable[None]] | None]:
    """Per process, or on the shared Redis (with the close of its client) when one is set."""
    if not settings.breaker_enabled:
        return None, None
    policy = BreakerPolicy(
        failures=settings.breaker_failures,
        error_rate=settings.breaker_error_rate,
        window_seconds=settings.breaker_window_seconds,
        min_calls=settings.breaker_min_calls,
        cooldown_seconds=settings.breaker_cooldown_seconds,
    )
    if settings.redis_url is None:
        return MemoryBreakers(policy, on_change=on_change), None
    from redis.asyncio import Redis  # the [redis] extra: imported only when configured

    from robota_proxy.storage.breakers_redis import RedisBreakers

    client = Redis.from_url(settings.redis_url)
    return RedisBreakers(client, settings.redis_prefix, policy, on_change=on_change), client.aclose


def _metrics(
    settings: Settings, resources: Resources, redis_failure: RedisFailurePolicy
) -> ProxyMetrics | None:
    """The metrics, fed by Redis failures, and their unauthenticated bind when
    ``ROBOTA_METRICS_ADDR`` is set (opened and closed with the other resources)."""
    if not settings.metrics_enabled:
        return None
    metrics = ProxyMetrics(
        per_user=settings.metrics_per_user, max_models=settings.metrics_max_models
    )
    redis_failure.on_failed = metrics.redis_failed
    if settings.metrics_addr is not None:
        server = MetricsServer(settings.metrics_addr, metrics.exposition)
        resources.start_after_open(server.start)
        resources.drain_before_close(server.stop)

    async def exited() -> None:
        metrics.process_exited()

    resources.drain_before_close(exited)
    return metrics


def _resilience(
    registry: UpstreamRegistry,
    settings: Settings,
    breakers: Breakers | None,
    counter: AttemptCounter | None = None,
) -> Resilience:
    policy = RetryPolicy(
        retries=settings.upstream_retries,
        backoff_base=settings.retry_backoff_base,
        backoff_max=settings.retry_backoff_max,
        retry_after_max=settings.retry_after_max,
    )
    limits = PhaseLimits(
        headers=settings.upstream_headers_timeout,
        first_token=settings.upstream_first_token_timeout,
        idle=settings.upstream_idle_timeout,
    )
    return Resilience(
        registry,
        policy=policy,
        fallbacks=settings.fallbacks,
        max_timeout=settings.max_request_timeout,
        targets=TargetTable(limits, settings.target_options),
        breakers=breakers,
        counter=counter,
        refusals_fall_back=settings.fallback_on_refusal,
    )


def _auth_options(
    settings: Settings, store: KeyStore, failures: AuthFailureLimiter
) -> dict[str, Any]:
    common: dict[str, Any] = {
        "exempt_paths": ("/health", "/ready", "/openapi.json", "/metrics"),  # the admin key
        "exempt_prefixes": ("/admin/",),  # guarded by the admin key instead
        "chat_paths": CHAT_PATHS,
        "max_body_bytes": settings.max_body_bytes,
    }
    if settings.auth == "disabled":
        log.warning(
            "AUTHENTICATION IS DISABLED (ROBOTA_AUTH=disabled): anyone who can reach this "
            "proxy can spend its vendor keys"
        )
        return {
            **common,
            "authenticator": StaticKeyAuthenticator(()),
            "anonymous": Principal("anonymous"),
        }
    return {
        **common,
        "authenticator": build_authenticator(settings, store),
        "failure_limiter": failures,
    }


def create_app(settings: Settings | None = None) -> ProxyApp:
    """The proxy app. Settings come from the environment and ``.env`` when not given."""
    return ProxyApp(settings if settings is not None else Settings())


def mount(host: Starlette, path: str, proxy: ProxyApp) -> None:
    """Mount ``proxy`` at ``path`` and tie its resources to the host's lifespan."""
    host.mount(path, proxy)
    inner: Callable[[Any], AbstractAsyncContextManager[Any]] = host.router.lifespan_context

    @asynccontextmanager
    async def combined(app: Any) -> AsyncIterator[Any]:
        async with proxy.lifespan(app), inner(app) as state:
            yield state

    host.router.lifespan_context = combined


async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return error_response(exc, keys.request_id(request.scope), scope=request.scope)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: ProxyError
    if exc.status_code == 404:
        error = NotFound(f"no route {request.method} {request.url.path}")
    elif exc.status_code == 405:
        # No wire code of its own: an invalid request, with HTTP's own status kept.
        error = InvalidRequest(f"method {request.method} is not allowed here")
        return error_response(
            error, keys.request_id(request.scope), status=405, scope=request.scope
        )
    else:
        error = InvalidRequest(str(exc.detail))
    return error_response(error, keys.request_id(request.scope), scope=request.scope)


#: An outage of the database is logged like this, at most once per interval, not per request.
_database_outage = ThrottledLog(log, interval=10.0)


async def _database_error(request: Request, exc: Exception) -> Response:
    """The database (or the network to it) is down: the caller can retry, nothing is wrong
    with the request or with the proxy, so no traceback either. Only the type is logged: a
    driver's message can carry the URL with its password. Registered for these types rather
    than caught in ``_unexpected_error``, whose middleware re-raises after answering."""
    _database_outage.warn(
        "database", "database unreachable (%s): answering 503", type(exc).__name__
    )
    metrics = getattr(request.app, "metrics", None)
    if isinstance(metrics, ProxyMetrics):
        metrics.database_failed()
    error = UpstreamUnavailable("the proxy's database is unreachable; retry shortly", retry_after=1)
    return error_response(error, keys.request_id(request.scope), scope=request.scope)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    request_id = keys.request_id(request.scope)
    log.error("unexpected error in %s", request_id, exc_info=exc)
    return error_response(InternalError("internal proxy error"), request_id, scope=request.scope)
