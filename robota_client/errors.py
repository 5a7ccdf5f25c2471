"""The client's error hierarchy: one class per wire error code, plus the two failures that
have no wire code (the proxy could not be reached; the proxy said something off-contract).

Catching ``RemoteError`` catches everything the client raises about a call. The subclasses
mirror the proxy's codes so application code can react to a cause (``RateLimitedError`` ->
wait ``retry_after``; ``BudgetExceededError`` -> stop) without parsing messages.

Messages come from the proxy, which never echoes keys; ``redact`` is a second line of
defence so that even a misbehaving server or load balancer cannot put the caller's API key
into a traceback or a log line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from pydantic import ValidationError

from robota_client.messages import STATUS_BY_CODE, ErrorBody, ErrorEvent

__all__ = [
    "BudgetExceededError",
    "ForbiddenError",
    "InternalError",
    "InvalidRequestError",
    "NotFoundError",
    "PayloadTooLargeError",
    "ProtocolError",
    "QuotaExceededError",
    "RateLimitedError",
    "RemoteConnectionError",
    "RemoteError",
    "StreamRestarted",
    "UnauthenticatedError",
    "UpstreamError",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
    "error_from_event",
    "error_from_response",
]

#: How much of a body that is not the contract's JSON to quote in an error message: enough
#: to recognise a load balancer's page, not enough to flood a log.
_SNIPPET_CHARS = 200
#: The proxy's header on errors from its upstream layer: the vendor calls it made.
UPSTREAM_ATTEMPTS_HEADER = "x-robota-upstream-attempts"


class RemoteError(Exception):
    """Base of every error the client raises about a remote call.

    ``code`` is the wire code (kept as sent, even when the server uses a code this client
    does not know yet); ``status`` is the HTTP status, or the code's nominal status for an
    error that arrived inside a stream, or ``None`` when no response was received.
    """

    code: str = "remote_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        upstream_attempts: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or type(self).code
        self.status = status
        self.request_id = request_id
        self.retry_after = retry_after
        #: How many vendor calls the proxy made before answering with this error, when the
        #: error comes from its upstream layer (``upstreamAttempts``); ``None`` otherwise.
        #: Set means the proxy already retried as its policy allows: the client does not
        #: retry such an error (see ``robota_client.transport``).
        self.upstream_attempts = upstream_attempts

    def __str__(self) -> str:
        details = [f"status {self.status}"] if self.status is not None else []
        if self.request_id:
            details.append(f"request id {self.request_id}")
        if self.retry_after is not None:
            details.append(f"retry after {self.retry_after:g}s")
        if self.upstream_attempts is not None:
            n = self.upstream_attempts
            details.append(f"{n} vendor call{'' if n == 1 else 's'}")
        suffix = f" ({', '.join(details)})" if details else ""
        return f"{self.code}: {self.message}{suffix}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"status={self.status!r}, request_id={self.request_id!r}, "
            f"retry_after={self.retry_after!r}, upstream_attempts={self.upstream_attempts!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments defeat Exception's default pickling; errors do travel
        # between processes (multiprocessing, task queues), so keep them picklable.
        return (type(self), (self.message,), self.__dict__.copy())


class InvalidRequestError(RemoteError):
    code = "invalid_request"


class UnauthenticatedError(RemoteError):
    code = "unauthenticated"


class ForbiddenError(RemoteError):
    code = "forbidden"


class NotFoundError(RemoteError):
    code = "not_found"


class PayloadTooLargeError(RemoteError):
    code = "payload_too_large"


class RateLimitedError(RemoteError):
    """Too many requests for now; ``retry_after`` says when trying again may succeed."""

    code = "rate_limited"


class QuotaExceededError(RemoteError):
    """A quota for a longer period is used up. Not a ``RateLimitedError``: waiting a few
    seconds does not help, so the client does not retry it."""

    code = "quota_exceeded"


class BudgetExceededError(RemoteError):
    code = "budget_exceeded"


class UpstreamError(RemoteError):
    code = "upstream_error"


class UpstreamUnavailableError(RemoteError):
    code = "upstream_unavailable"


class UpstreamTimeoutError(RemoteError):
    code = "upstream_timeout"


class InternalError(RemoteError):
    """A bug in the proxy itself (HTTP 500). Never retried: the call may have had effects."""

    code = "internal_error"


class RemoteConnectionError(RemoteError):
    """The proxy could not be reached (after retries), or the connection broke mid-call."""

    code = "connection_error"


class ProtocolError(RemoteError):
    """The server answered with something the wire contract does not allow: a body that is
    not the expected JSON, an unparsable stream event, a stream that stopped without
    ``done`` or ``error``. Usually a wrong ``server_url`` or a proxy in between."""

    code = "protocol_error"


class StreamRestarted(RemoteError):
    """A text stream (``chat_stream``) cannot give one clean answer: the proxy restarted the
    answer midway (a ``restart`` event, see ``robota_client.messages.RestartEvent``) and the
    fresh answer does not begin with the text already handed to the caller, which cannot be
    taken back. Raised as soon as the two are seen to differ, before any of the new text is
    handed over. Not a wire code: the proxy did nothing wrong, the caller's view of the
    stream is what broke; the whole call may be made again, or read with ``stream()``, which
    reports restarts as events.

    ``reason`` is the proxy's, from the restart event; ``delivered`` is the text the caller
    had already received (all of it void).
    """

    code = "stream_restarted"

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        delivered: str = "",
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.reason = reason
        self.delivered = delivered


_BY_CODE: dict[str, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        InvalidRequestError,
        UnauthenticatedError,
        ForbiddenError,
        NotFoundError,
        PayloadTooLargeError,
        RateLimitedError,
        QuotaExceededError,
        BudgetExceededError,
        UpstreamError,
        UpstreamUnavailableError,
        UpstreamTimeoutError,
        InternalError,
    )
}

# For codes this client does not know, and bodies that carry no code at all. 429 means
# "rate limited" rather than "quota exceeded": the retryable reading of an ambiguous status.
_BY_STATUS: dict[int, type[RemoteError]] = {
    STATUS_BY_CODE[code]: _BY_CODE[code] for code in reversed(list(STATUS_BY_CODE))
}


def _class_for(code: str | None, status: int | None) -> type[RemoteError]:
    if code in _BY_CODE:
        return _BY_CODE[code]
    if status is not None and status in _BY_STATUS:
        return _BY_STATUS[status]
    return RemoteError


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # httpx.Headers is case-insensitive; a plain dict (tests, other callers) may not be.
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lowered), None)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header, which may be a number or an HTTP date."""
    if value is None or not value.strip():
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def error_from_response(
    status: int,
    body: bytes | str | Mapping[str, Any] | None,
    headers: Mapping[str, str],
    *,
    redact: Iterable[str] = (),
) -> RemoteError:
    """The typed error for a non-2xx response.

    Anything that is not the contract's ``{"error": {...}}`` (an HTML page from a load
    balancer, an empty body) still yields the class its status suggests, so a 503 from an
    ingress is retried like a 503 from the proxy.
    """
    secrets = tuple(redact)
    request_id = _header(headers, "x-request-id")
    header_retry_after = parse_retry_after(_header(headers, "retry-after"))
    header_attempts = _count(_header(headers, UPSTREAM_ATTEMPTS_HEADER))
    detail = _error_detail(body)
    if detail is None:
        snippet = _snippet(body)
        message = f"HTTP {status} without the proxy's JSON error body"
        if snippet:
            message += f": {_redact(snippet, secrets)!r}"
        cls = _class_for(None, status)
        return cls(
            message,
            code=cls.code if cls is not RemoteError else "http_error",
            status=status,
            request_id=request_id,
            retry_after=header_retry_after,
            upstream_attempts=header_attempts,
        )
    cls = _class_for(detail.error.code, status)
    return cls(
        _redact(detail.error.message, secrets),
        code=detail.error.code,
        status=status,
        request_id=detail.error.request_id or request_id,
        # The body's value is exact; the header is rounded up to whole seconds.
        retry_after=(
            detail.error.retry_after if detail.error.retry_after is not None else header_retry_after
        ),
        upstream_attempts=(
            detail.error.upstream_attempts
            if detail.error.upstream_attempts is not None
            else header_attempts
        ),
    )


def _count(value: str | None) -> int | None:
    """A non-negative integer header; anything else (absent, garbled) is ``None``."""
    if value is None:
        return None
    try:
        count = int(value.strip())
    except ValueError:
        return None
    return count if count >= 0 else None


def error_from_event(
    event: ErrorEvent, *, request_id: str | None = None, redact: Iterable[str] = ()
) -> RemoteError:
    """The typed error for an ``error`` event that ended a stream.

    The HTTP status was 200 by then; ``status`` is the code's nominal status so handlers
    that branch on it treat a streamed failure like the same failure before the stream.
    """
    status = STATUS_BY_CODE.get(event.code)
    return _class_for(event.code, status)(
        _redact(event.message, tuple(redact)),
        code=event.code,
        status=status,
        request_id=event.request_id or request_id,
        retry_after=event.retry_after,
    )


def _error_detail(body: bytes | str | Mapping[str, Any] | None) -> ErrorBody | None:
    if body is None:
        return None
    try:
        payload = body if isinstance(body, Mapping) else json.loads(body)
        return ErrorBody.model_validate(payload)
    except (ValueError, ValidationError):
        return None


def _snippet(body: bytes | str | Mapping[str, Any] | None) -> str:
    if body is None:
        return ""
    if isinstance(body, Mapping):
        text = json.dumps(dict(body))
    elif isinstance(body, bytes):
        text = body.decode("utf-8", errors="replace")
    else:
        text = body
    text = " ".join(text.split())
    return text if len(text) <= _SNIPPET_CHARS else text[:_SNIPPET_CHARS] + "..."
