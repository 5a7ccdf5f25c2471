"""Anthropic Messages API.

The wire contract is OpenAI-shaped, so the conversation is reshaped on the way in: system
messages become the top-level ``system`` text, tool results travel in user turns, and
consecutive messages of one role are merged because the API wants user and assistant turns
to alternate.

``responseFormat: json`` is not mapped: the Messages API has no schema-less JSON mode (its
structured outputs need a JSON Schema), so the option is ignored and the prompt has to ask
for JSON. ``temperature`` and ``top_p`` are sent through ``extra_body`` because this SDK
generation no longer declares them; they go out only when the caller sets them.

Not mapped either: extended thinking (thinking blocks are dropped from answers), server
tools and their result blocks, citations, prompt-cache breakpoints and ``top_k``.

The connection pool is an ``httpx2`` client (the SDK's ``DefaultAsyncHttpxClient``): this
SDK generation refuses ``httpx`` objects.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from contextlib import aclosing, asynccontextmanager

import anthropic
import httpx2
import pydantic
from anthropic.types import (
    InputJSONDelta,
    Message,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    RawMessageStreamEvent,
    TextBlock,
    TextDelta,
    ToolUseBlock,
)
from httpx_sse import SSEError

from robota_client.messages import (
    AssistantMessage,
    ChatRequest,
    DeltaEvent,
    FinishReason,
    FunctionCall,
    ResponseMetadata,
    ToolCall,
    ToolCallEvent,
    ToolSchema,
    UniversalMessage,
    Usage,
    UsageEvent,
)
from robota_proxy.errors import ProxyError
from robota_proxy.observability import tracing
from robota_proxy.upstreams._convert import (
    JSONDict,
    arguments_json,
    malformed_response_error,
    status_error,
    tool_arguments,
)
from robota_proxy.upstreams.base import FinishEvent, UpstreamEvent
from robota_proxy.upstreams.errors import (
    broken_stream_error,
    timeout_error,
    unavailable_error,
)
from robota_proxy.upstreams.sse_json import response_objects

OFFICIAL_BASE_URL = "https://api.anthropic.com"

_FINISH_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

#: The HTTP status each error type stands for, to map an ``event: error`` that arrives in
#: the middle of a stream whose HTTP status was already 200.
_STATUS_BY_ERROR_TYPE: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

_TOOL_CHOICES: dict[str, JSONDict] = {
    "auto": {"type": "auto"},
    "required": {"type": "any"},
    "none": {"type": "none"},
}

#: Everything a call can raise that is the vendor's (or the network's) doing. The SDK
#: leaves transport errors in the middle of a stream unwrapped, hence ``httpx2``;
#: ``ValueError`` covers a stream event that is not JSON.
_CALL_ERRORS = (anthropic.AnthropicError, httpx2.HTTPError, ValueError)
#: What reading a started stream can raise besides the call's own errors.
_STREAM_ERRORS = (*_CALL_ERRORS, SSEError)
#: The SDK's own union of stream event types, to read an event object as the SDK would.
_STREAM_EVENT: pydantic.TypeAdapter[RawMessageStreamEvent] = pydantic.TypeAdapter(
    RawMessageStreamEvent
)


class AnthropicUpstream:
    """The Anthropic API behind one connection pool."""

    #: The wire it speaks: the Anthropic surface can pass a caller's JSON through to it.
    dialect = "anthropic"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        models: list[str] | None = None,
        default_max_tokens: int = 4096,
        max_connections: int = 1000,
    ) -> None:
        self.name = "anthropic"
        self._api_key = api_key
        self._models = list(models) if models is not None else None
        self._default_max_tokens = default_max_tokens
        self._http = anthropic.DefaultAsyncHttpxClient(
            limits=httpx2.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
            ),
            timeout=httpx2.Timeout(timeout, connect=connect_timeout),
            event_hooks=tracing.EVENT_HOOKS,  # traceparent to the vendor when tracing
        )
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key,
            # Explicit, so that an ANTHROPIC_BASE_URL in the environment cannot redirect
            # the proxy's key somewhere else.
            base_url=base_url or OFFICIAL_BASE_URL,
            timeout=timeout,
            max_retries=0,
            http_client=self._http,
        )

    def models(self) -> list[str] | None:
        return list(self._models) if self._models is not None else None

    async def aclose(self) -> None:
        await self._client.close()

    # --- calls -----------------------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> AssistantMessage:
        params = self._params(request)
        try:
            message = await self._client.messages.create(**params)
        except _CALL_ERRORS as exc:
            raise self._proxy_error(exc, streaming=False) from None
        return self._message(request, message)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[UpstreamEvent, None]:
        params = self._params(request)
        body = {**params, **params.pop("extra_body", {})}
        reader = _EventReader()
        async with self._events(body, None) as vendor_events:
            async for raw in vendor_events:
                try:
                    event = _STREAM_EVENT.validate_python(raw)
                except pydantic.ValidationError:
                    continue  # an event type this SDK does not know yet: nothing to read
                for item in reader.events(event):
                    yield item
        # ``message_delta`` carries the stop reason and the final usage: a stream that ends
        # after it but without ``message_stop`` has said everything, and is finished with
        # what it reported rather than treated as broken.
        if not reader.stopped and reader.stop_reason is None:
            raise broken_stream_error(self.name)
        usage = reader.usage()
        if usage is not None:
            yield UsageEvent(usage=usage)
        yield FinishEvent(_finish_reason(reader.stop_reason))

    # --- passthrough (the Anthropic surface, robota_proxy.routes.anthropic_compat) ------------

    async def passthrough(
        self, body: JSONDict, headers: Mapping[str, str], *, path: str = "/v1/messages"
    ) -> JSONDict:
        """POST the caller's own JSON (its model already rewritten) to ``path`` and return
        Anthropic's JSON answer untouched: thinking blocks, signatures and ``cache_control``
        survive because nothing is translated. ``headers``: the caller's
        ``anthropic-version`` / ``anthropic-beta``, which replace the SDK's defaults."""
        try:
            answer = await self._client.post(
                path, cast_to=object, body=body, options={"headers": dict(headers)}
            )
        except _CALL_ERRORS as exc:
            raise self._proxy_error(exc, streaming=False) from None
        if not isinstance(answer, dict):
            raise malformed_response_error(self.name)
        return answer

    async def passthrough_stream(
        self, body: JSONDict, headers: Mapping[str, str]
    ) -> AsyncGenerator[JSONDict, None]:
        """The stream of a passed-through call, one event object at a time as Anthropic sent
        it (``ping`` left out: the surface sends its own). A vendor ``event: error`` midway,
        a cut connection or a garbled event raise the same ``ProxyError`` as ``stream``."""
        async with self._events(body, headers) as vendor_events:
            async for event in vendor_events:
                yield event

    @asynccontextmanager
    async def _events(
        self, body: JSONDict, headers: Mapping[str, str] | None
    ) -> AsyncIterator[AsyncGenerator[JSONDict, None]]:
        """The event objects of one streamed ``/v1/messages`` call, read by ``sse_json`` (a
        malformed event is skipped, not fatal; ``ping`` is left out), with the vendor's
        failures mapped to wire errors and the response closed however the reading ends.
        ``headers``: the caller's ``anthropic-version`` / ``anthropic-beta`` on a passthrough."""
        try:
            response = await self._client.post(
                "/v1/messages",
                cast_to=httpx2.Response,
                body={**body, "stream": True},
                options={"headers": dict(headers)} if headers else {},
                stream=True,
            )
        except _CALL_ERRORS as exc:
            raise self._proxy_error(exc, streaming=False) from None
        async with response_objects(
            response,
            self.name,
            functools.partial(_event_objects, response=response),
            done=None,
            errors=_STREAM_ERRORS,
            to_proxy_error=self._stream_error,
        ) as events:
            yield events

    # --- request ---------------------------------------------------------------------------

    def _params(self, request: ChatRequest) -> JSONDict:
        system, turns = _conversation(request.messages, self.name)
        options = request.options
        params: JSONDict = {
            "model": request.model,
            "max_tokens": options.max_tokens or self._default_max_tokens,
            "messages": turns,
        }
        if system:
            params["system"] = system
        if request.tools:
            params["tools"] = [_tool_param(tool) for tool in request.tools]
            if options.tool_choice:
                params["tool_choice"] = _TOOL_CHOICES.get(
                    options.tool_choice, {"type": "tool", "name": options.tool_choice}
                )
        if options.stop:
            params["stop_sequences"] = options.stop
        sampling = {
            key: value
            for key, value in (("temperature", options.temperature), ("top_p", options.top_p))
            if value is not None
        }
        if sampling:
            params["extra_body"] = sampling
        return params

    # --- response --------------------------------------------------------------------------

    def _message(self, request: ChatRequest, message: Message) -> AssistantMessage:
        text = "".join(block.text for block in message.content if isinstance(block, TextBlock))
        calls = [
            ToolCall(
                id=block.id,
                function=FunctionCall(name=block.name, arguments=arguments_json(block.input)),
            )
            for block in message.content
            if isinstance(block, ToolUseBlock)
        ]
        usage = message.usage
        details = usage.output_tokens_details
        return AssistantMessage(
            content=text if text or not calls else None,
            tool_calls=calls or None,
            usage=_usage(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cache_read=usage.cache_read_input_tokens,
                cache_creation=usage.cache_creation_input_tokens,
                thinking=details.thinking_tokens if details else None,
            ),
            metadata=ResponseMetadata(
                provider=self.name,
                model=message.model or request.model,
                finish_reason=_finish_reason(message.stop_reason),
            ),
        )

    # --- errors ----------------------------------------------------------------------------

    def _stream_error(self, exc: Exception) -> ProxyError:
        return self._proxy_error(exc, streaming=True)

    def _proxy_error(self, exc: Exception, *, streaming: bool) -> ProxyError:
        """``streaming`` says the response had started, so a broken connection means a
        truncated answer rather than an unreachable vendor."""
        if isinstance(exc, anthropic.APIStatusError):
            status = exc.status_code
            if status < 400:
                # An ``event: error`` inside a 200 stream; its type says what went wrong.
                status = _STATUS_BY_ERROR_TYPE.get(_error_type(exc.body), 0)
                if not status:
                    return broken_stream_error(self.name)
            return status_error(
                self.name,
                status,
                body=exc.body,
                headers=exc.response.headers,
                secrets=[self._api_key],
            )
        if isinstance(exc, anthropic.APITimeoutError | httpx2.TimeoutException):
            return timeout_error(self.name)
        if isinstance(exc, anthropic.APIConnectionError | httpx2.TransportError) and not streaming:
            return unavailable_error(self.name)
        if streaming:
            return broken_stream_error(self.name)
        return malformed_response_error(self.name)


async def _event_objects(
    events: AsyncGenerator[tuple[str, JSONDict], None], response: httpx2.Response
) -> AsyncGenerator[JSONDict, None]:
    """The events but ``ping``; an ``error`` event midway raises as the SDK's reader did (its
    error type then decides the wire error, see ``_proxy_error``)."""
    async with aclosing(events):
        async for name, event in events:
            kind = event.get("type", name)
            if kind == "ping":
                continue
            if kind == "error":
                raise anthropic.APIStatusError(
                    "an error event in the stream", response=response, body=event
                )
            yield event


class _EventReader:
    """Turns stream events into wire events and keeps what is only complete at the end:
    the stop reason and the usage, whose input half comes first and output half last."""

    def __init__(self) -> None:
        #: Content block index -> position among the tool calls (the wire ``index``).
        self._tool_index: dict[int, int] = {}
        #: Tool blocks that got no argument fragments yet, with the input they started with.
        self._pending_input: dict[int, object] = {}
        self._tokens: dict[str, int | None] = {}
        self.stop_reason: str | None = None
        self.stopped = False

    def events(self, event: RawMessageStreamEvent) -> list[UpstreamEvent]:
        if isinstance(event, RawMessageStartEvent):
            self._start(event)
        elif isinstance(event, RawContentBlockStartEvent):
            return self._block_start(event)
        elif isinstance(event, RawContentBlockDeltaEvent):
            return self._block_delta(event)
        elif isinstance(event, RawContentBlockStopEvent):
            return self._block_stop(event.index)
        elif isinstance(event, RawMessageDeltaEvent):
            self._delta(event)
        elif isinstance(event, RawMessageStopEvent):
            self.stopped = True
        return []

    def usage(self) -> Usage | None:
        if not self._tokens:
            return None
        return _usage(
            input_tokens=self._tokens.get("input") or 0,
            output_tokens=self._tokens.get("output") or 0,
            cache_read=self._tokens.get("cache_read"),
            cache_creation=self._tokens.get("cache_creation"),
            thinking=self._tokens.get("thinking"),
        )

    def _start(self, event: RawMessageStartEvent) -> None:
        usage = event.message.usage
        details = usage.output_tokens_details
        self._count(
            input=usage.input_tokens,
            output=usage.output_tokens,
            cache_read=usage.cache_read_input_tokens,
            cache_creation=usage.cache_creation_input_tokens,
            thinking=details.thinking_tokens if details else None,
        )

    def _delta(self, event: RawMessageDeltaEvent) -> None:
        if event.delta.stop_reason is not None:
            self.stop_reason = event.delta.stop_reason
        usage = event.usage
        details = usage.output_tokens_details
        # The delta's counts are cumulative; input counts appear here only on newer API
        # versions, so the ones from message_start stay when they are absent.
        self._count(
            input=usage.input_tokens,
            output=usage.output_tokens,
            cache_read=usage.cache_read_input_tokens,
            cache_creation=usage.cache_creation_input_tokens,
            thinking=details.thinking_tokens if details else None,
        )

    def _count(self, **counts: int | None) -> None:
        for key, value in counts.items():
            if value is not None or key not in self._tokens:
                self._tokens[key] = value

    def _block_start(self, event: RawContentBlockStartEvent) -> list[UpstreamEvent]:
        block = event.content_block
        if isinstance(block, TextBlock):
            return [DeltaEvent(content=block.text)] if block.text else []
        if not isinstance(block, ToolUseBlock):
            return []
        index = len(self._tool_index)
        self._tool_index[event.index] = index
        self._pending_input[event.index] = block.input
        return [ToolCallEvent(index=index, id=block.id, name=block.name)]

    def _block_delta(self, event: RawContentBlockDeltaEvent) -> list[UpstreamEvent]:
        delta = event.delta
        if isinstance(delta, TextDelta):
            return [DeltaEvent(content=delta.text)] if delta.text else []
        index = self._tool_index.get(event.index)
        if not isinstance(delta, InputJSONDelta) or index is None or not delta.partial_json:
            return []
        self._pending_input.pop(event.index, None)
        return [ToolCallEvent(index=index, arguments_delta=delta.partial_json)]

    def _block_stop(self, block_index: int) -> list[UpstreamEvent]:
        """A tool block that got no fragments (a call without arguments) still gets its
        arguments, so a streamed call reads the same as the non-streamed ``"{}"``."""
        if block_index not in self._pending_input:
            return []
        start_input = self._pending_input.pop(block_index)
        index = self._tool_index[block_index]
        return [ToolCallEvent(index=index, arguments_delta=arguments_json(start_input or {}))]


def _conversation(messages: Iterable[UniversalMessage], vendor: str) -> tuple[str, list[JSONDict]]:
    """The top-level system text and the alternating turns."""
    system: list[str] = []
    turns: list[JSONDict] = []
    for message in messages:
        if message.role == "system":
            system.append(message.content or "")
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message, vendor)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        # The API wants tool results before any text in a user turn.
        turn["content"].sort(key=lambda block: block["type"] != "tool_result")
    return "\n\n".join(part for part in system if part), turns


def _blocks(message: UniversalMessage, vendor: str) -> list[JSONDict]:
    """The content blocks of one message. Empty text is left out: the API rejects empty
    text blocks."""
    if message.role == "tool":
        result: JSONDict = {"type": "tool_result", "tool_use_id": message.tool_call_id}
        if message.content:
            result["content"] = message.content
        return [result]
    blocks: list[JSONDict] = []
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    for call in message.tool_calls or []:
        blocks.append(
            {
                "type": "tool_use",
                "id": call.id,
                "name": call.function.name,
                "input": tool_arguments(call, vendor),
            }
        )
    return blocks


def _tool_param(tool: ToolSchema) -> JSONDict:
    param: JSONDict = {"name": tool.name, "input_schema": tool.parameters}
    if tool.description:
        param["description"] = tool.description
    return param


def _usage(
    *,
    input_tokens: int,
    output_tokens: int,
    cache_read: int | None,
    cache_creation: int | None,
    thinking: int | None,
) -> Usage:
    """Anthropic counts cached input apart from ``input_tokens`` (which is only the input
    that neither read nor wrote the cache); the contract's prompt tokens are all of the input,
    as with OpenAI, with the cache reads and writes named inside them because each is billed
    at its own price. ``output_tokens`` already includes the thinking tokens."""
    prompt = input_tokens + (cache_read or 0) + (cache_creation or 0)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=output_tokens,
        total_tokens=prompt + output_tokens,
        cached_prompt_tokens=cache_read,
        cache_write_tokens=cache_creation,
        reasoning_tokens=thinking,
    )


def _error_type(body: object) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return kind if isinstance(kind, str) else ""


def _finish_reason(reason: str | None) -> FinishReason:
    return _FINISH_REASONS.get(reason or "end_turn", "stop")
