"""``/ai/ws`` against a real proxy process: many calls on one socket, the same policy as
HTTP (auth, validation, metering), the in-flight bound, a slow reader bounded by the send
queue while the producer runs on, and a dropped socket resumed by the client."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from robota_client import RemoteAIProvider
from robota_client.errors import UnauthenticatedError
from robota_proxy.policy.static_keys import key_id
from robota_proxy.testing import FakeVendors, Fault, Reply
from tests.e2e.conftest import (
    USER_KEY,
    ProxyProcess,
    start_proxy,
    stop_proxy,
    vendor_env,
)
from tests.e2e.relay import CuttingRelay

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

KEY = "ws-user-key-0123456789abcdef"
MAX_IN_FLIGHT = 3
SEND_QUEUE = 8


@pytest.fixture(scope="module")
def ws_proxy(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Path]]:
    home = tmp_path_factory.mktemp("ws")
    database = home / "robota.db"
    env = {
        **vendor_env(fake_server),
        "ROBOTA_API_KEYS": KEY,
        "ROBOTA_DATABASE_URL": f"sqlite:///{database}",
        "ROBOTA_WS_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
        "ROBOTA_WS_SEND_QUEUE": str(SEND_QUEUE),
        "ROBOTA_RESUME_GRACE_SECONDS": "3",
    }
    running = start_proxy(env, home / "proxy.log")
    yield running, database
    stop_proxy(running)


def ws_url(proxy: ProxyProcess) -> str:
    return proxy.url.replace("http://", "ws://") + "/ai/ws"


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def body(text: str) -> dict[str, Any]:
    return {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
    }


def ledger_count(database: Path) -> int:
    with sqlite3.connect(database) as conn:
        return int(
            conn.execute(
                "SELECT count(*) FROM usage_ledger WHERE user_id = ?", (key_id(KEY),)
            ).fetchone()[0]
        )


async def frames_until_done(ws: Any, request_id: str) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = json.loads(await ws.recv())
        if frame.get("id") != request_id:
            continue
        frames.append(frame)
        if frame.get("event") in ("done", "error"):
            return frames


async def test_many_calls_on_one_socket_are_metered_like_http(
    ws_proxy: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = ws_proxy
    before = ledger_count(database)
    async with RemoteAIProvider(proxy.url, KEY, "openai", "gpt-4o-mini", transport="ws") as ai:
        answer = await ai.chat([{"role": "user", "content": "plain chat"}])
        assert answer.content == "Echo: plain chat"

        async def one(n: int) -> str:
            return "".join(
                [c async for c in ai.chat_stream([{"role": "user", "content": f"n{n}"}])]
            )

        texts = await asyncio.gather(*(one(n) for n in range(MAX_IN_FLIGHT)))
        assert texts == [f"Echo: n{n}" for n in range(MAX_IN_FLIGHT)]
        assert ai._ws is not None and ai._ws.reconnects == 0
    assert len(fake.requests) == 1 + MAX_IN_FLIGHT
    for _ in range(100):  # the last settle may still be on its way
        if ledger_count(database) >= before + 1 + MAX_IN_FLIGHT:
            break
        await asyncio.sleep(0.05)
    assert ledger_count(database) == before + 1 + MAX_IN_FLIGHT


async def test_calls_past_the_bound_wait_for_a_place_instead_of_failing(
    ws_proxy: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, _ = ws_proxy
    async with RemoteAIProvider(proxy.url, KEY, "openai", "gpt-4o-mini", transport="ws") as ai:
        answers = await asyncio.gather(
            *(ai.chat([{"role": "user", "content": f"q{n}"}]) for n in range(100))
        )
        assert [a.content for a in answers] == [f"Echo: q{n}" for n in range(100)]
        transport = ai._ws
        assert transport is not None
        # The server's bound, as it announced it; never exceeded, so never refused.
        assert transport.max_in_flight == MAX_IN_FLIGHT
        assert transport.busy_resends == 0
        assert transport.reconnects == 0
    assert len(fake.requests) == 100


async def test_a_hundred_calls_on_one_socket_under_the_default_bound(
    proxy: ProxyProcess, fake: FakeVendors
) -> None:
    fake.script(Reply(text="a b c d", fault=Fault(chunk_latency=0.01)), match="streamed")

    async def streamed(ai: RemoteAIProvider, n: int) -> str:
        chunks = ai.chat_stream([{"role": "user", "content": f"streamed {n}"}])
        return "".join([chunk async for chunk in chunks])

    async with RemoteAIProvider(proxy.url, USER_KEY, "openai", "gpt-4o-mini", transport="ws") as ai:
        answers, texts = await asyncio.gather(
            asyncio.gather(*(ai.chat([{"role": "user", "content": f"q{n}"}]) for n in range(60))),
            asyncio.gather(*(streamed(ai, n) for n in range(40))),
        )
        transport = ai._ws
        assert transport is not None
        assert transport.max_in_flight == 16
        assert transport.busy_resends == 0
    assert [a.content for a in answers] == [f"Echo: q{n}" for n in range(60)]
    assert texts == ["a b c d"] * 40
    assert len(fake.requests) == 100


async def test_a_cancelled_stream_frees_its_place_for_the_next_call(
    ws_proxy: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    """The server does not report the end of a cancelled call: a call sent at once into
    its place may be refused, and is sent again rather than failed."""
    proxy, _ = ws_proxy
    fake.script(Reply(text="slow " * 50, fault=Fault(chunk_latency=0.05)), match="slow")
    async with RemoteAIProvider(proxy.url, KEY, "openai", "gpt-4o-mini", transport="ws") as ai:
        for _ in range(3):
            streams = [ai.stream([{"role": "user", "content": "slow"}]) for _ in range(3)]
            for stream in streams:
                await anext(stream)  # started: each holds a place on the server
            for stream in streams:
                await stream.aclose()
            answers = await asyncio.gather(
                *(ai.chat([{"role": "user", "content": f"next {n}"}]) for n in range(5))
            )
            assert [a.content for a in answers] == [f"Echo: next {n}" for n in range(5)]
        assert ai._ws is not None
        print(f"\n[ws cancel] requests sent again after a refusal: {ai._ws.busy_resends}")
    assert len(fake.requests) == 3 * (3 + 5)


async def test_hello_announces_the_bound_and_raw_clients_are_still_held_to_it(
    ws_proxy: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, _ = ws_proxy
    fake.script(Reply(text="slow " * 20, fault=Fault(chunk_latency=0.02)), match="slow")
    async with connect(ws_url(proxy), additional_headers=auth()) as ws:
        await ws.send(json.dumps({"type": "hello"}))
        assert json.loads(await ws.recv()) == {
            "type": "hello",
            "maxInFlight": MAX_IN_FLIGHT,
            "sendQueueBound": SEND_QUEUE,
        }
        for n in range(MAX_IN_FLIGHT + 2):
            await ws.send(json.dumps({"type": "request", "id": f"r{n}", "body": body("slow")}))
        last: dict[str, dict[str, Any]] = {}
        while len([f for f in last.values() if f["event"] in ("done", "error")]) < 5:
            frame = json.loads(await ws.recv())
            last[frame["id"]] = frame
        refused = sorted(k for k, f in last.items() if f["event"] == "error")
        assert refused == [f"r{MAX_IN_FLIGHT}", f"r{MAX_IN_FLIGHT + 1}"]
        assert all(last[k]["data"]["code"] == "rate_limited" for k in refused)
        assert "status" not in last[refused[0]]
    assert fake.completed_streams == MAX_IN_FLIGHT


async def test_handshake_needs_a_valid_key(ws_proxy: tuple[ProxyProcess, Path]) -> None:
    proxy, _ = ws_proxy
    for headers in ({}, auth("not-a-valid-key-0000000000")):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(proxy), additional_headers=headers):
                pass
        # The contract's JSON 401 (uvicorn's websocket.http.response), not a bare 403.
        response = refused.value.response
        assert response.status_code == 401
        error = json.loads(response.body)["error"]
        assert error["code"] == "unauthenticated"
        assert response.headers["X-Request-ID"] == error["requestId"]
    bad_key = "not-a-valid-key-0000000000"
    with pytest.raises(UnauthenticatedError):
        async with RemoteAIProvider(
            proxy.url, bad_key, "openai", "gpt-4o-mini", transport="ws"
        ) as ai:
            await ai.chat([{"role": "user", "content": "hi"}])


async def test_policy_and_bounds_per_frame(
    ws_proxy: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, _ = ws_proxy
    fake.script(Reply(text="slow " * 40, fault=Fault(chunk_latency=0.02)), match="slow")
    async with connect(ws_url(proxy), additional_headers=auth()) as ws:
        # The request goes through the HTTP stack: body validation answers as for HTTP.
        await ws.send(json.dumps({"type": "request", "id": "bad", "body": {"model": 1}}))
        (bad,) = await frames_until_done(ws, "bad")
        assert bad["event"] == "error" and bad["data"]["code"] == "invalid_request"
        assert bad["status"] == 400
        for n in range(MAX_IN_FLIGHT + 1):
            await ws.send(json.dumps({"type": "request", "id": f"r{n}", "body": body("slow")}))
        await ws.send(json.dumps({"type": "ping"}))
        by_id: dict[str, list[dict[str, Any]]] = {}
        others = []
        while len([f for f in by_id.values() if f[-1]["event"] in ("done", "error")]) < 4:
            frame = json.loads(await ws.recv())
            if "id" in frame:
                by_id.setdefault(frame["id"], []).append(frame)
            else:
                others.append(frame)
        (excess,) = by_id[f"r{MAX_IN_FLIGHT}"]
        assert excess["data"]["code"] == "rate_limited"
        assert others == [{"type": "pong"}]
        for n in range(MAX_IN_FLIGHT):
            frames = by_id[f"r{n}"]
            assert frames[-1]["event"] == "done"
            assert frames[0]["eventId"].endswith(":1")
            assert "".join(f["data"].get("content", "") for f in frames[:-1]) == "slow " * 40
    assert fake.completed_streams == MAX_IN_FLIGHT


async def test_slow_reader_is_bounded_and_does_not_hold_the_producer(
    ws_proxy: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, _ = ws_proxy
    # ~12 MB of deltas: more than the kernel's socket buffers on both ends hold (4 MB send,
    # 64 KiB receive here), so the session's own send queue must fill up and stop there.
    words = " ".join(f"{i:05d}" + "x" * 5000 for i in range(2400))
    fake.script(Reply(text=words), match="flood me")
    port = httpx.URL(proxy.url).port
    assert port is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.connect(("127.0.0.1", port))
    # No compression (the repetitive text would shrink to nothing on the wire); the final
    # ``done`` frame carries the whole 12 MB message.
    async with connect(
        ws_url(proxy),
        sock=sock,
        additional_headers=auth(),
        max_queue=1,
        max_size=None,
        compression=None,
    ) as ws:
        await ws.send(json.dumps({"type": "request", "id": "flood", "body": body("flood me")}))
        first = json.loads(await ws.recv())
        assert first["event"] == "delta"
        # Not reading: the vendor answer still completes into the resume buffer...
        for _ in range(400):  # up to 20 s
            if fake.completed_streams:
                break
            await asyncio.sleep(0.05)
        assert fake.completed_streams == 1, "the producer waited for the slow reader"
        # ...while the frames to this socket back up: the proxy forwards them until every
        # buffer on the way is full, then stops.
        await _until_stalled(sock)
        await ws.send(json.dumps({"type": "stats"}))
        text, stats = [first["data"]["content"]], None
        while True:
            frame = json.loads(await ws.recv())
            if frame.get("type") == "stats":
                stats = frame
            elif frame["event"] == "delta":
                text.append(frame["data"]["content"])
            elif frame["event"] == "done":
                break
    # The queue filled to its bound and no further: the rest waited in the resume buffer
    # (itself bounded by bytes), not in an ever-growing outbox.
    assert stats is not None
    print(f"\n[ws slow reader] send queue high-water {stats['sendQueueHighWater']}/{SEND_QUEUE}")
    assert stats["sendQueueBound"] == SEND_QUEUE
    assert stats["sendQueueHighWater"] == SEND_QUEUE
    assert "".join(text) == words


async def _until_stalled(sock: socket.socket, *, still: float = 1.0, limit: float = 30.0) -> None:
    """Wait until the bytes queued in the kernel for this connection (the proxy's send queue
    plus this socket's receive queue) stop changing for ``still`` seconds: the proxy is
    blocked by flow control, not merely slow to forward."""
    queued, since, started = -1, 0.0, time.monotonic()
    while time.monotonic() - started < limit:
        now = _kernel_queued(sock)
        if now != queued:
            queued, since = now, time.monotonic()
        elif time.monotonic() - since >= still:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the proxy was still sending after {limit} s")


def _kernel_queued(sock: socket.socket) -> int:
    """From /proc/net/tcp: the server end's tx_queue plus the client end's rx_queue."""
    host, port = sock.getsockname()
    me = f"{socket.htonl(int.from_bytes(socket.inet_aton(host), 'big')):08X}:{port:04X}"
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        tx, rx = (int(n, 16) for n in fields[4].split(":"))
        if fields[1] == me:
            total += rx
        elif fields[2] == me:
            total += tx
    return total


async def test_a_dropped_socket_is_resumed(
    ws_proxy: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, _ = ws_proxy
    words = " ".join(f"w{i}" for i in range(300))
    fake.script(Reply(text=words, fault=Fault(chunk_latency=0.004)), match="ws resume")
    port = httpx.URL(proxy.url).port
    assert port is not None
    async with (
        CuttingRelay([("127.0.0.1", port)], cut_after=4000) as relay,
        RemoteAIProvider(relay.url, KEY, "openai", "gpt-4o-mini", transport="ws") as ai,
    ):
        text = "".join(
            [c async for c in ai.chat_stream([{"role": "user", "content": "ws resume"}])]
        )
        assert ai._ws is not None and ai._ws.reconnects == 1
    assert relay.cuts == 1
    assert text == words
    assert sum(1 for r in fake.requests if "ws resume" in r.last_text) == 1
    assert fake.completed_streams == 1
