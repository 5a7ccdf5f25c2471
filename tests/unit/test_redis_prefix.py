"""``ROBOTA_REDIS_PREFIX``: every key the proxy writes to Redis (rate limits, cached answers,
stream buffers) starts with it, so two deployments, or two test runs, can share one Redis
database without reading, counting or deleting each other's data."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import redis
from limits import RateLimitItemPerMinute
from limits.aio.strategies import MovingWindowRateLimiter

from robota_proxy.config_errors import ConfigError, load_settings
from robota_proxy.storage.limits_storage import LimitsStorage
from robota_proxy.storage.response_cache_redis import RedisResponseCache
from robota_proxy.streams.buffer import Entry, new_stream_id
from robota_proxy.streams.redis import RedisStreamBuffer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def keys_under(url: str, prefix: str) -> set[str]:
    client = redis.Redis.from_url(url)
    try:
        return {key.decode() for key in client.scan_iter(match=f"{prefix}*", count=1000)}
    finally:
        client.close()


async def test_every_part_writes_under_the_prefix(redis_url: str, redis_prefix: str) -> None:
    prefix = f"{redis_prefix}-{uuid.uuid4().hex[:6]}"
    limits = LimitsStorage(redis_url, prefix=prefix)
    cache = RedisResponseCache(redis_url, ttl=60, max_entry_bytes=1024, prefix=prefix)
    streams = RedisStreamBuffer(redis_url, 60, prefix=prefix)
    try:
        limiter = MovingWindowRateLimiter(limits.storage)
        assert await limiter.hit(RateLimitItemPerMinute(5), "alice")
        await cache.set("k1", b"answer")
        stream_id = new_stream_id()
        await streams.open(stream_id, "alice")
        await streams.append(stream_id, Entry(1, "delta", '{"content":"hi"}'))
        found = keys_under(redis_url, prefix)
    finally:
        await streams.aclose()
        await cache.aclose()
        await limits.aclose()
    assert f"{prefix}:cache:k1" in found
    assert {f"{prefix}:stream:{stream_id}:events", f"{prefix}:stream:{stream_id}:owner"} <= found
    assert any(key.startswith(f"{prefix}_limits:") and "alice" in key for key in found)
    assert len(found) == 4


@pytest.mark.parametrize("value", ["", "two words", "x" * 65, "robota*"])
def test_a_prefix_redis_could_not_scan_for_is_one_line(
    value: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in list(os.environ):
        if name.startswith("ROBOTA_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBOTA_REDIS_PREFIX", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("ROBOTA_REDIS_PREFIX is ")
    assert "\n" not in message
