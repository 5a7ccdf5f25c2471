"""One ledger row per vendor call: a call's earlier attempts split off its own row.

A call that was retried, fell back, or whose stream broke and was continued made several vendor
calls. The caller is billed their sum, once; the ledger shows each of them, so that an operator
can see which target and deployment failed, how, and what each vendor is owed (an answer begun
by OpenAI and finished by Anthropic costs at both). The call's own row is its last attempt and
keeps the call's ``request_id`` and final status; every earlier attempt is a row whose
``request_id`` is the call's plus ``/1``, ``/2``... and whose ``attempt_of`` names the call.

The split never changes what is billed: the attempts' rows are taken out of the call's totals,
so the rows of one call always add up to exactly what it was charged before the split. A failed
attempt (it ended before producing anything) is a row with no tokens and no cost.
"""

from __future__ import annotations

from dataclasses import replace

from robota_proxy.call_record import AttemptUsage, CallRecord
from robota_proxy.policy.pricing import to_pico
from robota_proxy.storage.usage_store import LedgerEntry


def split_attempts(entry: LedgerEntry, record: CallRecord) -> tuple[LedgerEntry, list[LedgerEntry]]:
    """``entry`` (the call's totals) as the call's own row, and the rows of its earlier
    attempts. A call with a single vendor call is returned as it is."""
    ended = record.ended
    if not ended:
        return entry, []
    # The last attempt is the call's own row: the one still running when the call ended, or,
    # when every attempt is over (the call failed, or its last stream broke), the last of them.
    last: AttemptUsage | None = None
    if not record.attempt_running:
        *ended, last = ended
    rows = [_row(entry, one, number) for number, one in enumerate(ended, start=1)]
    if not rows:
        return entry, []
    own = replace(
        entry,
        prompt_tokens=entry.prompt_tokens - sum(row.prompt_tokens for row in rows),
        completion_tokens=entry.completion_tokens - sum(row.completion_tokens for row in rows),
        cached_prompt_tokens=entry.cached_prompt_tokens
        - sum(row.cached_prompt_tokens for row in rows),
        cache_write_tokens=entry.cache_write_tokens - sum(row.cache_write_tokens for row in rows),
        reasoning_tokens=entry.reasoning_tokens - sum(row.reasoning_tokens for row in rows),
        cost_pico=entry.cost_pico - sum(row.cost_pico for row in rows),
        # An estimate that lies in the attempts' rows is theirs, not this row's.
        estimated=entry.estimated
        if not any(row.estimated for row in rows)
        else last is not None and last.estimated,
    )
    return own, rows


def _row(call: LedgerEntry, attempt: AttemptUsage, number: int) -> LedgerEntry:
    usage = attempt.usage
    return replace(
        call,
        request_id=f"{call.request_id}/{number}",
        attempt_of=call.request_id,
        provider=attempt.provider,
        model=attempt.model,
        deployment=attempt.deployment,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens or 0,
        cache_write_tokens=usage.cache_write_tokens or 0,
        reasoning_tokens=usage.reasoning_tokens or 0,
        cost_pico=0 if attempt.cost is None else to_pico(attempt.cost),
        priced=attempt.cost is not None,
        estimated=attempt.estimated,
        status=attempt.status,
        latency_ms=attempt.latency_ms,
        cached=False,
    )
