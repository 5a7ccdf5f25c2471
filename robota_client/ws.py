"""The client's WebSocket transport: every call of a ``RemoteAIProvider`` over one socket.

One socket to ``/ai/ws`` carries all calls, each tagged with an id (frame format in
``robota_proxy.routes.ws``). When the socket drops, the session reconnects with back-off
(tenacity) and re-attaches each call in flight: a stream that has received events sends a
``resume`` frame with its last ``eventId`` and gets the rest of the same answer (no second
vendor call); a stream that has received nothing is sent again, as the HTTP transport
does before a stream's first event. A non-streamed ``chat`` whose socket drops raises
``RemoteConnectionError``: the vendor may have been called, so it is not resent.

Keep-alive is the websockets library's protocol ping (every 20 s); a dead peer closes the
socket and triggers the reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
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

from robota_client.closing import AsyncClosing
from robota_client.errors import (
    ProtocolError,
    RemoteConnectionError,
    RemoteError,
    error_from_event,
    error_from_response,
)
from robota_client.messages import DoneEvent, ErrorEvent, parse_event
from robota_client.transport import ChatEvent, ChatEventIterator

__all__ = ["WSEventStream", "WSTransport"]

log = logging.getLogger("robota_client")

_EVENT_NAMES = frozenset({"delta", "tool_call", "usage", "done", "error"})


class _Call:
    def __init__(self, call_id: str, body: Mapping[str, Any], *, streamed: bool) -> None:
        self.id = call_id
        self.body = body
        self.streamed = streamed
        self.frames: asyncio.Queue[dict[str, Any] | RemoteError] = asyncio.Queue()
        self.last_event_id: str | None = None
        self.request_id: str | None = None

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
    ) -> None:
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
        #: Reconnections after a dropped socket (for tests and diagnostics).
        self.reconnects = 0

    def __repr__(self) -> str:
        return f"WSTransport(url={self.url!r})"

    # --- calls ------------------------------------------------------------------------------

    def stream(self, body: Mapping[str, Any]) -> WSEventStream:
        return WSEventStream(self, body)

    async def chat(self, body: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
        """A non-streamed chat; the answer's JSON and its request id."""
        call = self._new_call(body, streamed=False)
        try:
            await self._send(call.request_frame())
            frame = await self._next_frame(call)
        finally:
            self._calls.pop(call.id, None)
        event = _event(frame)
        if isinstance(event, DoneEvent):
            message = frame["data"]["message"]
            assert isinstance(message, dict)
            return message, event.message.metadata.request_id
        raise ProtocolError(f"unexpected {frame.get('event')!r} frame for a chat call")

    def _new_call(self, body: Mapping[str, Any], *, streamed: bool) -> _Call:
        call = _Call(f"c{next(self._ids)}", body, streamed=streamed)
        self._calls[call.id] = call
        return call

    async def _next_frame(self, call: _Call) -> dict[str, Any]:
        item = await call.frames.get()
        if isinstance(item, RemoteError):
            raise item
        if item.get("eventId"):
            call.last_event_id = item["eventId"]
        if item.get("event") == "error":
            data = item.get("data") or {}
            status = item.get("status")
            if isinstance(status, int):
                raise error_from_response(status, {"error": data}, {}, redact=self._secrets)
            raise error_from_event(_error_event(data), redact=self._secrets)
        return item

    async def _cancel(self, call: _Call) -> None:
        if self._calls.pop(call.id, None) is None:
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
            self._reader = asyncio.create_task(self._read(connection))
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
                        additional_headers=list(self._headers.items()),
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

    async def _read(self, connection: ClientConnection) -> None:
        try:
            async for message in connection:
                frame = json.loads(message)
                call_id = frame.get("id") if isinstance(frame, dict) else None
                call = self._calls.get(call_id) if isinstance(call_id, str) else None
                if call is not None:
                    call.frames.put_nowait(frame)
        except (ConnectionClosed, ValueError):
            pass
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
                self._calls.pop(call.id, None)
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
            self._transport._calls.pop(self._call.id, None)

    async def _next(self) -> ChatEvent:
        if self._call is None:
            self._call = self._transport._new_call(self._body, streamed=True)
            await self._transport._send(self._call.request_frame())
        while True:
            frame = await self._transport._next_frame(self._call)
            if frame.get("event") in _EVENT_NAMES:
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


def _error_event(data: Mapping[str, Any]) -> ErrorEvent:
    try:
        return ErrorEvent.model_validate(data)
    except ValueError:
        return ErrorEvent(code="upstream_error", message="an unreadable error frame")
