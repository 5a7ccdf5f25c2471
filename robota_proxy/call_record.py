"""``CallRecord``: the accounting slip of one chat call.

The route fills it as the call goes (which upstream, the usage the vendor reported, how much
text a stream produced before it ended); the metering and rate-limit middleware read it when
the call is over. It lives in the ASGI scope under ``robota_proxy.scope.CALL`` so the pieces
never import each other; ``call_record(scope)`` creates one when no metering middleware did.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from robota_client.messages import Usage
from robota_proxy.scope import CALL

#: ``(provider, model, usage) -> cost in USD``, or ``None`` when the model has no known price.
Pricer = Callable[[str, str, Usage], Decimal | None]


@dataclass(slots=True)
class CallRecord:
    request_id: str
    streamed: bool = False
    #: Set by the metering middleware so the route can put the cost on the answer.
    pricer: Pricer | None = None
    #: Where the call went (after fallbacks: the one that served).
    provider: str | None = None
    model: str | None = None
    #: True once a vendor was asked: only such calls (and cache hits) are ledger rows.
    upstream_called: bool = False
    cached: bool = False
    usage: Usage | None = None
    #: The route worked ``usage`` out itself because the vendor reported none (Gemini's
    #: embeddings): the ledger row is marked ``estimated``.
    usage_estimated: bool = False
    cost: Decimal | None = None
    #: Characters of text and tool-call arguments streamed so far, for the estimate used
    #: when a stream ends before the vendor reported usage.
    streamed_chars: int = 0
    #: ``ok``, a wire error code, or ``client_disconnected``.
    status: str = "ok"
    started: float = field(default_factory=time.perf_counter)

    def settle_usage(self, provider: str, model: str, usage: Usage) -> Decimal | None:
        """Record the vendor's usage and price it; a cached answer costs nothing."""
        self.provider, self.model, self.usage = provider, model, usage
        if self.cached:
            self.cost = Decimal(0)
        elif self.pricer is not None:
            self.cost = self.pricer(provider, model, usage)
        return self.cost

    @property
    def latency_ms(self) -> int:
        return round((time.perf_counter() - self.started) * 1000)


def call_record(scope: MutableMapping[str, Any], request_id: str) -> CallRecord:
    existing = scope.get(CALL)
    if isinstance(existing, CallRecord):
        return existing
    created = CallRecord(request_id=request_id)
    scope[CALL] = created
    return created
