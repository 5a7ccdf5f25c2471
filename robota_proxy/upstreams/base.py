"""What every vendor adapter provides.

An adapter turns a ``ChatRequest`` into one vendor call and the vendor's answer back into the
wire contract. It raises only ``robota_proxy.errors.ProxyError`` subclasses, so the routes never
see a vendor SDK's exception types (and never a message that could carry a key).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias, runtime_checkable

from robota_client.messages import (
    AssistantMessage,
    ChatRequest,
    DeltaEvent,
    FinishReason,
    ToolCallEvent,
    Usage,
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


#: What one embedding input is: text, or (OpenAI-compatible upstreams only) token ids.
EmbeddingInput: TypeAlias = str | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """One ``POST /v1/embeddings`` call, vendor-neutral: the route builds it from OpenAI's
    shape and each adapter maps it to its vendor's wire. ``encoding_format`` is not here on
    purpose: adapters always hand back floats and the route encodes them as the caller
    asked, so the vendor's choice of encoding never reaches the caller."""

    provider: str
    model: str
    #: In the caller's order; the answer's ``index`` is the position here.
    inputs: tuple[EmbeddingInput, ...]
    dimensions: int | None = None
    #: OpenAI's end-user id for abuse monitoring; vendors without one ignore it.
    user: str | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    """The vectors in input order, the model that made them and the vendor's token count.

    ``usage`` is ``None`` when the vendor did not report one (Gemini's embedding endpoints
    often do not): the proxy then estimates it and marks the ledger row ``estimated``.
    """

    vectors: Sequence[Sequence[float]]
    model: str
    usage: Usage | None


@runtime_checkable
class Embedder(Protocol):
    """An upstream that also serves embeddings. Not part of ``Upstream``: a vendor without
    embeddings (Anthropic, the mock) simply does not implement it, and the route answers 400
    naming the provider instead of calling it."""

    name: str

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """One vendor call for all of ``request.inputs``; raises ``ProxyError`` only."""
        ...
