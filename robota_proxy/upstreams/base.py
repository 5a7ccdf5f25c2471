"""What every vendor adapter provides.

An adapter turns a ``ChatRequest`` into one vendor call and the vendor's answer back into the
wire contract. It raises only ``robota_proxy.errors.ProxyError`` subclasses, so the routes never
see a vendor SDK's exception types (and never a message that could carry a key).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from robota_client.messages import (
    AssistantMessage,
    ChatRequest,
    DeltaEvent,
    FinishReason,
    ToolCallEvent,
    UsageEvent,
)


@dataclass(frozen=True, slots=True)
class FinishEvent:
    """The last event of an upstream stream: why the model stopped.

    Adapters yield it instead of a wire ``done`` event because the proxy assembles the
    final message itself (``StreamAssembler``) and adds the metadata only it knows.
    """

    finish_reason: FinishReason


UpstreamEvent: TypeAlias = DeltaEvent | ToolCallEvent | UsageEvent | FinishEvent


class Upstream(Protocol):
    """One vendor (or the mock). Created once per app, in the lifespan."""

    name: str

    def models(self) -> list[str] | None:
        """The models this upstream accepts, or ``None`` when any name is passed through."""
        ...

    async def chat(self, request: ChatRequest) -> AssistantMessage:
        """One non-streaming call. ``metadata.provider``, ``model`` and ``finishReason``
        and ``usage`` are filled; the proxy adds the request id and cost."""
        ...

    def stream(self, request: ChatRequest) -> AsyncGenerator[UpstreamEvent, None]:
        """Deltas, tool-call pieces in order, one ``UsageEvent`` when the vendor reports it,
        then exactly one ``FinishEvent``. Failures raise ``ProxyError`` at the point they
        happen, so a stream that already produced text can still end with an error event.
        Closing the iterator early must cancel the vendor call."""
        ...

    async def aclose(self) -> None:
        """Close the connection pool."""
        ...
