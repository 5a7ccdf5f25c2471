"""Proxy settings, read from the environment (prefix ``ROBOTA_``) and an optional ``.env``.

Vendor keys are also accepted under the vendors' own variable names (``OPENAI_API_KEY``...)
because that is where teams already keep them. Keys are ``SecretStr`` so that printing the
settings, or an exception that carries them, never shows a key.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _vendor_key(vendor: str) -> Any:
    return Field(
        default=None,
        validation_alias=AliasChoices(f"ROBOTA_{vendor}_API_KEY", f"{vendor}_API_KEY"),
    )


class TargetOverrides(BaseModel):
    """What one entry of ``ROBOTA_TARGET_OPTIONS`` may set for the targets its pattern
    matches; an unset field keeps the global limit or the known default."""

    model_config = ConfigDict(extra="forbid")

    headers_timeout: float | None = Field(default=None, gt=0, le=3600)
    first_token_timeout: float | None = Field(default=None, gt=0, le=3600)
    idle_timeout: float | None = Field(default=None, gt=0, le=3600)
    #: Whether the target continues an answer from an assistant prefill.
    prefill: bool | None = None


class DeploymentSettings(BaseModel):
    """One entry of ``ROBOTA_DEPLOYMENTS``: another key, base URL or region of a vendor that
    serves the same models, load-balanced with the vendor's own settings (README: Deployments).
    Its name is what the ledger and the metrics show; its key never leaves the proxy."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=60, pattern=r"^[A-Za-z0-9._-]+$")
    provider: Literal["openai", "anthropic", "google"]
    api_key: SecretStr | None = None
    base_url: str | None = None
    models: list[str] | None = None
    #: Share of the traffic under the ``weighted`` strategy.
    weight: float = Field(default=1.0, gt=0, le=1_000_000)
    #: This deployment's own vendor limits (requests and tokens per minute), if it has any.
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    #: Seconds to open a connection to it; unset: ``ROBOTA_UPSTREAM_CONNECT_TIMEOUT``. A
    #: connect limit belongs to an endpoint (a far region, a slow gateway), not to a model.
    connect_timeout: float | None = Field(default=None, gt=0, le=600)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ROBOTA_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    host: str = "127.0.0.1"
    port: int = 8787

    #: ``keys`` checks bearer keys against ``api_keys``; ``disabled`` runs open (loudly).
    auth: Literal["keys", "disabled"] = "keys"
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)

    #: Compare with ``ROBOTA_ADMIN_KEY`` for the admin API (``/admin/...``); unset: no admin API.
    admin_key: SecretStr | None = None

    #: Keys, users and the usage ledger. SQLite for one process, PostgreSQL for several.
    database_url: str = "sqlite:///robota.db"
    #: Shared rate limits (and cache) for several processes; unset: in-process memory.
    redis_url: str | None = None
    #: Redis unreachable: ``open`` goes on without limits, cache or resume (logged, throttled);
    #: ``closed`` answers 503 instead. Money is in SQL either way.
    redis_failure: Literal["open", "closed"] = "open"
    #: Every Redis key this proxy writes starts with it, so that deployments (or test runs)
    #: sharing one Redis database never see each other's limits, cache or streams.
    redis_prefix: str = Field(default="robota", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")

    #: Seconds a looked-up key is trusted before it is read again: the bound on how long a
    #: revoked key keeps working on a process that had just seen it. Half a second keeps
    #: revocation under one second, round trips included, at one indexed read per key per
    #: half second per process.
    key_cache_seconds: float = Field(default=0.5, ge=0, le=60)
    #: Failed authentications allowed per client address per minute (key guessing).
    auth_failures_per_minute: int = Field(default=20, gt=0)

    #: JWT bearer tokens: HS256 with a shared secret, or RS256/ES256 with a PEM public key.
    jwt_secret: SecretStr | None = None
    jwt_public_key_file: Path | None = None
    jwt_algorithms: CommaList | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: float = Field(default=30.0, ge=0, le=600)
    #: Take permissions from the token's namespaced claim instead of the user record.
    jwt_trust_claims: bool = False
    jwt_claims_namespace: str = "https://robota.dev/permissions"

    #: JSON file of per-model price overrides (negotiated or self-hosted prices), and an
    #: optional ``default`` price for models the price database does not know.
    prices_file: Path | None = None
    #: Output tokens reserved for a budgeted caller's request that sets no ``maxTokens``;
    #: the proxy also sends it to the vendor as the limit, so the reservation is a true bound.
    reserve_max_tokens: int = Field(default=4096, gt=0)

    #: Resumable streams: how long a stream's events stay resumable after it ended (memory,
    #: or Redis when ``redis_url`` is set), and how long an abandoned stream's vendor call
    #: goes on waiting for its client to resume before it is cancelled.
    resume_window_seconds: float = Field(default=60.0, gt=0, le=24 * 3600)
    resume_grace_seconds: float = Field(default=0.5, ge=0, le=60)
    #: What one stream may buffer (past it, the stream ends with an error event), and what all
    #: streams of this process may hold together (past it, new streams get 503).
    stream_max_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024)
    stream_buffer_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    #: ``/ai/ws``: concurrent requests per socket, and frames queued per socket for a slow
    #: reader before the stream writers wait.
    ws_max_in_flight: int = Field(default=16, gt=0)
    ws_send_queue: int = Field(default=64, gt=0)

    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # --- ``serve``'s HTTP server (README: Hardening) ---
    #: Addresses whose X-Forwarded-For / X-Forwarded-Proto are believed (a load balancer in
    #: front); none by default, so no co-located process can choose the client address.
    forwarded_allow_ips: CommaList = Field(default_factory=list)
    #: The request head (request line + headers) and how long it may take to arrive.
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_headers: int = Field(default=100, ge=8, le=10_000)
    max_request_line_bytes: int = Field(default=8 * 1024, ge=256, le=1024 * 1024)
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    #: Longest pause inside a request body before the connection is closed with 408.
    body_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    #: Open connections per process; unset: the descriptor limit less a reserve.
    max_connections: int | None = Field(default=None, ge=1)
    upstream_timeout: float = Field(default=60.0, gt=0)
    #: Connections each vendor adapter keeps open at most; unset: no cap of its own (each is
    #: a call in flight, so ``max_connections`` bounds them). A cap of 1000 held a stream
    #: past the thousandth waiting for a connection until its deadline.
    max_connections_per_vendor: int | None = Field(default=None, gt=0)
    #: ``text`` (a line per record) or ``json`` (an object per line; README: Operating it, Logs).
    log_format: Literal["text", "json"] = "text"
    #: OpenTelemetry traces (README: Operating it, Traces; the ``[otel]`` extra). The OTLP/HTTP
    #: endpoint is the collector's base URL (``/v1/traces`` is added); unset: the standard
    #: ``OTEL_EXPORTER_OTLP_*`` variables, else ``http://localhost:4318``.
    otel_enabled: bool = False
    otel_exporter_otlp_endpoint: str | None = Field(default=None, pattern=r"^https?://\S+$")
    #: Prompt and completion text on the spans: off, since they are the users' data.
    otel_capture_content: bool = False
    #: uvicorn's levels; any case is accepted (``INFO`` as well as ``info``).
    log_level: LogLevel = "info"
    #: On SIGTERM (README: Graceful drain): how long running calls and streams may go on
    #: finishing once the listener is closed; what is still running then is cancelled and
    #: settled (its ledger row written), and the process exits 0.
    drain_seconds: float = Field(default=30.0, ge=0, le=3600)
    #: ``/ready``: how long each check (database, Redis) may take before it counts as failed.
    ready_timeout_seconds: float = Field(default=1.0, gt=0, le=60)

    # --- response cache and upstream resilience (README: Caching, Fallbacks and retries) ---
    #: Exact-match cache of deterministic (temperature 0) or opted-in (``cache: true``) calls.
    cache_enabled: bool = True
    cache_ttl_seconds: float = Field(default=3600.0, gt=0)
    #: Bound of the in-process cache (sum of stored entry sizes); Redis uses its maxmemory.
    cache_max_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    #: ``user``: each user reads only answers given to them; ``shared``: everyone reads all.
    cache_scope: Literal["user", "shared"] = "user"
    #: Extra tries of a retryable vendor failure (429, 5xx, timeout, unreachable) per target.
    upstream_retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_base: float = Field(default=0.5, ge=0)
    retry_backoff_max: float = Field(default=8.0, ge=0)
    #: The longest vendor ``Retry-After`` waited for; a longer one is not retried here.
    retry_after_max: float = Field(default=10.0, ge=0)
    #: ``{"alias or provider/model": ["provider/model", ...]}``, tried in order.
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    #: Phase limits of one upstream attempt (README: Timeouts and continuation). A target that
    #: misses the headers or first-token limit is not tried again; the chain moves on.
    upstream_connect_timeout: float = Field(default=5.0, gt=0, le=600)
    #: A non-streamed answer (vendors send its headers only with the whole answer).
    upstream_headers_timeout: float = Field(default=25.0, gt=0, le=3600)
    #: A stream's first text or tool-call piece, counted from the start of the attempt.
    upstream_first_token_timeout: float = Field(default=15.0, gt=0, le=3600)
    #: The longest gap between two events of a stream before it is taken as stalled.
    upstream_idle_timeout: float = Field(default=10.0, gt=0, le=3600)
    #: ``{"glob of provider/model": {"headers_timeout", "first_token_timeout",
    #: "idle_timeout", "prefill"}}``: per-target overrides; the first matching pattern wins.
    target_options: dict[str, TargetOverrides] = Field(default_factory=dict)
    #: Circuit breakers per target (README: Circuit breakers), shared through Redis when
    #: ``ROBOTA_REDIS_URL`` is set: open after ``breaker_failures`` failures in a row or an
    #: error rate of ``breaker_error_rate`` over ``breaker_window_seconds`` (from
    #: ``breaker_min_calls`` calls on), skip the target for ``breaker_cooldown_seconds``,
    #: then let one probe through.
    #: A vendor's refusal of the request's content (OpenAI ``content_policy_violation``) is
    #: the answer, returned with its reason; true moves on to the next target of the chain.
    fallback_on_refusal: bool = False
    breaker_enabled: bool = True
    breaker_failures: int = Field(default=5, ge=1, le=10_000)
    breaker_error_rate: float | None = Field(default=0.5, gt=0, le=1)
    breaker_window_seconds: float = Field(default=30.0, gt=0, le=24 * 3600)
    breaker_min_calls: int = Field(default=10, ge=1, le=1_000_000)
    breaker_cooldown_seconds: float = Field(default=30.0, gt=0, le=24 * 3600)
    #: More deployments of a vendor (``[{"name", "provider", "api_key", "base_url",
    #: "models", "weight", "rpm", "tpm"}]``), balanced with the vendor's own settings.
    deployments: list[DeploymentSettings] = Field(default_factory=list)
    #: How a request picks among a vendor's deployments: ``weighted`` (random by weight),
    #: ``least-busy`` (fewest calls in flight) or ``lowest-latency`` (recent time to first
    #: token).
    balancing: Literal["weighted", "least-busy", "lowest-latency"] = "weighted"
    #: Upper bound of a request's ``options.timeout`` (larger values are clamped) and the
    #: deadline of requests that set none; covers retries, fallbacks and the whole stream.
    max_request_timeout: float = Field(default=300.0, gt=0)
    #: A call's ledger row is a lease that expires at its deadline plus this margin; the
    #: leases of a process that died are then closed (worst case charged as an estimate) and
    #: their holds released, by any process, checked every ``lease_reclaim_seconds``.
    lease_margin_seconds: float = Field(default=60.0, ge=0, le=24 * 3600)
    lease_reclaim_seconds: float = Field(default=5.0, gt=0, le=3600)

    # --- alerts (README: Operating it, Alerts) ---
    #: Where alerts are POSTed as JSON; unset: no alerts. A secret, like the keys: webhook
    #: URLs often carry their own token, so it is never logged.
    alert_webhook_url: SecretStr | None = None
    #: Signs each alert (``X-Robota-Signature: sha256=<hex>``, HMAC-SHA256 of
    #: ``<X-Robota-Timestamp>.<raw body>``) so the receiver can reject forgeries and replays.
    alert_webhook_secret: SecretStr | None = None
    #: Tries of one alert (the first included), spaced by a back-off doubling from
    #: ``alert_backoff_seconds`` up to ``alert_backoff_max_seconds``; then it is dropped.
    alert_attempts: int = Field(default=5, ge=1, le=20)
    alert_backoff_seconds: float = Field(default=0.5, ge=0, le=60)
    alert_backoff_max_seconds: float = Field(default=30.0, ge=0, le=600)
    #: The receiver's answer to one POST, connection included.
    alert_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    #: Alerts waiting to be sent; past it the oldest is dropped (counted in a warning).
    alert_queue_size: int = Field(default=1000, ge=1, le=1_000_000)
    #: At shutdown, how long what is still queued may take to go out.
    alert_drain_seconds: float = Field(default=3.0, ge=0, le=60)

    # --- Prometheus metrics (README: Operating it, Metrics) ---
    #: ``GET /metrics`` (behind the admin key) and the counting behind it.
    metrics_enabled: bool = True
    #: ``host:port``: also serve ``/metrics`` there, without authentication (a port only
    #: Prometheus reaches).
    metrics_addr: str | None = Field(
        default=None, pattern=r"^(\[[0-9A-Fa-f:.]+\]|[^:\s]*):\d{1,5}$"
    )
    #: A ``user`` label on requests, tokens and cost: one series per user (cardinality).
    metrics_per_user: bool = False
    #: Distinct provider/model pairs with a label of their own; the rest read ``other``.
    metrics_max_models: int = Field(default=500, ge=1, le=100_000)

    #: The offline ``mock`` provider: on by default so a fresh install answers without keys.
    mock_enabled: bool = True
    mock_models: CommaList = Field(default_factory=lambda: ["mock-1"])

    openai_api_key: SecretStr | None = _vendor_key("OPENAI")
    openai_base_url: str | None = None
    openai_models: CommaList | None = None

    anthropic_api_key: SecretStr | None = _vendor_key("ANTHROPIC")
    anthropic_base_url: str | None = None
    anthropic_models: CommaList | None = None
    anthropic_default_max_tokens: int = Field(default=4096, gt=0)

    google_api_key: SecretStr | None = _vendor_key("GOOGLE")
    google_base_url: str = "https://generativelanguage.googleapis.com"
    google_models: CommaList | None = None

    _split = field_validator(
        "api_keys",
        "mock_models",
        "openai_models",
        "anthropic_models",
        "google_models",
        "jwt_algorithms",
        "forwarded_allow_ips",
        mode="before",
    )(_split_commas)

    @field_validator("otel_enabled")
    @classmethod
    def _otel_installed(cls, value: bool) -> bool:
        """Turned on without the extra: said at startup, not at the first request."""
        if value and importlib.util.find_spec("opentelemetry.sdk") is None:
            raise ValueError("needs the [otel] extra: pip install 'robota-remote[otel]'")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: Any) -> Any:
        """Operators write ``INFO`` as often as ``info``; both name the same level."""
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("deployments")
    @classmethod
    def _check_deployments(cls, value: list[DeploymentSettings]) -> list[DeploymentSettings]:
        """Names are what the ledger shows: one per deployment, and never a vendor's own
        (its settings are the deployment of that name)."""
        seen: set[str] = set()
        for deployment in value:
            if deployment.name in seen or deployment.name in ("openai", "anthropic", "google"):
                raise ValueError(f"deployment name {deployment.name!r} is already taken")
            seen.add(deployment.name)
        return value

    @field_validator("fallbacks")
    @classmethod
    def _check_fallbacks(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, chain in value.items():
            for target in chain:
                provider, _, model = target.partition("/")
                if not provider or not model:
                    raise ValueError(f"fallback {target!r} for {name!r} must be 'provider/model'")
        return value

    def secrets(self) -> list[str]:
        """Every secret the proxy holds, for redaction."""
        held = [
            self.openai_api_key,
            self.anthropic_api_key,
            self.google_api_key,
            self.admin_key,
            self.jwt_secret,
            *self.api_keys,
            *(deployment.api_key for deployment in self.deployments),
            self.alert_webhook_url,
            self.alert_webhook_secret,
        ]
        return [secret.get_secret_value() for secret in held if secret is not None]
