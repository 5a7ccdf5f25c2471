"""Mapping wire errors (JSON bodies, bare statuses, stream events) to typed exceptions."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime

import pytest

from robota_client import errors
from robota_client.errors import (
    BudgetExceededError,
    InternalError,
    QuotaExceededError,
    RateLimitedError,
    RemoteError,
    UpstreamError,
    UpstreamUnavailableError,
    error_from_event,
    error_from_response,
    parse_retry_after,
)
from robota_client.messages import STATUS_BY_CODE, ErrorEvent


def body(code: str, message: str = "nope", **extra: object) -> dict[str, object]:
    return {"error": {"code": code, "message": message, "requestId": "req-1", **extra}}


@pytest.mark.parametrize("code", sorted(STATUS_BY_CODE))
def test_every_wire_code_has_its_own_class(code: str) -> None:
    error = error_from_response(STATUS_BY_CODE[code], body(code), {})
    assert type(error) is not RemoteError
    assert type(error).code == code
    assert (error.code, error.status, error.request_id) == (code, STATUS_BY_CODE[code], "req-1")


def test_quota_exceeded_is_not_a_rate_limit() -> None:
    error = error_from_response(429, body("quota_exceeded"), {})
    assert isinstance(error, QuotaExceededError)
    assert not isinstance(error, RateLimitedError)


def test_unknown_code_falls_back_by_status_and_keeps_the_code() -> None:
    error = error_from_response(503, body("vendor_melted"), {})
    assert isinstance(error, UpstreamUnavailableError)
    assert error.code == "vendor_melted"

    other = error_from_response(418, body("teapot"), {})
    assert type(other) is RemoteError
    assert other.code == "teapot"


def test_body_retry_after_wins_over_the_rounded_header() -> None:
    error = error_from_response(429, body("rate_limited", retryAfter=1.5), {"Retry-After": "2"})
    assert error.retry_after == 1.5


def test_header_supplies_retry_after_and_request_id_when_the_body_does_not() -> None:
    raw = b'{"error": {"code": "rate_limited", "message": "slow down"}}'
    error = error_from_response(429, raw, {"retry-after": "3", "X-Request-ID": "req-h"})
    assert error.retry_after == 3.0
    assert error.request_id == "req-h"


def test_non_json_body_from_a_load_balancer_is_still_typed() -> None:
    html = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
    error = error_from_response(502, html, {"x-request-id": "lb-1"})
    assert isinstance(error, UpstreamError)
    assert error.code == "upstream_error"
    assert error.status == 502
    assert "502 Bad Gateway" in str(error)

    unknown = error_from_response(405, b"", {})
    assert type(unknown) is RemoteError
    assert unknown.code == "http_error"


def test_json_that_is_not_the_error_shape_is_treated_as_no_body() -> None:
    error = error_from_response(500, b'{"detail": "Internal Server Error"}', {})
    assert isinstance(error, InternalError)
    assert "detail" in error.message


def test_str_has_code_request_id_and_no_api_key() -> None:
    key = "rk-live-abcdef0123456789"
    error = error_from_response(
        402, body("budget_exceeded", f"budget spent for key {key}"), {}, redact=[key]
    )
    assert isinstance(error, BudgetExceededError)
    text = str(error)
    assert "budget_exceeded" in text
    assert "req-1" in text
    assert key not in text
    assert key not in repr(error)


def test_stream_error_event_gets_the_nominal_status() -> None:
    event = ErrorEvent(code="upstream_timeout", message="slow vendor", retry_after=None)
    error = error_from_event(event, request_id="req-stream")
    assert isinstance(error, errors.UpstreamTimeoutError)
    assert (error.status, error.request_id) == (504, "req-stream")


def test_retry_after_accepts_an_http_date() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:05 GMT", now=now) == 5.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after("-4") == 0.0


def test_errors_survive_pickling() -> None:
    error = error_from_response(429, body("rate_limited", retryAfter=2), {})
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is RateLimitedError
    assert (clone.code, clone.status, clone.request_id, clone.retry_after) == (
        "rate_limited",
        429,
        "req-1",
        2,
    )
