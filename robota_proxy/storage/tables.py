"""The SQL schema, in SQLAlchemy Core, identical on SQLite and PostgreSQL.

Money is stored as integer picodollars (1e-12 USD, ``BigInteger``): exact on both engines,
summable in SQL, and fine-grained enough for per-token prices such as $0.0375 per million
tokens (37,500 pico per token). SQLite has no exact decimal type, so ``Numeric`` would
round-trip through float there.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("user_id", String(200), primary_key=True),
    #: ``UserPermissions.to_wire()``; shared by every key of the user.
    Column("permissions", JSON, nullable=False, default=dict),
    Column("created_at", DateTime(timezone=True), nullable=False),
    #: Set: every key of the user and every token with this ``sub`` is refused, whatever the
    #: key's own state; cleared by a restore (migration 3).
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

api_keys = Table(
    "api_keys",
    metadata,
    #: The short public id, also embedded in the key itself (``rk_<id>_<secret>``).
    Column("key_id", String(32), primary_key=True),
    Column("user_id", String(200), nullable=False, index=True),
    #: SHA-256 of the whole key, hex. The key has 256 random bits, so a fast hash is enough.
    Column("secret_hash", String(64), nullable=False),
    Column("name", String(200), nullable=True),
    #: Overrides of the user's permissions for this key only.
    Column("permissions", JSON, nullable=False, default=dict),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
)

#: Monthly token and money counters per user. ``*_reserved`` holds in-flight worst cases;
#: ``*_used`` is settled usage and always equals the ledger's sum for the same user and
#: month, because both are written in one transaction.
usage_counters = Table(
    "usage_counters",
    metadata,
    Column("user_id", String(200), primary_key=True),
    #: ``YYYY-MM`` in UTC.
    Column("period", String(7), primary_key=True),
    Column("tokens_used", BigInteger, nullable=False, default=0),
    Column("tokens_reserved", BigInteger, nullable=False, default=0),
    Column("cost_used_pico", BigInteger, nullable=False, default=0),
    Column("cost_reserved_pico", BigInteger, nullable=False, default=0),
    Column("requests", BigInteger, nullable=False, default=0),
)

#: One row per call that may have reached a vendor, written *before* the vendor is asked
#: (status ``in_flight``, with the call's lease) and completed by the settle; plus, written
#: by the settle, one row per earlier vendor call of that call (``attempt_of``); see
#: ``robota_proxy.storage.usage_store``.
usage_ledger = Table(
    "usage_ledger",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    #: Minted by the proxy, unique: the key the settle and the reclaimer find the row by.
    Column("request_id", String(100), nullable=False),
    #: The caller's own ``X-Request-ID``, when it sent one: theirs to correlate, not unique.
    Column("correlation_id", String(64), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("user_id", String(200), nullable=False),
    Column("key_id", String(64), nullable=True),
    Column("provider", String(100), nullable=False),
    Column("model", String(200), nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False, default=0),
    Column("completion_tokens", BigInteger, nullable=False, default=0),
    #: Of ``prompt_tokens``, those read from and those written to the vendor's prompt cache;
    #: each kind has its own price, so the row says how its cost was made up.
    Column("cached_prompt_tokens", BigInteger, nullable=False, default=0),
    Column("cache_write_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    Column("cost_pico", BigInteger, nullable=False, default=0),
    Column("latency_ms", Integer, nullable=False, default=0),
    #: ``in_flight`` until settled; then ``ok``, a wire error code (``upstream_error``...),
    #: ``client_disconnected``, ``interrupted`` (its process died: closed by the lease
    #: reclaimer) or ``settle_failed`` (its settle could not be written: closed the same way).
    Column("status", String(40), nullable=False),
    Column("streamed", Boolean, nullable=False, default=False),
    Column("cached", Boolean, nullable=False, default=False),
    #: False when no price was known for the model: cost 0 here means "unpriced", not free.
    Column("priced", Boolean, nullable=False, default=True),
    #: True when the vendor never reported usage and the tokens were estimated.
    Column("estimated", Boolean, nullable=False, default=False),
    # --- the lease of a call in flight ---
    #: The process serving the call (``host:pid:random``), kept after the settle.
    Column("lease_owner", String(100), nullable=True),
    #: When an unsettled row may be presumed dead: the request deadline plus a margin.
    #: Cleared by the settle.
    Column("lease_expires_at", DateTime(timezone=True), nullable=True),
    #: What the counters hold for this row while it is in flight (0 without limits).
    Column("reserved_tokens", BigInteger, nullable=False, default=0),
    Column("reserved_cost_pico", BigInteger, nullable=False, default=0),
    #: The worst case written at the start, charged if the call never settles
    #: (``estimate_cost_pico`` null: the model has no known price).
    Column("estimate_prompt_tokens", BigInteger, nullable=False, default=0),
    Column("estimate_completion_tokens", BigInteger, nullable=False, default=0),
    Column("estimate_cost_pico", BigInteger, nullable=True),
    #: The surface the call came in on: ``robota`` (``/ai/*``), ``openai`` (``/v1/chat/...``)
    #: or ``anthropic`` (``/v1/messages``); written when the row opens.
    Column("surface", String(20), nullable=False, default="robota", server_default="robota"),
    #: The deployment of the provider that answered (``ROBOTA_DEPLOYMENTS``; the provider's
    #: own name for its default one); written by the settle.
    Column("deployment", String(60), nullable=True),
    #: Set on the row of a vendor call that ended before its call did (a failed try, a
    #: fallback's failed target, a stream that broke and was continued): the ``request_id``
    #: of the call's own row, which is its last attempt. Such a row is billed (its tokens
    #: and cost are the call's) but is no request of its own in reports and counters.
    Column("attempt_of", String(100), nullable=True),
    Index("ix_usage_ledger_user_time", "user_id", "created_at"),
    Index("ux_usage_ledger_request_id", "request_id", unique=True),
    Index("ix_usage_ledger_lease", "status", "lease_expires_at"),
)

#: Alerts already sent, one row per (user, month, alert) such as ``budget:80``: the insert of
#: its key is how processes sharing the database agree that exactly one of them sends it
#: (``robota_proxy.storage.alert_marks``; Redis does this instead when configured).
alert_marks = Table(
    "alert_marks",
    metadata,
    Column("user_id", String(200), primary_key=True),
    Column("period", String(7), primary_key=True),
    Column("alert", String(40), primary_key=True),
)

#: Column lengths of the ledger's text columns: values are clipped to them, so that nothing
#: a caller sends (a 300-character model name) can make the ledger write fail.
LEDGER_TEXT_LIMITS = {
    name: column.type.length
    for name, column in usage_ledger.columns.items()
    if isinstance(column.type, String) and column.type.length is not None
}
