"""``MemoryStreamBuffer``: streams kept in this process, for a single proxy process."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from robota_proxy.streams.buffer import CANCELLED, Entry


@dataclass
class _Stream:
    owner: str
    entries: list[Entry] = field(default_factory=list)
    #: Replaced on every append; readers wait on the one they saw.
    changed: anyio.Event = field(default_factory=anyio.Event)
    readers: int = 0
    #: Set once the terminal entry is in: the resume window counts from here.
    expires_at: float | None = None

    @property
    def ended(self) -> bool:
        return bool(self.entries) and self.entries[-1].terminal


class MemoryStreamBuffer:
    """Entries live until ``window`` seconds after their stream ended; expired streams are
    swept on the next ``open``, so memory is bounded by the streams of the last window."""

    def __init__(self, window: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._streams: dict[str, _Stream] = {}

    async def open(self, stream_id: str, owner: str) -> None:
        self._sweep()
        self._streams[stream_id] = _Stream(owner)

    async def append(self, stream_id: str, entry: Entry) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.entries.append(entry)
        if entry.terminal:
            stream.expires_at = self._clock() + self.window
        changed, stream.changed = stream.changed, anyio.Event()
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

    def __len__(self) -> int:
        return len(self._streams)

    def _live(self, stream_id: str) -> _Stream | None:
        stream = self._streams.get(stream_id)
        expires_at = stream.expires_at if stream is not None else None
        if expires_at is not None and expires_at <= self._clock():
            del self._streams[stream_id]
            return None
        return stream

    def _sweep(self) -> None:
        now = self._clock()
        expired = [
            key
            for key, stream in self._streams.items()
            if stream.expires_at is not None and stream.expires_at <= now
        ]
        for key in expired:
            del self._streams[key]
