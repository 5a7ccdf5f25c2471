"""Circuit breakers per target: stop sending requests to a target that keeps failing.

A vendor that is down answers every request with an error only after its timeouts; sending it
the whole traffic meanwhile costs each caller those seconds and the vendor its recovery. So a
target is skipped once it fails ``failures`` times in a row, or when at least ``error_rate`` of
its calls in the last ``window_seconds`` failed (counted only from ``min_calls`` calls on, so
two failures out of three at night do not trip it). After ``cooldown_seconds`` exactly one
caller (the probe) is let through; its success closes the breaker at once, its failure opens it
for another cool-down. A probe that never reports (its process died, the task was cancelled
without reporting) does not wedge the breaker: its slot expires after
``probe_timeout_seconds`` and the next caller probes.

The window is counted in ``WINDOW_BUCKETS`` buckets of ``window_seconds / WINDOW_BUCKETS``
each, so it slides in steps and its memory is bounded whatever the traffic; the Redis
implementation (``robota_proxy.storage.breakers_redis``) counts the same way, so both trip at
the same moment.

A success while the breaker is open and cooling down is ignored: it comes from a request let
through before the breaker opened, and one straggler must not cancel the cool-down. A success
in half-open closes the breaker whoever reports it: the target answered after it was opened.

Transitions are logged on ``robota_proxy.upstream`` (target name, new state, counts; never a
key, a URL or a message text, so give breakers a target's name, not its base URL) and passed to
an optional ``on_change`` hook, e.g. to set a metric.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

log = logging.getLogger("robota_proxy.upstream")

BreakerState = Literal["closed", "open", "half_open"]

#: Called on every transition with (target, new state, consecutive failures).
OnChange = Callable[[str, BreakerState, int], None]

#: The error-rate window is counted in this many buckets.
WINDOW_BUCKETS = 10


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a breaker opens and how long it stays open.

    Either rule opens it: ``failures`` consecutive failures, or a share of failed calls of at
    least ``error_rate`` over the last ``window_seconds`` once that window holds ``min_calls``
    calls (``error_rate=None`` turns that rule off)."""

    failures: int = 5
    error_rate: float | None = 0.5
    window_seconds: float = 30.0
    min_calls: int = 10
    cooldown_seconds: float = 30.0
    #: How long the single probe may take before another caller may probe instead. Longer
    #: than a slow answer (else a second probe goes out while the first still runs), short
    #: enough that a probe lost with its process does not keep the target skipped for long.
    probe_timeout_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.failures < 1:
            raise ValueError("failures must be at least 1")
        if self.error_rate is not None and not 0.0 < self.error_rate <= 1.0:
            raise ValueError("error_rate must be in (0, 1]")
        if self.window_seconds <= 0 or self.cooldown_seconds < 0:
            raise ValueError("window_seconds must be > 0 and cooldown_seconds >= 0")
        if self.min_calls < 1 or self.probe_timeout_seconds <= 0:
            raise ValueError("min_calls must be at least 1 and probe_timeout_seconds > 0")

    @property
    def bucket_seconds(self) -> float:
        return self.window_seconds / WINDOW_BUCKETS

    def rate_trips(self, failed: int, calls: int) -> bool:
        """Whether ``failed`` of ``calls`` in the window open the breaker."""
        return (
            self.error_rate is not None
            and calls >= self.min_calls
            and failed >= self.error_rate * calls
        )


class Breakers(Protocol):
    """What ``resilience`` asks before and tells after each attempt at a target."""

    async def allow(self, target: str) -> bool:
        """True when the target may be tried now: closed, or this caller is the single probe
        of a cooled-down breaker. Never raises (a shared store that is down lets it through)."""
        ...

    async def success(self, target: str) -> None:
        """The attempt at ``target`` succeeded: closes a half-open breaker, resets the
        consecutive failures."""
        ...

    async def failure(self, target: str) -> None:
        """The attempt at ``target`` failed (a failure of the target, not of the request)."""
        ...

    async def snapshot(self) -> dict[str, BreakerState]:
        """The state of every target this process has seen, for ``/admin/metrics``."""
        ...


def announce(
    on_change: OnChange | None,
    target: str,
    state: BreakerState,
    failures: int,
    window_failed: int = 0,
    window_calls: int = 0,
) -> None:
    """Log a transition and call the hook. Opening is a warning (a target is being skipped);
    the rest is information. A hook that raises is logged, not passed on: a metric must not
    fail the request that happened to move the breaker."""
    if state == "open" and window_calls:
        log.warning(
            "circuit breaker %s: open (%d consecutive failures, %d of %d calls failed lately)",
            target,
            failures,
            window_failed,
            window_calls,
        )
    elif state == "open":  # the probe failed
        log.warning("circuit breaker %s: open (%d consecutive failures)", target, failures)
    else:
        log.info("circuit breaker %s: %s (%d consecutive failures)", target, state, failures)
    if on_change is not None:
        try:
            on_change(target, state, failures)
        except Exception:
            log.exception("circuit breaker hook failed for %s", target)


@dataclass(slots=True)
class _Breaker:
    state: BreakerState = "closed"
    consecutive: int = 0
    opened_at: float = 0.0
    probe_until: float = 0.0
    #: bucket number -> [calls, failed]; only the last ``WINDOW_BUCKETS`` buckets are kept.
    buckets: dict[int, list[int]] = field(default_factory=dict)


class MemoryBreakers:
    """Breakers of this process only, for a single proxy process (or when each process may
    learn about a failing target on its own). Every method runs without awaiting, so on one
    event loop each is atomic: among concurrent ``allow`` calls exactly one gets the probe."""

    def __init__(
        self,
        policy: BreakerPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: OnChange | None = None,
    ) -> None:
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self._on_change = on_change
        self._breakers: dict[str, _Breaker] = {}

    def _get(self, target: str) -> _Breaker:
        breaker = self._breakers.get(target)
        if breaker is None:
            breaker = self._breakers[target] = _Breaker()
        return breaker

    async def allow(self, target: str) -> bool:
        breaker = self._get(target)
        if breaker.state == "closed":
            return True
        now = self._clock()
        if breaker.state == "open":
            if now < breaker.opened_at + self.policy.cooldown_seconds:
                return False
            breaker.state = "half_open"
            breaker.probe_until = now + self.policy.probe_timeout_seconds
            announce(self._on_change, target, "half_open", breaker.consecutive)
            return True
        if now < breaker.probe_until:
            return False  # the probe is out
        breaker.probe_until = now + self.policy.probe_timeout_seconds  # it was lost: re-probe
        return True

    async def success(self, target: str) -> None:
        breaker = self._get(target)
        if breaker.state == "open":
            return  # a straggler from before the breaker opened: the cool-down stands
        if breaker.state == "half_open":
            breaker.state = "closed"
            breaker.consecutive = 0
            breaker.buckets.clear()  # the failures that opened it are over
            announce(self._on_change, target, "closed", 0)
            return
        breaker.consecutive = 0
        self._count(breaker, failed=False)

    async def failure(self, target: str) -> None:
        breaker = self._get(target)
        if breaker.state == "open":
            return  # a straggler: the breaker is already open
        now = self._clock()
        breaker.consecutive += 1
        if breaker.state == "half_open":
            self._open(target, breaker, now)  # the probe failed: another cool-down
            return
        calls, failed = self._count(breaker, failed=True)
        if breaker.consecutive >= self.policy.failures or self.policy.rate_trips(failed, calls):
            self._open(target, breaker, now, failed, calls)

    async def snapshot(self) -> dict[str, BreakerState]:
        return {target: breaker.state for target, breaker in self._breakers.items()}

    def _open(
        self, target: str, breaker: _Breaker, now: float, failed: int = 0, calls: int = 0
    ) -> None:
        breaker.state = "open"
        breaker.opened_at = now
        breaker.probe_until = 0.0
        announce(self._on_change, target, "open", breaker.consecutive, failed, calls)

    def _count(self, breaker: _Breaker, *, failed: bool) -> tuple[int, int]:
        """Count one call in the current bucket, drop buckets that left the window, and
        return (calls, failed) over the window."""
        current = math.floor(self._clock() / self.policy.bucket_seconds)
        bucket = breaker.buckets.get(current)
        if bucket is None:
            for number in [n for n in breaker.buckets if n <= current - WINDOW_BUCKETS]:
                del breaker.buckets[number]
            bucket = breaker.buckets[current] = [0, 0]
        bucket[0] += 1
        bucket[1] += int(failed)
        return (
            sum(b[0] for b in breaker.buckets.values()),
            sum(b[1] for b in breaker.buckets.values()),
        )
