"""``POST /v1/chat/completions`` and ``GET /v1/models``: the OpenAI-compatible surface.

Any OpenAI client works unchanged with ``base_url=<proxy>/v1``. The body was parsed by the
OpenAI dialect (``robota_proxy.dialects.openai``) into the universal ``ChatRequest`` the
middleware already authorized, limited, metered and looked up in the cache; this route makes
the call through the same retries and fallbacks as ``/ai/chat``, one target at a time:

- a target that speaks OpenAI's wire (``openai``, and any compatible server behind it) gets
  the caller's own JSON with the model rewritten, and its answer or chunks go back as they
  came: nothing is lost, and nothing is built that was not needed (the cheapest path);
- any other target (Anthropic, Gemini, the mock) gets the ``ChatRequest`` through its adapter,
  and the answer is rendered as ``chat.completion`` or ``chat.completion.chunk`` frames.

Either way the vendor's usage, by token kind (cached input, reasoning), settles the call
record, so the ledger row's cost is exact. Errors before a stream starts are plain statuses
in OpenAI's shape (the app's handlers render them by path); a failure after it started ends
the stream with an in-band ``data: {"error": ...}`` frame.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol, cast

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from robota_client.messages import (
    AssistantMessage,
    ChatRequest,
    ErrorEvent,
    Usage,
)
from robota_proxy import scope as keys
from robota_proxy.call_record import CallRecord, call_record
from robota_proxy.chat_body import chat_request
from robota_proxy.dialects import OPENAI_CHAT_PATH, ParsedChat
from robota_proxy.dialects import openai as dialect
from robota_proxy.errors import Forbidden, ProxyError, UpstreamError
from robota_proxy.policy.principals import Principal
from robota_proxy.routes.chat import principal_of, wire_events
from robota_proxy.routes.compat import (
    Item,
    JSONDict,
    Resume,
    as_items,
    chain,
    json_response,
    only_events,
    open_items,
    rendered,
    shown_model,
    written_on,
)
from robota_proxy.upstreams.base import Upstream
from robota_proxy.upstreams.registry import UpstreamRegistry
from robota_proxy.upstreams.resilience import Resilience
from robota_proxy.wire import sse

log = logging.getLogger("robota_proxy.openai_compat")

MODELS_PATH = "/v1/models"


class Passthrough(Protocol):
    """What an adapter offers for the caller's JSON (``robota_proxy.upstreams.openai``)."""

    def passthrough_body(self, body: JSONDict, model: str, max_tokens: int | None) -> JSONDict: ...

    async def chat_raw(self, body: JSONDict) -> tuple[JSONDict, Usage | None]: ...

    def stream_raw(self, body: JSONDict) -> AsyncGenerator[JSONDict, None]: ...


def _passthrough(upstream: Upstream, parsed: ParsedChat) -> Passthrough | None:
    """The adapter as a passthrough when the caller's JSON can go to it as it is."""
    if parsed.raw is None or getattr(upstream, "dialect", None) != dialect.VENDOR:
        return None
    return cast(Passthrough, upstream) if hasattr(upstream, "chat_raw") else None


@dataclass(slots=True)
class _Raw:
    answer: JSONDict
    usage: Usage | None


class OpenAIRoutes:
    def __init__(
        self,
        registry: UpstreamRegistry,
        *,
        max_body_bytes: int,
        resilience: Resilience,
        aliases: Collection[str] = (),
    ) -> None:
        self.registry = registry
        self.resilience = resilience
        self.max_body_bytes = max_body_bytes
        self.aliases = sorted(aliases)

    def routes(self) -> list[Route]:
        return [
            Route(OPENAI_CHAT_PATH, self.chat_completions, methods=["POST"]),
            Route(MODELS_PATH, self.models, methods=["GET"]),
        ]

    # --- GET /v1/models ---------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        """What this caller may use: ``provider/model`` for every model a provider lists
        (a provider that takes any model lists none), and the aliases, as OpenAI lists."""
        principal = principal_of(request)
        names: list[tuple[str, str]] = [
            (provider, model)
            for provider, models in self.registry.catalogue().items()
            for model in models or []
        ]
        names += [("auto", alias) for alias in self.aliases]
        data = []
        for provider, model in names:
            if principal is not None and not _allowed(principal, provider, model):
                continue
            shown = model if provider == "auto" else f"{provider}/{model}"
            owner = "robota" if provider == "auto" else provider
            data.append({"id": shown, "object": "model", "created": 0, "owned_by": owner})
        return json_response({"object": "list", "data": data})

    # --- POST /v1/chat/completions ----------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        body = await chat_request(request, self.max_body_bytes)
        parsed = request.scope.get(keys.PARSED_CHAT)
        if not isinstance(parsed, ParsedChat):  # parsed by another path's dialect: a bug
            raise UpstreamError("the request was not parsed as an OpenAI chat completion")
        request_id = keys.request_id(request.scope)
        record = call_record(request.scope, request_id)
        if parsed.streamed:
            record.streamed = True
            return await self._stream(request, body, parsed, record)

        async def call(upstream: Upstream, sent: ChatRequest) -> AssistantMessage | _Raw:
            raw = _passthrough(upstream, parsed)
            if raw is None:
                return await upstream.chat(sent)
            assert parsed.raw is not None
            out = raw.passthrough_body(parsed.raw, sent.model, sent.options.max_tokens)
            return _Raw(*await raw.chat_raw(out))

        try:
            result, served = await self.resilience.run(
                body, principal_of(request), "chat", record, call
            )
        except ProxyError as exc:
            record.status = exc.code
            raise
        sent = served.request
        if isinstance(result, _Raw):
            if result.usage is not None:
                record.settle_usage(sent.provider, sent.model, result.usage)
            return json_response(result.answer)
        if result.usage is not None:
            record.settle_usage(sent.provider, sent.model, result.usage)
        model = shown_model(parsed, body, sent)
        return json_response(dialect.completion(result, model=model, request_id=request_id))

    async def _stream(
        self, request: Request, body: ChatRequest, parsed: ParsedChat, record: CallRecord
    ) -> Response:
        raw_body = parsed.raw or {}
        options = raw_body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True

        def start(upstream: Upstream, sent: ChatRequest) -> AsyncGenerator[Item, None]:
            raw = _passthrough(upstream, parsed)
            if raw is None:
                return as_items(upstream.stream(sent))
            out = raw.passthrough_body(raw_body, sent.model, sent.options.max_tokens)
            return as_items(raw.stream_raw(out))

        first, rest, served = await open_items(
            self.resilience, body, principal_of(request), record, start, _is_content
        )
        sent = served.request
        frames: AsyncIterator[bytes]
        if isinstance(first, dict):
            resume = functools.partial(
                self.resilience.continuation, principal_of(request), record, served
            )
            writer = dialect.ChunkWriter(
                request_id=record.request_id, model=sent.model, include_usage=include_usage
            )
            frames = _forwarded(sent, record, first, rest, writer, resume)
        else:
            writer = dialect.ChunkWriter(
                request_id=record.request_id,
                model=shown_model(parsed, body, sent),
                include_usage=include_usage,
            )
            continued = self.resilience.continued(
                principal_of(request), record, served, first, only_events(rest), restart=False
            )
            frames = rendered(writer, wire_events(sent, record, None, continued))
        return StreamingResponse(frames, media_type="text/event-stream", headers=sse.HEADERS)


def _is_content(chunk: JSONDict) -> bool:
    """Whether a passed-through chunk carries part of the answer: OpenAI's first chunk
    (``delta: {"role": "assistant", "content": ""}``) comes with the headers and does not."""
    if chunk.get("usage"):
        return True
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if choice.get("finish_reason") or (
            isinstance(delta, dict)
            and (delta.get("content") or delta.get("tool_calls") or delta.get("refusal"))
        ):
            return True
    return False


async def _forwarded(
    sent: ChatRequest,
    record: CallRecord,
    first: JSONDict,
    rest: AsyncGenerator[Item, None],
    writer: dialect.ChunkWriter,
    resume: Resume,
) -> AsyncGenerator[bytes, None]:
    """The vendor's chunks as they came, with their usage settled on the call record; the
    usage-only chunk the proxy asked for is dropped when the caller did not ask for it. A
    stream that breaks midway while all it said is text is continued from a prefill
    (``resume``) where a target takes one, written on with the same chunk id; otherwise it
    ends with an error event naming the failure."""
    finished = False
    text: list[str] = []
    only_text = True
    last: JSONDict = first
    async with aclosing(rest):
        try:
            try:
                async for chunk in chain(first, rest):
                    if not isinstance(chunk, dict):
                        continue
                    last = chunk
                    usage = dialect_usage(chunk)
                    if usage is not None:
                        record.settle_usage(sent.provider, sent.model, usage)
                    choices = chunk.get("choices")
                    if isinstance(choices, list):
                        for choice in choices:
                            record.streamed_chars += _delta_chars(choice)
                            delta = choice.get("delta") if isinstance(choice, dict) else None
                            if isinstance(delta, dict):
                                if isinstance(delta.get("content"), str):
                                    text.append(delta["content"])
                                only_text = only_text and not delta.get("tool_calls")
                            if isinstance(choice, dict) and choice.get("finish_reason"):
                                finished = True
                    if choices == [] and usage is not None and not writer.include_usage:
                        continue
                    yield dialect.sse(chunk)
            except ProxyError as broken:
                more = await resume(broken, "".join(text)) if only_text and not finished else None
                if more is None:
                    raise
                same = (record.provider, record.model) == (sent.provider, sent.model)
                writer.resume(
                    last, str(last.get("model")) if same else f"{record.provider}/{record.model}"
                )
                async for frame in written_on(sent, record, writer, more):
                    yield frame
                return
            if not finished:
                raise UpstreamError(f"{sent.provider} ended the stream before it finished")
            yield dialect.DONE_FRAME
        except ProxyError as exc:
            record.status = exc.code
            yield _error_frame(exc, record.request_id)
        except Exception:
            record.status = UpstreamError.code
            log.exception("stream %s failed", record.request_id)
            yield _error_frame(UpstreamError("the stream failed"), record.request_id)
        except BaseException:
            record.status = "client_disconnected"
            raise


def dialect_usage(chunk: JSONDict) -> Usage | None:
    from robota_proxy.upstreams.openai import chunk_usage

    return chunk_usage(chunk)


def _delta_chars(choice: object) -> int:
    delta = choice.get("delta") if isinstance(choice, dict) else None
    if not isinstance(delta, dict):
        return 0
    size = len(delta.get("content") or "")
    for call in delta.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            size += len(function.get("arguments") or "") + len(function.get("name") or "")
    return size


def _error_frame(error: ProxyError, request_id: str) -> bytes:
    return dialect.error_frame(
        ErrorEvent(code=error.code, message=error.message, request_id=request_id)
    )


def _allowed(principal: Principal, provider: str, model: str) -> bool:
    probe = ChatRequest(provider=provider, model=model, messages=[{"role": "user", "content": "-"}])
    try:
        principal.permissions.authorize(probe, "chat")
    except Forbidden:
        return False
    return True
