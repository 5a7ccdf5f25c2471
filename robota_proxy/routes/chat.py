"""``POST /ai/chat`` and ``POST /ai/chat/stream``: one chat call, answered whole or streamed."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from decimal import Decimal

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from robota_client.messages import (
    ChatRequest,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    ResponseMetadata,
    StreamAssembler,
    StreamEvent,
    ToolCallEvent,
    Usage,
    UsageEvent,
)
from robota_proxy import scope as keys
from robota_proxy.call_record import CallRecord, call_record
from robota_proxy.chat_body import chat_request
from robota_proxy.errors import ProxyError, UpstreamError
from robota_proxy.policy.principals import Principal
from robota_proxy.responses import WireResponse
from robota_proxy.streams.buffer import StreamBuffer, new_stream_id
from robota_proxy.streams.memory import MemoryStreamBuffer
from robota_proxy.streams.response import DEFAULT_STREAM_MAX_BYTES, ProducingStream
from robota_proxy.upstreams.base import FinishEvent, UpstreamEvent
from robota_proxy.upstreams.registry import UpstreamRegistry
from robota_proxy.upstreams.resilience import Resilience, StreamItem
from robota_proxy.wire.paths import CHAT_PATH, STREAM_PATH

log = logging.getLogger("robota_proxy.chat")


class ChatRoutes:
    def __init__(
        self,
        registry: UpstreamRegistry,
        *,
        max_body_bytes: int,
        streams: StreamBuffer | None = None,
        resume_grace: float = 0.5,
        stream_max_bytes: int = DEFAULT_STREAM_MAX_BYTES,
        resilience: Resilience | None = None,
    ) -> None:
        self.registry = registry
        #: Retries, fallbacks and the deadline around every upstream call.
        self.resilience = resilience if resilience is not None else Resilience(registry)
        self.max_body_bytes = max_body_bytes
        #: Where streamed answers are produced into, so a dropped client can resume them.
        self.streams: StreamBuffer = streams if streams is not None else MemoryStreamBuffer(60)
        self.resume_grace = resume_grace
        self.stream_max_bytes = stream_max_bytes

    def routes(self) -> list[Route]:
        return [
            Route(CHAT_PATH, self.chat, methods=["POST"]),
            Route(STREAM_PATH, self.chat_stream, methods=["POST"]),
        ]

    async def chat(self, request: Request) -> Response:
        body = await chat_request(request, self.max_body_bytes)
        request_id = keys.request_id(request.scope)
        record = call_record(request.scope, request_id)
        record.keeps_answer = True
        try:
            message, served = await self.resilience.chat(body, principal_of(request), record)
        except ProxyError as exc:
            record.status = exc.code
            raise
        sent = served.request  # after fallbacks: the provider and model that answered
        if message.usage is not None:
            _put_cost(message.usage, record.settle_usage(sent.provider, sent.model, message.usage))
        message.metadata.request_id = request_id
        if served.vendor_calls > 1:
            message.metadata.attempts = served.vendor_calls  # type: ignore[attr-defined]
        record.answer = message  # for the response cache: the object, not its bytes
        return WireResponse(message)

    async def chat_stream(self, request: Request) -> Response:
        body = await chat_request(request, self.max_body_bytes)
        request_id = keys.request_id(request.scope)
        record = call_record(request.scope, request_id)
        record.streamed = record.keeps_answer = True
        # Wait for the first upstream event before answering 200: a vendor that refuses the
        # call outright (429, 401, unreachable) then gets a plain error status the client can
        # retry on, instead of a 200 stream that only says "error". Until then the call may be
        # retried and fall back (robota_proxy.upstreams.resilience); after it, never.
        try:
            opened = await self.resilience.open_stream(body, principal_of(request), record)
        except BaseException as exc:
            record.status = exc.code if isinstance(exc, ProxyError) else "client_disconnected"
            raise
        body, first, events = opened.served.request, opened.first, opened.events
        # The producer is decoupled from this connection (see robota_proxy.streams.response):
        # a client that drops can resume the same answer; one that does not come back within
        # the grace has the vendor call cancelled and what was produced settled.
        principal = principal_of(request)
        return ProducingStream(
            self.streams,
            new_stream_id(),
            principal.user if principal is not None else "anonymous",
            wire_events(body, record, first, events),
            grace=self.resume_grace,
            max_bytes=self.stream_max_bytes,
            record=record,
        )


async def wire_events(
    body: ChatRequest,
    record: CallRecord,
    first: UpstreamEvent | None,
    events: AsyncGenerator[StreamItem, None],
) -> AsyncGenerator[StreamEvent, None]:
    """The upstream's events as wire events: its finish becomes ``done`` with the assembled
    message, and a failure midway becomes a closing ``error`` event. The call record learns
    the usage (priced) and, until then, how much text was produced, so a stream cut short by
    the client is still settled, and the final message (``answer``, for the cache). A stream
    continued on another target (``restart`` or a prefill) reports the usage and cost of all
    its attempts, and the target that finished."""
    assembler = StreamAssembler()
    request_id = record.request_id
    async with aclosing(events):
        try:
            pending = [] if first is None else [first]
            async for event in _chain(pending, events):
                if isinstance(event, DeltaEvent):
                    record.streamed_chars += len(event.content)
                elif isinstance(event, ToolCallEvent):
                    record.streamed_chars += len(event.arguments_delta) + len(event.name or "")
                elif isinstance(event, UsageEvent):
                    provider = record.provider or body.provider
                    model = record.model or body.model
                    cost = record.settle_usage(provider, model, event.usage)
                    if record.earlier and record.usage is not None:  # every attempt's usage
                        event = UsageEvent(usage=record.usage)
                    _put_cost(event.usage, cost)
                if isinstance(event, FinishEvent):
                    metadata = ResponseMetadata(
                        provider=record.provider or body.provider,
                        model=record.model or body.model,
                        finish_reason=event.finish_reason,
                        request_id=request_id,
                    )
                    record.answer = assembler.message(metadata)
                    yield DoneEvent(finish_reason=event.finish_reason, message=record.answer)
                else:
                    assembler.add(event)
                    yield event
        except ProxyError as exc:
            record.status = exc.code
            yield _error_event(exc, request_id)
        except Exception:
            record.status = UpstreamError.code
            log.exception("stream %s failed", request_id)
            yield _error_event(UpstreamError("the stream failed"), request_id)
        except BaseException:
            # Cancelled or closed: the client went away mid-stream.
            record.status = "client_disconnected"
            raise


def principal_of(request: Request) -> Principal | None:
    """Who the auth middleware said is calling (``None`` when it is not mounted)."""
    principal = request.scope.get(keys.PRINCIPAL)
    return principal if isinstance(principal, Principal) else None


def _put_cost(usage: Usage, cost: Decimal | None) -> None:
    """The wire carries the cost as a JSON number for display; the ledger keeps it exact."""
    usage.cost = float(cost) if cost is not None else None


async def _chain(
    head: list[UpstreamEvent], rest: AsyncIterator[StreamItem]
) -> AsyncIterator[StreamItem]:
    for event in head:
        yield event
    async for item in rest:
        yield item


def _error_event(error: ProxyError, request_id: str) -> ErrorEvent:
    return ErrorEvent(
        code=error.code,
        message=error.message,
        retry_after=error.retry_after,
        request_id=request_id,
    )
