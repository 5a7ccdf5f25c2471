"""A client that goes away (HTTP disconnect, task cancelled, WS cancel frame, WS closed):
the vendor call is cancelled within a second (the resume grace, 0.5 s by default, included)
and what was produced is settled to the ledger. Run with ``-s`` to see the measured delays."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from websockets.asyncio.client import connect

from robota_client import RemoteAIProvider
from robota_proxy.testing import FakeVendors, Fault, Reply
from tests.e2e.conftest import USER_KEY, ProxyProcess, ledger_rows

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

LONG = " ".join(f"w{i}" for i in range(400))
BODY = {"provider": "openai", "model": "gpt-4o-mini"}


def long_answer(fake: FakeVendors, marker: str) -> dict[str, object]:
    fake.script(Reply(text=LONG, fault=Fault(chunk_latency=0.02)), match=marker)
    return {**BODY, "messages": [{"role": "user", "content": marker}]}


async def cancel_delay(fake: FakeVendors, left_at: float, what: str) -> float:
    for _ in range(500):  # up to 5 s; the vendor thread has no event to await
        if fake.aborted_at:
            break
        await asyncio.sleep(0.01)
    assert fake.aborted_at, f"{what}: the vendor stream was never closed"
    delay = fake.aborted_at[0] - left_at
    print(f"\n[cancellation] {what}: vendor connection closed {delay * 1000:.0f} ms after")
    assert fake.completed_streams == 0
    return delay


def ledger_status(proxy: ProxyProcess, request_id: str) -> tuple[str, int]:
    rows = ledger_rows(proxy.log_path.parent / "robota.db", request_id)
    assert rows, "no ledger row for the abandoned stream"
    return str(rows[0]["status"]), int(rows[0]["completion_tokens"])


async def test_http_disconnect(proxy: ProxyProcess, fake: FakeVendors) -> None:
    body = long_answer(fake, "leave over http")
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    async with (
        httpx.AsyncClient(base_url=proxy.url, timeout=10) as http,
        http.stream("POST", "/ai/chat/stream", json=body, headers=headers) as response,
    ):
        request_id = response.headers["x-request-id"]
        lines = response.aiter_lines()
        for _ in range(12):
            await anext(lines)
        left_at = time.monotonic()
    delay = await cancel_delay(fake, left_at, "HTTP disconnect")
    assert delay < 1.0
    status, produced = ledger_status(proxy, request_id)
    assert status == "client_disconnected" and produced > 0


async def test_client_task_cancelled(proxy: ProxyProcess, fake: FakeVendors) -> None:
    long_answer(fake, "cancel my task")
    started = asyncio.Event()

    async def read() -> None:
        async with RemoteAIProvider(proxy.url, USER_KEY, "openai", "gpt-4o-mini") as ai:
            async for _ in ai.chat_stream([{"role": "user", "content": "cancel my task"}]):
                started.set()

    task = asyncio.create_task(read())
    await started.wait()
    task.cancel()
    left_at = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await cancel_delay(fake, left_at, "client task cancelled") < 1.0


async def test_ws_cancel_frame_skips_the_grace(proxy: ProxyProcess, fake: FakeVendors) -> None:
    long_answer(fake, "cancel over ws")
    async with RemoteAIProvider(proxy.url, USER_KEY, "openai", "gpt-4o-mini", transport="ws") as ai:
        stream = ai.stream([{"role": "user", "content": "cancel over ws"}])
        await anext(stream)
        await stream.aclose()  # sends {"type": "cancel"}
        left_at = time.monotonic()
        delay = await cancel_delay(fake, left_at, "WS cancel frame")
    assert delay < 0.4, "an explicit cancel does not wait for the resume grace"


async def test_ws_closed(proxy: ProxyProcess, fake: FakeVendors) -> None:
    body = long_answer(fake, "close the socket")
    ws_url = proxy.url.replace("http://", "ws://") + "/ai/ws"
    async with connect(ws_url, additional_headers={"Authorization": f"Bearer {USER_KEY}"}) as ws:
        await ws.send(json.dumps({"type": "request", "id": "a", "body": body}))
        for _ in range(5):
            frame = json.loads(await ws.recv())
            assert frame["event"] == "delta"
    left_at = time.monotonic()
    assert await cancel_delay(fake, left_at, "WS closed") < 1.0
