"""The stream buffer backends (memory, and a real Redis) behave the same: numbered entries,
reads from a position that wait for more, owner, cancel marker, attached readers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import anyio
import pytest

from robota_proxy.streams.buffer import (
    CANCELLED,
    ENTRY_OVERHEAD,
    Entry,
    StreamBuffer,
    StreamBufferFull,
    event_id,
    new_stream_id,
    parse_event_id,
)
from robota_proxy.streams.memory import MemoryStreamBuffer
from robota_proxy.streams.redis import RedisStreamBuffer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "redis"])
async def buffer(
    request: pytest.FixtureRequest, redis_url: str, redis_prefix: str
) -> AsyncIterator[StreamBuffer]:
    made: StreamBuffer = (
        MemoryStreamBuffer(60)
        if request.param == "memory"
        else RedisStreamBuffer(redis_url, 60, prefix=redis_prefix)
    )
    yield made
    await made.aclose()


async def read_all(buffer: StreamBuffer, stream_id: str, after: int) -> list[Entry]:
    return [entry async for entry in buffer.read(stream_id, after)]


async def test_reads_from_a_position_up_to_the_terminal_entry(buffer: StreamBuffer) -> None:
    stream_id = new_stream_id()
    await buffer.open(stream_id, "alice")
    entries = [Entry(1, "delta", '{"content":"a"}'), Entry(2, "delta", '{"content":"b"}')]
    entries.append(Entry(3, "done", "{}"))
    for entry in entries:
        await buffer.append(stream_id, entry)
    assert await read_all(buffer, stream_id, 0) == entries
    assert await read_all(buffer, stream_id, 2) == entries[2:]
    assert await buffer.owner(stream_id) == "alice"
    assert await buffer.owner(new_stream_id()) is None
    assert not await buffer.cancelled(stream_id)


async def test_a_reader_waits_for_entries_still_to_come(buffer: StreamBuffer) -> None:
    stream_id = new_stream_id()
    await buffer.open(stream_id, "bob")
    await buffer.append(stream_id, Entry(1, "delta", "{}"))
    seen: list[Entry] = []

    async def reader() -> None:
        seen.extend(await read_all(buffer, stream_id, 0))

    async with anyio.create_task_group() as group:
        group.start_soon(reader)
        await anyio.wait_all_tasks_blocked()
        await buffer.append(stream_id, Entry(2, CANCELLED, "{}"))
    assert [entry.seq for entry in seen] == [1, 2]
    assert await buffer.cancelled(stream_id)


async def test_attached_counts_connections(buffer: StreamBuffer) -> None:
    stream_id = new_stream_id()
    await buffer.open(stream_id, "carol")
    assert not await buffer.attached(stream_id)
    async with buffer.attach(stream_id):
        assert await buffer.attached(stream_id)
        async with buffer.attach(stream_id):
            assert await buffer.attached(stream_id)
        assert await buffer.attached(stream_id)
    assert not await buffer.attached(stream_id)


async def test_memory_streams_expire_a_window_after_they_end() -> None:
    now = [100.0]
    buffer = MemoryStreamBuffer(60, clock=lambda: now[0])
    ended, running = new_stream_id(), new_stream_id()
    await buffer.open(ended, "dave")
    await buffer.open(running, "dave")
    await buffer.append(ended, Entry(1, "done", "{}"))
    now[0] += 59
    assert await buffer.owner(ended) == "dave"
    now[0] += 2
    await buffer.open(new_stream_id(), "erin")  # sweeps
    assert await buffer.owner(ended) is None
    assert await buffer.owner(running) == "dave", "a stream still producing never expires"
    assert len(buffer) == 2


def test_event_ids_locate_a_stream_and_a_position() -> None:
    stream_id = f"s_{uuid.uuid4().hex}"
    assert parse_event_id(event_id(stream_id, 42)) == (stream_id, 42)
    for bad in ("42", "s_x:1", f"{stream_id}:", f"{stream_id}:-1", f"{stream_id}:1e3"):
        assert parse_event_id(bad) is None


async def test_memory_sweep_drops_ended_streams_over_the_byte_bound() -> None:
    """All streams together are bounded in bytes (event data plus the per-entry overhead):
    ended streams go oldest first, before their window is over; a running stream is never
    dropped."""
    cost = ENTRY_OVERHEAD
    running, ended_stream = 80 + cost, 40 + cost + 2 + cost
    buffer = MemoryStreamBuffer(60, max_bytes=running + 2 * ended_stream)
    await buffer.open("running", "alice")
    await buffer.append("running", Entry(1, "delta", "x" * 80))
    for name in ("old", "new"):
        await buffer.open(name, "alice")
        await buffer.append(name, Entry(1, "delta", "y" * 40))
        await buffer.append(name, Entry(2, "done", "{}"))
    await buffer.open("next", "alice")  # sweeps: exactly at the bound, nothing goes
    assert await buffer.owner("old") == "alice"
    await buffer.open("third", "alice")
    await buffer.append("third", Entry(1, "delta", "z" * 40))
    await buffer.append("third", Entry(2, "done", "{}"))
    await buffer.open("last", "alice")  # one ended stream over: the oldest goes
    assert await buffer.owner("old") is None
    assert await buffer.owner("new") == "alice"
    assert await buffer.owner("third") == "alice"
    assert await buffer.owner("running") == "alice"


async def test_memory_refuses_a_new_stream_when_running_ones_hold_the_bound() -> None:
    buffer = MemoryStreamBuffer(60, max_bytes=ENTRY_OVERHEAD + 100)
    await buffer.open("running", "alice")
    await buffer.append("running", Entry(1, "delta", "x" * 100))
    await buffer.open("fits", "alice")  # exactly at the bound: still room
    await buffer.append("fits", Entry(1, "delta", "x"))
    with pytest.raises(StreamBufferFull):
        await buffer.open("refused", "alice")
    assert await buffer.owner("refused") is None
    await buffer.append("running", Entry(2, "done", "{}"))
    await buffer.append("fits", Entry(2, "done", "{}"))
    await buffer.open("after", "alice")  # the ended streams made room
    assert await buffer.owner("after") == "alice"
