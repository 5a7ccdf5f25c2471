"""Which once-a-month alerts were already sent, agreed across every process of a deployment.

A user crossing 80% of a budget is seen by whichever process settles the call that crossed
it, and then by every process that settles the user's next calls: each of them asks
``claim(user, period, alert)`` and only the first in the whole deployment gets True. Two ways,
picked by what the deployment already shares:

- ``RedisAlertMarks``: ``SET key 1 NX EX`` under ``ROBOTA_REDIS_PREFIX``, expiring after
  ``MARK_TTL_SECONDS`` (longer than a month, so a mark outlives its period and then leaves
  nothing behind);
- ``DatabaseAlertMarks``: an ``INSERT`` into ``alert_marks`` whose primary key is the mark;
  the unique violation is the "already sent" answer. It works on SQLite (several workers on one
  file) and PostgreSQL alike, so a deployment without Redis still sends each alert once. Old
  periods are pruned at start (``prune``).

When the store cannot answer (Redis or the database down), ``claim`` says True: an alert sent
twice is better than one never sent. The caller logs nothing per failure; a throttled warning
here does.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import delete, insert
from sqlalchemy.exc import IntegrityError

from robota_proxy.observability.throttled_log import ThrottledLog
from robota_proxy.storage.database import Database
from robota_proxy.storage.tables import alert_marks

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("robota_proxy.alerts")

#: Longer than any month, so a mark holds for its whole period wherever in it it was set.
MARK_TTL_SECONDS = 40 * 24 * 3600


class AlertMarks(Protocol):
    async def claim(self, user: str, period: str, alert: str) -> bool:
        """True for exactly one caller per (user, period, alert) across the deployment (or
        when the store cannot tell); never raises except cancellation."""
        ...


class DatabaseAlertMarks:
    def __init__(self, database: Database) -> None:
        self._database = database
        self._warn = ThrottledLog(log, 60.0)

    async def claim(self, user: str, period: str, alert: str) -> bool:
        statement = insert(alert_marks).values(user_id=user[:200], period=period, alert=alert)
        try:
            async with self._database.engine.begin() as conn:
                await conn.execute(statement)
        except IntegrityError:
            return False
        except Exception as exc:
            self._warn.warn(
                "claim", "alert marks unavailable (%s): sending anyway", type(exc).__name__
            )
        return True

    async def prune(self, keep_from: str) -> None:
        """Drop marks of periods before ``keep_from`` (``YYYY-MM``): they can never be asked
        about again. Best effort: a failure only leaves a few small rows behind."""
        try:
            async with self._database.engine.begin() as conn:
                await conn.execute(delete(alert_marks).where(alert_marks.c.period < keep_from))
        except Exception as exc:
            log.warning("could not prune old alert marks (%s)", type(exc).__name__)


class RedisAlertMarks:
    """The client is the caller's: it is not closed here."""

    def __init__(self, client: Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._warn = ThrottledLog(log, 60.0)

    async def claim(self, user: str, period: str, alert: str) -> bool:
        key = f"{self._prefix}:alert:{period}:{alert}:{user}"
        try:
            return bool(await self._client.set(key, b"1", nx=True, ex=MARK_TTL_SECONDS))
        except Exception as exc:
            self._warn.warn(
                "claim", "alert marks unavailable (%s): sending anyway", type(exc).__name__
            )
            return True

    async def prune(self, keep_from: str) -> None:
        """Nothing to do: the keys expire."""
