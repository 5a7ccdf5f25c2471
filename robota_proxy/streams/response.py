"""The two ASGI responses of a resumable stream: the one that produces it, and a resumed one.

``ProducingStream`` (the original ``POST /ai/chat/stream``) runs the producer (upstream ->
buffer) and the writer (buffer -> this connection) side by side. Its ASGI call returns only
when the producer has finished or been cancelled, even if the client left long before, so the
metering middleware around it settles a complete ``CallRecord`` (usage, status) exactly once.

When the client goes away, the producer keeps going for ``grace`` seconds with nobody
attached; a resume (on this process or, with Redis, any other) that attaches within the
grace gets the whole answer from the same upstream call. If nobody attaches within the grace,
the producer is cancelled: the vendor connection is closed and what was produced is settled
(status ``client_disconnected``). The trade-off is the grace itself: longer survives slower
reconnects, shorter stops paying for abandoned answers sooner; the default 0.5 s keeps the
cancellation of an abandoned stream under one second while a client that reconnects at once
(the Robota client does, then backs off) still resumes the same call. An explicit cancel
(WebSocket ``cancel`` frame) skips the grace.

Events already produced stay readable for the resume window after the stream ended, so a
client that lost only the tail of a finished answer can still fetch it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import Literal

import anyio
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from robota_client.messages import ErrorEvent, StreamEvent
from robota_proxy import scope as keys
from robota_proxy.call_record import CallRecord
from robota_proxy.errors import UpstreamUnavailable
from robota_proxy.streams.buffer import (
    CANCELLED,
    ENTRY_OVERHEAD,
    Entry,
    StreamBuffer,
    StreamBufferFull,
    event_id,
)
from robota_proxy.wire import sse

#: Header announcing the stream id of a streamed answer.
STREAM_ID_HEADER = "X-Robota-Stream-Id"
#: Key in an ``http.disconnect`` message meaning "the client asked to stop": no grace.
CANCEL_KEY = "robota.cancel"
#: How often an orphaned stream checks whether a resumed reader attached.
_POLL = 0.05

Outcome = Literal["finished", "left", "cancelled"]
#: ``robota_proxy.scope.EVENT_SINK``'s value: takes ``(event name, event id, data JSON)``.
EventSink = Callable[[str, str, str], Awaitable[None]]

log = logging.getLogger("robota_proxy.streams")


#: What one stream may hold in its buffer (event data plus per-entry bookkeeping). A stream
#: past it ends with an error event instead of growing the process without bound: a client
#: that never reads would otherwise keep the whole answer in memory for the resume window.
DEFAULT_STREAM_MAX_BYTES = 16 * 1024 * 1024


def _too_large(seq: int) -> Entry:
    error = ErrorEvent(
        code="upstream_error",
        message="the answer grew past what one stream may buffer; ask for fewer tokens",
    )
    return Entry(seq, "error", error.to_json())


def stream_headers(stream_id: str) -> list[tuple[bytes, bytes]]:
    headers = {**sse.HEADERS, "content-type": "text/event-stream", STREAM_ID_HEADER: stream_id}
    return [(name.lower().encode(), value.encode()) for name, value in headers.items()]


def event_sink(scope: Scope) -> EventSink | None:
    """The sink an internal caller (``/ai/ws``) put in the scope, if any."""
    sink = scope.get(keys.EVENT_SINK)
    return sink if callable(sink) else None


async def deliver(
    buffer: StreamBuffer,
    stream_id: str,
    after: int,
    receive: Receive,
    send: Send,
    extra_headers: Mapping[str, str] | None = None,
    sink: EventSink | None = None,
) -> Outcome:
    """Write the stream from ``after`` to this connection until it ends or the client
    leaves; how it ended. Attached to the stream the whole time, so the producer knows a
    client is still there.

    With a ``sink`` (``robota_proxy.scope.EVENT_SINK``) the events go to it as they are
    kept, not as SSE frames: the caller wants them one by one and would only parse the
    frames back. The response messages still go out around them (the start, one empty body
    message before the first event, which marks the first byte for the access log's TTFT,
    and the last one), so every layer sees the same call as over HTTP. The sink waiting is
    the back-pressure; its ``OSError`` is the client gone."""
    outcome: Outcome = "finished"
    headers = stream_headers(stream_id)
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    async with buffer.attach(stream_id), anyio.create_task_group() as group:

        async def watch() -> None:
            nonlocal outcome
            while True:
                message: Message = await receive()
                if message["type"] == "http.disconnect":
                    outcome = "cancelled" if message.get(CANCEL_KEY) else "left"
                    group.cancel_scope.cancel()
                    return

        group.start_soon(watch)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            first = True
            async for entry in buffer.read(stream_id, after):
                if entry.event == CANCELLED:
                    break
                if sink is None:
                    frame = sse.encode(event_id(stream_id, entry.seq), entry.event, entry.data)
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                    continue
                if first:
                    first = False
                    await send({"type": "http.response.body", "body": b"", "more_body": True})
                await sink(entry.event, event_id(stream_id, entry.seq), entry.data)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            # A server that reports writes to a closed connection (uvicorn's
            # ClientDisconnected) rather than dropping them silently.
            outcome = "left"
        group.cancel_scope.cancel()
    return outcome


class _StreamResponse(Response):
    """A ``Response`` only so routes can return it; it writes its own messages."""

    media_type = "text/event-stream"

    def __init__(self) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({})


class ProducingStream(_StreamResponse):
    """The response of the call that starts a stream; see the module docstring."""

    def __init__(
        self,
        buffer: StreamBuffer,
        stream_id: str,
        owner: str,
        events: AsyncGenerator[StreamEvent, None],
        *,
        grace: float,
        max_bytes: int = DEFAULT_STREAM_MAX_BYTES,
        record: CallRecord | None = None,
    ) -> None:
        """``record``: the call's record, told every event produced (``keep_event``) for the
        response cache when it asked for them."""
        super().__init__()
        self.buffer = buffer
        self.stream_id = stream_id
        self.owner = owner
        self.events = events
        self.grace = grace
        self.max_bytes = max_bytes
        self.record = record
        #: Seconds from the client leaving to the producer being cancelled (None: it was
        #: not), for the log line and tests.
        self.cancel_delay: float | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.buffer.open(self.stream_id, self.owner)
        except StreamBufferFull as exc:
            await self.events.aclose()
            log.warning("stream refused: %s (ROBOTA_STREAM_BUFFER_MAX_BYTES)", exc)
            raise UpstreamUnavailable(
                "the proxy holds as many streams as it may; retry shortly", retry_after=1
            ) from None
        except BaseException:
            await self.events.aclose()
            raise
        produced = anyio.Event()
        producer = anyio.CancelScope()
        async with anyio.create_task_group() as group:
            group.start_soon(self._produce, producer, produced)
            sink = event_sink(scope)
            outcome = await deliver(self.buffer, self.stream_id, 0, receive, send, sink=sink)
            if outcome == "cancelled":
                producer.cancel()
            elif outcome == "left":
                await self._cancel_when_orphaned(producer, produced)

    async def _produce(self, scope: anyio.CancelScope, produced: anyio.Event) -> None:
        seq = size = 0
        finished = False
        record = self.record
        try:
            with scope:
                async with aclosing(self.events) as events:
                    async for event in events:
                        seq += 1
                        entry = Entry(seq, event.type, event.to_json())
                        size += len(entry.data) + ENTRY_OVERHEAD
                        if size > self.max_bytes and not entry.terminal:
                            # Leaving the loop closes the upstream call (metering settles
                            # what was produced); the reader gets a clean end.
                            await self.buffer.append(self.stream_id, _too_large(seq))
                            log.warning(
                                "stream %s ended: over %d bytes (ROBOTA_STREAM_MAX_BYTES)",
                                self.stream_id,
                                self.max_bytes,
                            )
                            break
                        if record is not None:
                            # Before the append: a reader may end the answer (and the cache
                            # store it) as soon as the entry is in.
                            record.keep_event(entry.event, entry.data)
                        await self.buffer.append(self.stream_id, entry)
                finished = True
        finally:
            if not finished:
                with anyio.CancelScope(shield=True):
                    await self.buffer.append(self.stream_id, Entry(seq + 1, CANCELLED, "{}"))
            produced.set()

    async def _cancel_when_orphaned(
        self, producer: anyio.CancelScope, produced: anyio.Event
    ) -> None:
        """Let the producer run while a resumed reader is attached somewhere; cancel it once
        nobody has been for ``grace`` seconds."""
        left_at = unattended_since = time.monotonic()
        while not produced.is_set():
            now = time.monotonic()
            if await self.buffer.attached(self.stream_id):
                unattended_since = now
            elif now - unattended_since >= self.grace:
                producer.cancel()
                self.cancel_delay = now - left_at
                return
            with anyio.move_on_after(_POLL):
                await produced.wait()


class ResumedStream(_StreamResponse):
    """The response of a resume: the rest of a stream from the buffer, no upstream call."""

    def __init__(self, buffer: StreamBuffer, stream_id: str, after: int) -> None:
        super().__init__()
        self.buffer = buffer
        self.stream_id = stream_id
        self.after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sink = event_sink(scope)
        await deliver(self.buffer, self.stream_id, self.after, receive, send, sink=sink)
