"""What a stream buffer is: numbered entries of one answer, kept for the resume window.

Two backends implement it: ``MemoryStreamBuffer`` (one process) and ``RedisStreamBuffer``
(several processes: the producer on one, a resumed reader on another). The producer is the
only writer of a stream and numbers its entries itself (1, 2, ...), so the backends never
have to agree on a counter.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

#: The entry a cancelled producer leaves behind: readers stop, resumes are refused.
CANCELLED = "cancelled"
#: Wire events after which nothing more comes.
TERMINAL = frozenset({"done", "error", CANCELLED})

_STREAM_ID = re.compile(r"^s_[0-9a-f]{32}$")


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    #: The wire event name (``delta``, ``done``...) or ``cancelled``.
    event: str
    #: The event's JSON, exactly as it goes on the wire.
    data: str

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL


#: Python's own cost of one kept entry beyond its JSON (object, list slot, str header), so
#: that the byte bounds of the buffers and of one stream are about memory, not just payload.
ENTRY_OVERHEAD = 120


class StreamBufferFull(Exception):
    """No room for one more stream: the streams in flight hold the whole buffer."""


def new_stream_id() -> str:
    return f"s_{uuid.uuid4().hex}"


def is_stream_id(value: str) -> bool:
    return bool(_STREAM_ID.match(value))


def event_id(stream_id: str, seq: int) -> str:
    """The SSE ``id:`` / WS ``eventId``: globally unique, so it alone locates a resume."""
    return f"{stream_id}:{seq}"


#: A seq as it appears in an event id: ASCII digits only. ``str.isdigit`` is not enough: it
#: is True for '²' and other Unicode digits that ``int`` then refuses (a 500 in the audit).
_SEQ = re.compile(r"^[0-9]{1,9}$")


def parse_seq(value: str) -> int | None:
    """A seq (1 to 9 ASCII digits, surrounding spaces allowed), or ``None``."""
    text = value.strip()
    return int(text) if _SEQ.match(text) else None


def parse_event_id(value: str) -> tuple[str, int] | None:
    """``(stream id, seq)`` from an event id, or ``None`` when it is not one of ours."""
    stream_id, sep, text = value.strip().rpartition(":")
    seq = parse_seq(text) if sep and is_stream_id(stream_id) else None
    return None if seq is None else (stream_id, seq)


class StreamBuffer(Protocol):
    async def open(self, stream_id: str, owner: str) -> None:
        """Start a stream belonging to ``owner`` (the principal's user)."""
        ...

    async def append(self, stream_id: str, entry: Entry) -> None: ...

    async def owner(self, stream_id: str) -> str | None:
        """Who started the stream; ``None`` when it is unknown or has expired."""
        ...

    async def cancelled(self, stream_id: str) -> bool: ...

    def read(self, stream_id: str, after: int) -> AsyncIterator[Entry]:
        """The entries after ``after``, waiting for new ones, up to a terminal entry (or
        until the stream expires)."""
        ...

    def attach(self, stream_id: str) -> AbstractAsyncContextManager[None]:
        """Held by a connection while it delivers the stream to a client: the producer
        keeps going only while someone is attached (or within the grace after the last
        one left)."""
        ...

    async def attached(self, stream_id: str) -> bool: ...

    async def aclose(self) -> None: ...
