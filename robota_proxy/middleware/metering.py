"""``MeteringMiddleware``: open the ledger row before a chat call, settle the truth after.

Before the route runs, one transaction writes the call's ledger row, status ``in_flight``,
with a *lease* (this process, and an expiry: the request's deadline, ``options.timeout``
clamped to ``max_request_timeout``, plus ``lease_margin``) and, for a caller with a monthly
token quota or budget, holds the request's worst case (an upper bound of its prompt tokens
plus its ``maxTokens``, priced without any cache discount) atomically against the limits. A
request that does not fit is refused with 429 ``quota_exceeded`` or 402 ``budget_exceeded``
and never reaches a vendor. A budgeted request without ``maxTokens`` gets
``settings.reserve_max_tokens`` on its call record (``CallRecord.max_tokens``; the parsed
request itself is read-only), and the request sent to the vendor carries it, so the vendor is
bound by the same number the reservation assumed. If the row cannot be written (the database
is down), the call is refused with 503 ``upstream_unavailable``: no vendor call without a
ledger row.

After the call (whatever way it ended: answered, failed, the client gone, the task cancelled)
one transaction completes the row, releases the hold and adds the real usage to the month's
counters; a call that never reached a vendor (404, 400...) has its row deleted instead. The
settle is shielded from cancellation, so a disconnect cannot skip the bill. If the process
dies first, the lease expires and a reclaimer (``robota_proxy.storage.usage_store``) closes
the row as ``interrupted`` with its worst case and releases the hold.

The row's key is minted here and unique; a caller's own ``X-Request-ID`` is kept beside it
as its correlation id. Where the vendor never reported usage (a stream cut short, a server
that does not report it), the row is an estimate, marked ``estimated``: the prompt's upper
bound plus a token per four characters produced. A vendor that refused the call outright
before producing anything is recorded with zero tokens: vendors do not bill refusals. A
client that went away (a disconnect seen, or a write to it that failed) is recorded as
``client_disconnected``, not as the proxy's own ``internal_error``.

Pure ASGI, configured only by its arguments; meets the other pieces through the scope
(``PRINCIPAL``, ``CHAT_REQUEST``, ``CALL``, ``CORRELATION_ID``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

import anyio
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from robota_client.messages import ChatRequest, Usage
from robota_proxy import scope as keys
from robota_proxy.call_record import CallRecord, call_record
from robota_proxy.chat_body import parse_into_scope, read_body
from robota_proxy.dialects import surface_of
from robota_proxy.errors import (
    BudgetExceeded,
    Forbidden,
    InvalidRequest,
    ProxyError,
    QuotaExceeded,
    UpstreamUnavailable,
)
from robota_proxy.middleware.attempt_rows import split_attempts
from robota_proxy.observability.throttled_log import ThrottledLog
from robota_proxy.policy.pricing import (
    PriceBook,
    estimate_completion_tokens,
    to_pico,
    usd_text,
)
from robota_proxy.policy.principals import Principal
from robota_proxy.policy.prompts import prompt_bound
from robota_proxy.responses import error_response
from robota_proxy.storage.database import DATABASE_OUTAGE
from robota_proxy.storage.usage_store import (
    LedgerEntry,
    Opening,
    Refusal,
    Reservation,
    UsageStore,
    new_lease_owner,
    period_of,
)
from robota_proxy.wire.paths import CHAT_PATHS, call_feature, route_path

if TYPE_CHECKING:
    from robota_proxy.observability.alerts import Alerts

log = logging.getLogger("robota_proxy.metering")
#: A database outage fails every call the same way: one line per interval, not per call.
_outage = ThrottledLog(log, interval=10.0)

#: Statuses after which a vendor may have done (and billed) work although it reported no
#: usage; any other error status means the vendor refused before starting.
_MAY_HAVE_WORKED = frozenset({"ok", "client_disconnected", "upstream_timeout", "internal_error"})


class MeteringMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        store: UsageStore,
        prices: PriceBook,
        reserve_max_tokens: int = 4096,
        max_body_bytes: int = 4 * 1024 * 1024,
        paths: Collection[str] = tuple(CHAT_PATHS),
        anonymous_user: str = "anonymous",
        request_timeout: float = 300.0,
        lease_margin: float = 60.0,
        lease_owner: str | None = None,
        alerts: Alerts | None = None,
    ) -> None:
        self.app = app
        #: Told of ledger write failures and of settles of users with limits (README: Alerts).
        self.alerts = alerts
        self.store = store
        self.prices = prices
        self.reserve_max_tokens = reserve_max_tokens
        self.max_body_bytes = max_body_bytes
        self.paths = frozenset(paths)
        self.anonymous_user = anonymous_user
        #: The longest a request may run (``settings.max_request_timeout``); a request's own
        #: ``options.timeout`` shortens it. With ``lease_margin`` added, the life of a lease.
        self.request_timeout = request_timeout
        self.lease_margin = lease_margin
        self.lease_owner = lease_owner or new_lease_owner()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) not in self.paths:
            await self.app(scope, receive, send)
            return
        principal = scope.get(keys.PRINCIPAL)
        if not isinstance(principal, Principal):
            principal = Principal(self.anonymous_user)
        record = call_record(scope, keys.request_id(scope))
        record.pricer = self.prices
        record.estimator = functools.partial(_estimated_usage, scope)
        started_at = datetime.now(UTC)
        try:
            receive = await self._readable(scope, receive, principal)
            # Shielded: once committed, the row must reach the settle below.
            with anyio.CancelScope(shield=True):
                reservation = await self._open(scope, record, principal, started_at)
        except ProxyError as exc:
            await error_response(exc, record.request_id, scope=scope)(scope, receive, send)
            return
        gone = False

        async def watched_receive() -> Message:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = True
            return message

        async def watched_send(message: Message) -> None:
            nonlocal gone
            try:
                await send(message)
            except Exception:
                gone = True  # a write to the client failed: it is gone
                raise

        try:
            await self.app(scope, watched_receive, watched_send)
        except BaseException as exc:
            if record.status == "ok":
                failed = isinstance(exc, Exception) and not gone
                record.status = "internal_error" if failed else "client_disconnected"
            raise
        finally:
            # Shielded: a cancelled request (the client went away) must still be billed
            # and must give its reservation back.
            with anyio.CancelScope(shield=True):
                await self._settle(scope, record, principal, reservation, started_at)

    # --- before -------------------------------------------------------------------------

    async def _readable(self, scope: Scope, receive: Receive, principal: Principal) -> Receive:
        """Parse the chat body into the scope if nobody did, and give back a ``receive`` that
        still yields the body to the app. A body that is not a chat request is the app's
        business (metering can sit in front of a host's own endpoint), unless the caller has
        limits: their worst case cannot be bounded without it."""
        if isinstance(scope.get(keys.CHAT_REQUEST), ChatRequest):
            return receive
        body = await read_body(Request(scope, receive), self.max_body_bytes)
        try:
            parse_into_scope(scope, body)
        except InvalidRequest:
            if principal.permissions.has_money_limits:
                raise
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    async def _open(
        self, scope: Scope, record: CallRecord, principal: Principal, now: datetime
    ) -> Reservation:
        """Write the in-flight row and hold the worst case; raise what the caller gets
        instead of a vendor call when that is not possible."""
        request = scope.get(keys.CHAT_REQUEST)
        request = request if isinstance(request, ChatRequest) else None
        limits = principal.permissions
        budget = limits.monthly_budget_usd
        prompt = completion = 0
        worst: Decimal | None = None
        if request is not None:
            if budget is not None and not self.prices.knows(request.provider, request.model):
                raise Forbidden(
                    f"no price known for model {request.provider}/{request.model}; callers "
                    "with a monthly budget can only use priced models (the operator can price "
                    "it in ROBOTA_PRICES_FILE, or set a default price there)"
                )
            # An embedding produces no tokens: its worst case is its input alone.
            produces = call_feature(scope) != "embeddings"
            max_tokens = request.options.max_tokens
            if produces and max_tokens is None and limits.has_money_limits:
                # On the record, not in the shared request (the cache's key): the request
                # sent to the vendor carries it (``Resilience``).
                max_tokens = record.max_tokens = self.reserve_max_tokens
            prompt = prompt_bound(scope, request)
            # Without limits nothing is sent or held, but an interrupted call is still
            # charged an estimate: this many output tokens.
            completion = (max_tokens or self.reserve_max_tokens) if produces else 0
            worst = self.prices.cost(
                request.provider,
                request.model,
                Usage(prompt_tokens=prompt, completion_tokens=completion),
            )
        correlation = scope.get(keys.CORRELATION_ID)
        # The caller's id is theirs to reuse; the ledger's key must be unique.
        ledger_id = keys.new_request_id() if correlation else keys.request_id(scope)
        timeout = self.request_timeout
        if request is not None and request.options.timeout is not None:
            timeout = min(timeout, request.options.timeout)
        call = Opening(
            request_id=ledger_id,
            created_at=now,
            user=principal.user,
            key_id=principal.key_id,
            provider=request.provider if request is not None else "unknown",
            model=request.model if request is not None else "unknown",
            streamed=call_feature(scope) == "stream",
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_pico=None if worst is None else to_pico(worst),
            lease_owner=self.lease_owner,
            lease_expires_at=now + timedelta(seconds=timeout + self.lease_margin),
            correlation_id=correlation if isinstance(correlation, str) else None,
            surface=surface_of(scope),
        )
        try:
            result = await self.store.open(
                call,
                token_limit=limits.monthly_tokens,
                cost_limit_pico=None if budget is None else to_pico(budget),
            )
        except Exception as exc:
            if self.alerts is not None:
                self.alerts.ledger_write_failed("open", type(exc).__name__)
            if isinstance(exc, DATABASE_OUTAGE):
                _outage.warn(
                    "open", "ledger rows cannot be written (%s): calls refused", type(exc).__name__
                )
            else:
                log.exception("could not write the ledger row of %s", keys.request_id(scope))
            raise UpstreamUnavailable(
                "the usage ledger is unavailable, and no vendor call is made without its "
                "ledger row; try again shortly",
                retry_after=1.0,
            ) from None
        if isinstance(result, Refusal):
            raise _refusal_error(result, principal, period_of(now), prompt + completion, worst)
        return result

    # --- after --------------------------------------------------------------------------

    async def _settle(
        self,
        scope: Scope,
        record: CallRecord,
        principal: Principal,
        reservation: Reservation,
        started_at: datetime,
    ) -> None:
        try:
            if not record.upstream_called and not record.cached:
                # Refused before any vendor (404, 400...): not a ledger row.
                await self.store.abandon(reservation)
                return
            entry = self._entry(scope, record, principal, started_at, reservation.request_id)
            own, attempts = split_attempts(entry, record)
            await self.store.settle(own, reservation, attempts)
            if self.alerts is not None and principal.permissions.has_money_limits:
                budget = principal.permissions.monthly_budget_usd
                self.alerts.usage_settled(
                    principal.user,
                    principal.key_id,
                    reservation.period,
                    principal.permissions.monthly_tokens,
                    None if budget is None else to_pico(budget),
                )
        except Exception as exc:
            if self.alerts is not None:
                self.alerts.ledger_write_failed("settle", type(exc).__name__)
            # The answer has gone out already; all that is left to do is to say so loudly.
            # The store has released the hold (or the lease's expiry will).
            if isinstance(exc, DATABASE_OUTAGE):
                _outage.warn(
                    "settle",
                    "usage not settled (%s); the lease reclaim will close the rows",
                    type(exc).__name__,
                )
                return
            log.exception(
                "could not settle the usage of %s (ledger row %s)",
                record.request_id,
                reservation.request_id,
            )

    def _entry(
        self,
        scope: Scope,
        record: CallRecord,
        principal: Principal,
        started_at: datetime,
        ledger_id: str,
    ) -> LedgerEntry:
        request = scope.get(keys.CHAT_REQUEST)
        request = request if isinstance(request, ChatRequest) else None
        provider = record.provider or (request.provider if request else "unknown")
        model = record.model or (request.model if request else "unknown")
        if record.attempt_unsettled:  # a continued stream ended before its last usage report
            record.end_attempt()
        usage, estimated = record.usage, record.usage_estimated
        if usage is None:
            usage, estimated = _estimate(scope, record, request), True
            if usage.total_tokens == 0:
                estimated = False
        cost: Decimal | None
        if record.cached:
            cost = Decimal(0)
        elif record.usage is not None and record.cost is not None:
            cost = record.cost
        else:
            cost = self.prices.cost(provider, model, usage)
        correlation = scope.get(keys.CORRELATION_ID)
        return LedgerEntry(
            request_id=ledger_id,
            correlation_id=correlation if isinstance(correlation, str) else None,
            created_at=started_at,
            user=principal.user,
            key_id=principal.key_id,
            provider=provider,
            model=model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_prompt_tokens=usage.cached_prompt_tokens or 0,
            cache_write_tokens=usage.cache_write_tokens or 0,
            reasoning_tokens=usage.reasoning_tokens or 0,
            cost_pico=0 if cost is None else to_pico(cost),
            latency_ms=record.latency_ms,
            status=record.status,
            streamed=record.streamed,
            cached=record.cached,
            priced=cost is not None,
            estimated=estimated,
            deployment=record.deployment,
            surface=surface_of(scope),
        )


def _estimate(scope: Scope, record: CallRecord, request: ChatRequest | None) -> Usage:
    if record.status not in _MAY_HAVE_WORKED and record.streamed_chars == 0:
        return Usage()
    return _usage_of(scope, request, record.streamed_chars)


def _estimated_usage(scope: Scope, streamed_chars: int) -> Usage:
    """The record's estimator: an attempt of a continued stream that broke before its usage
    report is charged like any stream cut short."""
    request = scope.get(keys.CHAT_REQUEST)
    chat = request if isinstance(request, ChatRequest) else None
    return _usage_of(scope, chat, streamed_chars)


def _usage_of(scope: Scope, request: ChatRequest | None, streamed_chars: int) -> Usage:
    prompt = prompt_bound(scope, request) if request is not None else 0
    completion = estimate_completion_tokens(streamed_chars)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _refusal_error(
    refusal: Refusal, principal: Principal, period: str, tokens: int, worst: Decimal | None
) -> ProxyError:
    limits = principal.permissions
    counters = refusal.counters
    if refusal.limit == "tokens":
        assert limits.monthly_tokens is not None
        left = max(0, limits.monthly_tokens - counters.tokens_used - counters.tokens_reserved)
        return QuotaExceeded(
            f"monthly token quota reached: {left} of {limits.monthly_tokens} tokens left for "
            f"{period} (including calls in flight), and this request may use up to {tokens} "
            "(prompt plus maxTokens); lower maxTokens or wait for next month"
        )
    assert limits.monthly_budget_usd is not None
    limit_pico = to_pico(limits.monthly_budget_usd)
    left_pico = max(0, limit_pico - counters.cost_used_pico - counters.cost_reserved_pico)
    may_cost = usd_text(to_pico(worst)) if worst is not None else "0"
    return BudgetExceeded(
        f"monthly budget reached: ${usd_text(left_pico)} of ${usd_text(limit_pico)} left for "
        f"{period} (including calls in flight), and this request may cost up to ${may_cost} "
        "(prompt plus maxTokens); lower maxTokens or wait for next month"
    )
