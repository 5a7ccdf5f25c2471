"""The ``limits`` library's storage: in-process memory, or Redis shared by several processes.

Every limiter in the proxy (rate limits, failed-authentication limits) uses one storage per
app, built here, so that setting ``ROBOTA_REDIS_URL`` moves all of them at once.
"""

from __future__ import annotations

from limits.aio.storage import MemoryStorage, RedisStorage, Storage


def limits_storage(redis_url: str | None) -> Storage:
    if redis_url is None:
        return MemoryStorage()
    # redis-py (not coredis): one Redis client library for the whole project.
    uri = redis_url.replace("redis://", "async+redis://", 1).replace(
        "rediss://", "async+rediss://", 1
    )
    return RedisStorage(uri, implementation="redispy", key_prefix="robota_limits")
