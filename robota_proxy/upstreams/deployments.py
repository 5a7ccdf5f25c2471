"""Several deployments behind one provider, and which one a request goes to.

A deployment is one adapter of a vendor with its own key, base URL or region (two OpenAI
organisations, Azure OpenAI deployments, a second Anthropic workspace). A provider configured
the usual way is one deployment named after the provider; ``ROBOTA_DEPLOYMENTS`` adds more.
Each try of a request picks one (a retry may land on another), skipping a deployment that is
cooling down after a vendor 429 (for its ``Retry-After``) or whose own rpm/tpm limit is spent
(counted with the ``limits`` library, in the app's limits storage, so several proxy processes
share the count on Redis). Among the rest, the strategy chooses:

- ``weighted``: at random, in proportion to the weights;
- ``least-busy``: the fewest calls in flight in this process (ties by weight);
- ``lowest-latency``: the lowest recent time to first token (an exponentially weighted
  average per deployment; one never measured is tried first).

A provider with one deployment and no limits skips all of this: no lookup on the hot path.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from limits import RateLimitItemPerMinute
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter

from robota_proxy.errors import RateLimited
from robota_proxy.observability.throttled_log import ThrottledLog
from robota_proxy.upstreams.base import Upstream

log = logging.getLogger("robota_proxy.upstream")

Strategy = Literal["weighted", "least-busy", "lowest-latency"]

#: Weight of the newest time-to-first-token sample in a deployment's running average.
_LATENCY_SMOOTHING = 0.3
#: A vendor 429 without ``Retry-After`` cools its deployment down this long.
DEFAULT_COOLDOWN = 10.0


@dataclass(slots=True)
class Deployment:
    name: str
    provider: str
    upstream: Upstream
    weight: float = 1.0
    rpm: int | None = None
    tpm: int | None = None
    #: Calls of this process in flight on it.
    in_flight: int = 0
    #: Running average of the time to first token, seconds (None: never measured).
    latency: float | None = None
    #: ``clock()`` until which it is skipped (a vendor 429 said so).
    cooled_until: float = 0.0
    _limits: list[tuple[RateLimitItemPerMinute, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rpm is not None:
            self._limits.append((RateLimitItemPerMinute(self.rpm), "rpm"))
        if self.tpm is not None:
            self._limits.append((RateLimitItemPerMinute(self.tpm), "tpm"))

    @property
    def limited(self) -> bool:
        return bool(self._limits)


class Balancer:
    """Picks a deployment per try and learns from what happened; one per app."""

    def __init__(
        self,
        strategy: Strategy = "weighted",
        storage: Storage | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        choice: Callable[[Sequence[Deployment], Sequence[float]], Deployment] | None = None,
    ) -> None:
        self.strategy = strategy
        self._window = MovingWindowRateLimiter(storage) if storage is not None else None
        self._clock = clock
        self._choice = choice or _weighted_choice
        self._warn = ThrottledLog(log, 10.0)

    async def pick(self, deployments: Sequence[Deployment], tokens: int) -> Deployment:
        """The deployment for one try of a call of about ``tokens`` tokens; ``RateLimited``
        (with the shortest wait) when every one is cooling down or out of its limits."""
        if len(deployments) == 1 and not deployments[0].limited:
            only = deployments[0]
            if only.cooled_until <= self._clock():
                return only
        now = self._clock()
        ready = [one for one in deployments if one.cooled_until <= now]
        for one in self._ordered(ready):
            if await self._admit(one, tokens):
                return one
        waits = [one.cooled_until - now for one in deployments if one.cooled_until > now]
        wait = min(waits) if waits else 60.0
        names = ", ".join(one.name for one in deployments)
        raise RateLimited(
            f"every deployment ({names}) is at its rate limit or cooling down",
            retry_after=max(1.0, round(wait, 1)),
        )

    def started(self, deployment: Deployment) -> None:
        deployment.in_flight += 1

    def finished(self, deployment: Deployment) -> None:
        deployment.in_flight = max(0, deployment.in_flight - 1)

    def first_token(self, deployment: Deployment, seconds: float) -> None:
        before = deployment.latency
        deployment.latency = (
            seconds if before is None else before + _LATENCY_SMOOTHING * (seconds - before)
        )

    def cool_down(self, deployment: Deployment, seconds: float | None) -> None:
        """A vendor 429: skip this deployment for its ``Retry-After`` (or a default)."""
        wait = DEFAULT_COOLDOWN if seconds is None else seconds
        deployment.cooled_until = max(deployment.cooled_until, self._clock() + wait)

    def _ordered(self, ready: list[Deployment]) -> list[Deployment]:
        """Candidates in the order the strategy prefers them."""
        if len(ready) < 2:
            return ready
        if self.strategy == "least-busy":
            return sorted(ready, key=lambda one: (one.in_flight, -one.weight))
        if self.strategy == "lowest-latency":
            return sorted(
                ready, key=lambda one: (one.latency is not None, one.latency or 0.0, -one.weight)
            )
        first = self._choice(ready, [one.weight for one in ready])
        return [first, *(one for one in ready if one is not first)]

    async def _admit(self, deployment: Deployment, tokens: int) -> bool:
        """Counts the try against the deployment's own limits; False when one is spent."""
        if not deployment.limited or self._window is None:
            return True
        costs = [
            (item, kind, min(max(1, tokens), item.amount) if kind == "tpm" else 1)
            for item, kind in deployment._limits
        ]
        try:
            name = deployment.name
            for item, kind, cost in costs:
                if not await self._window.test(item, "deployment", name, kind, cost=cost):
                    return False
            for item, kind, cost in costs:
                await self._window.hit(item, "deployment", name, kind, cost=cost)
        except Exception as exc:  # the shared storage is down: the vendor's own 429 still guards
            self._warn.warn(
                "deployment-limits",
                "deployment limits unavailable (%s): %s admitted unchecked",
                type(exc).__name__,
                deployment.name,
            )
        return True


def _weighted_choice(deployments: Sequence[Deployment], weights: Sequence[float]) -> Deployment:
    return random.choices(deployments, weights=weights)[0]
