"""The stream buffer the settings ask for: Redis when several processes share streams."""

from __future__ import annotations

from robota_proxy.redis_failure import RedisFailurePolicy
from robota_proxy.streams.buffer import StreamBuffer
from robota_proxy.streams.memory import MemoryStreamBuffer


def stream_buffer(
    redis_url: str | None,
    window: float,
    *,
    max_bytes: int = 256 * 1024 * 1024,
    on_failure: RedisFailurePolicy | None = None,
    redis_prefix: str = "robota",
) -> StreamBuffer:
    """``max_bytes`` bounds the in-process buffer; Redis is bounded by its ``maxmemory``."""
    if redis_url:
        # Imported here so a single-process install does not need the redis extra.
        from robota_proxy.streams.redis import RedisStreamBuffer

        return RedisStreamBuffer(redis_url, window, on_failure=on_failure, prefix=redis_prefix)
    return MemoryStreamBuffer(window, max_bytes=max_bytes)
