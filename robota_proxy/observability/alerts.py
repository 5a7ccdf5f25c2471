"""Alerts: a JSON POST to the operator's webhook when something needs a human.

What is sent (README: Operating it, Alerts), each as ``{"id", "type", "time", "details"}``:

- ``budget_threshold`` / ``quota_threshold``: a user's settled usage this month reached 80% or
  100% of its ``monthlyBudgetUsd`` / ``monthlyTokenLimit``; once per threshold per user per
  month across every process (``robota_proxy.storage.alert_marks``);
- ``circuit_open`` / ``circuit_closed``: a target's circuit breaker opened or closed again;
- ``ledger_write_failed``: a ledger row could not be written (``stage`` ``open``: calls are
  being refused; ``settle``: a call's bill is left to the lease reclaimer), at most one per
  ``ledger_interval`` per process, with the number of failures since the previous one.

Details carry user ids, key public ids, target names and numbers only: never a key, a URL, an
error message or anything a caller wrote.

Nothing here blocks or fails a call. The hooks (``usage_settled``, ``circuit_changed``,
``ledger_write_failed``) are plain functions that only put work in memory: a usage check (one
pending per user, the latest limits win) and an outbox of alerts, bounded, whose oldest alert
is dropped with a counted warning when it is full. Two background tasks, started and stopped
with the app's resources, do the rest: one reads the counters and claims the thresholds, the
other POSTs (``Webhook``, retried with an exponential back-off, then dropped with a log line).
A slow or dead receiver therefore holds up nothing but the alerts behind it. At shutdown what
is queued gets ``drain_seconds`` to go out; what is left is counted in a warning.

The signature, when a secret is set: ``X-Robota-Timestamp`` is the Unix time in seconds of
the attempt and ``X-Robota-Signature`` is ``sha256=`` followed by the hex HMAC-SHA256, keyed by
the secret, of ``<timestamp>.<raw body>``. The timestamp is inside the signed text so that a
captured request cannot be replayed later with a fresh one; receivers reject a signature
whose timestamp is more than a few minutes away from their clock (``verify`` does this).
Each attempt is signed anew. A retry after a lost answer can deliver an alert twice: receivers
that care drop a repeated ``id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from robota_proxy.observability.throttled_log import ThrottledLog
from robota_proxy.policy.pricing import usd_text

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("robota_proxy.alerts")

#: Percentages of a monthly limit that are announced, in order.
THRESHOLDS = (80, 100)
SIGNATURE_HEADER = "X-Robota-Signature"
TIMESTAMP_HEADER = "X-Robota-Timestamp"
#: How far a signature's timestamp may be from the receiver's clock (``verify``).
SIGNATURE_TOLERANCE_SECONDS = 300


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``<timestamp>.<body>``: what follows ``sha256=``."""
    return hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(
    secret: bytes,
    headers: dict[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance: float = SIGNATURE_TOLERANCE_SECONDS,
) -> bool:
    """What a receiver does (header names in any case): the signature matches the raw body
    and the timestamp, and the timestamp is recent (a replay fails here)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    timestamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    signature = lowered.get(SIGNATURE_HEADER.lower(), "")
    if not timestamp.isdigit() or not signature.startswith("sha256="):
        return False
    moment = time.time() if now is None else now
    if abs(moment - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(signature.removeprefix("sha256="), sign(secret, timestamp, body))


def alert_body(
    kind: str, details: dict[str, Any], *, now: datetime | None = None
) -> dict[str, Any]:
    moment = now or datetime.now(UTC)
    return {
        "id": uuid.uuid4().hex,
        "type": kind,
        "time": moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "details": details,
    }


class _TryAgain(Exception):
    """The receiver may take it later: unreachable, timed out, 408/425/429 or 5xx."""


class _Refused(Exception):
    """The receiver answered that it will never take it (another 4xx, a redirect)."""


class Webhook:
    """POSTs one alert, retried with back-off; ``deliver`` never raises (but cancellation)."""

    def __init__(
        self,
        url: str,
        secret: str | None = None,
        *,
        attempts: int = 5,
        backoff: float = 0.5,
        backoff_max: float = 30.0,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._secret = secret.encode() if secret else None
        self.attempts = attempts
        self._wait = wait_exponential(multiplier=backoff, max=backoff_max)
        self._timeout = timeout
        self._transport = transport
        self._sleep = sleep
        self._clock = clock
        self._client: httpx.AsyncClient | None = None

    async def open(self) -> None:
        if self._client is None:
            # Here, not at import: most proxies have no webhook, and httpx is 90 ms of start-up.
            import httpx

            self._client = httpx.AsyncClient(
                timeout=self._timeout, transport=self._transport, follow_redirects=False
            )

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def deliver(self, alert: dict[str, Any]) -> bool:
        """True once the receiver answered 2xx; False when the alert was dropped (logged with
        its id and type, never the URL: webhook URLs often carry a token)."""
        body = json.dumps(alert, separators=(",", ":")).encode()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            wait=self._wait,
            retry=retry_if_exception_type(_TryAgain),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._post(body)
        except _TryAgain as exc:
            log.warning(
                "alert %s (%s) dropped after %d attempts: receiver unavailable (%s)",
                alert["id"],
                alert["type"],
                self.attempts,
                exc,
            )
            return False
        except _Refused as exc:
            log.warning(
                "alert %s (%s) dropped: the receiver refused it (%s)",
                alert["id"],
                alert["type"],
                exc,
            )
            return False
        log.info("alert %s (%s) delivered", alert["id"], alert["type"])
        return True

    async def _post(self, body: bytes) -> None:
        import httpx  # loaded by ``open`` already

        await self.open()
        assert self._client is not None
        headers = {"Content-Type": "application/json", "User-Agent": "robota-proxy-alerts"}
        if self._secret is not None:
            timestamp = str(int(self._clock()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = "sha256=" + sign(self._secret, timestamp, body)
        try:
            response = await self._client.post(self._url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise _TryAgain(type(exc).__name__) from None
        status = response.status_code
        if 200 <= status < 300:
            return
        if status in (408, 425, 429) or status >= 500:
            raise _TryAgain(f"HTTP {status}")
        raise _Refused(f"HTTP {status}")


class UsageCounters(Protocol):
    """What is read of a user's month (``robota_proxy.storage.usage_store.Counters``)."""

    @property
    def tokens_used(self) -> int: ...

    @property
    def cost_used_pico(self) -> int: ...


CountersReader = Callable[[str, str], Awaitable[UsageCounters]]


class Marks(Protocol):
    """``robota_proxy.storage.alert_marks``: who sends a once-a-month alert."""

    async def claim(self, user: str, period: str, alert: str) -> bool: ...

    async def prune(self, keep_from: str) -> None: ...


@dataclass(frozen=True, slots=True)
class _UsageCheck:
    user: str
    key_id: str | None
    period: str
    token_limit: int | None
    cost_limit_pico: int | None

    def limits(self) -> list[tuple[str, int]]:
        """(kind, limit) of each limit the user has; a limit of 0 refuses everything and is
        never "crossed"."""
        pairs = [("quota", self.token_limit), ("budget", self.cost_limit_pico)]
        return [(kind, limit) for kind, limit in pairs if limit is not None and limit > 0]


class Alerts:
    """The hooks the proxy calls, and the two background tasks that turn them into POSTs."""

    def __init__(
        self,
        webhook: Webhook,
        marks: Marks,
        counters: CountersReader,
        *,
        queue_size: int = 1000,
        drain_seconds: float = 3.0,
        ledger_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.webhook = webhook
        self._marks = marks
        self._counters = counters
        self._queue_size = queue_size
        self._drain_seconds = drain_seconds
        self._ledger_interval = ledger_interval
        self._clock = clock
        self._outbox: deque[dict[str, Any]] = deque()
        self._sending: dict[str, Any] | None = None
        self._checks: dict[str, _UsageCheck] = {}
        #: (user, period, alert) this process knows were claimed, by it or another one: the
        #: next settles of that user skip the read and the claim.
        self._known: set[tuple[str, str, str]] = set()
        #: Made in ``start``, on the loop that runs the tasks (an app may be built outside it).
        self._outbox_ready: asyncio.Event | None = None
        self._checks_ready: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ledger_failures = 0
        self._ledger_last: float | None = None
        self._full = ThrottledLog(log, 10.0)
        #: Alerts dropped because the outbox was full (tests and the warning read it).
        self.dropped = 0

    # --- the hooks: synchronous, never blocking, never raising -------------------------

    def emit(self, kind: str, details: dict[str, Any]) -> None:
        if len(self._outbox) >= self._queue_size:
            old = self._outbox.popleft()
            self.dropped += 1
            self._full.warn(
                "full",
                "alert queue full (%d): dropped the oldest alert, %s (%s); %d dropped so far",
                self._queue_size,
                old["id"],
                old["type"],
                self.dropped,
            )
        self._outbox.append(alert_body(kind, details))
        if self._idle is not None and self._outbox_ready is not None:
            self._idle.clear()
            self._outbox_ready.set()

    def usage_settled(
        self,
        user: str,
        key_id: str | None,
        period: str,
        token_limit: int | None,
        cost_limit_pico: int | None,
    ) -> None:
        """A call of a user with a monthly limit settled: check its thresholds, later."""
        check = _UsageCheck(user, key_id, period, token_limit, cost_limit_pico)
        if all(
            (user, period, f"{kind}:{threshold}") in self._known
            for kind, _ in check.limits()
            for threshold in THRESHOLDS
        ):
            return  # all announced already (or no limit): no read at all
        if user not in self._checks and len(self._checks) >= self._queue_size:
            self._full.warn("checks", "alert usage checks backed up: a check was skipped")
            return
        self._checks[user] = check
        if self._checks_ready is not None:
            self._checks_ready.set()

    def circuit_changed(self, target: str, state: str, failures: int) -> None:
        """The breakers' ``on_change``: opening and closing are announced, half-open is not
        (it is the breaker's own probe, followed by one of the two)."""
        if state == "open":
            self.emit("circuit_open", {"target": target, "consecutiveFailures": failures})
        elif state == "closed":
            self.emit("circuit_closed", {"target": target})

    def ledger_write_failed(self, stage: str, error: str) -> None:
        """A ledger write failed (``error`` is the exception's type name). During an outage
        every call fails the same way: one alert per ``ledger_interval``, counting them."""
        self._ledger_failures += 1
        now = self._clock()
        if self._ledger_last is not None and now - self._ledger_last < self._ledger_interval:
            return
        self._ledger_last = now
        failures, self._ledger_failures = self._ledger_failures, 0
        self.emit("ledger_write_failed", {"stage": stage, "error": error, "failures": failures})

    # --- the background tasks --------------------------------------------------------

    async def start(self) -> None:
        """After the database is open (``Resources.start_after_open``)."""
        if self._tasks:
            return
        await self.webhook.open()
        now = datetime.now(UTC)
        previous = f"{now.year - 1}-12" if now.month == 1 else f"{now.year}-{now.month - 1:02d}"
        await self._marks.prune(previous)
        self._outbox_ready = asyncio.Event()
        self._checks_ready = asyncio.Event()
        self._idle = asyncio.Event()
        if self._outbox:  # emitted before the start (a breaker moved early)
            self._outbox_ready.set()
        else:
            self._idle.set()
        if self._checks:
            self._checks_ready.set()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._check_loop(), name="robota-alert-checks"),
            loop.create_task(self._send_loop(), name="robota-alert-sender"),
        ]

    async def stop(self) -> None:
        """Finish the pending checks and send what is queued, for ``drain_seconds`` at most;
        what could not go out is counted in a warning (``Resources.drain_before_close``)."""
        if not self._tasks:
            await self.webhook.aclose()
            return
        checker, sender = self._tasks
        self._tasks = []
        with anyio.move_on_after(self._drain_seconds):
            await _cancel(checker)
            await self._run_checks()
            assert self._idle is not None
            await self._idle.wait()
        await _cancel(sender)
        left = len(self._outbox) + (self._sending is not None)
        if left:
            log.warning("%d alert(s) not delivered before shutdown: dropped", left)
        self._outbox.clear()
        self._sending = None
        await self.webhook.aclose()

    async def _send_loop(self) -> None:
        assert self._idle is not None and self._outbox_ready is not None
        while True:
            if not self._outbox:
                self._idle.set()
                await self._outbox_ready.wait()
                self._outbox_ready.clear()
                continue
            self._sending = self._outbox.popleft()
            await self.webhook.deliver(self._sending)
            self._sending = None

    async def _check_loop(self) -> None:
        assert self._checks_ready is not None
        while True:
            await self._checks_ready.wait()
            self._checks_ready.clear()
            await self._run_checks()

    async def _run_checks(self) -> None:
        while self._checks:
            user = next(iter(self._checks))
            check = self._checks.pop(user)
            try:
                await self._check(check)
            except Exception as exc:  # the database is down: the next settle checks again
                self._full.warn("read", "usage thresholds not checked (%s)", type(exc).__name__)

    async def _check(self, check: _UsageCheck) -> None:
        counters = await self._counters(check.user, check.period)
        if len(self._known) > 100_000:
            self._known.clear()  # a bound; forgetting costs a claim that says "sent already"
        for kind, limit in check.limits():
            used = counters.tokens_used if kind == "quota" else counters.cost_used_pico
            for threshold in THRESHOLDS:
                mark = f"{kind}:{threshold}"
                if (check.user, check.period, mark) in self._known:
                    continue
                if used * 100 < threshold * limit:
                    break
                if await self._marks.claim(check.user, check.period, mark):
                    self.emit(
                        f"{kind}_threshold", _usage_details(check, kind, threshold, limit, used)
                    )
                self._known.add((check.user, check.period, mark))


def _usage_details(
    check: _UsageCheck, kind: str, threshold: int, limit: int, used: int
) -> dict[str, Any]:
    details: dict[str, Any] = {
        "user": check.user,
        "keyId": check.key_id,
        "period": check.period,
        "threshold": threshold,
    }
    if kind == "quota":
        details |= {"limitTokens": limit, "usedTokens": used}
    else:
        details |= {"limitUsd": usd_text(limit), "usedUsd": usd_text(used)}
    return details


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
