"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: the Anthropic-compatible
surface.

Any Anthropic client (the SDK with ``base_url=<proxy>``, Claude Code with
``ANTHROPIC_BASE_URL``) works unchanged. The body was parsed by the Anthropic dialect
(``robota_proxy.dialects.anthropic``) into the universal ``ChatRequest`` the middleware
already authorized, limited and metered; this route makes the call through the same retries
and fallbacks as ``/ai/chat``, one target at a time:

- a target that speaks Anthropic's wire gets the caller's own JSON with the model rewritten,
  and the caller's ``anthropic-version`` / ``anthropic-beta`` headers; its answer or events go
  back as they came, so thinking blocks with their signatures, cache breakpoints and betas
  survive;
- any other target (OpenAI, Gemini, the mock) gets the ``ChatRequest`` through its adapter
  (refused with a 400 naming the field when the body holds what it cannot honour), and the
  answer is rendered as a ``message`` or as Anthropic's SSE sequence.

Either way the vendor's usage, by token kind (cache reads and writes), settles the call
record, so the ledger row's cost is exact. Errors before a stream starts are plain statuses
in Anthropic's shape (the app's handlers render them by path); a failure after it started
ends the stream with an in-band ``event: error``.

``count_tokens`` is forwarded to Anthropic's own endpoint for an Anthropic target; for any
other target it answers the proxy's own prompt estimate (``prompt_token_bound``: an upper
bound, not the target's tokenizer count).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol, cast

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from robota_client.messages import (
    AssistantMessage,
    ChatRequest,
    ErrorEvent,
)
from robota_proxy import scope as keys
from robota_proxy.call_record import CallRecord, call_record
from robota_proxy.chat_body import chat_request, read_body
from robota_proxy.dialects import ModelRouter, ParsedChat, syntactic_router
from robota_proxy.dialects import anthropic as dialect
from robota_proxy.errors import ProxyError, UpstreamError
from robota_proxy.policy.pricing import prompt_token_bound
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

log = logging.getLogger("robota_proxy.anthropic_compat")


class Passthrough(Protocol):
    """What an adapter offers for the caller's JSON (``robota_proxy.upstreams.anthropic``)."""

    async def passthrough(
        self, body: JSONDict, headers: Mapping[str, str], *, path: str = ...
    ) -> JSONDict: ...

    def passthrough_stream(
        self, body: JSONDict, headers: Mapping[str, str]
    ) -> AsyncGenerator[JSONDict, None]: ...


def _passthrough(upstream: Upstream) -> Passthrough | None:
    """The adapter as a passthrough when it speaks Anthropic's wire."""
    if getattr(upstream, "dialect", None) != dialect.VENDOR:
        return None
    return cast(Passthrough, upstream) if hasattr(upstream, "passthrough_stream") else None


@dataclass(slots=True)
class _Raw:
    answer: JSONDict


class AnthropicRoutes:
    def __init__(
        self, registry: UpstreamRegistry, *, max_body_bytes: int, resilience: Resilience
    ) -> None:
        self.registry = registry
        self.resilience = resilience
        self.max_body_bytes = max_body_bytes

    def routes(self) -> list[Route]:
        return [
            Route(dialect.MESSAGES_PATH, self.messages, methods=["POST"]),
            Route(dialect.COUNT_TOKENS_PATH, self.count_tokens, methods=["POST"]),
        ]

    # --- POST /v1/messages ------------------------------------------------------------------

    async def messages(self, request: Request) -> Response:
        body = await chat_request(request, self.max_body_bytes)
        parsed = request.scope.get(keys.PARSED_CHAT)
        if not isinstance(parsed, ParsedChat) or parsed.raw is None:  # another dialect: a bug
            raise UpstreamError("the request was not parsed as an Anthropic message")
        raw = parsed.raw
        headers = dialect.forwarded_headers(request.headers)
        request_id = keys.request_id(request.scope)
        record = call_record(request.scope, request_id)
        if parsed.streamed:
            record.streamed = True
            return await self._stream(request, body, parsed, record, headers)

        async def call(upstream: Upstream, sent: ChatRequest) -> AssistantMessage | _Raw:
            passthrough = _passthrough(upstream)
            if passthrough is None:
                return await upstream.chat(_translated(parsed, sent))
            return _Raw(await passthrough.passthrough(_forwarded_body(raw, sent), headers))

        try:
            result, served = await self.resilience.run(
                body, principal_of(request), "chat", record, call
            )
        except ProxyError as exc:
            record.status = exc.code
            raise
        sent = served.request
        if isinstance(result, _Raw):
            usage = result.answer.get("usage")
            if isinstance(usage, dict):
                record.settle_usage(sent.provider, sent.model, dialect.usage_of(usage))
            return json_response(result.answer, headers={"request-id": request_id})
        if result.usage is not None:
            record.settle_usage(sent.provider, sent.model, result.usage)
        model = shown_model(parsed, body, sent)
        return json_response(
            dialect.message_json(result, model=model, request_id=request_id),
            headers={"request-id": request_id},
        )

    async def _stream(
        self,
        request: Request,
        body: ChatRequest,
        parsed: ParsedChat,
        record: CallRecord,
        headers: Mapping[str, str],
    ) -> Response:
        raw = parsed.raw or {}

        def start(upstream: Upstream, sent: ChatRequest) -> AsyncGenerator[Item, None]:
            passthrough = _passthrough(upstream)
            if passthrough is None:
                return as_items(upstream.stream(_translated(parsed, sent)))
            return as_items(passthrough.passthrough_stream(_forwarded_body(raw, sent), headers))

        first, rest, served = await open_items(
            self.resilience, body, principal_of(request), record, start, _is_content
        )
        sent = served.request
        frames: AsyncIterator[bytes]
        if isinstance(first, dict):
            resume = functools.partial(
                self.resilience.continuation, principal_of(request), record, served
            )
            frames = _forwarded(sent, record, first, rest, resume)
        else:
            writer = dialect.EventWriter(
                request_id=record.request_id, model=shown_model(parsed, body, sent)
            )
            continued = self.resilience.continued(
                principal_of(request), record, served, first, only_events(rest), restart=False
            )
            frames = rendered(writer, wire_events(sent, record, None, continued))
        return StreamingResponse(
            frames,
            media_type="text/event-stream",
            headers={**sse.HEADERS, "request-id": record.request_id},
        )

    # --- POST /v1/messages/count_tokens -----------------------------------------------------

    async def count_tokens(self, request: Request) -> Response:
        """Anthropic's own count for an Anthropic target; the proxy's prompt estimate (an
        upper bound) for any other. Authorized like a chat call to the same model; not a
        ledger row, as counting is free at Anthropic too."""
        request_id = keys.request_id(request.scope)
        router = request.scope.get(keys.MODEL_ROUTER)
        route: ModelRouter = router if callable(router) else syntactic_router
        parsed = dialect.parse_count_tokens(await read_body(request, self.max_body_bytes), route)
        target = parsed.request
        principal = principal_of(request)
        if principal is not None:
            principal.permissions.authorize(target, "chat")
        if target.provider != "auto":
            upstream = self.registry.resolve(target)
            passthrough = _passthrough(upstream)
            if passthrough is not None and parsed.raw is not None:
                answer = await passthrough.passthrough(
                    _forwarded_body(parsed.raw, target),
                    dialect.forwarded_headers(request.headers),
                    path=dialect.COUNT_TOKENS_PATH,
                )
                return json_response(answer, headers={"request-id": request_id})
        return json_response(
            {"input_tokens": prompt_token_bound(target)}, headers={"request-id": request_id}
        )


def _translated(parsed: ParsedChat, sent: ChatRequest) -> ChatRequest:
    """The request for a target that does not speak Anthropic's wire. A body parsed for a
    passthrough was read leniently (its untranslatable blocks carried as text), so for such
    a target (a fallback of another vendor) it is translated again, strictly: a field the
    target cannot honour is then a 400, before that vendor is called."""
    if not parsed.native or parsed.raw is None:
        return sent
    dialect.refuse_untranslatable(parsed.raw, sent.provider)
    strict = dialect.to_chat_request(parsed.raw, sent.provider, sent.model, lenient=False)
    strict.options = sent.options  # what the chain imposed (metering's maxTokens) holds
    return strict


def _forwarded_body(raw: JSONDict, sent: ChatRequest) -> JSONDict:
    body = dialect.passthrough_body(raw, sent.model)
    body.pop("stream", None)
    return body


#: Delta fields whose text a stream cut short is estimated from.
_DELTA_TEXT = ("text", "thinking", "partial_json")


#: Anthropic events that come with the headers, before the model has said anything.
_FRAMING = frozenset({"message_start", "ping"})


def _is_content(event: JSONDict) -> bool:
    """Whether a passed-through event carries part of the answer (a text block's start is
    framing; a tool call's start names the tool, which is the answer)."""
    kind = event.get("type")
    if kind in _FRAMING:
        return False
    if kind == "content_block_start":
        block = event.get("content_block")
        return isinstance(block, dict) and block.get("type") not in ("text", "thinking")
    return True


@dataclass(slots=True)
class _Blocks:
    """What a passed-through stream has started: its content blocks and their text, so a
    break can be continued from a prefill while every block so far is text."""

    count: int = 0
    open: int | None = None
    only_text: bool = True
    text: list[str] = field(default_factory=list)

    def see(self, event: JSONDict) -> None:
        kind = event["type"]
        if kind == "content_block_start":
            block = event.get("content_block")
            self.only_text = (
                self.only_text and isinstance(block, dict) and block.get("type") == "text"
            )
            self.count += 1
            index = event.get("index")
            self.open = index if isinstance(index, int) else None
        elif kind == "content_block_stop":
            self.open = None
        elif kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("text"), str):
                self.text.append(delta["text"])


async def _forwarded(
    sent: ChatRequest,
    record: CallRecord,
    first: JSONDict,
    rest: AsyncGenerator[Item, None],
    resume: Resume,
) -> AsyncGenerator[bytes, None]:
    """Anthropic's events as they came (a ``ping`` after ``message_start``, as Anthropic
    sends), with the cumulative usage of ``message_delta`` settled on the call record. A
    stream that ends after its stop reason without ``message_stop`` is finished here; one
    that breaks midway while all it said is text is continued from a prefill (``resume``)
    where a target takes one, else ends with an error event naming the failure."""
    tracker = dialect.UsageTracker()
    blocks = _Blocks()
    async with aclosing(rest):
        try:
            try:
                async for event in chain(first, rest):
                    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                        continue
                    tracker.see(event)
                    blocks.see(event)
                    delta = event.get("delta")
                    if event["type"] == "content_block_delta" and isinstance(delta, dict):
                        record.streamed_chars += sum(
                            len(delta[key])
                            for key in _DELTA_TEXT
                            if isinstance(delta.get(key), str)
                        )
                    if event["type"] == "message_delta":
                        usage = tracker.usage()
                        if usage is not None:
                            record.settle_usage(sent.provider, sent.model, usage)
                    yield dialect.frame(event)
                    if event["type"] == "message_start":
                        yield dialect.PING_FRAME
            except ProxyError as broken:
                more = None
                if blocks.only_text and tracker.stop_reason is None:
                    more = await resume(broken, "".join(blocks.text))
                if more is None:
                    raise
                writer = dialect.EventWriter(request_id=record.request_id, model=sent.model)
                writer.resume(blocks.count, blocks.open)
                async for frame in written_on(sent, record, writer, more):
                    yield frame
                return
            if tracker.stopped:
                return
            if tracker.stop_reason is None:
                raise UpstreamError(f"{sent.provider} ended the stream before message_stop")
            yield dialect.frame({"type": "message_stop"})
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


def _error_frame(error: ProxyError, request_id: str) -> bytes:
    return dialect.error_frame(
        ErrorEvent(code=error.code, message=error.message, request_id=request_id)
    )
