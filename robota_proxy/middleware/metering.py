"""``MeteringMiddleware``: hold the worst case before a chat call, settle the truth after.

For a caller with a monthly token quota or budget, the request's worst case (an upper bound
of its prompt tokens plus its ``maxTokens``, priced without any cache discount) is reserved
atomically before the route runs; a request that does not fit is refused with 429
``quota_exceeded`` or 402 ``budget_exceeded`` and never reaches a vendor. A request without
``maxTokens`` gets ``settings.reserve_max_tokens`` written into it, so the vendor is bound by
the same number the reservation assumed.

After the call (whatever way it ended: answered, failed, the client gone, the task cancelled)
one transaction releases the reservation, adds the real usage to the month's counters and
writes the ledger row. The settle is shielded from cancellation, so a disconnect cannot skip
the bill. Callers without limits reserve nothing but are still counted and ledgered, so
``/ai/me``, ``/ai/usage`` and the ledger always agree.

Where the vendor never reported usage (a stream cut short, a server that does not report
it), the row is an estimate, marked ``estimated``: the prompt's upper bound plus a token per
four characters produced. A vendor that refused the call outright before producing anything
is recorded with zero tokens: vendors do not bill refusals.

Pure ASGI, configured only by its arguments; meets the other pieces through the scope
(``PRINCIPAL``, ``CHAT_REQUEST``, ``CALL``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import UTC, datetime
from decimal import Decimal

import anyio
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from robota_client.messages import ChatRequest, Usage
from robota_proxy import scope as keys
from robota_proxy.call_record import CallRecord, call_record
from robota_proxy.chat_body import chat_request
from robota_proxy.errors import BudgetExceeded, Forbidden, ProxyError, QuotaExceeded
from robota_proxy.middleware.paths import CHAT_PATHS, route_path
from robota_proxy.policy.pricing import (
    PriceBook,
    estimate_completion_tokens,
    prompt_token_bound,
    to_pico,
    usd_text,
)
from robota_proxy.policy.principals import Principal
from robota_proxy.responses import error_response
from robota_proxy.storage.usage_store import (
    LedgerEntry,
    Refusal,
    Reservation,
    UsageStore,
    period_of,
)

log = logging.getLogger("robota_proxy.metering")

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
    ) -> None:
        self.app = app
        self.store = store
        self.prices = prices
        self.reserve_max_tokens = reserve_max_tokens
        self.max_body_bytes = max_body_bytes
        self.paths = frozenset(paths)
        self.anonymous_user = anonymous_user

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) not in self.paths:
            await self.app(scope, receive, send)
            return
        principal = scope.get(keys.PRINCIPAL)
        if not isinstance(principal, Principal):
            principal = Principal(self.anonymous_user)
        record = call_record(scope, keys.request_id(scope))
        record.pricer = self.prices
        started_at = datetime.now(UTC)
        reservation: Reservation | None = None
        if principal.permissions.has_money_limits:
            try:
                reservation = await self._reserve(scope, receive, principal, started_at)
            except ProxyError as exc:
                await error_response(exc, record.request_id)(scope, receive, send)
                return
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            if record.status == "ok":
                record.status = (
                    "internal_error" if isinstance(exc, Exception) else "client_disconnected"
                )
            raise
        finally:
            # Shielded: a cancelled request (the client went away) must still be billed
            # and must give its reservation back.
            with anyio.CancelScope(shield=True):
                await self._settle(scope, record, principal, reservation, started_at)

    # --- before -------------------------------------------------------------------------

    async def _reserve(
        self, scope: Scope, receive: Receive, principal: Principal, now: datetime
    ) -> Reservation:
        request = await chat_request(Request(scope, receive), self.max_body_bytes)
        limits = principal.permissions
        budget = limits.monthly_budget_usd
        if budget is not None and not self.prices.knows(request.provider, request.model):
            raise Forbidden(
                f"no price known for model {request.provider}/{request.model}; callers with "
                "a monthly budget can only use priced models (the operator can price it in "
                "ROBOTA_PRICES_FILE, or set a default price there)"
            )
        if request.options.max_tokens is None:
            request.options.max_tokens = self.reserve_max_tokens
        prompt = prompt_token_bound(request)
        completion = request.options.max_tokens
        worst = self.prices.cost(
            request.provider,
            request.model,
            Usage(prompt_tokens=prompt, completion_tokens=completion),
        )
        period = period_of(now)
        result = await self.store.reserve(
            principal.user,
            period,
            tokens=prompt + completion,
            cost_pico=0 if worst is None else to_pico(worst),
            token_limit=limits.monthly_tokens,
            cost_limit_pico=None if budget is None else to_pico(budget),
        )
        if isinstance(result, Refusal):
            raise _refusal_error(result, principal, period, prompt + completion, worst)
        return result

    # --- after --------------------------------------------------------------------------

    async def _settle(
        self,
        scope: Scope,
        record: CallRecord,
        principal: Principal,
        reservation: Reservation | None,
        started_at: datetime,
    ) -> None:
        try:
            if not record.upstream_called and not record.cached:
                # Refused before any vendor (404, 400...): not a ledger row.
                if reservation is not None:
                    await self.store.release(reservation)
                return
            entry = self._entry(scope, record, principal, started_at)
            await self.store.settle(entry, reservation)
        except Exception:
            # The answer has gone out already; all that is left to do is to say so loudly.
            log.exception("could not settle the usage of %s", record.request_id)

    def _entry(
        self, scope: Scope, record: CallRecord, principal: Principal, started_at: datetime
    ) -> LedgerEntry:
        request = scope.get(keys.CHAT_REQUEST)
        request = request if isinstance(request, ChatRequest) else None
        provider = record.provider or (request.provider if request else "unknown")
        model = record.model or (request.model if request else "unknown")
        usage, estimated = record.usage, False
        if usage is None:
            usage, estimated = _estimate(record, request), True
            if usage.total_tokens == 0:
                estimated = False
        cost: Decimal | None
        if record.cached:
            cost = Decimal(0)
        elif record.usage is not None and record.cost is not None:
            cost = record.cost
        else:
            cost = self.prices.cost(provider, model, usage)
        return LedgerEntry(
            request_id=record.request_id,
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
        )


def _estimate(record: CallRecord, request: ChatRequest | None) -> Usage:
    if record.status not in _MAY_HAVE_WORKED and record.streamed_chars == 0:
        return Usage()
    prompt = prompt_token_bound(request) if request is not None else 0
    completion = estimate_completion_tokens(record.streamed_chars)
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
