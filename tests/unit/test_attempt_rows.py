"""A call's vendor calls as ledger rows: ``CallRecord``'s attempts and ``split_attempts``.

The rows of one call must add up to exactly what the call was billed, each attempt's row must
say where it went and how it ended, and the call's own row is always its last attempt."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from robota_client.messages import Usage
from robota_proxy.call_record import CallRecord
from robota_proxy.middleware.attempt_rows import split_attempts
from robota_proxy.policy.pricing import to_pico
from robota_proxy.storage.usage_store import LedgerEntry

#: USD per token, by provider: 1e-6 and 3e-6.
PRICES = {"openai": Decimal("0.000001"), "anthropic": Decimal("0.000003")}


def pricer(provider: str, model: str, usage: Usage) -> Decimal:
    return PRICES[provider] * (usage.prompt_tokens + usage.completion_tokens)


def record() -> CallRecord:
    made = CallRecord(request_id="req_1", pricer=pricer, streamed=True)
    # What the metering's estimator charges a stream cut short: 100 prompt tokens, a token
    # per 4 characters.
    made.estimator = lambda chars: Usage(
        prompt_tokens=100, completion_tokens=chars // 4, total_tokens=100 + chars // 4
    )
    return made


def totals(made: CallRecord) -> LedgerEntry:
    """The call's row as the metering writes it before the split: its totals."""
    usage = made.usage or Usage()
    return LedgerEntry(
        request_id="req_1",
        created_at=datetime(2030, 1, 2, tzinfo=UTC),
        user="alice",
        key_id="rk_1",
        provider=made.provider or "unknown",
        model=made.model or "unknown",
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens or 0,
        reasoning_tokens=usage.reasoning_tokens or 0,
        cost_pico=0 if made.cost is None else to_pico(made.cost),
        latency_ms=900,
        status=made.status,
        streamed=True,
        cached=False,
        priced=True,
        estimated=made.usage_estimated,
        deployment=made.deployment,
        surface="openai",
    )


def fields(row: LedgerEntry) -> tuple[object, ...]:
    return (
        row.request_id,
        row.attempt_of,
        row.provider,
        row.deployment,
        row.status,
        row.prompt_tokens,
        row.completion_tokens,
        row.cost_pico,
        row.estimated,
        row.surface,
    )


def test_a_call_with_one_vendor_call_is_one_row_as_it_is() -> None:
    made = record()
    made.begin_attempt("openai")
    made.provider, made.model = "openai", "m"
    made.settle_usage("openai", "m", Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15))
    call = totals(made)
    assert split_attempts(call, made) == (call, [])


def test_a_fallback_after_a_failed_try_adds_a_row_with_no_cost_naming_where_it_failed() -> None:
    made = record()
    made.begin_attempt("openai-east")
    made.attempt_failed("openai", "m", "openai-east", "upstream_unavailable")
    made.begin_attempt("anthropic")
    made.settle_usage(
        "anthropic", "c", Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15)
    )
    call = totals(made)
    own, rows = split_attempts(call, made)
    assert own == call  # the fallback's usage alone: the failed try cost nothing
    assert [fields(row) for row in rows] == [
        (
            "req_1/1",
            "req_1",
            "openai",
            "openai-east",
            "upstream_unavailable",
            0,
            0,
            0,
            False,
            "openai",
        )
    ]
    # The fallback's answer is the call's own row: the attempt that has not ended.
    assert (made.attempts, made.attempt_running) == (2, True)


def test_a_call_whose_every_try_failed_is_its_last_try_plus_a_row_per_earlier_one() -> None:
    made = record()
    for status in ("upstream_error", "upstream_error", "upstream_unavailable"):
        made.begin_attempt("openai")
        made.attempt_failed("openai", "m", "openai", status)
    made.provider, made.model, made.status = "openai", "m", "upstream_unavailable"
    call = totals(made)
    own, rows = split_attempts(call, made)
    assert own == call
    assert [(row.request_id, row.status) for row in rows] == [
        ("req_1/1", "upstream_error"),
        ("req_1/2", "upstream_error"),
    ]


def test_a_continued_stream_bills_each_attempt_on_its_own_row_and_the_rows_add_up() -> None:
    made = record()
    made.begin_attempt("openai")
    made.provider, made.model = "openai", "m"
    made.streamed_chars = 80  # 20 tokens, then the stream broke before its usage report
    made.end_attempt("upstream_error")
    assert not made.attempt_unsettled  # nothing runs until the continuation starts
    made.begin_attempt("anthropic")
    made.provider, made.model = "anthropic", "c"
    made.settle_usage(
        "anthropic", "c", Usage(prompt_tokens=130, completion_tokens=40, total_tokens=170)
    )
    call = totals(made)
    # The caller's usage is the sum: 100 + 130 prompt, 20 + 40 completion, both priced.
    assert (call.prompt_tokens, call.completion_tokens) == (230, 60)
    assert call.cost_pico == to_pico(Decimal("0.000120") + Decimal("0.000510"))
    own, rows = split_attempts(call, made)
    assert [fields(row) for row in rows] == [
        (
            "req_1/1",
            "req_1",
            "openai",
            "openai",
            "upstream_error",
            100,
            20,
            120_000_000,
            True,
            "openai",
        )
    ]
    assert fields(own) == (
        "req_1",
        None,
        "anthropic",
        "anthropic",
        "ok",
        130,
        40,
        510_000_000,
        False,
        "openai",
    )
    assert own.prompt_tokens + rows[0].prompt_tokens == call.prompt_tokens
    assert own.cost_pico + rows[0].cost_pico == call.cost_pico


def test_a_stream_that_broke_with_nowhere_to_continue_is_one_row_billed_once() -> None:
    """Its attempt ended when it broke; no continuation started: the call's row is that
    attempt, charged once (the settle does not end it a second time)."""
    made = record()
    made.begin_attempt("openai")
    made.provider, made.model = "openai", "m"
    made.streamed_chars = 40
    made.end_attempt("upstream_error")
    made.status = "upstream_error"
    assert not made.attempt_unsettled
    call = totals(made)
    assert (call.prompt_tokens, call.completion_tokens, call.estimated) == (100, 10, True)
    assert split_attempts(call, made) == (call, [])


def test_a_continuation_that_fails_leaves_the_broken_attempt_billed_on_its_own_row() -> None:
    made = record()
    made.begin_attempt("openai")
    made.provider, made.model = "openai", "m"
    made.streamed_chars = 40
    made.end_attempt("upstream_error")
    made.begin_attempt("anthropic")
    made.attempt_failed("anthropic", "c", "anthropic", "upstream_unavailable")
    made.status = "upstream_error"
    call = totals(made)
    own, rows = split_attempts(call, made)
    assert [fields(row)[:8] for row in rows] == [
        ("req_1/1", "req_1", "openai", "openai", "upstream_error", 100, 10, 110_000_000)
    ]
    # The call's own row is its last attempt, which produced nothing.
    assert (own.prompt_tokens, own.completion_tokens, own.cost_pico, own.estimated) == (
        0,
        0,
        0,
        False,
    )
