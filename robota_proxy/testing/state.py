"""The bookkeeping shared by the test thread and the server thread.

The server runs on its own event loop in another thread, so every read and write goes
through one ``threading.Lock``; each critical section is a few list operations, cheap
enough for load benchmarks.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping

from robota_proxy.testing.script import (
    Fault,
    Matcher,
    PrefillMode,
    RecordedRequest,
    Reply,
    Rule,
    Vendor,
)

#: What each vendor really does with a final assistant turn: Anthropic continues it, OpenAI
#: accepts the request but writes a fresh answer, Gemini refuses a conversation that does
#: not end with a user turn.
DEFAULT_PREFILL: dict[Vendor, PrefillMode] = {
    "openai": "ignore",
    "anthropic": "continue",
    "google": "reject",
}


class FakeState:
    def __init__(
        self, max_recorded: int, prefill: Mapping[Vendor, PrefillMode] | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._prefill_defaults: dict[Vendor, PrefillMode] = {**DEFAULT_PREFILL, **(prefill or {})}
        self._prefill = dict(self._prefill_defaults)
        self._abandoned_at: list[float] = []
        self._rules: list[Rule] = []
        # Bounded so a long benchmark cannot grow the test process without limit.
        self._requests: deque[RecordedRequest] = deque(maxlen=max_recorded)
        self._completed = 0
        self._aborted = 0
        self._dropped = 0
        self._aborted_at: list[float] = []

    def add_rule(
        self, reply: Reply | Fault, match: Matcher, times: int | None, vendor: Vendor | None
    ) -> None:
        if times is not None and times < 1:
            raise ValueError("times must be at least 1 (or None for unlimited)")
        with self._lock:
            self._rules.append(Rule(reply=reply, match=match, times=times, vendor=vendor))

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def choose(self, request: RecordedRequest) -> Reply | Fault | None:
        """The first rule that matches and still has uses, consuming one use."""
        with self._lock:
            rules = list(self._rules)
        for rule in rules:
            # A callable matcher is user code: run it outside the lock.
            if not rule.matches(request):
                continue
            with self._lock:
                if rule.times is not None:
                    if rule.times <= 0:  # used up by a concurrent request meanwhile
                        continue
                    rule.times -= 1
                return rule.reply
        return None

    def stream_completed(self) -> None:
        with self._lock:
            self._completed += 1

    def stream_aborted(self) -> None:
        with self._lock:
            self._aborted += 1
            self._aborted_at.append(time.monotonic())

    def wait_abandoned(self) -> None:
        with self._lock:
            self._abandoned_at.append(time.monotonic())

    def prefill_mode(self, vendor: Vendor) -> PrefillMode:
        with self._lock:
            return self._prefill[vendor]

    def set_prefill(self, vendor: Vendor, mode: PrefillMode) -> None:
        with self._lock:
            self._prefill[vendor] = mode

    def stream_dropped(self) -> None:
        with self._lock:
            self._dropped += 1

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def completed_streams(self) -> int:
        with self._lock:
            return self._completed

    @property
    def aborted_streams(self) -> int:
        with self._lock:
            return self._aborted

    @property
    def aborted_at(self) -> list[float]:
        with self._lock:
            return list(self._aborted_at)

    @property
    def abandoned_at(self) -> list[float]:
        with self._lock:
            return list(self._abandoned_at)

    @property
    def dropped_streams(self) -> int:
        with self._lock:
            return self._dropped

    def reset(self) -> None:
        with self._lock:
            self._rules.clear()
            self._requests.clear()
            self._completed = self._aborted = self._dropped = 0
            self._aborted_at.clear()
            self._abandoned_at.clear()
            self._prefill = dict(self._prefill_defaults)
