"""``RedisStreamBuffer``: streams in Redis, so a client can resume on any proxy process.

Per stream three keys, all expiring ``window`` seconds after the last write:

- ``robota:stream:<id>:events``: a Redis stream; entry ``<seq>`` is stored under the
  explicit Redis id ``0-<seq>``, so "everything after seq N" is ``XREAD ... 0-N``;
- ``robota:stream:<id>:owner``: the user who started it (resume is theirs only);
- ``robota:stream:<id>:readers``: how many connections (on any process) deliver it now.
  INCR/DECR rather than a heartbeat, so a slow client that is simply not reading is not
  mistaken for a gone one. A process that dies while attached leaves the count up until it
  expires: the producer then finishes the answer (metered in full) instead of cancelling it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from redis.asyncio import Redis

from robota_proxy.streams.buffer import CANCELLED, Entry

#: How long one blocking read waits before checking that the stream still exists.
_BLOCK_MS = 500


class RedisStreamBuffer:
    def __init__(self, url: str, window: float) -> None:
        self.window = window
        self._ttl = max(1, round(window))
        self._redis: Redis = Redis.from_url(url)

    @staticmethod
    def _keys(stream_id: str) -> tuple[str, str, str]:
        base = f"robota:stream:{stream_id}"
        return f"{base}:events", f"{base}:owner", f"{base}:readers"

    async def open(self, stream_id: str, owner: str) -> None:
        _, owner_key, _ = self._keys(stream_id)
        await self._redis.set(owner_key, owner, ex=self._ttl)

    async def append(self, stream_id: str, entry: Entry) -> None:
        events, owner_key, _ = self._keys(stream_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(events, {"e": entry.event, "d": entry.data}, id=f"0-{entry.seq}")
            pipe.expire(events, self._ttl)
            pipe.expire(owner_key, self._ttl)
            await pipe.execute()

    async def owner(self, stream_id: str) -> str | None:
        _, owner_key, _ = self._keys(stream_id)
        value = await self._redis.get(owner_key)
        return value.decode() if isinstance(value, bytes) else value

    async def cancelled(self, stream_id: str) -> bool:
        events, _, _ = self._keys(stream_id)
        last = await self._redis.xrevrange(events, count=1)
        return bool(last) and last[0][1].get(b"e") == CANCELLED.encode()

    async def read(self, stream_id: str, after: int) -> AsyncIterator[Entry]:
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
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.incr(readers)
            pipe.expire(readers, self._ttl)
            await pipe.execute()
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await self._redis.decr(readers)

    async def attached(self, stream_id: str) -> bool:
        _, _, readers = self._keys(stream_id)
        value = await self._redis.get(readers)
        return value is not None and int(value) > 0

    async def aclose(self) -> None:
        await self._redis.aclose()
