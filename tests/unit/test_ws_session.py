"""The ``/ai/ws`` session against a socket that does not read: the server-side queue stays
within its bound while the producer finishes the answer into the resume buffer.

Over a real socket the OS buffers absorb megabytes before a server ever waits, so the bound
is shown here with a fake socket whose ``send_text`` blocks until the test opens it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from starlette.websockets import WebSocket

from robota_proxy import ProxyApp, create_app
from robota_proxy.routes.ws import Session
from robota_proxy.settings import Settings
from robota_proxy.upstreams.mock import MAX_REPLY_WORDS

KEY = "unit-ws-key"
SEND_QUEUE = 4
#: 2,000 words of 200 characters: ~400 kB of deltas, 100 times what the queue may hold.
#: The longest reply the mock gives: "You said: " and these words.
WORDS = [f"{i:04d}" + "x" * 196 for i in range(MAX_REPLY_WORDS - 2)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class StalledSocket:
    """A WebSocket peer that sends one request, then reads nothing until ``gate`` is set."""

    def __init__(self, app: ProxyApp, request: dict[str, Any]) -> None:
        self.scope: dict[str, Any] = {
            "type": "websocket",
            "path": "/ai/ws",
            "root_path": "",
            "scheme": "ws",
            "headers": [(b"authorization", f"Bearer {KEY}".encode())],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
            "app": app,
        }
        self._incoming = [json.dumps(request)]
        self.gate = anyio.Event()
        self.hang_up = anyio.Event()
        self.done = anyio.Event()
        #: Frames the session started to send (the first one waits at the gate).
        self.sent: list[str] = []

    async def receive(self) -> dict[str, Any]:
        if self._incoming:
            return {"type": "websocket.receive", "text": self._incoming.pop(0)}
        await self.hang_up.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def send_text(self, text: str) -> None:
        self.sent.append(text)
        await self.gate.wait()
        if json.loads(text).get("event") == "done":
            self.done.set()


class Accounting:
    """What the session holds between the stream and the socket: frames it queued (``emit``
    returned) and the socket has not taken yet, in number and bytes, at their worst."""

    def __init__(self, session: Session, socket: StalledSocket) -> None:
        self.queued: list[str] = []
        self.most_frames = 0
        self.most_bytes = 0
        emit = session.emit

        async def counted(frame: dict[str, Any]) -> None:
            await emit(frame)
            self.queued.append(json.dumps(frame, separators=(",", ":")))
            held = self.queued[len(socket.sent) :]
            self.most_frames = max(self.most_frames, len(held))
            self.most_bytes = max(self.most_bytes, sum(len(text) for text in held))

        session.emit = counted  # type: ignore[method-assign]


async def finished_stream(proxy: ProxyApp, stream_ids: list[str], opened: anyio.Event) -> int:
    """Waits until the producer put the answer's last event into the resume buffer;
    how many events it holds."""
    await opened.wait()
    entries = [entry async for entry in proxy.streams.read(stream_ids[0], 0)]
    assert entries[-1].event == "done"
    return len(entries)


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[ProxyApp]:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        api_keys=[KEY],
        database_url=f"sqlite:///{tmp_path / 'robota.db'}",
        ws_send_queue=SEND_QUEUE,
    )
    app = create_app(settings)
    async with app.lifespan():
        yield app


@pytest.mark.anyio
async def test_a_stalled_reader_holds_the_queue_bound_while_the_producer_finishes(
    proxy: ProxyApp,
) -> None:
    body = {"provider": "mock", "model": "mock-1"}
    body["messages"] = [{"role": "user", "content": " ".join(WORDS)}]  # type: ignore[assignment]
    socket = StalledSocket(proxy, {"type": "request", "id": "big", "body": body})
    session = Session(proxy, cast(WebSocket, socket), max_in_flight=4, send_queue=SEND_QUEUE)
    accounting = Accounting(session, socket)
    stream_ids: list[str] = []
    opened = anyio.Event()
    open_stream = proxy.streams.open

    async def recorded_open(stream_id: str, owner: str) -> None:
        await open_stream(stream_id, owner)
        stream_ids.append(stream_id)
        opened.set()

    proxy.streams.open = recorded_open  # type: ignore[method-assign]

    with anyio.fail_after(60):  # a guard against a hang, not a timing assertion
        async with anyio.create_task_group() as group:
            group.start_soon(session.run)
            produced = await finished_stream(proxy, stream_ids, opened)
            # The whole answer is in the resume buffer while the socket took one frame.
            assert produced >= len(WORDS) + 1
            assert len(socket.sent) == 1
            assert accounting.most_frames <= SEND_QUEUE
            assert session.high_water <= SEND_QUEUE
            stalled_bytes = accounting.most_bytes

            socket.gate.set()
            await socket.done.wait()
            socket.hang_up.set()

    frames = [json.loads(text) for text in socket.sent]
    assert [f["event"] for f in frames][-1] == "done"
    text = "".join(f["data"]["content"] for f in frames if f["event"] == "delta")
    assert text == "You said: " + " ".join(WORDS)
    assert session.high_water <= SEND_QUEUE
    # Bounded by the queue: a few frames' worth, not the ~200 kB answer.
    largest_delta = max(len(t) for t in socket.sent if '"event":"delta"' in t)
    assert stalled_bytes <= SEND_QUEUE * largest_delta
    assert stalled_bytes < len(text) // 50
