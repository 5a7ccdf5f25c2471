"""The proxy's error hierarchy: one class per wire error code.

Anything raised as a ``ProxyError`` becomes the JSON error body of the wire contract with the
right status. Messages must never contain a vendor key or a caller's key: adapters build them
from status codes and vendor error *types*, never by echoing what the vendor sent back.
"""

from __future__ import annotations

from typing import ClassVar

from robota_client.messages import STATUS_BY_CODE, ErrorBody, ErrorDetail


class ProxyError(Exception):
    code: ClassVar[str] = "upstream_error"

    def __init__(
        self, message: str, *, retry_after: float | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        #: The request field at fault, in the terms of the dialect the caller spoke
        #: (``messages.2.content``); compatible surfaces send it as OpenAI's ``param``.
        self.param = param
        #: Vendor calls made before this error was given up on, set by the upstream layer
        #: (``robota_proxy.upstreams.resilience``) on what it raises; ``None`` for errors
        #: that never went through it. Sent as ``upstreamAttempts`` and
        #: ``X-Robota-Upstream-Attempts`` so that clients do not multiply the proxy's retries
        #: by their own.
        self.upstream_attempts: int | None = None

    @property
    def status(self) -> int:
        return STATUS_BY_CODE[self.code]

    def body(self, request_id: str | None) -> ErrorBody:
        return ErrorBody(
            error=ErrorDetail(
                code=self.code,
                message=self.message,
                request_id=request_id,
                retry_after=self.retry_after,
                upstream_attempts=self.upstream_attempts,
            )
        )


class InvalidRequest(ProxyError):
    code = "invalid_request"


class Unauthenticated(ProxyError):
    code = "unauthenticated"


class Forbidden(ProxyError):
    code = "forbidden"


class NotFound(ProxyError):
    code = "not_found"


class PayloadTooLarge(ProxyError):
    code = "payload_too_large"


class RateLimited(ProxyError):
    code = "rate_limited"


class QuotaExceeded(ProxyError):
    code = "quota_exceeded"


class BudgetExceeded(ProxyError):
    code = "budget_exceeded"


class UpstreamError(ProxyError):
    code = "upstream_error"


class UpstreamUnavailable(ProxyError):
    code = "upstream_unavailable"


class UpstreamTimeout(ProxyError):
    code = "upstream_timeout"


class InternalError(ProxyError):
    code = "internal_error"
