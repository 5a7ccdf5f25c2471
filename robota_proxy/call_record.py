"""``CallRecord``: the accounting slip of one chat call.

The route fills it as the call goes (which upstream, the usage the vendor reported, how much
text a stream produced before it ended); the metering and rate-limit middleware read it when
the call is over. It lives in the ASGI scope under ``robota_proxy.scope.CALL`` so the pieces
never import each other; ``call_record(scope)`` creates one when no metering middleware did.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from robota_client.messages import AssistantMessage, Usage
from robota_proxy.scope import AUTHORIZED, CALL, Authorized

#: ``(provider, model, usage) -> cost in USD``, or ``None`` when the model has no known price.
Pricer = Callable[[str, str, Usage], Decimal | None]
#: Usage of a stream attempt the vendor never reported, from the characters it produced.
Estimator = Callable[[int], Usage]
#: The events of a stream that make up its answer before ``done`` (what a cache replays).
_KEPT_EVENTS = frozenset({"delta", "tool_call", "usage"})


@dataclass(frozen=True, slots=True)
class AttemptUsage:
    """What one vendor call of a chat call consumed, priced at its own target: the attempt of a
    continued stream, or one that failed before it produced anything (usage nil, cost 0)."""

    provider: str
    model: str
    usage: Usage
    cost: Decimal | None
    estimated: bool
    #: How it ended (``ok`` while it runs or once it answered, else the wire error code of its
    #: failure), on which deployment, and how long it took: its own ledger row says so.
    status: str = "ok"
    deployment: str | None = None
    latency_ms: int = 0


@dataclass(slots=True)
class CallRecord:
    request_id: str
    streamed: bool = False
    #: Set by the metering middleware so the route can put the cost on the answer.
    pricer: Pricer | None = None
    #: Where the call went (after fallbacks: the one that served), and the deployment of that
    #: provider that answered (its name, never its key).
    provider: str | None = None
    model: str | None = None
    deployment: str | None = None
    #: True once a vendor was asked: only such calls (and cache hits) are ledger rows.
    upstream_called: bool = False
    #: Vendor calls made for it (retries, fallbacks and continuations each count): the
    #: access log's and the trace's ``attempts``.
    attempts: int = 0
    cached: bool = False
    usage: Usage | None = None
    #: The route worked ``usage`` out itself because the vendor reported none (Gemini's
    #: embeddings): the ledger row is marked ``estimated``.
    usage_estimated: bool = False
    cost: Decimal | None = None
    #: Characters of text and tool-call arguments the current attempt streamed so far, for
    #: the estimate used when it ends before the vendor reported usage.
    streamed_chars: int = 0
    #: Set by the metering middleware: the usage of ``streamed_chars`` the vendor never
    #: reported (the prompt's bound plus the text's tokens).
    estimator: Estimator | None = None
    #: Attempts of a stream that broke midway and was continued (``usage`` and ``cost`` are
    #: then the sums, each attempt priced at its own target).
    earlier: list[AttemptUsage] = field(default_factory=list)
    #: Every vendor call of this call that is over, in order: the failed ones (retries and
    #: fallbacks) and those of ``earlier``. Each is a ledger row of its own besides the call's.
    ended: list[AttemptUsage] = field(default_factory=list)
    #: When the current vendor call started (``begin_attempt``).
    attempt_started: float = 0.0
    #: ``ok``, a wire error code, or ``client_disconnected``.
    status: str = "ok"
    started: float = field(default_factory=time.perf_counter)
    #: Seconds spent waiting on vendors before the answer started (every attempt, back-off
    #: included): what ``X-Robota-Overhead-Ms`` takes out of the elapsed time.
    vendor_seconds: float = 0.0
    #: ``hit`` or ``miss`` once the response cache looked the call up (metrics).
    cache_result: str | None = None
    #: The ``maxTokens`` a layer imposes on a request that set none (the metering's
    #: reservation, ``reserve_max_tokens``): the parsed request stays as the caller sent it
    #: (it is the cache's key), and the request sent to the vendor carries this bound.
    max_tokens: int | None = None
    #: What the auth middleware already authorized (``robota_proxy.scope.AUTHORIZED``, taken
    #: over when the record is created): ``Resilience`` does not authorize it again.
    authorized: Authorized | None = None
    #: The final message of a call that answered (``/ai/chat``'s answer, a stream's ``done``),
    #: the route's own object: the response cache stores it as it is instead of parsing the
    #: bytes that were sent. Set before the answer's last byte goes out.
    answer: AssistantMessage | None = None
    #: Set by a route that fills ``answer`` (and collects ``answer_events`` when asked), before
    #: its response starts: the response cache then reads this record instead of the bytes.
    #: Someone else's endpoint behind the cache leaves it False and is cached from its bytes.
    keeps_answer: bool = False
    #: ``[]`` once the response cache means to store this stream (a cacheable miss; the flag
    #: that makes the producer collect, so an uncached stream keeps nothing): the ``(event
    #: name, data JSON)`` of its events before ``done``, the very strings the producer put on
    #: the wire, as ``CachedAnswer.events`` holds them. ``None``: nobody wants them.
    answer_events: list[tuple[str, str]] | None = None
    _attempt: AttemptUsage | None = None

    def keep_event(self, name: str, data: str) -> None:
        """Called by a stream's producer for every event it sends, before it sends it: kept in
        ``answer_events`` when someone asked for them. A ``restart`` voids what came before
        (``StreamAssembler`` forgets it too), so only the fresh answer's events are kept and a
        replay never shows the abandoned text; ``done`` and ``error`` are not kept."""
        events = self.answer_events
        if events is None:
            return
        if name in _KEPT_EVENTS:
            events.append((name, data))
        elif name == "restart":
            events.clear()

    def settle_usage(self, provider: str, model: str, usage: Usage) -> Decimal | None:
        """Record the vendor's usage of the current attempt and price it; a cached answer
        costs nothing. ``usage`` and ``cost`` become the call's totals when earlier attempts
        of a continued stream were kept; the total cost is returned."""
        self.provider, self.model = provider, model
        cost = self._price(provider, model, usage)
        self._attempt = AttemptUsage(provider, model, usage, cost, False)
        if not self.earlier:
            self.usage, self.cost = usage, cost
        else:
            self._add_up()
        return self.cost

    def begin_attempt(self, deployment: str) -> None:
        """A vendor call starts (a try, a fallback or a continuation) on ``deployment``."""
        self.attempts += 1
        self.deployment = deployment
        self.attempt_started = time.perf_counter()

    def attempt_failed(self, provider: str, model: str, deployment: str, status: str) -> None:
        """The current vendor call failed before it produced anything: it costs nothing, and
        its ledger row says where and why."""
        ms = self._attempt_ms()
        self.ended.append(
            AttemptUsage(provider, model, Usage(), Decimal(0), False, status, deployment, ms)
        )

    @property
    def attempt_running(self) -> bool:
        """A vendor call started and has not ended (answering, or still streaming)."""
        return self.attempts > len(self.ended)

    @property
    def attempt_unsettled(self) -> bool:
        """A continued stream whose current attempt has not reported its usage."""
        return bool(self.earlier) and self._attempt is None and self.attempt_running

    def end_attempt(self, status: str = "ok") -> AttemptUsage:
        """The current attempt of a stream is over (it broke with ``status`` and another one
        continues the answer, or the call ended): keep what it consumed, estimated from its
        text when the vendor never said, and start counting the next one from nothing."""
        ended = self._attempt
        if ended is None:
            usage = self.estimator(self.streamed_chars) if self.estimator else Usage()
            provider, model = self.provider or "unknown", self.model or "unknown"
            ended = AttemptUsage(
                provider, model, usage, self._price(provider, model, usage), usage.total_tokens > 0
            )
        ended = replace(
            ended, status=status, deployment=self.deployment, latency_ms=self._attempt_ms()
        )
        self.earlier.append(ended)
        self.ended.append(ended)
        self._attempt = None
        self.streamed_chars = 0
        self._add_up()
        return ended

    def _price(self, provider: str, model: str, usage: Usage) -> Decimal | None:
        if self.cached:
            return Decimal(0)
        return self.pricer(provider, model, usage) if self.pricer is not None else None

    def _add_up(self) -> None:
        attempts = [*self.earlier, *([self._attempt] if self._attempt else [])]
        total = Usage()
        for one in attempts:
            total = _plus(total, one.usage)
        self.usage = total
        costs = [one.cost for one in attempts if one.cost is not None]
        self.cost = sum(costs, Decimal(0)) if len(costs) == len(attempts) else None
        self.usage_estimated = self.usage_estimated or any(one.estimated for one in attempts)

    def _attempt_ms(self) -> int:
        return round((time.perf_counter() - (self.attempt_started or self.started)) * 1000)

    @property
    def latency_ms(self) -> int:
        return round((time.perf_counter() - self.started) * 1000)


def _plus(total: Usage, one: Usage) -> Usage:
    def kind(a: int | None, b: int | None) -> int | None:
        return None if a is None and b is None else (a or 0) + (b or 0)

    return Usage(
        prompt_tokens=total.prompt_tokens + one.prompt_tokens,
        completion_tokens=total.completion_tokens + one.completion_tokens,
        total_tokens=total.total_tokens + one.total_tokens,
        cached_prompt_tokens=kind(total.cached_prompt_tokens, one.cached_prompt_tokens),
        cache_write_tokens=kind(total.cache_write_tokens, one.cache_write_tokens),
        reasoning_tokens=kind(total.reasoning_tokens, one.reasoning_tokens),
    )


def call_record(scope: MutableMapping[str, Any], request_id: str) -> CallRecord:
    existing = scope.get(CALL)
    if isinstance(existing, CallRecord):
        return existing
    authorized = scope.get(AUTHORIZED)
    created = CallRecord(
        request_id=request_id,
        authorized=authorized if isinstance(authorized, Authorized) else None,
    )
    scope[CALL] = created
    return created
