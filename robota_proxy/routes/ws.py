"""``/ai/ws``: many chat calls over one WebSocket, each treated exactly like an HTTP call.

Every ``request`` (or ``resume``) frame is run through the app's own HTTP stack as an
internal ASGI call (``POST /ai/chat/stream``, ``POST /ai/chat`` or
``GET /ai/chat/stream/{id}``) carrying the socket's handshake headers (its
``Authorization``), so authentication, permissions, rate limits, metering and the cache
apply per request with no policy code here: the re-entry is what keeps this surface from
growing a second, drifting copy of the HTTP chain. What it does not need is the SSE framing:
the internal call's scope carries a sink (``robota_proxy.scope.EVENT_SINK``) that the stream
responses hand each event to, ``(name, event id, data JSON)`` as the resume buffer keeps it,
and each becomes one WS frame (one ``json.loads``/``json.dumps``, nothing parsed twice).

Frames, client -> server::

    {"type": "request", "id": "<req id>", "body": <ChatRequest>, "stream": true}
    {"type": "cancel", "id": "<req id>"}
    {"type": "resume", "id": "<req id>", "streamId": "s_...", "lastEventId": "s_...:12"}
    {"type": "ping"}                       -> {"type": "pong"}
    {"type": "hello"}                      -> {"type": "hello", "maxInFlight", "sendQueueBound"}
    {"type": "stats"}                      -> {"type": "stats", "sendQueueBound", ...}

server -> client: ``{"id", "event": delta|tool_call|usage|done|error, "eventId", "data"}``,
the events (and ids) of the SSE stream. ``"stream": false`` runs ``POST /ai/chat`` (the
``chat`` feature, not ``stream``) and answers with one ``done`` frame. A refusal before any
event (401/403/429...) is an ``error`` frame with the HTTP error's body.

Bounds: at most ``max_in_flight`` calls per socket (the excess gets ``rate_limited``; a
client learns the bound from ``hello`` and queues its calls past it), and
at most ``send_queue`` frames waiting for a slow reader: when the queue is full the stream
writers wait, while the producers keep filling the resume buffer, so a slow reader costs
the buffer (bounded by the answers themselves) and never an unbounded socket queue. Keep-
alive: uvicorn's protocol pings (``--ws-ping-interval``, 20 s by default) plus app-level
``ping`` frames for clients that want to check the application too.

A bad frame (binary, not JSON, nested too deep, a wrong type, an id that is not one of
ours) is answered with an ``error`` frame for that frame alone, with the frame's ``id``
when it has a usable one: the socket and its other calls live on.

A socket that closes disconnects its calls the way a dropped HTTP connection does: each
stream waits the resume grace for a ``resume`` frame on a new socket (any process, with
Redis), then cancels its vendor call. A ``cancel`` frame cancels at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from starlette.routing import WebSocketRoute
from starlette.types import ASGIApp, Message, Scope
from starlette.websockets import WebSocket, WebSocketDisconnect

from robota_proxy import scope as keys
from robota_proxy.chat_body import parse_json
from robota_proxy.errors import ProxyError
from robota_proxy.streams.buffer import is_stream_id, parse_event_id, parse_seq
from robota_proxy.streams.response import CANCEL_KEY
from robota_proxy.wire.paths import CHAT_PATH, STREAM_PATH, route_path

log = logging.getLogger("robota_proxy.ws")

PATH = "/ai/ws"
# Handshake headers not copied onto the internal HTTP calls.
_SKIP_HEADERS = frozenset(
    {
        b"connection",
        b"upgrade",
        b"content-length",
        b"content-type",
        b"x-request-id",
        b"last-event-id",
        b"transfer-encoding",
    }
)


class WebSocketRoutes:
    def __init__(self, *, max_in_flight: int, send_queue: int) -> None:
        self.max_in_flight = max_in_flight
        self.send_queue = send_queue

    def routes(self) -> list[WebSocketRoute]:
        return [WebSocketRoute(PATH, self.endpoint)]

    async def endpoint(self, websocket: WebSocket) -> None:
        await websocket.accept()
        session = Session(
            websocket.scope["app"],
            websocket,
            max_in_flight=self.max_in_flight,
            send_queue=self.send_queue,
        )
        await session.run()


class _Call:
    """One internal HTTP call and the ASGI ``receive`` it reads its request from."""

    def __init__(self, request_id: str, body: bytes) -> None:
        self.id = request_id
        self.body = body
        self.sent_body = False
        self.gone = anyio.Event()
        self.cancelled = False
        self.terminal = False

    def leave(self, *, cancel: bool) -> None:
        self.cancelled = self.cancelled or cancel
        self.gone.set()

    async def receive(self) -> Message:
        if not self.sent_body:
            self.sent_body = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect", CANCEL_KEY: self.cancelled}


class Session:
    """One socket: reads frames, runs calls, and writes their events through one bounded
    queue."""

    def __init__(
        self, app: ASGIApp, websocket: WebSocket, *, max_in_flight: int, send_queue: int
    ) -> None:
        self.app = app
        self.websocket = websocket
        self.max_in_flight = max_in_flight
        self.send_queue = send_queue
        self.calls: dict[str, _Call] = {}
        self.high_water = 0
        self.closed = False
        self._out: MemoryObjectSendStream[str]
        self._out_reader: MemoryObjectReceiveStream[str]
        self._out, self._out_reader = anyio.create_memory_object_stream[str](send_queue)
        prefix = websocket.scope["path"][: -len(PATH)] if route_path(websocket.scope) else ""
        self._prefix = prefix

    async def run(self) -> None:
        async with anyio.create_task_group() as calls:
            sender = anyio.CancelScope()

            async def send_all() -> None:
                with sender:
                    await self._send_all()

            calls.start_soon(send_all)
            try:
                while True:
                    message = await self.websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        break
                    await self._on_message(message, calls)
            except (WebSocketDisconnect, RuntimeError, OSError):
                pass
            finally:
                # Like a dropped HTTP connection: each stream gets its resume grace.
                self.closed = True
                for call in list(self.calls.values()):
                    call.leave(cancel=False)
                sender.cancel()
                # Writers waiting for queue space learn the socket is gone.
                self._out_reader.close()

    # --- outgoing ---------------------------------------------------------------------------

    async def emit(self, frame: dict[str, Any]) -> None:
        """Queue a frame; waits while the queue is full (the back-pressure point)."""
        if self.closed:
            raise OSError("the WebSocket is closed")
        try:
            await self._out.send(json.dumps(frame, separators=(",", ":")))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise OSError("the WebSocket is closed") from exc
        used = self._out.statistics().current_buffer_used
        self.high_water = max(self.high_water, used)

    async def _send_all(self) -> None:
        async for text in self._out_reader:
            try:
                await self.websocket.send_text(text)
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.closed = True
                return

    # --- incoming ---------------------------------------------------------------------------

    async def _on_message(self, message: Message, calls: TaskGroup) -> None:
        """One frame, whatever it holds: a mistake in it costs that frame an ``error`` frame,
        never the socket (which carries other calls). Only a gone socket (``OSError``) ends
        the loop."""
        text = message.get("text")
        if not isinstance(text, str):
            await self._refuse(None, "invalid_request", "binary frames are not supported")
            return
        try:
            await self._on_frame(text, calls)
        except ProxyError as exc:
            await self._refuse(None, exc.code, exc.message)
        except OSError:
            raise
        except Exception:
            # A bug of ours, not the caller's: logged like an HTTP 500, answered like one,
            # and the socket keeps serving its other calls.
            log.exception("a WebSocket frame could not be handled")
            await self._refuse(None, "internal_error", "internal proxy error")

    async def _on_frame(self, text: str, calls: TaskGroup) -> None:
        # Bounded in depth and strict about lone surrogates: json.loads raised
        # RecursionError on a deep frame, which closed the socket without a close frame.
        frame = parse_json(text, "the frame")
        if not isinstance(frame, dict):
            await self._refuse(None, "invalid_request", "a frame must be a JSON object")
            return
        kind, request_id = frame.get("type"), frame.get("id")
        if kind == "ping":
            await self.emit({"type": "pong"})
        elif kind == "hello":
            # Asked for, never volunteered: raw clients that expect only their own frames
            # keep working.
            await self.emit(
                {
                    "type": "hello",
                    "maxInFlight": self.max_in_flight,
                    "sendQueueBound": self.send_queue,
                }
            )
        elif kind == "stats":
            await self.emit(
                {
                    "type": "stats",
                    "sendQueueBound": self.send_queue,
                    "sendQueueHighWater": self.high_water,
                    "inFlight": len(self.calls),
                }
            )
        elif kind == "cancel":
            call = self.calls.get(request_id) if isinstance(request_id, str) else None
            if call is not None:
                call.leave(cancel=True)
        elif kind in ("request", "resume"):
            await self._start(frame, calls)
        else:
            shown = repr(kind) if len(repr(kind)) <= 40 else f"{repr(kind)[:36]}..."
            await self._refuse(request_id, "invalid_request", f"unknown frame type {shown}")

    async def _start(self, frame: dict[str, Any], calls: TaskGroup) -> None:
        request_id = frame.get("id")
        if not isinstance(request_id, str) or not request_id or len(request_id) > 128:
            await self._refuse(None, "invalid_request", "a request needs a string 'id'")
            return
        if request_id in self.calls:
            await self._refuse(request_id, "invalid_request", "this id is already in flight")
            return
        if len(self.calls) >= self.max_in_flight:
            message = f"at most {self.max_in_flight} requests in flight per socket"
            await self._refuse(request_id, "rate_limited", message)
            return
        if frame["type"] == "request":
            if not isinstance(frame.get("body"), dict):
                await self._refuse(request_id, "invalid_request", "'body' must be a ChatRequest")
                return
            streamed = frame.get("stream", True) is not False
            path = STREAM_PATH if streamed else CHAT_PATH
            body = json.dumps(frame["body"]).encode()
            scope = self._scope("POST", path, body, {})
        else:
            stream_id, last = frame.get("streamId"), frame.get("lastEventId")
            if not isinstance(stream_id, str) or not is_stream_id(stream_id):
                await self._refuse(request_id, "invalid_request", "'streamId' is not a stream id")
                return
            # Checked here, not by the resume route: it travels as a latin-1 header, which a
            # non-ASCII id cannot be (a UnicodeEncodeError that closed the socket).
            last = last.strip() if isinstance(last, str) else last
            if last not in (None, "") and not (isinstance(last, str) and _is_position(last)):
                message = "'lastEventId' is not an event id ('<stream id>:<seq>' or a seq)"
                await self._refuse(request_id, "invalid_request", message)
                return
            extra = {"last-event-id": last} if last else {}
            scope = self._scope("GET", f"/ai/chat/stream/{stream_id}", b"", extra)
            body = b""
        call = _Call(request_id, body)
        self.calls[request_id] = call
        calls.start_soon(self._run, call, scope)

    async def _refuse(self, request_id: Any, code: str, message: str) -> None:
        frame: dict[str, Any] = {"event": "error", "data": {"code": code, "message": message}}
        if isinstance(request_id, str):
            frame["id"] = request_id
        with contextlib.suppress(OSError):
            await self.emit(frame)

    def _scope(self, method: str, path: str, body: bytes, extra: dict[str, str]) -> Scope:
        ws = self.websocket.scope
        headers = [
            (name, value)
            for name, value in ws.get("headers", ())
            if name not in _SKIP_HEADERS and not name.startswith(b"sec-websocket-")
        ]
        headers.append((b"content-type", b"application/json"))
        headers.append((b"content-length", str(len(body)).encode()))
        headers += [(name.encode(), value.encode("latin-1")) for name, value in extra.items()]
        full_path = self._prefix + path
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "https" if ws.get("scheme") == "wss" else "http",
            "path": full_path,
            "raw_path": full_path.encode(),
            "root_path": ws.get("root_path", ""),
            "query_string": b"",
            "headers": headers,
            "client": ws.get("client"),
            "server": ws.get("server"),
            "state": dict(ws.get("state", {})),
            "extensions": {},
        }

    # --- one call ---------------------------------------------------------------------------

    async def _run(self, call: _Call, scope: Scope) -> None:
        answer = _Answer()

        async def sink(name: str, event_id: str, data: str) -> None:
            """One event of the streamed answer as one frame. An ``OSError`` (socket gone)
            stops the stream's writer the way a dead TCP connection stops an HTTP one: its
            stream waits for a resume."""
            frame = {"id": call.id, "event": name, "eventId": event_id, "data": json.loads(data)}
            try:
                await self.emit(frame)
            except OSError:
                call.leave(cancel=False)
                raise
            if name in ("done", "error"):
                call.terminal = True
                self._done(call)

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.start(message)
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if body:
                    answer.add(body)
                if not message.get("more_body", False):
                    await self._finish(call, answer)

        scope[keys.EVENT_SINK] = sink
        try:
            await self.app(scope, call.receive, send)
        except Exception:
            log.exception("internal call %s over the WebSocket failed", call.id)
        finally:
            await self._finish(call, answer)  # the app failed before its last message
            self._done(call)

    async def _finish(self, call: _Call, answer: _Answer) -> None:
        """The internal call's answer is complete (or the call failed): a whole answer (a
        plain ``/ai/chat``, an error status) becomes its one frame; a stream that ended
        without ``done`` or ``error`` gets an ``error`` frame unless it was cancelled or the
        socket is gone."""
        if answer.finished:
            return
        answer.finished = True
        if answer.streamed:
            if answer.body:
                # Only the sink carries a stream's events here; SSE bytes mean a producer
                # that does not know it, and are not parsed back.
                log.error("internal call %s answered SSE bytes, not events", call.id)
            if not call.terminal and not call.cancelled and not self.closed:
                await self._refuse(call.id, "upstream_error", "the stream ended early")
            return
        try:
            await self.emit(_whole_answer(call.id, answer.status, b"".join(answer.body)))
        except OSError:
            call.leave(cancel=False)
            return
        call.terminal = True
        self._done(call)

    def _done(self, call: _Call) -> None:
        """Out of the in-flight count once its answer is complete (the internal call may
        still be settling its bill), so a client can send its next request at once."""
        if self.calls.get(call.id) is call:
            del self.calls[call.id]


class _Answer:
    """What the internal call answered: its status, whether it is a stream (whose events
    come through the sink) and, for a whole answer, its body."""

    def __init__(self) -> None:
        #: A call that failed before it started answering is an internal error.
        self.status = 500
        self.streamed = False
        self.body: list[bytes] = []
        self.finished = False

    def start(self, message: Message) -> None:
        self.status = message["status"]
        for name, value in message.get("headers", ()):
            if name.lower() == b"content-type":
                media = value.decode("latin-1")
                self.streamed = self.status == 200 and media.startswith("text/event-stream")

    def add(self, body: bytes) -> None:
        self.body.append(body)


def _is_position(last_event_id: str) -> bool:
    return parse_event_id(last_event_id) is not None or parse_seq(last_event_id) is not None


def _whole_answer(request_id: str, status: int, content: bytes) -> dict[str, Any]:
    """A non-streamed answer (``POST /ai/chat``) or an error answer as one frame."""
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    if status == 200 and isinstance(data, dict):
        finish = (data.get("metadata") or {}).get("finishReason") or "stop"
        done = {"finishReason": finish, "message": data}
        return {"id": request_id, "event": "done", "data": done}
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        error = {"code": "internal_error", "message": f"HTTP {status} from the proxy"}
    return {"id": request_id, "event": "error", "data": error, "status": status}
