"""A warning that repeats under load is logged at most once per interval, with a count.

An outage (Redis down, a flood of slow clients) fires the same warning for every request; one
line per request would bury everything else and cost CPU when it can least be spared. The
standard ``logging`` filters have no notion of "once per interval, then say how many were
skipped", hence this small class.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class ThrottledLog:
    """``warn(key, message, *args)`` logs the first time per ``key`` in each ``interval``
    seconds; the next line it logs for that key says how many it held back meanwhile."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, key: str, message: str, *args: object) -> bool:
        """Returns whether the line was logged (tests use it; callers need not)."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            message += " (%d more like this in the last %.0f s)"
            args = (*args, held, self._interval)
        self._logger.warning(message, *args)
        return True
