"""``RedisStreamBuffer``: streams in Redis, so a client can resume on any proxy process.

Per stream three keys, all expiring ``window`` seconds after the last write:

- ``<prefix>:stream:<id>:events`` (the prefix is ``ROBOTA_REDIS_PREFIX``, ``robota`` by
  default): a Redis stream; entry ``<seq>`` is stored under the
  explicit Redis id ``0-<seq>``, so "everything after seq N" is ``XREAD ... 0-N``;
- ``<prefix>:stream:<id>:owner``: the user who started it (resume is theirs only);
- ``<prefix>:stream:<id>:readers``: how many connections (on any process) deliver it now.
  INCR/DECR rather than a heartbeat, so a slow client that is simply not reading is not
  mistaken for a gone one. A process that dies while attached leaves the count up until it
  expires: the producer then finishes the answer (metered in full) instead of cancelling it.

A stream produced by this process is also kept in a local list until it ends, and readers in
this process (above all the producing connection's own writer) read that list rather than
Redis: the entry goes to Redis first, for resumes elsewhere, then straight to the local
readers, instead of a second round trip (XREAD) per chunk. Once the terminal entry is in, the
list is kept for ``_FINISHED_SECONDS`` more: a fast answer can be over before the producing
connection's own writer starts reading, and that writer must not depend on Redis (which may
have gone away meanwhile). A reader that starts after that reads Redis, which has it all.

When Redis cannot be reached the Redis failure policy decides: open (the default), the stream
is still produced and delivered on this connection from the local list, only not resumable
elsewhere; closed, a new stream is refused with 503. A resume always needs Redis: 503.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field

import anyio
from cachetools import TTLCache
from redis.asyncio import Redis

from robota_proxy.errors import ProxyError, UpstreamUnavailable
from robota_proxy.redis_failure import RedisFailurePolicy
from robota_proxy.streams.buffer import CANCELLED, Entry

_PART = "resumable streams"

#: How long one blocking read waits before checking that the stream still exists.
_BLOCK_MS = 500
#: How long, and for how many streams, a finished stream's local list is kept (above).
_FINISHED_SECONDS = 10.0
_FINISHED_MAX = 1024


@dataclass(slots=True)
class _LocalStream:
    """The entries of a stream this process produces, as they were written to Redis."""

    entries: list[Entry] = field(default_factory=list)
    #: Set and dropped on every append; made only when a reader waits.
    changed: anyio.Event | None = None


class RedisStreamBuffer:
    def __init__(
        self,
        url: str,
        window: float,
        *,
        on_failure: RedisFailurePolicy | None = None,
        prefix: str = "robota",
    ) -> None:
        self.window = window
        self._prefix = f"{prefix}:stream:"
        self._on_failure = on_failure or RedisFailurePolicy()
        self._ttl = max(1, round(window))
        self._redis: Redis = Redis.from_url(url)
        #: Streams produced by this process that have not ended yet, and those that ended
        #: in the last ``_FINISHED_SECONDS``.
        self._local: dict[str, _LocalStream] = {}
        self._finished: TTLCache[str, _LocalStream] = TTLCache(_FINISHED_MAX, _FINISHED_SECONDS)

    def _keys(self, stream_id: str) -> tuple[str, str, str]:
        base = self._prefix + stream_id
        return f"{base}:events", f"{base}:owner", f"{base}:readers"

    async def open(self, stream_id: str, owner: str) -> None:
        _, owner_key, _ = self._keys(stream_id)
        try:
            await self._redis.set(owner_key, owner, ex=self._ttl)
        except Exception as exc:
            self._on_failure.failed(_PART, exc)  # closed: the 503; open: local only
        self._local[stream_id] = _LocalStream()

    async def append(self, stream_id: str, entry: Entry) -> None:
        events, owner_key, _ = self._keys(stream_id)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(events, {"e": entry.event, "d": entry.data}, id=f"0-{entry.seq}")
                pipe.expire(events, self._ttl)
                pipe.expire(owner_key, self._ttl)
                await pipe.execute()
        except Exception as exc:
            # Mid-stream nothing can be refused any more: the local readers get every entry.
            with contextlib.suppress(ProxyError):
                self._on_failure.failed(_PART, exc)
        except BaseException:
            # Local readers still learn that the stream ended, even if Redis did not.
            if entry.terminal:
                self._append_local(stream_id, entry)
            raise
        self._append_local(stream_id, entry)

    def _append_local(self, stream_id: str, entry: Entry) -> None:
        local = self._local.get(stream_id)
        if local is None:
            return
        local.entries.append(entry)
        if entry.terminal:
            self._finished[stream_id] = self._local.pop(stream_id)
        changed = local.changed
        if changed is not None:
            local.changed = None
            changed.set()

    async def owner(self, stream_id: str) -> str | None:
        _, owner_key, _ = self._keys(stream_id)
        try:
            value = await self._redis.get(owner_key)
        except Exception as exc:
            with contextlib.suppress(ProxyError):
                self._on_failure.failed(_PART, exc)
            raise UpstreamUnavailable(
                "streams cannot be resumed while the proxy's shared state is unreachable",
                retry_after=1,
            ) from None
        return value.decode() if isinstance(value, bytes) else value

    async def cancelled(self, stream_id: str) -> bool:
        events, _, _ = self._keys(stream_id)
        last = await self._redis.xrevrange(events, count=1)
        return bool(last) and last[0][1].get(b"e") == CANCELLED.encode()

    async def read(self, stream_id: str, after: int) -> AsyncIterator[Entry]:
        local = self._local.get(stream_id) or self._finished.get(stream_id)
        source = (
            _read_local(local, after) if local is not None else self._read_redis(stream_id, after)
        )
        async with aclosing(source) as entries:
            async for entry in entries:
                yield entry

    async def _read_redis(self, stream_id: str, after: int) -> AsyncGenerator[Entry, None]:
        events, owner_key, _ = self._keys(stream_id)
        position = f"0-{max(after, 0)}"
        while True:
            answer = await self._redis.xread({events: position}, count=256, block=_BLOCK_MS)
            if not answer:
                if not await self._redis.exists(owner_key):
                    return  # expired
                continue
            for raw_id, fields in answer[0][1]:
                position = raw_id.decode()
                entry = Entry(
                    seq=int(position.partition("-")[2]),
                    event=fields[b"e"].decode(),
                    data=fields[b"d"].decode(),
                )
                yield entry
                if entry.terminal:
                    return

    @asynccontextmanager
    async def attach(self, stream_id: str) -> AsyncIterator[None]:
        _, _, readers = self._keys(stream_id)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.incr(readers)
                pipe.expire(readers, self._ttl)
                await pipe.execute()
        except Exception as exc:
            with contextlib.suppress(ProxyError):
                self._on_failure.failed(_PART, exc)
            yield  # delivered all the same, just not counted across processes
            return
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._redis.decr(readers)

    async def attached(self, stream_id: str) -> bool:
        _, _, readers = self._keys(stream_id)
        try:
            value = await self._redis.get(readers)
        except Exception as exc:
            with contextlib.suppress(ProxyError):
                self._on_failure.failed(_PART, exc)
            return False  # nobody can resume without Redis: an orphan is cancelled
        return value is not None and int(value) > 0

    async def aclose(self) -> None:
        self._local.clear()
        self._finished.clear()
        await self._redis.aclose()


async def _read_local(local: _LocalStream, after: int) -> AsyncGenerator[Entry, None]:
    """Entries after ``after`` from this process's list, waiting for more up to the terminal
    one (which the producer always appends, even when cancelled)."""
    position = 0
    while True:
        changed = local.changed
        if changed is None:
            changed = local.changed = anyio.Event()
        while position < len(local.entries):
            entry = local.entries[position]
            position += 1
            # By seq, not by index: an entry Redis refused is missing from the list too.
            if entry.seq <= after and not entry.terminal:
                continue
            yield entry
            if entry.terminal:
                return
        await changed.wait()
