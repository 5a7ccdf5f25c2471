"""What the vendor-compatible surfaces (``openai_compat``, ``anthropic_compat``) share.

A compatible route's stream carries one of two kinds of item per target: the vendor's own
chunks as dicts (a passthrough to a target that speaks the surface's wire) or the adapters'
``UpstreamEvent``s (a translated call), which a dialect's frame writer renders. These helpers
join the first item ``Resilience.open_events`` waited for with the rest, split the kinds, and
render events as frames, closing the vendor call whenever the caller stops reading.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Protocol, TypeAlias

import pydantic_core
from starlette.responses import Response

from robota_client.messages import ChatRequest, DeltaEvent, FinishReason, UsageEvent
from robota_proxy.call_record import CallRecord
from robota_proxy.dialects import ParsedChat
from robota_proxy.errors import ProxyError
from robota_proxy.policy.principals import Principal
from robota_proxy.upstreams.base import FinishEvent, Upstream, UpstreamEvent
from robota_proxy.upstreams.resilience import Resilience, Served

JSONDict: TypeAlias = dict[str, Any]
#: What one target's stream yields: the vendor's own chunks (passthrough) or wire events.
Item: TypeAlias = JSONDict | UpstreamEvent
#: ``(failure, text so far) ->`` the rest of a broken passed-through answer, from a target
#: that takes a prefill (``Resilience.continuation``), or ``None``.
Resume: TypeAlias = Callable[
    [ProxyError, str], Awaitable[AsyncGenerator[UpstreamEvent, None] | None]
]


class FrameWriter(Protocol):
    """A dialect's renderer of wire events as SSE frames."""

    def start(self) -> bytes: ...

    def event(self, event: Any) -> bytes | None: ...


class ResumedWriter(Protocol):
    """A dialect's renderer set to write on in a passed-through stream (``resume``d)."""

    def event(self, event: Any) -> bytes: ...

    def finish(self, reason: FinishReason) -> bytes: ...


async def as_items(events: AsyncGenerator[Any, None]) -> AsyncGenerator[Item, None]:
    async with aclosing(events):
        async for event in events:
            yield event


async def only_events(items: AsyncGenerator[Item, None]) -> AsyncGenerator[UpstreamEvent, None]:
    async with aclosing(items):
        async for item in items:
            if not isinstance(item, dict):
                yield item


async def rendered(
    writer: FrameWriter, events: AsyncGenerator[Any, None]
) -> AsyncGenerator[bytes, None]:
    async with aclosing(events):
        yield writer.start()
        async for event in events:
            frame = writer.event(event)
            if frame:
                yield frame


async def chain(first: Item, rest: AsyncIterator[Item]) -> AsyncIterator[Item]:
    yield first
    async for item in rest:
        yield item


async def open_items(
    resilience: Resilience,
    body: ChatRequest,
    principal: Principal | None,
    record: CallRecord,
    start: Callable[[Upstream, ChatRequest], AsyncGenerator[Item, None]],
    is_content: Callable[[JSONDict], bool],
) -> tuple[Item | None, AsyncGenerator[Item, None], Served]:
    """``Resilience.open_events``, with a failure before the first item recorded on the call
    record (its error code, or ``client_disconnected``) for the ledger row. ``is_content``
    tells the vendor's framing chunks of a passthrough from its first token (a translated
    call's events are all content)."""

    def content(item: Item) -> bool:
        return is_content(item) if isinstance(item, dict) else True

    try:
        return await resilience.open_events(body, principal, record, start, content)
    except BaseException as exc:
        record.status = exc.code if isinstance(exc, ProxyError) else "client_disconnected"
        raise


def shown_model(parsed: ParsedChat, asked: ChatRequest, sent: ChatRequest) -> str:
    """The name the caller used when its target answered; ``provider/model`` of the
    fallback that did otherwise."""
    if (sent.provider, sent.model) == (asked.provider, asked.model) and parsed.raw is not None:
        return str(parsed.raw.get("model") or sent.model)
    return f"{sent.provider}/{sent.model}"


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """JSON straight from pydantic-core (no ``json.dumps`` round trip)."""
    return Response(
        pydantic_core.to_json(body),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def written_on(
    sent: ChatRequest,
    record: CallRecord,
    writer: ResumedWriter,
    events: AsyncGenerator[UpstreamEvent, None],
) -> AsyncGenerator[bytes, None]:
    """A continuation's events (``Resume``) written on in a broken passed-through stream by
    the dialect's ``writer``; its final usage is every attempt's, which is what the caller
    is billed."""
    async with aclosing(events):
        async for event in events:
            if isinstance(event, DeltaEvent):
                record.streamed_chars += len(event.content)
                yield writer.event(event)
            elif isinstance(event, UsageEvent):
                provider, model = record.provider or sent.provider, record.model or sent.model
                record.settle_usage(provider, model, event.usage)
                if record.usage is not None:
                    writer.event(UsageEvent(usage=record.usage))
            elif isinstance(event, FinishEvent):
                yield writer.finish(event.finish_reason)
