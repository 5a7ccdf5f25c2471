"""Per-user rate limits (requests per minute, requests per day, tokens per minute) on ``limits``.

Strategy: the ``limits`` library's **sliding window counter** for all three limits. Why:

* correctness: unlike a fixed window it does not let a caller spend twice the limit across a
  window boundary (it weighs the previous window's count by how much of it still overlaps);
  the approximation is the assumption that the previous window's hits were spread evenly.
* speed and size: two counters per limit and user, O(1) whatever the limit, and on Redis one
  Lua script (one round trip) per read or hit, atomic across processes. A moving window is
  exact but keeps one entry per unit: with token costs (``tpm`` of 100 000) that is a list of
  100 000 timestamps per user; the sliding counter charges a weighted hit as one ``INCRBY``.

How one request is checked (``admit``): first the windows of all the caller's limits are read
(concurrently, so one round trip of latency on Redis), and the request is refused, consuming
nothing, if any is exhausted; only then are the request limits hit (each hit is itself an
atomic check-and-count, so concurrent requests in several processes can never together exceed
a limit; a hit that loses such a race refuses the request).

Tokens per minute cannot be known before the call, so it is enforced in two steps:

1. before the call, the estimated prompt tokens (UTF-8 bytes / 4 of the messages and tools:
   a fair estimate for a rate limit, which is not money) must fit in what is left of the
   minute; nothing is consumed yet. A prompt larger than the whole limit waits for an empty
   window rather than being refused forever.
2. after the call, the real total tokens the vendor reported are charged (a weighted hit). The
   sliding window cannot hold more than its limit, so an answer larger than what is left fills
   the window: the caller then waits until enough of the minute has slid by.

Several requests may pass step 1 together and overshoot by their answers: tpm bounds the
rate, it is not a budget (the metering middleware's reservations are).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from limits import RateLimitItem, RateLimitItemPerDay, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.util import WindowStats

from robota_client.messages import ChatRequest
from robota_proxy.policy.pricing import prompt_token_bound
from robota_proxy.policy.principals import Principal, UserPermissions

LimitName = Literal["rpm", "dailyRequestLimit", "tpm"]
T = TypeVar("T")

_DESCRIPTIONS: dict[LimitName, str] = {
    "rpm": "requests per minute (rpm)",
    "dailyRequestLimit": "requests per day (dailyRequestLimit)",
    "tpm": "tokens per minute (tpm)",
}


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """One limit as it stands for one user."""

    name: LimitName
    limit: int
    remaining: int
    #: Seconds until at least one more unit is free again (0 when nothing is used).
    reset_seconds: float

    @property
    def reset_header(self) -> int:
        """Whole seconds, rounded up, so a client waiting that long never comes back early."""
        return math.ceil(self.reset_seconds)

    def describe(self) -> str:
        return f"{self.limit} {_DESCRIPTIONS[self.name]}"

    def to_wire(self) -> dict[str, Any]:
        return {"limit": self.limit, "remaining": self.remaining, "resetSeconds": self.reset_header}


@dataclass(frozen=True, slots=True)
class Admission:
    """The verdict on one request."""

    #: The limit that refused the request, or ``None`` when it may go ahead.
    refused_by: LimitStatus | None = None
    #: Why, for the error message.
    reason: str = ""
    #: The tightest request limit (rpm or per day) after this request was counted.
    requests: LimitStatus | None = None
    #: Tokens per minute as they stood before the call.
    tokens: LimitStatus | None = None

    @property
    def allowed(self) -> bool:
        return self.refused_by is None


UNLIMITED = Admission()


def estimate_prompt_tokens(request: ChatRequest) -> int:
    """The typical prompt tokens of ``request``: ``estimate_from_bound`` of its
    ``robota_proxy.policy.pricing.prompt_token_bound``."""
    return estimate_from_bound(prompt_token_bound(request))


def estimate_from_bound(bound: int) -> int:
    """A quarter of the prompt-token bound (UTF-8 bytes of every text the vendor sees, plus
    framing), rounded up: about four bytes make a token in practice.

    Deliberately cheap (no tokenizer): it only decides whether a request may start; the real
    count from the vendor is what gets charged. Not the bound itself, on purpose: that is the
    worst case (a token per byte) that money reservations must never undershoot, about four
    times this typical count, and would refuse most requests a ``tpm`` limit ought to let
    through. Taken from the bound so that the prompt is walked once per request
    (``robota_proxy.policy.prompts.prompt_bound`` shares it with the metering).
    """
    return math.ceil(bound / 4)


@lru_cache(maxsize=4096)
def _item(name: LimitName, amount: int) -> RateLimitItem:
    """Items are immutable and their construction parses nothing, but caching keeps the hot
    path free of allocations for the handful of distinct limits a deployment uses."""
    if name == "dailyRequestLimit":
        return RateLimitItemPerDay(amount, namespace="robota-rpd")
    return RateLimitItemPerMinute(amount, namespace=f"robota-{name}")


def _limits(permissions: UserPermissions) -> list[tuple[LimitName, int]]:
    found: list[tuple[LimitName, int]] = []
    if permissions.rpm is not None:
        found.append(("rpm", permissions.rpm))
    if permissions.daily_requests is not None:
        found.append(("dailyRequestLimit", permissions.daily_requests))
    if permissions.tpm is not None:
        found.append(("tpm", permissions.tpm))
    return found


def has_rate_limits(permissions: UserPermissions) -> bool:
    return (
        permissions.rpm is not None
        or permissions.daily_requests is not None
        or permissions.tpm is not None
    )


class RateLimiter:
    """Checks and counts one user's rate limits in a ``limits`` storage (memory or Redis).

    Keyed by ``principal.user`` (all of a user's keys share the limits), with the limits from
    ``principal.permissions`` (a key's own limits already overlaid). A principal with no rate
    limit set is never looked up.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._strategy = SlidingWindowCounterRateLimiter(storage)
        # Memory storage never waits, so running its calls one after another is cheaper than
        # scheduling tasks; a network storage gains one round trip of latency per extra call.
        self._concurrent = not isinstance(storage, MemoryStorage)

    async def admit(self, principal: Principal, prompt_tokens: int = 0) -> Admission:
        """Decide whether one request may start, counting it against the request limits."""
        ident = quote(principal.user, safe="")
        current = await self._read(principal.permissions, ident)
        if not current:
            return UNLIMITED
        tokens: LimitStatus | None = None
        requests: list[tuple[LimitStatus, RateLimitItem]] = []
        for status, item in current:
            if status.name == "tpm":
                tokens = status
                needed = min(max(prompt_tokens, 1), status.limit)
                if needed > status.remaining:
                    return Admission(
                        refused_by=status,
                        reason=(
                            f"about {max(prompt_tokens, 1)} prompt tokens do not fit in the "
                            f"{status.remaining} left of {status.describe()}"
                        ),
                    )
            elif status.remaining < 1:
                return Admission(refused_by=status, reason=f"{status.describe()} reached")
            else:
                requests.append((status, item))
        hits = await self._gather(self._strategy.hit(item, ident) for _, item in requests)
        for (status, _), hit in zip(requests, hits, strict=True):
            if not hit:  # lost a race with a concurrent request, maybe in another process
                lost = LimitStatus(status.name, status.limit, 0, status.reset_seconds)
                return Admission(refused_by=lost, reason=f"{status.describe()} reached")
        counted = [
            LimitStatus(s.name, s.limit, max(0, s.remaining - 1), s.reset_seconds)
            for s, _ in requests
        ]
        tightest = min(counted, key=lambda s: (s.remaining, -s.reset_seconds), default=None)
        return Admission(requests=tightest, tokens=tokens)

    async def charge_tokens(self, principal: Principal, tokens: int) -> None:
        """Count the tokens a finished call really used against ``tpm``."""
        limit = principal.permissions.tpm
        if limit is None or tokens <= 0:
            return
        ident = quote(principal.user, safe="")
        item = _item("tpm", limit)
        if await self._strategy.hit(item, ident, cost=min(tokens, limit)):
            return
        # More than is left: fill what is left, so the next request waits for the window.
        left = (await self._strategy.get_window_stats(item, ident)).remaining
        if left > 0:
            await self._strategy.hit(item, ident, cost=min(tokens, left))

    async def status(self, principal: Principal) -> list[LimitStatus]:
        """Every rate limit of the principal as it stands, consuming nothing."""
        current = await self._read(principal.permissions, quote(principal.user, safe=""))
        return [status for status, _ in current]

    async def remaining(self, principal: Principal) -> dict[str, dict[str, Any]]:
        """What is left of each rate limit, wire-ready for ``/ai/me``:
        ``{"rpm": {"limit", "remaining", "resetSeconds"}, "dailyRequestLimit": ..., "tpm": ...}``
        with only the limits the principal has. Reading consumes nothing."""
        return {status.name: status.to_wire() for status in await self.status(principal)}

    async def _read(
        self, permissions: UserPermissions, ident: str
    ) -> list[tuple[LimitStatus, RateLimitItem]]:
        items = [(name, _item(name, amount)) for name, amount in _limits(permissions)]
        if not items:
            return []
        windows = await self._gather(
            self._strategy.get_window_stats(item, ident) for _, item in items
        )
        now = time.time()
        return [
            (_status(name, item, window, now), item)
            for (name, item), window in zip(items, windows, strict=True)
        ]

    async def _gather(self, calls: Iterable[Awaitable[T]]) -> list[T]:
        if self._concurrent:
            return list(await asyncio.gather(*calls))
        return [await call for call in calls]


def _status(name: LimitName, item: RateLimitItem, window: WindowStats, now: float) -> LimitStatus:
    return LimitStatus(name, item.amount, window.remaining, max(0.0, window.reset_time - now))
