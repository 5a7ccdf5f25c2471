"""Anthropic Messages API.

The wire contract is OpenAI-shaped, so the conversation is reshaped on the way in: system
messages become the top-level ``system`` text, tool results travel in user turns, and
consecutive messages of one role are merged because the API wants user and assistant turns
to alternate.

``responseFormat: json`` is not mapped: the Messages API has no schema-less JSON mode (its
structured outputs need a JSON Schema), so the option is ignored and the prompt has to ask
for JSON. ``temperature`` and ``top_p`` go out only when the caller sets them.

Not mapped either: extended thinking (thinking blocks are dropped from answers), server
tools and their result blocks, citations, prompt-cache breakpoints and ``top_k``.

Spoken directly over one pooled aiohttp session (``vendor_http``), not through the
``anthropic`` SDK: the request built here is already the wire JSON and answers are read as
the JSON dicts, so the SDK was only an expensive ``post()`` and a pydantic model per stream
event (see ``vendor_http``). What it added on the wire is sent here: the key, as the
``x-api-key`` header Anthropic documents, and the ``anthropic-version`` the SDK pins
(``API_VERSION``); a passthrough caller's own ``anthropic-version`` / ``anthropic-beta``
replace the defaults. The official SDK stays where it is the best judge: as a client of our
Anthropic surface, and as the parser that proves our fake vendor speaks Anthropic's wire (the
tests).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from contextlib import aclosing, asynccontextmanager

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
from robota_proxy.upstreams._convert import (
    JSONDict,
    arguments_json,
    malformed_response_error,
    status_error,
    tool_arguments,
)
from robota_proxy.upstreams.base import FinishEvent, UpstreamEvent
from robota_proxy.upstreams.errors import broken_stream_error
from robota_proxy.upstreams.vendor_http import VendorHTTP

OFFICIAL_BASE_URL = "https://api.anthropic.com"
#: The API version sent unless a passthrough caller names its own: the one the official SDK
#: (2.14) sends, so that leaving the SDK changed nothing Anthropic sees. Stream usage depends
#: on it: input and cache counts in ``message_delta`` come only on newer versions.
API_VERSION = "2026-10-21"
_PATH = "/v1/messages"

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
        max_connections: int = 0,
    ) -> None:
        self.name = "anthropic"
        self._secrets = [api_key]
        self._models = list(models) if models is not None else None
        self._default_max_tokens = default_max_tokens
        self._http = VendorHTTP(
            vendor=self.name,
            # Explicit, so that an ANTHROPIC_BASE_URL in the environment cannot redirect
            # the proxy's key somewhere else.
            base_url=base_url or OFFICIAL_BASE_URL,
            headers={"x-api-key": api_key, "anthropic-version": API_VERSION},
            secrets=self._secrets,
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
        )

    def models(self) -> list[str] | None:
        return list(self._models) if self._models is not None else None

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- calls -----------------------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> AssistantMessage:
        message = await self._http.post_json(_PATH, self._params(request))
        return self._message(request, message)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[UpstreamEvent, None]:
        reader = _EventReader()
        async with self._events(self._params(request), None) as vendor_events:
            async for event in vendor_events:
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
        self, body: JSONDict, headers: Mapping[str, str], *, path: str = _PATH
    ) -> JSONDict:
        """POST the caller's own JSON (its model already rewritten) to ``path`` and return
        Anthropic's JSON answer untouched: thinking blocks, signatures and ``cache_control``
        survive because nothing is translated. ``headers``: the caller's
        ``anthropic-version`` / ``anthropic-beta`` (lower-case names), which replace the
        defaults."""
        return await self._http.post_json(path, body, headers=headers)

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
        """The event objects of one streamed ``/v1/messages`` call (a malformed event is
        skipped, not fatal; ``ping`` is left out), with the vendor's failures mapped to wire
        errors and the response closed however the reading ends. ``headers``: the caller's
        ``anthropic-version`` / ``anthropic-beta`` on a passthrough."""
        async with (
            self._http.post_events(_PATH, {**body, "stream": True}, headers=headers) as events,
            aclosing(_event_objects(events, self.name, self._secrets)) as objects,
        ):
            yield objects

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
        if options.temperature is not None:
            params["temperature"] = options.temperature
        if options.top_p is not None:
            params["top_p"] = options.top_p
        return params

    # --- response --------------------------------------------------------------------------

    def _message(self, request: ChatRequest, message: JSONDict) -> AssistantMessage:
        """A ``message`` object: its text and ``tool_use`` blocks (anything else, thinking
        included, is dropped), usage and stop reason."""
        content = message.get("content")
        if not isinstance(content, list):
            raise malformed_response_error(self.name)
        blocks = [block for block in content if isinstance(block, dict)]
        text = "".join(
            block["text"]
            for block in blocks
            if block.get("type") == "text" and isinstance(block.get("text"), str)
        )
        calls = [
            ToolCall(
                id=block["id"],
                function=FunctionCall(
                    name=block["name"], arguments=arguments_json(block.get("input") or {})
                ),
            )
            for block in blocks
            if _is_tool_use(block)
        ]
        usage = message.get("usage")
        model = message.get("model")
        return AssistantMessage(
            content=text if text or not calls else None,
            tool_calls=calls or None,
            usage=_usage(_counts(usage)) if isinstance(usage, dict) else None,
            metadata=ResponseMetadata(
                provider=self.name,
                model=model if isinstance(model, str) and model else request.model,
                finish_reason=_finish_reason(_str(message.get("stop_reason"))),
            ),
        )


async def _event_objects(
    events: AsyncGenerator[tuple[str, JSONDict], None], vendor: str, secrets: list[str]
) -> AsyncGenerator[JSONDict, None]:
    """The events but ``ping``; an ``error`` event midway raises the wire error its type
    stands for (an unknown type: a broken stream), the key cut out of its message."""
    async with aclosing(events):
        async for name, event in events:
            kind = event.get("type", name)
            if kind == "ping":
                continue
            if kind == "error":
                raise _error_event(event, vendor, secrets)
            yield event


def _error_event(event: JSONDict, vendor: str, secrets: list[str]) -> ProxyError:
    """The wire error for an ``event: error`` inside a stream whose HTTP status was 200."""
    status = _STATUS_BY_ERROR_TYPE.get(_error_type(event), 0)
    if not status:
        return broken_stream_error(vendor)
    return status_error(vendor, status, body=event, headers=None, secrets=secrets)


class _EventReader:
    """Turns stream events (the JSON objects as Anthropic sent them) into wire events and
    keeps what is only complete at the end: the stop reason and the usage, whose input half
    comes first and output half last. An event of a type not read here, or one missing what
    is read from it, gives nothing."""

    def __init__(self) -> None:
        #: Content block index -> position among the tool calls (the wire ``index``).
        self._tool_index: dict[int, int] = {}
        #: Tool blocks that got no argument fragments yet, with the input they started with.
        self._pending_input: dict[int, object] = {}
        self._tokens: dict[str, int | None] = {}
        self.stop_reason: str | None = None
        self.stopped = False

    def events(self, event: JSONDict) -> list[UpstreamEvent]:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._count(_counts(usage))
        elif kind == "content_block_start":
            return self._block_start(event)
        elif kind == "content_block_delta":
            return self._block_delta(event)
        elif kind == "content_block_stop":
            index = _int(event.get("index"))
            return self._block_stop(index) if index is not None else []
        elif kind == "message_delta":
            self._delta(event)
        elif kind == "message_stop":
            self.stopped = True
        return []

    def usage(self) -> Usage | None:
        if not self._tokens:
            return None
        return _usage(self._tokens)

    def _delta(self, event: JSONDict) -> None:
        delta = event.get("delta")
        reason = _str(delta.get("stop_reason")) if isinstance(delta, dict) else None
        if reason is not None:
            self.stop_reason = reason
        usage = event.get("usage")
        # The delta's counts are cumulative; input counts appear here only on newer API
        # versions, so the ones from message_start stay when they are absent.
        if isinstance(usage, dict):
            self._count(_counts(usage))

    def _count(self, counts: dict[str, int | None]) -> None:
        for key, value in counts.items():
            if value is not None or key not in self._tokens:
                self._tokens[key] = value

    def _block_start(self, event: JSONDict) -> list[UpstreamEvent]:
        block = event.get("content_block")
        block_index = _int(event.get("index"))
        if not isinstance(block, dict) or block_index is None:
            return []
        if block.get("type") == "text":
            text = block.get("text")
            return [DeltaEvent(content=text)] if isinstance(text, str) and text else []
        if not _is_tool_use(block):
            return []
        index = len(self._tool_index)
        self._tool_index[block_index] = index
        self._pending_input[block_index] = block.get("input")
        return [ToolCallEvent(index=index, id=block["id"], name=block["name"])]

    def _block_delta(self, event: JSONDict) -> list[UpstreamEvent]:
        delta = event.get("delta")
        block_index = _int(event.get("index"))
        if not isinstance(delta, dict) or block_index is None:
            return []
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            return [DeltaEvent(content=text)] if isinstance(text, str) and text else []
        index = self._tool_index.get(block_index)
        fragment = delta.get("partial_json")
        if kind != "input_json_delta" or index is None or not isinstance(fragment, str):
            return []
        if not fragment:
            return []
        self._pending_input.pop(block_index, None)
        return [ToolCallEvent(index=index, arguments_delta=fragment)]

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


def _is_tool_use(block: JSONDict) -> bool:
    return (
        block.get("type") == "tool_use"
        and isinstance(block.get("id"), str)
        and isinstance(block.get("name"), str)
    )


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _counts(usage: JSONDict) -> dict[str, int | None]:
    """The token counts of a ``usage`` object, ``None`` where it has none."""
    details = usage.get("output_tokens_details")
    return {
        "input": _int(usage.get("input_tokens")),
        "output": _int(usage.get("output_tokens")),
        "cache_read": _int(usage.get("cache_read_input_tokens")),
        "cache_creation": _int(usage.get("cache_creation_input_tokens")),
        "thinking": _int(details.get("thinking_tokens")) if isinstance(details, dict) else None,
    }


def _usage(counts: Mapping[str, int | None]) -> Usage:
    """Anthropic counts cached input apart from ``input_tokens`` (which is only the input
    that neither read nor wrote the cache); the contract's prompt tokens are all of the input,
    as with OpenAI, with the cache reads and writes named inside them because each is billed
    at its own price. ``output_tokens`` already includes the thinking tokens."""
    cache_read = counts.get("cache_read")
    cache_creation = counts.get("cache_creation")
    output = counts.get("output") or 0
    prompt = (counts.get("input") or 0) + (cache_read or 0) + (cache_creation or 0)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=output,
        total_tokens=prompt + output,
        cached_prompt_tokens=cache_read,
        cache_write_tokens=cache_creation,
        reasoning_tokens=counts.get("thinking"),
    )


def _error_type(body: object) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return kind if isinstance(kind, str) else ""


def _finish_reason(reason: str | None) -> FinishReason:
    return _FINISH_REASONS.get(reason or "end_turn", "stop")
