"""RedisStreamBuffer hands a stream's entries straight to readers in the producing process,
and still writes them to Redis, where another process (another buffer) reads the same."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import anyio
import pytest
from redis.asyncio import Redis

from robota_proxy.streams.buffer import CANCELLED, Entry, new_stream_id
from robota_proxy.streams.redis import RedisStreamBuffer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def two_processes(
    redis_url: str,
    redis_prefix: str,
) -> AsyncIterator[tuple[RedisStreamBuffer, RedisStreamBuffer]]:
    producer = RedisStreamBuffer(redis_url, 60, prefix=redis_prefix)
    other = RedisStreamBuffer(redis_url, 60, prefix=redis_prefix)
    yield producer, other
    await producer.aclose()
    await other.aclose()


async def test_local_and_remote_readers_see_the_same_entries(
    two_processes: tuple[RedisStreamBuffer, RedisStreamBuffer],
) -> None:
    producer, other = two_processes
    stream_id = new_stream_id()
    await producer.open(stream_id, "alice")
    entries = [Entry(seq, "delta", f'{{"content":"{seq}"}}') for seq in range(1, 6)]
    entries.append(Entry(6, "done", "{}"))
    local: list[Entry] = []
    remote: list[Entry] = []
    resumed: list[Entry] = []

    async def read(buffer: RedisStreamBuffer, after: int, into: list[Entry]) -> None:
        into.extend([entry async for entry in buffer.read(stream_id, after)])

    async with anyio.create_task_group() as group:
        group.start_soon(read, producer, 0, local)
        group.start_soon(read, other, 0, remote)
        group.start_soon(read, producer, 3, resumed)
        await anyio.wait_all_tasks_blocked()
        for entry in entries:
            await producer.append(stream_id, entry)
    assert local == entries
    assert remote == entries
    assert resumed == entries[3:]
    # Once ended, the stream is read back from Redis, on either process.
    assert [entry async for entry in producer.read(stream_id, 4)] == entries[4:]
    assert [entry async for entry in other.read(stream_id, 0)] == entries


async def test_a_local_reader_ends_on_the_cancel_marker(
    two_processes: tuple[RedisStreamBuffer, RedisStreamBuffer],
) -> None:
    producer, other = two_processes
    stream_id = new_stream_id()
    await producer.open(stream_id, "bob")
    seen: list[Entry] = []

    async def reader() -> None:
        seen.extend([entry async for entry in producer.read(stream_id, 0)])

    async with anyio.create_task_group() as group:
        group.start_soon(reader)
        await anyio.wait_all_tasks_blocked()
        await producer.append(stream_id, Entry(1, "delta", "{}"))
        await producer.append(stream_id, Entry(2, CANCELLED, "{}"))
    assert [entry.seq for entry in seen] == [1, 2]
    assert await other.cancelled(stream_id)


async def test_a_stream_that_ended_before_its_writer_read_it_needs_no_redis(
    redis_url: str, redis_prefix: str
) -> None:
    """A fast answer can be over before the producing connection's writer starts reading;
    if Redis went away meanwhile, that writer still gets every entry from this process (a
    Redis outage cut such a stream in an e2e run: the list was dropped at the terminal entry
    and the reader went to Redis)."""
    producer = RedisStreamBuffer(redis_url, 60, prefix=redis_prefix)
    stream_id = new_stream_id()
    await producer.open(stream_id, "alice")
    entries = [Entry(1, "delta", '{"content":"a"}'), Entry(2, "done", "{}")]
    for entry in entries:
        await producer.append(stream_id, entry)
    with socket.socket() as probe:  # a port nobody listens on: Redis is gone
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    real = producer._redis
    producer._redis = Redis.from_url(f"redis://127.0.0.1:{closed}/0")
    try:
        with anyio.fail_after(5):
            got = [entry async for entry in producer.read(stream_id, 0)]
        assert got == entries
    finally:
        await producer.aclose()
        await real.aclose()
