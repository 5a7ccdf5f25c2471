"""The ``limits`` library's storage: in-process memory, or Redis shared by several processes.

Every limiter in the proxy (rate limits, failed-authentication limits) uses one storage per
app, built here, so that setting ``ROBOTA_REDIS_URL`` moves all of them at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from limits.aio.storage import MemoryStorage, RedisStorage, Storage

if TYPE_CHECKING:  # the redis extra is imported only when configured
    from redis.asyncio import ConnectionPool


class LimitsStorage:
    """The storage and the means to close it.

    ``limits``' ``RedisStorage`` has no close of its own; its documented ``connection_pool``
    option lets the pool be made here instead, so that the app's shutdown can close the
    connections it opened. Memory storage holds nothing to close.
    """

    def __init__(self, redis_url: str | None, *, prefix: str = "robota") -> None:
        self._pool: ConnectionPool | None = None
        if redis_url is None:
            self.storage: Storage = MemoryStorage()
            return
        from redis.asyncio import ConnectionPool

        self._pool = ConnectionPool.from_url(redis_url)
        # redis-py (not coredis): one Redis client library for the whole project.
        uri = redis_url.replace("redis://", "async+redis://", 1).replace(
            "rediss://", "async+rediss://", 1
        )
        # ``limits`` types its options as scalars, though it documents ``connection_pool``.
        options: dict[str, Any] = {"connection_pool": self._pool}
        self.storage = RedisStorage(
            uri, implementation="redispy", key_prefix=f"{prefix}_limits", **options
        )

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
