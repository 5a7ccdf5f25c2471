"""The client's WebSocket transport: every call of a ``RemoteAIProvider`` over one socket.

One socket to ``/ai/ws`` carries all calls, each tagged with an id (frame format in
``robota_proxy.routes.ws``). When the socket drops, the session reconnects with back-off
(tenacity) and re-attaches each call in flight: a stream that has received events sends a
``resume`` frame with its last ``eventId`` and gets the rest of the same answer (no second
vendor call); a stream that has received nothing is sent again, as the HTTP transport
does before a stream's first event. A non-streamed ``chat`` whose socket drops raises
``RemoteConnectionError``: the vendor may have been called, so it is not resent. A
``restart`` frame is an event like the others here, with its ``eventId`` (see the module doc
of ``robota_client.transport``): a resume continues after it, and undoing the abandoned
answer is left to ``ChatStream`` and ``TextStream``.

Keep-alive is the websockets library's protocol ping (every 20 s); a dead peer closes the
socket and triggers the reconnect.

The proxy runs at most ``ROBOTA_WS_MAX_IN_FLIGHT`` calls per socket and refuses the excess
with ``rate_limited``. That bound is the server's business, not the application's: the
transport asks for it (a ``hello`` frame, answered with ``maxInFlight``) on every new socket
and holds calls past it in a queue, so ``asyncio.gather`` of a hundred calls just works. The
server frees a call's place as it sends the call's last frame, so a client that counts its
calls until their last frame arrives stays within the bound; the one window where it could
still be refused (a cancelled stream, whose end the server does not report) is covered by
sending a refused request again after a short back-off: a refusal of that kind (no HTTP
status, no event id: the socket's own, not the proxy's rate limiter) means the request
never started.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections import deque
from collections.abc import Mapping
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from robota_client import tracing
from robota_client.closing import AsyncClosing
from robota_client.errors import (
    ProtocolError,
    RateLimitedError,
    RemoteConnectionError,
    RemoteError,
    error_from_event,
    error_from_response,
)
from robota_client.messages import EVENT_NAMES, DoneEvent, ErrorEvent, parse_event
from robota_client.transport import ChatEvent, ChatEventIterator

__all__ = ["WSEventStream", "WSTransport"]

log = logging.getLogger("robota_client")

#: The proxy's default ``ROBOTA_WS_MAX_IN_FLIGHT``: the bound assumed until it says its own.
DEFAULT_MAX_IN_FLIGHT = 16
#: Re-sends of a request the socket refused as over its bound, before giving up (with
#: back-off from 10 ms doubling to 0.5 s: about 8 s in all). Only a race makes the first
#: one necessary (see the module doc), so the rest are a margin, not a plan.
_BUSY_RESENDS = 20


class _Slots:
    """The calls allowed on the socket at once: a semaphore whose size can change (the
    server announces its bound after the socket opens), waiters served first come, first
    served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.used < self.limit and not self._waiters:
            self.used += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Handed a place just as it was cancelled: pass it on.
                self.used -= 1
                self._wake()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def release(self) -> None:
        self.used -= 1
        self._wake()

    def resize(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._wake()

    def _wake(self) -> None:
        """Hand free places to waiters in order; the place is taken on their behalf, so a
        newcomer cannot overtake a woken waiter."""
        while self._waiters and self.used < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += 1
                waiter.set_result(None)


class _Call:
    def __init__(self, call_id: str, body: Mapping[str, Any], *, streamed: bool) -> None:
        self.id = call_id
        self.body = body
        self.streamed = streamed
        self.frames: asyncio.Queue[dict[str, Any] | RemoteError] = asyncio.Queue()
        self.last_event_id: str | None = None
        self.request_id: str | None = None
        #: Holds one of the transport's ``_Slots`` (from ``_begin`` to ``_end``).
        self.has_slot = False

    def reattach_frame(self) -> dict[str, Any] | None:
        """What to send on a new socket; ``None`` when the call cannot be re-attached."""
        if self.last_event_id is not None:
            stream_id = self.last_event_id.rpartition(":")[0]
            return {
                "type": "resume",
                "id": self.id,
                "streamId": stream_id,
                "lastEventId": self.last_event_id,
            }
        if self.streamed:
            return self.request_frame()
        return None

    def request_frame(self) -> dict[str, Any]:
        return {"type": "request", "id": self.id, "body": self.body, "stream": self.streamed}


class WSTransport(AsyncClosing):
    """One WebSocket to the proxy, opened on first use and re-opened when it drops."""

    def __init__(
        self,
        server_url: str,
        api_key: str | None,
        *,
        headers: Mapping[str, str] | None = None,
        open_timeout: float = 10.0,
        reconnect_attempts: int = 5,
        reconnect_initial_delay: float = 0.05,
        reconnect_max_delay: float = 2.0,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        """``max_in_flight`` is the server's bound on calls per socket as assumed until the
        server announces its own (servers that announce nothing are taken at this word)."""
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        url = httpx.URL(server_url)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"server_url must be an http(s) URL, got {server_url!r}")
        scheme = "wss" if url.scheme == "https" else "ws"
        self.url = str(url.copy_with(scheme=scheme, path=url.path.rstrip("/") + "/ai/ws"))
        self._headers = httpx.Headers(headers or {})
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.open_timeout = open_timeout
        self.reconnect_attempts = reconnect_attempts
        self._backoff = wait_exponential(
            multiplier=reconnect_initial_delay, max=reconnect_max_delay
        ) + wait_random(0, reconnect_initial_delay)
        self._ids = itertools.count(1)
        self._calls: dict[str, _Call] = {}
        self._connection: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._slots = _Slots(max_in_flight)
        #: Reconnections after a dropped socket (for tests and diagnostics).
        self.reconnects = 0
        #: Requests sent again after the socket refused them as over its bound (ditto).
        self.busy_resends = 0

    @property
    def max_in_flight(self) -> int:
        """The bound on concurrent calls in use: the server's, once it has said it."""
        return self._slots.limit

    def __repr__(self) -> str:
        return f"WSTransport(url={self.url!r})"

    # --- calls ------------------------------------------------------------------------------

    def stream(self, body: Mapping[str, Any]) -> WSEventStream:
        return WSEventStream(self, body)

    async def chat(self, body: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
        """A non-streamed chat; the answer's JSON and its request id."""
        call = self._new_call(body, streamed=False)
        try:
            await self._begin(call)
            await self._send(call.request_frame())
            frame = await self._next_frame(call)
        finally:
            self._end(call)
        event = _event(frame)
        if isinstance(event, DoneEvent):
            message = frame["data"]["message"]
            assert isinstance(message, dict)
            return message, event.message.metadata.request_id
        raise ProtocolError(f"unexpected {frame.get('event')!r} frame for a chat call")

    def _new_call(self, body: Mapping[str, Any], *, streamed: bool) -> _Call:
        return _Call(f"c{next(self._ids)}", body, streamed=streamed)

    async def _begin(self, call: _Call) -> None:
        """Wait for a place on the socket, then register ``call`` to receive frames.

        Connects first, so that a new socket's bound is known before places are counted."""
        await self._connect()
        await self._slots.acquire()
        call.has_slot = True
        self._calls[call.id] = call

    def _end(self, call: _Call) -> None:
        """Forget ``call`` and free its place; safe to call more than once."""
        self._calls.pop(call.id, None)
        if call.has_slot:
            call.has_slot = False
            self._slots.release()

    async def _next_frame(self, call: _Call) -> dict[str, Any]:
        busy = 0
        while True:
            item = await call.frames.get()
            if isinstance(item, RemoteError):
                raise item
            if item.get("eventId"):
                call.last_event_id = item["eventId"]
            if item.get("event") != "error":
                return item
            data = item.get("data") or {}
            status = item.get("status")
            if isinstance(status, int):
                raise error_from_response(status, {"error": data}, {}, redact=self._secrets)
            error = error_from_event(_error_event(data), redact=self._secrets)
            if not (_is_busy(item, error) and busy < _BUSY_RESENDS):
                raise error
            # Refused before it started (see the module doc): send it again shortly.
            await asyncio.sleep(min(0.01 * 2**busy, 0.5))
            busy += 1
            self.busy_resends += 1
            await self._send(call.reattach_frame() or call.request_frame())

    async def _cancel(self, call: _Call) -> None:
        registered = self._calls.get(call.id) is call
        self._end(call)
        if not registered:
            return
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(ConnectionClosed):
                await connection.send(json.dumps({"type": "cancel", "id": call.id}))

    # --- the socket -------------------------------------------------------------------------

    @property
    def _secrets(self) -> tuple[str, ...]:
        scheme, _, credential = self._headers.get("authorization", "").partition(" ")
        return (credential,) if scheme.lower() == "bearer" and credential else ()

    async def _send(self, frame: Mapping[str, Any]) -> None:
        connection = await self._connect()
        # On a drop the reader re-attaches every call in flight, this one included.
        with contextlib.suppress(ConnectionClosed):
            await connection.send(json.dumps(frame))

    async def _connect(self) -> ClientConnection:
        async with self._lock:
            if self._closed:
                raise RemoteConnectionError("the WebSocket transport is closed")
            if self._connection is not None:
                return self._connection
            connection = await self._open()
            self._connection = connection
            hello = asyncio.Event()
            self._reader = asyncio.create_task(self._read(connection, hello))
            # The server's bound on calls in flight, before any call is counted against it.
            # A server that does not know ``hello`` answers with an error frame (no id),
            # which ends the wait as well; the timeout is for one that answers nothing.
            with contextlib.suppress(ConnectionClosed):
                await connection.send(json.dumps({"type": "hello"}))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hello.wait(), self.open_timeout)
            return connection

    async def _open(self) -> ClientConnection:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.reconnect_attempts),
            wait=self._backoff,
            retry=retry_if_exception_type((OSError, asyncio.TimeoutError)),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await connect(
                        self.url,
                        # The span current when the socket opens, as traceparent (when
                        # OpenTelemetry is installed): the socket's calls join that trace.
                        additional_headers=[*self._headers.items(), *tracing.headers().items()],
                        open_timeout=self.open_timeout,
                        max_size=None,
                    )
        except InvalidStatus as exc:
            response = exc.response
            raise error_from_response(
                response.status_code,
                bytes(response.body or b""),
                dict(response.headers.raw_items()),
                redact=self._secrets,
            ) from exc
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise RemoteConnectionError(
                f"could not open a WebSocket to {self.url}: {type(exc).__name__}: {exc}"
            ) from exc
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    async def _read(self, connection: ClientConnection, hello: asyncio.Event) -> None:
        try:
            async for message in connection:
                frame = json.loads(message)
                if not isinstance(frame, dict):
                    continue
                call_id = frame.get("id")
                call = self._calls.get(call_id) if isinstance(call_id, str) else None
                if call is not None:
                    call.frames.put_nowait(frame)
                elif frame.get("type") == "hello":
                    bound = frame.get("maxInFlight")
                    if isinstance(bound, int) and not isinstance(bound, bool) and bound > 0:
                        self._slots.resize(bound)
                    hello.set()
                elif frame.get("event") == "error" and call_id is None:
                    hello.set()  # a server that does not know ``hello``
        except (ConnectionClosed, ValueError):
            pass
        hello.set()
        if self._closed:
            return
        async with self._lock:
            if self._connection is connection:
                self._connection = None
        await self._reattach()

    async def _reattach(self) -> None:
        """After a drop: a new socket, and every call in flight re-attached to it."""
        calls = list(self._calls.values())
        if not calls:
            return
        try:
            connection = await self._connect()
        except RemoteError as exc:
            for call in calls:
                call.frames.put_nowait(exc)
            return
        self.reconnects += 1
        for call in calls:
            frame = call.reattach_frame()
            if frame is None:
                self._end(call)
                call.frames.put_nowait(
                    RemoteConnectionError(
                        "the WebSocket dropped during a chat call; not resent because the "
                        "vendor may already have answered it"
                    )
                )
                continue
            with contextlib.suppress(ConnectionClosed):
                await connection.send(json.dumps(frame))

    async def aclose(self) -> None:
        self._closed = True
        connection, reader = self._connection, self._reader
        self._connection = self._reader = None
        if connection is not None:
            await connection.close()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


class WSEventStream(ChatEventIterator):
    """The WebSocket twin of ``EventStream``: an async iterator of ``ChatEvent``."""

    def __init__(self, transport: WSTransport, body: Mapping[str, Any]) -> None:
        self._transport = transport
        self._body = body
        self._call: _Call | None = None
        self.request_id: str | None = None

    async def _on_done(self) -> None:
        # The answer is complete: forget the call, with no cancel frame (that is ``aclose``).
        self._finished = True
        if self._call is not None:
            self._transport._end(self._call)

    async def _next(self) -> ChatEvent:
        if self._call is None:
            self._call = self._transport._new_call(self._body, streamed=True)
            await self._transport._begin(self._call)
            await self._transport._send(self._call.request_frame())
        while True:
            frame = await self._transport._next_frame(self._call)
            if frame.get("event") in EVENT_NAMES:
                event = _event(frame)
                if isinstance(event, DoneEvent):
                    self.request_id = event.message.metadata.request_id
                assert not isinstance(event, ErrorEvent)
                return event

    async def aclose(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._call is not None:
            await self._transport._cancel(self._call)


def _event(frame: Mapping[str, Any]) -> ChatEvent:
    try:
        event = parse_event(str(frame.get("event")), frame.get("data") or {})
    except ValueError as exc:
        raise ProtocolError(f"unreadable {frame.get('event')!r} frame: {exc}") from exc
    assert not isinstance(event, ErrorEvent)
    return event


def _is_busy(frame: Mapping[str, Any], error: RemoteError) -> bool:
    """The socket's own refusal of a request over its in-flight bound: ``rate_limited``
    without the HTTP status of an answer from the proxy's pipeline (its rate limiter sends
    429) and without the event id of a stream's event."""
    return (
        isinstance(error, RateLimitedError)
        and frame.get("status") is None
        and not frame.get("eventId")
    )


def _error_event(data: Mapping[str, Any]) -> ErrorEvent:
    try:
        return ErrorEvent.model_validate(data)
    except ValueError:
        return ErrorEvent(code="upstream_error", message="an unreadable error frame")
