"""What the proxy does when Redis, its shared state, cannot be reached: one policy for all.

Redis holds what smooths traffic and saves work (rate limits, the failed-authentication
limiter, the response cache, the resume buffer), never money: quotas, budgets and the ledger
are in SQL. So by default an outage is survived by doing without it ("open"): the request
goes on unlimited and uncached, and a warning is logged at most once per interval per part,
not once per request with a traceback (an audit saw 9,690 tracebacks and 4,842 answers of
500 in a 10 s outage). ``ROBOTA_REDIS_FAILURE=closed`` is for operators who would rather
refuse than serve unlimited: then the request gets a 503 JSON error instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from robota_proxy.errors import UpstreamUnavailable
from robota_proxy.observability.throttled_log import ThrottledLog

RedisFailureMode = Literal["open", "closed"]

log = logging.getLogger("robota_proxy.redis")


class RedisFailurePolicy:
    """Call ``failed(part, exc)`` where an operation on shared state raised: it logs (rate
    limited) and, when closed, raises the 503; when open, the caller goes on without it."""

    def __init__(self, mode: RedisFailureMode = "open", *, interval: float = 10.0) -> None:
        self.mode = mode
        self._log = ThrottledLog(log, interval)
        #: Told of every failure with its part (``robota_redis_errors_total``).
        self.on_failed: Callable[[str], None] | None = None

    def failed(self, part: str, exc: BaseException) -> None:
        if self.on_failed is not None:
            self.on_failed(part)
        verdict = "requests refused (ROBOTA_REDIS_FAILURE=closed)"
        if self.mode == "open":
            verdict = "going on without it (ROBOTA_REDIS_FAILURE=open)"
        self._log.warn(part, "shared state unreachable for %s (%s): %s", part, _name(exc), verdict)
        if self.mode == "closed":
            raise UpstreamUnavailable(
                f"the proxy's shared state is unreachable ({part}); retry shortly",
                retry_after=1,
            ) from None


def _name(exc: BaseException) -> str:
    """The exception's type only: its text may carry a URL with a password."""
    return type(exc).__name__
