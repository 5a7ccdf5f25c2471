"""Where cached answers live: in this process (cachetools) or in Redis, shared by processes.

Both store opaque bytes under a key with a time to live; what the bytes mean is the cache
middleware's business. The Redis backend lives in ``response_cache_redis`` and is imported
only when configured, so a single-process install needs no ``redis`` package.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from cachetools import TTLCache

from robota_proxy.redis_failure import RedisFailurePolicy

log = logging.getLogger("robota_proxy.cache")


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


def response_cache(
    redis_url: str | None,
    *,
    ttl: float,
    max_bytes: int,
    on_failure: RedisFailurePolicy | None = None,
    redis_prefix: str = "robota",
) -> ResponseCache:
    """Redis when a URL is configured (several processes share answers), else memory."""
    if redis_url:
        # Imported here so a single-process install does not need the redis extra.
        from robota_proxy.storage.response_cache_redis import RedisResponseCache

        return RedisResponseCache(
            redis_url,
            ttl=ttl,
            max_entry_bytes=max_bytes,
            on_failure=on_failure,
            prefix=redis_prefix,
        )
    return MemoryResponseCache(ttl=ttl, max_bytes=max_bytes)
