"""Where cached answers live: in this process (cachetools) or in Redis, shared by processes.

Both store opaque bytes under a key with a time to live; what the bytes mean is the cache
middleware's business. A backend failure must never fail a chat call, so the Redis backend
logs and answers "not cached" / drops the write instead of raising.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from cachetools import TTLCache
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("robota_proxy.cache")

#: Prefix of the cache's Redis keys, so the db can be shared with rate limits and streams.
REDIS_PREFIX = "robota:cache:"


class ResponseCache(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes) -> None: ...

    async def aclose(self) -> None: ...


def _entry_size(value: bytes) -> int:
    return len(value)


class MemoryResponseCache:
    """Bounded by the total size of the stored entries in bytes, least recently used out
    first, each entry gone after ``ttl`` seconds. An entry larger than the whole bound is
    simply not stored."""

    def __init__(
        self, *, ttl: float, max_bytes: int, timer: Callable[[], float] = time.monotonic
    ) -> None:
        """``timer``: the clock of the expiry (a test passes its own instead of sleeping)."""
        self._entries: TTLCache[str, bytes] = TTLCache(
            maxsize=max_bytes, ttl=ttl, timer=timer, getsizeof=_entry_size
        )

    @property
    def size_bytes(self) -> int:
        return int(self._entries.currsize)

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        return self._entries.get(key)

    async def set(self, key: str, value: bytes) -> None:
        try:
            self._entries[key] = value
        except ValueError:  # larger than max_bytes on its own
            log.info("answer of %d bytes not cached: larger than the cache", len(value))

    async def aclose(self) -> None:
        self._entries.clear()


class RedisResponseCache:
    """Entries under ``robota:cache:<key>`` with Redis's own expiry; the size bound is the
    Redis server's ``maxmemory`` policy, plus ``max_entry_bytes`` per entry here."""

    def __init__(self, url: str, *, ttl: float, max_entry_bytes: int) -> None:
        self._redis: Redis = Redis.from_url(url)
        self._ttl_ms = max(1, round(ttl * 1000))
        self._max_entry_bytes = max_entry_bytes

    async def get(self, key: str) -> bytes | None:
        try:
            value: bytes | None = await self._redis.get(REDIS_PREFIX + key)
        except (RedisError, OSError) as exc:
            log.warning("response cache read failed (%s); answering uncached", type(exc).__name__)
            return None
        return value

    async def set(self, key: str, value: bytes) -> None:
        if len(value) > self._max_entry_bytes:
            log.info("answer of %d bytes not cached: larger than the cache", len(value))
            return
        try:
            await self._redis.set(REDIS_PREFIX + key, value, px=self._ttl_ms)
        except (RedisError, OSError) as exc:
            log.warning("response cache write failed (%s)", type(exc).__name__)

    async def aclose(self) -> None:
        await self._redis.aclose()


def response_cache(redis_url: str | None, *, ttl: float, max_bytes: int) -> ResponseCache:
    """Redis when a URL is configured (several processes share answers), else memory."""
    if redis_url:
        return RedisResponseCache(redis_url, ttl=ttl, max_entry_bytes=max_bytes)
    return MemoryResponseCache(ttl=ttl, max_bytes=max_bytes)
