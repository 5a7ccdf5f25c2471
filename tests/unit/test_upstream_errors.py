"""The shared vendor-error mapping: statuses, Retry-After forms, and redaction."""

from __future__ import annotations

import email.utils
import time

import pytest

from robota_proxy.errors import (
    InvalidRequest,
    NotFound,
    RateLimited,
    UpstreamError,
    UpstreamUnavailable,
)
from robota_proxy.upstreams.errors import (
    VendorServerError,
    error_for_status,
    redact,
    retry_after_seconds,
)


@pytest.mark.parametrize(
    ("status", "kind", "wire_status"),
    [
        (400, InvalidRequest, 400),
        (401, UpstreamError, 502),
        (403, UpstreamError, 502),
        (404, NotFound, 404),
        (422, InvalidRequest, 400),
        (429, RateLimited, 429),
        (500, VendorServerError, 502),  # an UpstreamError the proxy retries
        (502, UpstreamUnavailable, 503),
        (503, UpstreamUnavailable, 503),
        (529, UpstreamUnavailable, 503),
    ],
)
def test_status_mapping(status: int, kind: type[Exception], wire_status: int) -> None:
    error = error_for_status("openai", status, vendor_message="boom")
    assert type(error) is kind
    assert error.status == wire_status


def test_auth_failures_never_echo_the_vendor_text() -> None:
    error = error_for_status(
        "openai", 401, vendor_message="Incorrect API key provided: sk-abc***xyz", secrets=["k"]
    )
    assert "sk-" not in error.message
    assert "Incorrect" not in error.message


def test_client_errors_pass_the_vendor_text_redacted() -> None:
    secret = "my-secret-vendor-key"
    error = error_for_status(
        "anthropic",
        400,
        vendor_message=f"bad field; key {secret} and sk-proj-ABCDEFGHIJKLMNOP here",
        secrets=[secret],
    )
    assert "bad field" in error.message
    assert secret not in error.message
    assert "sk-proj" not in error.message


def test_redact_known_shapes() -> None:
    text = redact("a AIzaSyA1234567890abcdefghij b rk_live_0123456789 c", [])
    assert "AIza" not in text and "rk_live" not in text
    assert text.startswith("a [redacted] b")


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"retry-after": "7"}) == 7
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    parsed = retry_after_seconds({"retry-after": future})
    assert parsed is not None and 25 < parsed <= 30
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None
    error = error_for_status("google", 429, retry_after=3)
    assert error.retry_after == 3
