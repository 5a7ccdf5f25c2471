"""``MemoryStreamBuffer``: streams kept in this process, for a single proxy process."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from robota_proxy.streams.buffer import CANCELLED, ENTRY_OVERHEAD, Entry, StreamBufferFull


@dataclass
class _Stream:
    owner: str
    entries: list[Entry] = field(default_factory=list)
    #: Set and dropped on every append; readers wait on the one they saw. Made only when a
    #: reader waits, not on every append (an ``anyio.Event`` is not free).
    changed: anyio.Event | None = None
    readers: int = 0
    size: int = 0
    #: Set once the terminal entry is in: the resume window counts from here.
    expires_at: float | None = None

    @property
    def ended(self) -> bool:
        return bool(self.entries) and self.entries[-1].terminal


class MemoryStreamBuffer:
    """Entries live until ``window`` seconds after their stream ended, and ended streams are
    dropped oldest first sooner when all streams together hold more than ``max_bytes``; when
    live streams alone hold that much, a new stream is refused (``StreamBufferFull``).

    Ended streams wait in a queue in the order they ended; with one window for all, that is
    also the order they expire in, so the sweep on each ``open`` looks only at the front of
    the queue (O(1) amortised) instead of at every stream kept."""

    def __init__(
        self,
        window: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.window = window
        self.max_bytes = max_bytes
        self._clock = clock
        self._streams: dict[str, _Stream] = {}
        #: ``(expires_at, stream_id)`` of ended streams, in the order they ended.
        self._ended: deque[tuple[float, str]] = deque()
        #: Event data held by ended streams (the ones the byte bound may drop).
        self._ended_bytes = 0
        #: Event data held by all streams, live and ended.
        self._bytes = 0

    async def open(self, stream_id: str, owner: str) -> None:
        self._sweep()
        if self._bytes > self.max_bytes:
            # Only live streams are left (ended ones were dropped first): refuse the new one
            # rather than cut answers in flight or grow past the bound.
            raise StreamBufferFull(
                f"{len(self._streams)} streams in flight hold the whole stream buffer"
            )
        self._streams[stream_id] = _Stream(owner)

    async def append(self, stream_id: str, entry: Entry) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.entries.append(entry)
        size = len(entry.data) + ENTRY_OVERHEAD
        stream.size += size
        self._bytes += size
        if stream.expires_at is not None:
            self._ended_bytes += size
        elif entry.terminal:
            stream.expires_at = self._clock() + self.window
            self._ended.append((stream.expires_at, stream_id))
            self._ended_bytes += stream.size
        changed = stream.changed
        if changed is not None:
            stream.changed = None
            changed.set()

    async def owner(self, stream_id: str) -> str | None:
        stream = self._live(stream_id)
        return stream.owner if stream is not None else None

    async def cancelled(self, stream_id: str) -> bool:
        stream = self._live(stream_id)
        return stream is not None and stream.ended and stream.entries[-1].event == CANCELLED

    async def read(self, stream_id: str, after: int) -> AsyncIterator[Entry]:
        position = max(after, 0)
        while True:
            stream = self._live(stream_id)
            if stream is None:
                return
            changed = stream.changed
            if changed is None:
                changed = stream.changed = anyio.Event()
            while position < len(stream.entries):
                entry = stream.entries[position]
                position += 1
                yield entry
                if entry.terminal:
                    return
            await changed.wait()

    @asynccontextmanager
    async def attach(self, stream_id: str) -> AsyncIterator[None]:
        stream = self._streams.get(stream_id)
        if stream is None:
            yield
            return
        stream.readers += 1
        try:
            yield
        finally:
            stream.readers -= 1

    async def attached(self, stream_id: str) -> bool:
        stream = self._streams.get(stream_id)
        return stream is not None and stream.readers > 0

    async def aclose(self) -> None:
        self._streams.clear()
        self._ended.clear()
        self._ended_bytes = 0
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._streams)

    def _live(self, stream_id: str) -> _Stream | None:
        stream = self._streams.get(stream_id)
        expires_at = stream.expires_at if stream is not None else None
        if expires_at is not None and expires_at <= self._clock():
            self._drop(stream_id)
            return None
        return stream

    def _sweep(self) -> None:
        now = self._clock()
        ended = self._ended
        while ended and (ended[0][0] <= now or self._bytes > self.max_bytes):
            _, stream_id = ended.popleft()
            self._drop(stream_id)

    def _drop(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        self._bytes -= stream.size
        if stream.expires_at is not None:
            self._ended_bytes -= stream.size
