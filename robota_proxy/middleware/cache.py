"""``CacheMiddleware``: exact-match response cache for chat calls.

Sits innermost, just before the routes: authentication, rate limits and metering run for a
cached answer exactly as for any other (a hit is one request, one ledger row marked cached
with cost 0), and only the vendor call is saved.

What is cached: a request whose answer is worth repeating, i.e. deterministic
(``temperature: 0``) or opted in (``options.cache: true``; ``cache: false`` opts out). The key
is the SHA-256 of the canonical JSON of the scope (``user:<principal>`` by default, or
``shared``), provider, model, messages (as the vendor sees them: a message's ``id``,
``timestamp`` and ``metadata`` are left out), tools and options (less ``cache`` and
``timeout``, which do not change the answer). ``Cache-Control: no-cache`` skips the read,
``no-store`` the write; on the stream route only ``X-Robota-Cache-Control`` (also accepted on
the plain route) says so, see ``cache_directives``.

Only a complete success is stored: a 200 JSON answer, or a stream whose last event is
``done`` with no ``error`` before it, while the call record says ``ok``. The entry keeps the
final ``AssistantMessage`` and, for a stream, its event list, so a streamed request replays
the same events (delta, tool_call, usage, done) and a plain request is answered from a stored
stream and the other way round (the events are rebuilt from the message).

Nothing the proxy's own chat routes sent is parsed back: they leave their final message on
the call record (``CallRecord.answer``, with ``keeps_answer`` set) and, on a miss this
middleware means to store, the stream's producer collects the events' JSON as it writes them
(``CallRecord.answer_events``, asked for by setting it; an uncached stream collects nothing).
The entry is built from those when the response's last body message passes, before it goes
on. Someone else's endpoint behind this middleware, which knows nothing of the record, is
cached from a copy of the bytes it sent, parsed back (httpx-sse for a stream).

``/v1/chat/completions`` and ``/v1/messages`` are cached by the same rules (the tenant scope,
``temperature: 0``, the directives, only complete successes, the ``X-Robota-Cache`` header),
but keep the exact bytes their route sent and are keyed on the caller's own JSON: see
``cache_raw``. A streamed call (``stream: true``) reads only ``X-Robota-Cache-Control``, as the
stream route does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from robota_client.messages import (
    AssistantMessage,
    ChatRequest,
    DeltaEvent,
    DoneEvent,
    StreamEvent,
    ToolCallEvent,
    Usage,
    UsageEvent,
    parse_event,
)
from robota_proxy import scope as keys
from robota_proxy.call_record import CallRecord, call_record
from robota_proxy.chat_body import chat_request
from robota_proxy.dialects import ANTHROPIC, CHAT_SURFACES, ROBOTA, Dialect, ParsedChat, dialect_of
from robota_proxy.errors import ProxyError
from robota_proxy.middleware.cache_raw import (
    RawAnswer,
    cacheable_dialect,
    raw_cache_key,
    stream_complete,
)
from robota_proxy.policy.principals import Principal
from robota_proxy.responses import WireResponse, error_response
from robota_proxy.storage.response_cache import MemoryResponseCache, ResponseCache
from robota_proxy.wire import sse
from robota_proxy.wire.paths import CHAT_PATHS, call_feature, route_path

log = logging.getLogger("robota_proxy.cache")

CACHE_HEADER = "X-Robota-Cache"
#: Options that say how to run the call, not what to answer.
_NOT_IN_KEY = {"cache", "timeout"}
#: Message fields vendors never see: different on every call from TypeScript Robota.
_MESSAGE_BOOKKEEPING = {"id", "timestamp", "metadata"}
#: Stored metadata that belongs to the call that stored it.
_PER_CALL_METADATA = {"requestId", "request_id", "attempts", "cached"}
_FORMAT = 1


def is_cacheable(request: ChatRequest) -> bool:
    if request.options.cache is not None:
        return request.options.cache
    return request.options.temperature == 0


def cache_key(scope_name: str, request: ChatRequest) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces) of what decides the answer."""
    options = {k: v for k, v in request.options.to_wire().items() if k not in _NOT_IN_KEY}
    document = {
        "scope": scope_name,
        "provider": request.provider,
        "model": request.model,
        "messages": [
            m.model_dump(
                by_alias=True, exclude_none=True, mode="json", exclude=_MESSAGE_BOOKKEEPING
            )
            for m in request.messages
        ],
        "tools": [tool.to_wire() for tool in request.tools] if request.tools else None,
        "options": options,
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def cache_directives(scope: Scope, streamed: bool) -> set[str]:
    """``no-cache`` / ``no-store`` from ``X-Robota-Cache-Control`` and, on the plain route,
    ``Cache-Control``. Not ``Cache-Control`` on the stream route: SSE clients send it on every
    request as a transport matter (httpx-sse ``no-store``, browsers' EventSource
    ``no-cache``), which would otherwise switch the cache off for every stream."""
    names = (
        (b"x-robota-cache-control",) if streamed else (b"x-robota-cache-control", b"cache-control")
    )
    directives: set[str] = set()
    for name, value in scope.get("headers", ()):
        if name in names:
            text = value.decode("latin-1").lower()
            directives.update(part.strip() for part in text.split(",") if part.strip())
    return directives


@dataclass(slots=True)
class CachedAnswer:
    """One stored answer: the final message, and the stream's events when it was a stream."""

    message: AssistantMessage
    #: ``(event name, data JSON)`` of every event before ``done``; None: stored from JSON.
    events: list[tuple[str, str]] | None = None

    def to_bytes(self) -> bytes:
        message = self.message.to_wire()
        metadata = message.get("metadata", {})
        for name in _PER_CALL_METADATA:
            metadata.pop(name, None)
        data = {"v": _FORMAT, "message": message, "events": self.events}
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> CachedAnswer | None:
        """None for an entry this version cannot read (written by another release)."""
        try:
            data = json.loads(raw)
            if data.get("v") != _FORMAT:
                return None
            events = data.get("events")
            return cls(
                message=AssistantMessage.model_validate(data["message"]),
                events=[(str(name), str(body)) for name, body in events]
                if events is not None
                else None,
            )
        except (ValueError, KeyError, TypeError, ValidationError):
            return None

    def replay(self, request_id: str) -> tuple[AssistantMessage, list[StreamEvent]]:
        """The message and the stream events to send for this hit, marked cached, cost 0."""
        message = self.message.model_copy(deep=True)
        message.metadata.cached = True
        message.metadata.request_id = request_id
        if message.usage is not None:
            message.usage.cost = 0.0
        events: list[StreamEvent] = []
        if self.events is None:
            events.extend(_events_of(message))
        else:
            for name, data in self.events:
                event = parse_event(name, data)
                if isinstance(event, UsageEvent):
                    event.usage.cost = 0.0
                events.append(event)
        finish = message.metadata.finish_reason or "stop"
        events.append(DoneEvent(finish_reason=finish, message=message))
        return message, events


def _events_of(message: AssistantMessage) -> list[StreamEvent]:
    """The events a stream of this message would have carried."""
    events: list[StreamEvent] = []
    if message.content:
        events.append(DeltaEvent(content=message.content))
    for index, call in enumerate(message.tool_calls or []):
        events.append(
            ToolCallEvent(
                index=index,
                id=call.id,
                name=call.function.name,
                arguments_delta=call.function.arguments,
            )
        )
    if message.usage is not None:
        events.append(UsageEvent(usage=message.usage))
    return events


class _Capture:
    """Passes the route's response on, adding the MISS header, and keeps a copy of the body
    (up to a bound) when it is what will be stored: always on the raw surfaces (``raw``),
    which store the bytes as sent, and for an endpoint that does not leave its answer on the
    call record (``CallRecord.keeps_answer``, known when the response starts). ``on_complete``
    runs when the last body message arrives, *before* it is passed on: a client that asks
    again as soon as it has the whole answer finds it stored (a stream's producer may still
    be winding down well after the last byte went out)."""

    def __init__(
        self,
        send: Send,
        max_bytes: int,
        on_complete: Callable[[_Capture], Awaitable[None]],
        *,
        scope: Scope,
        raw: bool,
    ) -> None:
        self._send = send
        self._max_bytes = max_bytes
        self._on_complete = on_complete
        self._scope = scope
        self._raw = raw
        self.keep_body = raw
        self.status = 0
        self.content_type = "application/json"
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False
        self.too_big = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if not self._raw:
                record = self._scope.get(keys.CALL)
                self.keep_body = not (isinstance(record, CallRecord) and record.keeps_answer)
            for name, value in message.get("headers", []):
                if name.lower() == b"content-type":
                    self.content_type = value.decode("latin-1")
            message = {
                **message,
                "headers": [*message.get("headers", []), (b"x-robota-cache", b"MISS")],
            }
        elif message["type"] == "http.response.body":
            body: bytes = message.get("body", b"")
            if self.keep_body:
                self.size += len(body)
                if self.size > self._max_bytes:
                    self.too_big = True
                    self.chunks.clear()
                elif body:
                    self.chunks.append(body)
            if not message.get("more_body", False):
                self.complete = True
                await self._on_complete(self)
        await self._send(message)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


class CacheMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        cache: ResponseCache | None = None,
        *,
        scope: Literal["user", "shared"] = "user",
        enabled: bool = True,
        max_body_bytes: int = 4 * 1024 * 1024,
        max_entry_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        """``cache``: the backend (default: in-process, 1 h, 64 MiB). ``scope``: ``user``
        keeps each user's answers to themselves; ``shared`` lets every caller read every
        answer (only for deployments whose users may see each other's prompts' answers)."""
        self.app = app
        self.cache: ResponseCache = (
            cache if cache is not None else MemoryResponseCache(ttl=3600, max_bytes=64 << 20)
        )
        self.scope = scope
        self.enabled = enabled
        self.max_body_bytes = max_body_bytes
        self.max_entry_bytes = max_entry_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        feature = CHAT_PATHS.get(route_path(scope)) if scope["type"] == "http" else None
        if not self.enabled or feature is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        request_id = keys.request_id(scope)
        try:
            body = await chat_request(Request(scope, receive), self.max_body_bytes)
        except ProxyError as exc:
            # The body is spent: answer the error here rather than hand the route nothing.
            await error_response(exc, request_id, scope=scope)(scope, receive, send)
            return
        streamed = call_feature(scope) == "stream"
        if not is_cacheable(body):
            await self.app(scope, receive, send)
            return
        surface = CHAT_SURFACES.get(route_path(scope))
        parsed = scope.get(keys.PARSED_CHAT)
        if dialect_of(scope) is ROBOTA:
            key = cache_key(self._scope_name(scope), body)
            raw_surface: Dialect | None = None
        elif (
            surface is not None
            and cacheable_dialect(surface.dialect)
            and isinstance(parsed, ParsedChat)
        ):
            raw_surface = surface.dialect
            headers = Headers(scope=scope)
            key = raw_cache_key(self._scope_name(scope), raw_surface, parsed, body, headers)
        else:  # embeddings, or a dialect without a raw form
            await self.app(scope, receive, send)
            return
        directives = cache_directives(scope, streamed)
        if "no-cache" not in directives:
            try:
                stored = await self.cache.get(key)
            except ProxyError as exc:  # its storage is down and the operator chose "closed"
                await error_response(exc, request_id, scope=scope)(scope, receive, send)
                return
            if stored is not None and raw_surface is not None:
                raw_answer = RawAnswer.from_bytes(stored)
                if raw_answer is not None:
                    log.info("cache hit %s %s/%s", request_id, body.provider, body.model)
                    await self._raw_hit(raw_answer, raw_surface, streamed, scope, send)
                    return
            elif stored is not None:
                answer = CachedAnswer.from_bytes(stored)
                if answer is not None:
                    log.info("cache hit %s %s/%s", request_id, body.provider, body.model)
                    await self._hit(answer, streamed, scope, receive, send)
                    return
            call_record(scope, request_id).cache_result = "miss"
        if raw_surface is None and streamed and "no-store" not in directives:
            # The flag that makes the producer collect the events this entry will hold.
            call_record(scope, request_id).answer_events = []

        async def store(capture: _Capture) -> None:
            if "no-store" in directives:
                return
            entry: bytes | None = None
            if raw_surface is not None:
                raw_answer = self._raw_answer(capture, raw_surface, streamed, scope, body)
                entry = raw_answer.to_bytes() if raw_answer is not None else None
            else:
                entry = self._entry(capture, streamed, scope)
            if entry is not None:
                await self.cache.set(key, entry)

        raw = raw_surface is not None
        capture = _Capture(send, self.max_entry_bytes, store, scope=scope, raw=raw)
        await self.app(scope, receive, capture.send)

    def _scope_name(self, scope: Scope) -> str:
        if self.scope == "shared":
            return "shared"
        principal = scope.get(keys.PRINCIPAL)
        return f"user:{principal.user if isinstance(principal, Principal) else 'anonymous'}"

    async def _hit(
        self, answer: CachedAnswer, streamed: bool, scope: Scope, receive: Receive, send: Send
    ) -> None:
        request_id = keys.request_id(scope)
        message, events = answer.replay(request_id)
        record = call_record(scope, request_id)
        record.cached, record.streamed = True, streamed
        record.cache_result = "hit"
        provider = message.metadata.provider or ""
        model = message.metadata.model or ""
        record.settle_usage(provider, model, message.usage or Usage())
        if not streamed:
            response = WireResponse(message)
            response.headers[CACHE_HEADER] = "HIT"
            await response(scope, receive, send)
            return
        headers = {**sse.HEADERS, "content-type": "text/event-stream", CACHE_HEADER: "HIT"}
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            }
        )
        sink = scope.get(keys.EVENT_SINK)
        if callable(sink):  # an internal caller that takes the events as they are (/ai/ws)
            for number, event in enumerate(events, 1):
                await sink(event.type, str(number), event.to_json())
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        frames = b"".join(sse.frame(number, event) for number, event in enumerate(events, 1))
        await send({"type": "http.response.body", "body": frames, "more_body": False})

    def _entry(self, capture: _Capture, streamed: bool, scope: Scope) -> bytes | None:
        """The entry to store for the route's answer, or None when it is not a complete
        success or is too big. From what the route left on the call record: a 200 whose
        record says ``ok`` and holds the final message (for a stream, one that ended
        ``done``, which is when the message is set), at most ``max_entry_bytes`` stored."""
        record = scope.get(keys.CALL)
        if not isinstance(record, CallRecord) or record.status != "ok":
            return None
        if capture.status != 200 or not capture.complete:
            return None
        if capture.keep_body:
            return _entry_from_bytes(capture, streamed)
        if record.answer is None:
            return None
        events: list[tuple[str, str]] | None = None
        if streamed:
            if record.answer_events is None:
                return None
            events = list(record.answer_events)
            # The entry holds each event's JSON (escaped, so no shorter): a stream whose
            # events alone are over the bound is refused before it is serialised.
            if sum(len(data) for _, data in events) > self.max_entry_bytes:
                return None
        entry = CachedAnswer(record.answer, events).to_bytes()
        return entry if len(entry) <= self.max_entry_bytes else None

    async def _raw_hit(
        self, answer: RawAnswer, dialect: Dialect, streamed: bool, scope: Scope, send: Send
    ) -> None:
        """The stored bytes as they were sent, metered like a Robota hit: one row marked
        cached, cost 0, with the token counts of the call that stored it."""
        request_id = keys.request_id(scope)
        record = call_record(scope, request_id)
        record.cached, record.streamed = True, streamed
        record.cache_result = "hit"
        record.settle_usage(answer.provider, answer.model, answer.usage or Usage())
        headers = [(b"content-type", answer.content_type.encode("latin-1"))]
        if streamed:
            headers += [(k.lower().encode(), v.encode()) for k, v in sse.HEADERS.items()]
        else:
            headers.append((b"content-length", str(len(answer.body)).encode()))
        if dialect is ANTHROPIC:  # the Anthropic route names every answer's request
            headers.append((b"request-id", request_id.encode()))
        headers.append((b"x-robota-cache", b"HIT"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body, "more_body": False})

    def _raw_answer(
        self, capture: _Capture, dialect: Dialect, streamed: bool, scope: Scope, body: ChatRequest
    ) -> RawAnswer | None:
        """The route's bytes to store, or None when they are not a complete success."""
        record = scope.get(keys.CALL)
        if not isinstance(record, CallRecord) or record.status != "ok":
            return None
        if capture.status != 200 or not capture.complete or capture.too_big:
            return None
        content = capture.body
        if streamed and not stream_complete(dialect, content):
            return None
        return RawAnswer(
            content_type=capture.content_type,
            body=content,
            provider=record.provider or body.provider,
            model=record.model or body.model,
            usage=record.usage,
        )


def _entry_from_bytes(capture: _Capture, streamed: bool) -> bytes | None:
    """The entry of someone else's endpoint, parsed back from the bytes it sent (at most
    ``max_entry_bytes`` of them)."""
    if capture.too_big:
        return None
    try:
        if not streamed:
            answer = CachedAnswer(AssistantMessage.model_validate_json(capture.body))
        else:
            parsed = _stream_answer(capture.body)
            if parsed is None:
                return None
            answer = parsed
    except (ValueError, ValidationError):
        log.warning("cache: could not read the endpoint's answer; not stored")
        return None
    return answer.to_bytes()


def _stream_answer(body: bytes) -> CachedAnswer | None:
    """The events of a finished stream, parsed with httpx-sse; None unless it ended ``done``.
    Imported here: only an endpoint that does not fill the call record needs them."""
    import httpx
    from httpx_sse import EventSource

    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)
    events: list[tuple[str, str]] = []
    done: DoneEvent | None = None
    for item in EventSource(response).iter_sse():
        if done is not None or item.event == "error":
            return None
        if item.event == "done":
            parsed = parse_event(item.event, item.data)
            assert isinstance(parsed, DoneEvent)
            done = parsed
        elif item.event in ("delta", "tool_call", "usage"):
            events.append((item.event, item.data))
    if done is None:
        return None
    return CachedAnswer(done.message, events)
