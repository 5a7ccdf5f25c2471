"""Prometheus metrics of the proxy (``GET /metrics``, README: Operating it, Metrics).

Why it looks the way it does:

- **Our own registry.** A host app that mounts the proxy may use prometheus-client's default
  registry for its own metrics; registering ours there would clash on a second ``create_app``
  and mix two apps' numbers. Each ``ProxyMetrics`` has a ``CollectorRegistry`` of its own.
- **Multiprocess mode.** With ``--workers N`` each worker counts on its own; when
  ``PROMETHEUS_MULTIPROC_DIR`` is set (``robota-proxy serve --workers N`` sets it to a fresh
  directory unless the operator gave one) prometheus-client writes every value to files there
  and a scrape of any worker sums them all. The variable must be set before prometheus-client
  is imported, which is why ``serve`` sets it in the parent, before the workers start.
- **One read per request.** The per-call numbers (provider, model, usage, cost, cache, status)
  are read once, at the end of the request, from the ``CallRecord`` the layers filled, by
  ``RequestContextMiddleware``; only what no record knows (attempts, time to first token, the
  gaps between tokens, ledger writes, Redis failures) is counted where it happens.
- **Cheap hot path.** Label children are bound once per label tuple and cached in plain
  dicts; a request costs a few dict lookups and counter increments, no registry lookup.
- **Bounded labels.** No label carries a secret, a key, a prompt or an answer. Model names
  come from callers' requests, so at most ``max_models`` provider/model pairs get a label of
  their own (the rest read ``other``); users are labels only when the operator asks
  (``ROBOTA_METRICS_PER_USER=true``).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, MutableMapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import anyio
from starlette.routing import BaseRoute, Mount, Route

from robota_client.messages import Usage
from robota_proxy import scope as keys
from robota_proxy.call_record import CallRecord
from robota_proxy.dialects import CHAT_SURFACES, scope_feature
from robota_proxy.policy.principals import Principal
from robota_proxy.upstreams.resilience import Attempt, AttemptCounter, Target

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("robota_proxy.metrics")

#: prometheus-client's own switch for multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Buckets from 1 ms to 60 s: a token gap of 2 ms and a minute-long answer both land in a
#: bucket of their own.
BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    float("inf"),
)
#: The error codes that are the proxy's own refusals (not a vendor's answer).
REFUSALS = frozenset(
    {"rate_limited", "quota_exceeded", "budget_exceeded", "forbidden", "unauthenticated"}
)
TOKEN_KINDS = ("prompt", "completion", "cached_prompt", "cache_write", "reasoning")
RESUME_ROUTE = "/ai/chat/stream/{stream_id}"
OTHER = "other"


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def prepare_multiprocess(workers: int) -> str | None:
    """For ``serve --workers N`` (N > 1): make sure ``PROMETHEUS_MULTIPROC_DIR`` names an
    empty directory the workers share, so ``/metrics`` sums them. The operator's own is kept
    (they clear it between runs, as prometheus-client asks); otherwise a fresh temporary one
    is made for this run and removed when ``serve`` exits. Returns the directory used."""
    if workers <= 1 and not multiprocess_enabled():
        return None
    existing = os.environ.get(MULTIPROC_ENV)
    if existing:
        os.makedirs(existing, exist_ok=True)
        return existing
    made = tempfile.mkdtemp(prefix="robota-metrics-")
    os.environ[MULTIPROC_ENV] = made
    atexit.register(shutil.rmtree, made, True)
    return made


class _Children:
    """Label children of one metric, bound on first use and kept: the hot path does a dict
    lookup instead of prometheus-client's ``labels()`` (argument checks, a lock)."""

    __slots__ = ("_bound", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._bound: dict[tuple[str, ...], Any] = {}

    def get(self, labels: tuple[str, ...]) -> Any:
        child = self._bound.get(labels)
        if child is None:
            child = self._bound[labels] = self._metric.labels(*labels)
        return child


class ModelLabels:
    """``(provider, model)`` as labels, at most ``limit`` distinct pairs: a caller can send
    any model name a permissive vendor accepts, and each would be a new time series."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._known: dict[tuple[str, str], tuple[str, str]] = {}

    def of(self, provider: str, model: str) -> tuple[str, str]:
        pair = (provider, model)
        known = self._known.get(pair)
        if known is not None:
            return known
        if len(self._known) >= self.limit:
            return (provider, OTHER)
        self._known[pair] = pair
        return pair


class PrometheusAttemptCounter(AttemptCounter):
    """The resilience layer's attempt counter (``/admin/metrics`` keeps working) that also
    feeds ``robota_upstream_attempts_total``, the upstream latency, time to first token and
    the gaps between tokens."""

    times_tokens = True

    def __init__(self, metrics: ProxyMetrics) -> None:
        super().__init__()
        self._attempts = _Children(metrics.upstream_attempts)
        self._duration = _Children(metrics.upstream_duration)
        self._ttft = _Children(metrics.ttft)
        self._gap = _Children(metrics.inter_token)
        self._models = metrics.models
        self._targets: dict[Target, tuple[str, str]] = {}

    def _labels(self, target: Target) -> tuple[str, str]:
        labels = self._targets.get(target)
        if labels is None:
            labels = self._targets[target] = self._models.of(target.provider, target.model)
        return labels

    def add(self, attempt: Attempt) -> None:
        super().add(attempt)
        labels = self._labels(attempt.target)
        self._attempts.get(("/".join(labels), attempt.outcome)).inc()
        if attempt.outcome not in ("skipped", "circuit_open"):
            self._duration.get(labels).observe(attempt.ms / 1000)

    def decided(self, target: Target, what: str) -> None:
        self._attempts.get(("/".join(self._labels(target)), what)).inc()

    def first_token(self, target: Target, seconds: float) -> None:
        self._ttft.get(self._labels(target)).observe(seconds)

    def token_gap(self, target: Target, seconds: float) -> None:
        self._gap.get(self._labels(target)).observe(seconds)


class ProxyMetrics:
    """Every metric of one proxy app, and the methods the layers call to move them."""

    def __init__(
        self,
        *,
        per_user: bool = False,
        max_models: int = 500,
        registry: CollectorRegistry | None = None,
    ) -> None:
        # Imported when metrics are built, not with the app: prometheus-client is ~30 ms.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.per_user = per_user
        self.models = ModelLabels(max_models)
        user = ("user",) if per_user else ()
        r = self.registry
        self.requests = Counter(
            "robota_requests",
            "HTTP requests answered, by surface, route template, provider, model and status",
            ("surface", "route", "provider", "model", "status", *user),
            registry=r,
        )
        self.request_duration = Histogram(
            "robota_request_duration_seconds",
            "Time from a request's arrival to the end of its answer (a stream: its last event)",
            ("surface", "route"),
            buckets=BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "robota_upstream_duration_seconds",
            "One vendor call (attempt), to its answer or a stream's first content",
            ("provider", "model"),
            buckets=BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "robota_time_to_first_token_seconds",
            "A stream's first content, from the request's start (retries and fallbacks in)",
            ("provider", "model"),
            buckets=BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "robota_inter_token_seconds",
            "The gap between two content events of a vendor's stream",
            ("provider", "model"),
            buckets=BUCKETS,
            registry=r,
        )
        self.upstream_attempts = Counter(
            "robota_upstream_attempts",
            "Upstream attempts by target and outcome (ok, an error code, timeout, cancelled, "
            "skipped, circuit_open), and the decisions after a failure (retry, fallback)",
            ("target", "outcome"),
            registry=r,
        )
        self.tokens = Counter(
            "robota_tokens",
            "Tokens vendors reported, by kind, under the provider and model of the vendor call "
            "that used them (a failed-over call's tries each under their own; cache hits "
            "excluded)",
            ("provider", "model", "kind", *user),
            registry=r,
        )
        self.cost = Counter(
            "robota_cost_usd",
            "Cost in USD of the vendor calls, each under its own provider and model (priced "
            "models only)",
            ("provider", "model", *user),
            registry=r,
        )
        self.cache_requests = Counter(
            "robota_cache_requests",
            "Response cache look-ups by result",
            ("result",),
            registry=r,
        )
        self.refusals = Counter(
            "robota_refusals",
            "Requests the proxy refused before any vendor call, by reason",
            ("reason",),
            registry=r,
        )
        self.streams_open = Gauge(
            "robota_streams_open",
            "Streams being sent to clients right now",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.stream_resumes = Counter(
            "robota_stream_resumes",
            "Streams resumed with Last-Event-ID (the rest sent again, no vendor call)",
            registry=r,
        )
        self.ledger_pending = Gauge(
            "robota_ledger_writes_pending",
            "Ledger writes (opens and settles) queued or being written",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.ledger_failures = Counter(
            "robota_ledger_write_failures",
            "Ledger writes that failed (the row is closed by the lease reclaimer)",
            registry=r,
        )
        self.redis_errors = Counter(
            "robota_redis_errors",
            "Operations on Redis (shared state) that failed, by part",
            ("part",),
            registry=r,
        )
        self.database_errors = Counter(
            "robota_database_errors",
            "Database operations that failed: ledger writes and requests answered 503",
            registry=r,
        )
        for result in ("hit", "miss"):
            self.cache_requests.labels(result)
        for reason in sorted(REFUSALS):
            self.refusals.labels(reason)
        self.attempts = PrometheusAttemptCounter(self)
        self._requests = _Children(self.requests)
        self._durations = _Children(self.request_duration)
        self._tokens = _Children(self.tokens)
        self._cost = _Children(self.cost)
        self._refusals = {reason: self.refusals.labels(reason) for reason in REFUSALS}
        self._hit = self.cache_requests.labels("hit")
        self._miss = self.cache_requests.labels("miss")
        self._redis = _Children(self.redis_errors)
        self._routes: dict[Any, str] = {}
        self._static: dict[str, str] = {}
        self._surfaces: dict[str, str] = {}

    # --- wiring --------------------------------------------------------------------------

    def bind_routes(self, routes: Iterable[BaseRoute], prefix: str = "") -> None:
        """Learn the app's route templates, so that ``route`` is ``/ai/chat/stream/{stream_id}``
        rather than one series per stream id, and an unknown path is ``other``."""
        for route in routes:
            if isinstance(route, Mount):
                self.bind_routes(route.routes, prefix + route.path)
            elif isinstance(route, Route):
                template = prefix + route.path
                self._routes[route.endpoint] = template
                if "{" not in template:
                    self._static[template] = template

    # --- the end of a request (RequestContextMiddleware) ------------------------------------

    def stream_started(self, scope: MutableMapping[str, Any], status: int) -> bool:
        """At the start of an answer: whether it is a stream (now counted open; call
        ``stream_ended`` when the request is over)."""
        if status != 200:
            return False
        record = scope.get(keys.CALL)
        if isinstance(record, CallRecord):
            if not (record.streamed or scope_feature(scope) == "stream"):
                return False
        elif self._route(scope) != RESUME_ROUTE:
            return False
        self.streams_open.inc()
        return True

    def stream_ended(self) -> None:
        self.streams_open.dec()

    def request_done(self, scope: MutableMapping[str, Any], status: int, seconds: float) -> None:
        route = self._route(scope)
        surface = self._surfaces.get(route)
        if surface is None:
            surface = self._surfaces[route] = _surface(route)
        record = scope.get(keys.CALL)
        provider = model = ""
        user: tuple[str, ...] = ()
        if self.per_user:
            principal = scope.get(keys.PRINCIPAL)
            user = (principal.user if isinstance(principal, Principal) else "",)
        if isinstance(record, CallRecord):
            if record.cache_result is not None:
                (self._hit if record.cached else self._miss).inc()
            if (record.upstream_called or record.cached) and record.provider and record.model:
                provider, model = self.models.of(record.provider, record.model)
            if record.upstream_called and not record.cached:
                self._bill(record, (provider, model) if provider else None, user)
        code = scope.get(keys.ERROR_CODE)
        if code is not None and code in REFUSALS:
            if not (isinstance(record, CallRecord) and record.upstream_called):
                self._refusals[code].inc()
        elif route == RESUME_ROUTE and status == 200:
            self.stream_resumes.inc()
        self._requests.get((surface, route, provider, model, str(status), *user)).inc()
        self._durations.get((surface, route)).observe(seconds)

    def _bill(
        self, record: CallRecord, final: tuple[str, str] | None, user: tuple[str, ...]
    ) -> None:
        """The call's tokens and cost, each vendor call's share under its own provider and
        model: ``record.usage`` and ``record.cost`` are the call's totals, and the vendor
        calls that ended before it (``record.ended``: failed tries, which cost nothing, and
        the broken attempts of a continued stream) say what was theirs; the rest is the
        final attempt's (``final``)."""
        counts = _token_counts(record.usage)
        cost = record.cost
        if record.ended:
            for attempt in record.ended:
                own = _token_counts(attempt.usage)
                counts = tuple(left - one for left, one in zip(counts, own, strict=True))
                if cost is not None:
                    cost -= attempt.cost or 0
                labels = self.models.of(attempt.provider, attempt.model)
                self._add(labels, own, attempt.cost, user)
        if final is not None:
            self._add(final, counts, cost, user)

    def _add(
        self,
        labels: tuple[str, str],
        counts: tuple[int, ...],
        cost: Decimal | None,
        user: tuple[str, ...],
    ) -> None:
        provider, model = labels
        for kind, count in zip(TOKEN_KINDS, counts, strict=True):
            if count > 0:
                self._tokens.get((provider, model, kind, *user)).inc(count)
        if cost is not None and cost > 0:
            self._cost.get((provider, model, *user)).inc(float(cost))

    def _route(self, scope: MutableMapping[str, Any]) -> str:
        endpoint = scope.get("endpoint")
        if endpoint is not None:
            template = self._routes.get(endpoint)
            if template is not None:
                return template
        return self._static.get(keys.route_path(scope), OTHER)

    # --- counted where they happen --------------------------------------------------------

    def ledger_write(self, delta: int) -> None:
        """A ledger write was queued (+1) or is done (-1)."""
        self.ledger_pending.inc(delta)

    def ledger_failed(self, database_error: bool) -> None:
        self.ledger_failures.inc()
        if database_error:
            self.database_errors.inc()

    def redis_failed(self, part: str) -> None:
        self._redis.get((part,)).inc()

    def database_failed(self) -> None:
        self.database_errors.inc()

    # --- the scrape ------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The text format of every metric: this process's registry, or, in multiprocess
        mode, the sum of all workers' files."""
        from prometheus_client import CollectorRegistry, generate_latest  # loaded by __init__

        if not multiprocess_enabled():
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        collected = CollectorRegistry()
        multiprocess.MultiProcessCollector(collected)  # type: ignore[no-untyped-call]
        return generate_latest(collected)

    def process_exited(self) -> None:
        """At shutdown: this worker's live gauges (streams open, ledger writes pending) stop
        counting; its counters stay in the sums, as they should."""
        if multiprocess_enabled():
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def _token_counts(usage: Usage | None) -> tuple[int, ...]:
    """A usage's counts in ``TOKEN_KINDS``' order (what a vendor did not say is 0)."""
    if usage is None:
        return (0, 0, 0, 0, 0)
    return (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.cached_prompt_tokens or 0,
        usage.cache_write_tokens or 0,
        usage.reasoning_tokens or 0,
    )


#: The classic text format (0.0.4), which every Prometheus server reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _surface(route: str) -> str:
    surface = CHAT_SURFACES.get(route)
    if surface is not None:
        return surface.dialect.name
    if route.startswith("/v1/messages"):
        return "anthropic"
    if route.startswith("/v1/"):
        return "openai"
    if route.startswith("/ai/"):
        return "robota"
    if route.startswith("/admin/") or route == "/metrics":
        return "admin"
    return OTHER


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9100`` for IPv6); a bare ``:9100`` binds 127.0.0.1."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


class MetricsServer:
    """``ROBOTA_METRICS_ADDR``: ``GET /metrics`` without authentication on a bind of its own
    (a port only Prometheus reaches), started and stopped with the app's resources. Bound
    with ``SO_REUSEPORT`` so that every worker of ``--workers N`` can listen on the same
    address: whichever answers, it serves the sum of all workers (multiprocess mode). Its
    answers carry ``X-Robota-Overhead-Ms`` as all of the proxy's do: the time from the
    request head's arrival to the answer (the rendering, in a thread, included)."""

    def __init__(self, address: str, render: Callable[[], bytes]) -> None:
        self.host, self.port = parse_address(address)
        self._render = render
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_port=True
        )
        log.info("metrics on http://%s:%d/metrics (no authentication)", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with anyio.fail_after(10):
                head = await reader.readuntil(b"\r\n\r\n")
            started = time.perf_counter()
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            if method != b"GET" or path not in (b"/metrics", b"/"):
                status, body, ctype = b"404 Not Found", b"not found: GET /metrics\n", b"text/plain"
            else:
                body = await anyio.to_thread.run_sync(self._render)
                status, ctype = b"200 OK", CONTENT_TYPE.encode()
            overhead = (time.perf_counter() - started) * 1000
            writer.write(
                b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                b"X-Robota-Overhead-Ms: %.2f\r\n"
                b"Connection: close\r\n\r\n" % (status, ctype, len(body), overhead)
            )
            writer.write(body)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
