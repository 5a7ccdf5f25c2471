"""The response cache in Redis, shared by every proxy process that uses the same server.

A backend failure is handled by the Redis failure policy: by default (open) it logs, throttled,
and answers "not cached" / drops the write; closed, a read raises the policy's 503. Imported
only when ``ROBOTA_REDIS_URL`` is set (the ``[redis]`` extra).
"""

from __future__ import annotations

import contextlib
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from robota_proxy.errors import ProxyError
from robota_proxy.redis_failure import RedisFailurePolicy

log = logging.getLogger("robota_proxy.cache")


class RedisResponseCache:
    """Entries under ``<prefix>:cache:<key>`` with Redis's own expiry (the prefix is
    ``ROBOTA_REDIS_PREFIX``, so the database can be shared with rate limits, streams and other
    deployments); the size bound is the Redis server's ``maxmemory`` policy, plus
    ``max_entry_bytes`` per entry here."""

    def __init__(
        self,
        url: str,
        *,
        ttl: float,
        max_entry_bytes: int,
        on_failure: RedisFailurePolicy | None = None,
        prefix: str = "robota",
    ) -> None:
        self._redis: Redis = Redis.from_url(url)
        self._prefix = f"{prefix}:cache:"
        self._ttl_ms = max(1, round(ttl * 1000))
        self._max_entry_bytes = max_entry_bytes
        self._on_failure = on_failure or RedisFailurePolicy()

    async def get(self, key: str) -> bytes | None:
        try:
            value: bytes | None = await self._redis.get(self._prefix + key)
        except (RedisError, OSError) as exc:
            self._on_failure.failed("the response cache", exc)  # raises when closed
            return None
        return value

    async def set(self, key: str, value: bytes) -> None:
        if len(value) > self._max_entry_bytes:
            log.info("answer of %d bytes not cached: larger than the cache", len(value))
            return
        try:
            await self._redis.set(self._prefix + key, value, px=self._ttl_ms)
        except (RedisError, OSError) as exc:
            with contextlib.suppress(ProxyError):  # the answer is already out: not stored
                self._on_failure.failed("the response cache", exc)

    async def aclose(self) -> None:
        await self._redis.aclose()
