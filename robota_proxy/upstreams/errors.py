"""Turning a vendor's failure into a wire error, the same way for every adapter.

The vendor's own error text is passed on only where it helps the caller fix the request
(4xx other than auth), and even then with every secret we know of cut out. Auth failures are
never echoed: OpenAI's 401 text, for one, quotes part of the key it was given.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Iterable, Mapping

from robota_proxy.errors import (
    InvalidRequest,
    NotFound,
    ProxyError,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)


class ContextWindowExceeded(InvalidRequest):
    """The prompt does not fit the target's context window (OpenAI ``context_length_exceeded``,
    Anthropic's "prompt is too long", Gemini's "input token count ... exceeds"). The caller
    sees a 400 like any rejected request, but a fallback with a larger window may serve it:
    the next target of a chain is tried, the same one never again."""


class ContentRefused(InvalidRequest):
    """The vendor refused the request's content (OpenAI ``content_policy_violation``, Azure
    OpenAI ``content_filter``): its answer, returned with its reason and never retried. The
    chain moves on only where the operator asked for it (``ROBOTA_FALLBACK_ON_REFUSAL``): a
    refusal routed around silently would defeat the vendor's policy."""


#: The vendors' error codes of a refused content.
_REFUSAL_CODES = frozenset({"content_policy_violation", "content_filter"})


class PhaseTimeout(UpstreamTimeout):
    """A target missed a phase limit (response headers, first token, stream idle). Trying
    the same target again would likely wait as long again, so the chain moves on at once."""


class VendorServerError(UpstreamError):
    """A vendor 5xx without a more specific meaning: same wire error as ``UpstreamError``,
    kept apart so the proxy's retries can tell it (worth another try) from a refused vendor
    key or a malformed answer (not)."""


_KEY_SHAPES = re.compile(r"(sk-[A-Za-z0-9_\-*]{8,}|AIza[0-9A-Za-z_\-]{10,}|rk_[A-Za-z0-9_\-]{8,})")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove known secrets and anything shaped like a vendor or Robota key."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _KEY_SHAPES.sub("[redacted]", text)


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """``Retry-After`` as seconds, from either of its forms (delta-seconds or HTTP date)."""
    if not headers:
        return None
    for name in ("retry-after-ms", "retry-after"):
        raw = headers.get(name)
        if raw is None:
            continue
        raw = raw.strip()
        try:
            seconds = float(raw)
        except ValueError:
            if name == "retry-after-ms":
                continue
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                continue
            return max(0.0, when.timestamp() - time.time())
        return max(0.0, seconds / 1000 if name == "retry-after-ms" else seconds)
    return None


#: How each vendor words a prompt that does not fit the context window (its error code is
#: checked first where it has one).
_CONTEXT_OVERFLOW = re.compile(
    r"maximum context length|context[ _]length|prompt is too long|context window"
    r"|input token count .* exceeds",
    re.IGNORECASE,
)


def is_context_overflow(code: str | None, message: str | None) -> bool:
    if code == "context_length_exceeded":
        return True
    return bool(message and _CONTEXT_OVERFLOW.search(message))


def error_for_status(
    vendor: str,
    status: int,
    *,
    vendor_message: str | None = None,
    vendor_code: str | None = None,
    retry_after: float | None = None,
    secrets: Iterable[str] = (),
) -> ProxyError:
    """The wire error for a vendor HTTP status; ``vendor_code`` is the vendor's own error
    code where its body has one (OpenAI's ``code``)."""
    if status in (401, 403):
        return UpstreamError(
            f"{vendor} refused the proxy's credentials (HTTP {status}); "
            "the proxy operator must check the configured vendor key"
        )
    if status == 429:
        return RateLimited(f"{vendor} is rate limiting this proxy", retry_after=retry_after)
    detail = f": {redact(vendor_message, secrets)}" if vendor_message else ""
    if status == 404:
        return NotFound(f"{vendor} does not know the requested resource (HTTP 404){detail}")
    if status in (400, 413) and is_context_overflow(vendor_code, vendor_message):
        return ContextWindowExceeded(
            f"{vendor} rejected the request: the prompt exceeds the model's context window"
            f" (HTTP {status}){detail}"
        )
    if status == 400 and vendor_code in _REFUSAL_CODES:
        return ContentRefused(f"{vendor} refused the request's content (HTTP 400){detail}")
    if 400 <= status < 500:
        return InvalidRequest(f"{vendor} rejected the request (HTTP {status}){detail}")
    if status in (502, 503, 504, 529):
        return UpstreamUnavailable(
            f"{vendor} is unavailable (HTTP {status})", retry_after=retry_after
        )
    if status >= 500:
        return VendorServerError(f"{vendor} failed (HTTP {status})")
    return UpstreamError(f"{vendor} failed (HTTP {status})")


def timeout_error(vendor: str) -> UpstreamTimeout:
    return UpstreamTimeout(f"{vendor} did not answer in time")


def unavailable_error(vendor: str) -> UpstreamUnavailable:
    return UpstreamUnavailable(f"could not reach {vendor}")


def broken_stream_error(vendor: str) -> UpstreamError:
    return UpstreamError(f"{vendor} sent a malformed or truncated stream")
