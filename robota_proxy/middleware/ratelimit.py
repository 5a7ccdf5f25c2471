"""``RateLimitMiddleware``: per-user requests per minute, per day, and tokens per minute.

Pure ASGI, so it can sit in front of any app once something has put a
``robota_proxy.policy.principals.Principal`` in the scope under ``robota_proxy.scope.PRINCIPAL``
(``AuthMiddleware`` does). What it reads and writes in the scope, and nothing else:

* ``PRINCIPAL``: who to count (``.user``) and their limits (``.permissions``: ``rpm``,
  ``daily_requests``, ``tpm``). No principal, or one without limits: not limited.
* ``CHAT_REQUEST`` (optional): the parsed chat body, for the prompt-token estimate the ``tpm``
  check needs before the call. Without it the check only requires the minute not to be spent.
  The estimate starts from the prompt's bound, kept under ``PROMPT_TOKEN_BOUND`` for the
  metering (the prompt is walked once per request).
* ``CALL`` (optional, read after the call): the call record the route fills; its usage is what
  ``tpm`` is charged. See ``robota_proxy.policy.ratelimits`` for the whole approach.

Refusals are the contract's 429 ``rate_limited`` with ``Retry-After`` and ``X-RateLimit-Limit``,
``X-RateLimit-Remaining``, ``X-RateLimit-Reset`` (seconds) of the limit that refused. Answers
that pass carry the ``X-RateLimit-*`` headers of the tightest request limit, and
``X-RateLimit-*-Tokens`` when a ``tpm`` is set.

The tokens are charged just before the answer's last body message is sent (or when the call
ends without one: an error, a client that went away), so the next request already sees them.
If the limits storage fails (Redis down) requests pass unlimited and the failure is logged:
rate limits smooth traffic, while the money limits are enforced in SQL by the metering.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection

import anyio
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from robota_client.messages import ChatRequest
from robota_proxy import scope as keys
from robota_proxy.call_record import CallRecord
from robota_proxy.errors import ProxyError, RateLimited
from robota_proxy.policy.pricing import estimate_completion_tokens
from robota_proxy.policy.principals import Principal
from robota_proxy.policy.prompts import prompt_bound
from robota_proxy.policy.ratelimits import (
    Admission,
    LimitStatus,
    RateLimiter,
    estimate_from_bound,
    has_rate_limits,
)
from robota_proxy.redis_failure import RedisFailurePolicy
from robota_proxy.responses import refuse
from robota_proxy.wire.paths import route_path


class RateLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        limiter: RateLimiter,
        *,
        exempt_paths: Collection[str] = ("/health",),
        on_storage_failure: RedisFailurePolicy | None = None,
    ) -> None:
        """``exempt_paths``: route paths (below any mount point) never counted.
        ``on_storage_failure``: what an unreachable storage (Redis) means; by default the
        request passes unlimited and a warning is logged at most once per interval."""
        self.app = app
        self.limiter = limiter
        self.exempt_paths = frozenset(exempt_paths)
        self.on_storage_failure = on_storage_failure or RedisFailurePolicy()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = scope.get(keys.PRINCIPAL)
        if (
            scope["type"] not in ("http", "websocket")
            or not isinstance(principal, Principal)
            or not has_rate_limits(principal.permissions)
            or route_path(scope) in self.exempt_paths
        ):
            await self.app(scope, receive, send)
            return
        chat = scope.get(keys.CHAT_REQUEST)
        prompt_tokens = (
            estimate_from_bound(prompt_bound(scope, chat)) if isinstance(chat, ChatRequest) else 0
        )
        try:
            admission = await self.limiter.admit(principal, prompt_tokens)
        except Exception as exc:
            # Open by default: rate limits smooth traffic, the money limits live in SQL.
            try:
                self.on_storage_failure.failed("rate limits", exc)
            except ProxyError as refusal:
                await refuse(refusal, scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if not admission.allowed:
            await self._refuse(scope, receive, send, admission)
            return
        headers = _headers(admission)
        charges_tokens = principal.permissions.tpm is not None
        charged = False

        async def charge() -> None:
            nonlocal charged
            if not charged:
                charged = True
                try:
                    await self.limiter.charge_tokens(principal, _used_tokens(scope, prompt_tokens))
                except Exception as exc:
                    with contextlib.suppress(ProxyError):  # the answer is already out
                        self.on_storage_failure.failed("rate limits", exc)

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(headers)
            elif (
                charges_tokens
                and message["type"] == "http.response.body"
                and not message.get("more_body", False)
            ):
                # Charged before the last byte leaves, so a caller that sends its next request
                # the moment this answer is complete already finds the tokens counted.
                await charge()
            await send(message)

        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            if charges_tokens and not charged:
                # Shielded: a client that went away cancels the request, not the charge.
                with anyio.CancelScope(shield=True):
                    await charge()

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, admission: Admission
    ) -> None:
        refused = admission.refused_by
        assert refused is not None
        retry_after = max(1, refused.reset_header)
        error = RateLimited(
            f"rate limit exceeded: {admission.reason}; retry in {retry_after} s",
            retry_after=retry_after,
        )
        await refuse(error, scope, receive, send, _limit_headers(refused))


def _limit_headers(status: LimitStatus, suffix: str = "") -> dict[str, str]:
    return {
        f"X-RateLimit-Limit{suffix}": str(status.limit),
        f"X-RateLimit-Remaining{suffix}": str(status.remaining),
        f"X-RateLimit-Reset{suffix}": str(status.reset_header),
    }


def _headers(admission: Admission) -> dict[str, str]:
    headers: dict[str, str] = {}
    if admission.requests is not None:
        headers.update(_limit_headers(admission.requests))
    if admission.tokens is not None:
        headers.update(_limit_headers(admission.tokens, "-Tokens"))
    return headers


def _used_tokens(scope: Scope, prompt_tokens: int) -> int:
    """What the finished call cost in tokens: the vendor's count when it reported one.

    A call that produced output but no usage (the client went away mid-stream) is charged the
    estimate of its prompt plus the text streamed; a call no vendor answered, or a cached
    answer, costs the vendor nothing and is not charged.
    """
    record = scope.get(keys.CALL)
    if not isinstance(record, CallRecord) or not record.upstream_called or record.cached:
        return 0
    if record.usage is not None:
        return record.usage.total_tokens
    if record.streamed_chars or record.status == "client_disconnected":
        return prompt_tokens + estimate_completion_tokens(record.streamed_chars)
    return 0
