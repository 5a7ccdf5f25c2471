"""The WebSocket transport's places on the socket: a semaphore the server can resize, first
come first served, and never losing a place to a cancelled waiter."""

from __future__ import annotations

import asyncio

import pytest

from robota_client.ws import WSTransport, _Slots

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_waiters_are_served_in_order_as_places_free() -> None:
    slots = _Slots(2)
    await slots.acquire()
    await slots.acquire()
    order: list[int] = []

    async def wait(n: int) -> None:
        await slots.acquire()
        order.append(n)

    tasks = [asyncio.create_task(wait(n)) for n in range(3)]
    await settle()
    assert order == [] and slots.used == 2
    slots.release()
    await settle()
    assert order == [0]
    slots.release()
    slots.release()
    await settle()
    assert order == [0, 1, 2]
    assert slots.used == 2
    await asyncio.gather(*tasks)


async def test_a_larger_bound_announced_later_lets_waiters_in_at_once() -> None:
    slots = _Slots(1)
    await slots.acquire()
    tasks = [asyncio.create_task(slots.acquire()) for _ in range(4)]
    await settle()
    slots.resize(3)
    await settle()
    assert sum(task.done() for task in tasks) == 2
    assert slots.used == 3
    slots.resize(0)  # nonsense from a server: at least one place
    assert slots.limit == 1
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_cancelled_waiter_does_not_take_a_place_with_it() -> None:
    slots = _Slots(1)
    await slots.acquire()
    first = asyncio.create_task(slots.acquire())
    second = asyncio.create_task(slots.acquire())
    await settle()
    slots.release()  # handed to ``first``...
    first.cancel()  # ...which is cancelled before it runs: the place goes to ``second``
    await settle()
    assert first.cancelled()
    assert second.done()
    assert slots.used == 1


def test_the_assumed_bound_is_the_servers_default_and_must_be_positive() -> None:
    assert WSTransport("http://127.0.0.1:1", None).max_in_flight == 16
    assert WSTransport("http://127.0.0.1:1", None, max_in_flight=4).max_in_flight == 4
    with pytest.raises(ValueError, match="max_in_flight"):
        WSTransport("http://127.0.0.1:1", None, max_in_flight=0)
