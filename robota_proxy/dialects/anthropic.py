"""Anthropic Messages as a dialect: what ``/v1/messages`` and ``count_tokens`` read and write.

Read: a ``messages.create`` body becomes the universal ``ChatRequest`` the chain sees (auth,
limits, metering), and the body itself is kept so that a target speaking Anthropic's wire gets
it passed through with only the model rewritten: thinking blocks and their signatures,
``cache_control`` breakpoints, images and documents reach Anthropic exactly as sent. For that
passthrough the ``ChatRequest`` is only the chain's view of the call (its prompt bound, its
model, its tools): blocks it has no shape for are carried as their JSON text, so the budget's
worst case still counts them. Crossing to another vendor, a field or block the translation
cannot carry is refused with a 400 whose ``param`` names it (``messages.1.content.0``,
``thinking``, ``top_k``) rather than dropped, because dropping it would change the answer; what
never changes the answer (``metadata``, ``cache_control`` hints, ``service_tier``) is let go.

Written: an ``AssistantMessage`` as a ``message`` object; wire stream events as Anthropic's SSE
sequence (``message_start``, ``ping``, ``content_block_start/delta/stop`` for text and
``tool_use`` with ``input_json_delta``, ``message_delta`` with the cumulative usage,
``message_stop``; a failure midway as an in-band ``event: error``); usage by token kind
(Anthropic's ``input_tokens`` leaves out the cache reads and writes, the contract's
``promptTokens`` holds them); a ``ProxyError`` in Anthropic's error shape, with the
``x-should-retry`` header the SDK obeys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pydantic_core
from pydantic import ValidationError

from robota_client.messages import (
    AssistantMessage,
    ChatOptions,
    ChatRequest,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    FinishReason,
    FunctionCall,
    StreamEvent,
    ToolCall,
    ToolCallEvent,
    ToolSchema,
    UniversalMessage,
    Usage,
    UsageEvent,
)
from robota_proxy.chat_body import parse_json
from robota_proxy.dialects import ModelRouter, ParsedChat
from robota_proxy.errors import InvalidRequest, ProxyError, UpstreamError

VENDOR = "anthropic"
MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
#: Request headers a passthrough forwards to Anthropic as the caller sent them.
FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")

#: Fields translated into the ``ChatRequest`` (or read by the route: ``stream``).
_TRANSLATED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stream",
        "temperature",
        "top_p",
        "stop_sequences",
        "tools",
        "tool_choice",
    }
)
#: Fields that never change the answer: let go when the target is another vendor.
#: (``metadata.user_id`` is Anthropic's abuse-tracking id; ``service_tier`` a billing choice.)
_IGNORABLE = frozenset({"metadata", "service_tier"})
#: Keys of a block that are hints to Anthropic's infrastructure, not content.
_BLOCK_HINTS = frozenset({"cache_control", "citations"})

_STOP_REASONS: dict[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
    "error": "end_turn",
}
_FINISH_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

#: Anthropic's error ``type`` for each wire code (the types its SDK maps to exceptions by
#: status: 401 ``AuthenticationError``, 403 ``PermissionDeniedError``, 429 ``RateLimitError``).
_ERROR_TYPES: dict[str, str] = {
    "invalid_request": "invalid_request_error",
    "unauthenticated": "authentication_error",
    "budget_exceeded": "billing_error",
    "forbidden": "permission_error",
    "not_found": "not_found_error",
    "payload_too_large": "request_too_large",
    "rate_limited": "rate_limit_error",
    "quota_exceeded": "rate_limit_error",
    "upstream_error": "api_error",
    "upstream_unavailable": "overloaded_error",
    "upstream_timeout": "timeout_error",
    "internal_error": "api_error",
}


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {message}", param=param)


def _untranslatable(param: str, what: str, provider: str) -> InvalidRequest:
    return _bad(
        param,
        f"{what} cannot be translated for provider {provider!r}; it reaches Anthropic models "
        "only (name one, e.g. anthropic/claude-...)",
    )


# --- reading --------------------------------------------------------------------------------


def _object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise InvalidRequest("the request body is empty; send a messages JSON object")
    raw = parse_json(body)
    if not isinstance(raw, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return raw


def parse(body: bytes, router: ModelRouter) -> ParsedChat:
    """A ``messages.create`` body as a ``ChatRequest`` routed by ``router``; raises
    ``InvalidRequest`` naming the Anthropic field at fault."""
    raw = _object(body)
    max_tokens = raw.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _bad("max_tokens", "a positive whole number is required")
    return _parse(raw, router, count_only=False)


def parse_count_tokens(body: bytes, router: ModelRouter) -> ParsedChat:
    """A ``messages.count_tokens`` body: the same as a message without ``max_tokens``. A
    count never calls a model, so nothing is refused for being untranslatable: the estimate
    counts every block as its JSON text."""
    return _parse(_object(body), router, count_only=True)


def _parse(raw: dict[str, Any], router: ModelRouter, *, count_only: bool) -> ParsedChat:
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "a model name is required, such as 'claude-sonnet-4-5'")
    routed = router(model, VENDOR)
    lenient = routed.native or count_only
    if not lenient:
        refuse_untranslatable(raw, routed.provider)
    stream = raw.get("stream")
    if stream not in (None, True, False):
        raise _bad("stream", "must be true or false")
    request = to_chat_request(raw, routed.provider, routed.model, lenient=lenient)
    return ParsedChat(request, raw, streamed=stream is True, native=routed.native)


def refuse_untranslatable(raw: Mapping[str, Any], provider: str) -> None:
    """Raise for a top-level field a non-Anthropic ``provider`` cannot honour."""
    for name, value in raw.items():
        if name in _TRANSLATED or name in _IGNORABLE or value is None:
            continue
        if name == "thinking" and isinstance(value, dict) and value.get("type") == "disabled":
            continue
        raise _untranslatable(name, f"{name!r}", provider)
    choice = raw.get("tool_choice")
    if isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True:
        raise _untranslatable(
            "tool_choice.disable_parallel_tool_use", "disable_parallel_tool_use", provider
        )


def to_chat_request(
    raw: Mapping[str, Any], provider: str, model: str, *, lenient: bool
) -> ChatRequest:
    """The universal request for ``raw`` sent to ``provider``/``model``. ``lenient``: the
    body is passed through as it is (or only counted), so a block without a universal shape
    is carried as its JSON text; otherwise it is a 400 naming it."""
    messages = raw.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of messages is required")
    universal: list[UniversalMessage] = []
    system = _system(raw.get("system"), provider, lenient)
    if system is not None:
        universal.append(UniversalMessage(role="system", content=system))
    for index, item in enumerate(messages):
        universal += _message(item, f"messages.{index}", provider, lenient)
    tools = _tools(raw.get("tools"), provider, lenient)
    try:
        options = ChatOptions(
            temperature=_number(raw, "temperature", 1.0),
            top_p=_number(raw, "top_p", 1.0),
            max_tokens=raw.get("max_tokens"),
            stop=_stop_sequences(raw.get("stop_sequences")),
            tool_choice=_tool_choice(raw.get("tool_choice")),
        )
        return ChatRequest(
            provider=provider, model=model, messages=universal, options=options, tools=tools
        )
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _number(raw: Mapping[str, Any], name: str, top: float) -> float | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= top:
        raise _bad(name, f"must be a number between 0 and {top:g}")
    return float(value)


def _stop_sequences(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _bad("stop_sequences", "must be a list of strings")
    return value or None


def _system(value: Any, provider: str, lenient: bool) -> str | None:
    """``system`` as a string or a list of text blocks (whose ``cache_control`` is a hint)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if not isinstance(value, list):
        raise _bad("system", "must be a string or a list of text blocks")
    pieces: list[str] = []
    for index, block in enumerate(value):
        param = f"system.{index}"
        if not isinstance(block, dict):
            raise _bad(param, "a system block must be an object")
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            if not lenient:
                raise _untranslatable(param, f"a {block.get('type')!r} system block", provider)
            pieces.append(_opaque(block))
            continue
        pieces.append(block["text"])
    return "\n\n".join(piece for piece in pieces if piece) or None


def _opaque(block: Mapping[str, Any]) -> str:
    """A block the universal request has no shape for, as the chain sees it in a passthrough:
    its JSON text, so the prompt bound counts it and two different blocks never look alike."""
    return json.dumps(block, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _blocks(content: Any, param: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _bad(param, "must be a string or a list of content blocks")
    for index, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _bad(f"{param}.{index}", "a content block must be an object with a type")
    return content


def _message(item: Any, param: str, provider: str, lenient: bool) -> list[UniversalMessage]:
    """One Anthropic turn as universal messages: a user turn's ``tool_result`` blocks become
    tool messages (first, as the tool results answer the previous turn), its text a user
    message; an assistant turn's ``tool_use`` blocks become its tool calls."""
    if not isinstance(item, dict):
        raise _bad(param, "a message must be an object")
    role = item.get("role")
    if role not in ("user", "assistant"):
        raise _bad(f"{param}.role", "must be 'user' or 'assistant'")
    blocks = _blocks(item.get("content"), f"{param}.content")
    texts: list[str] = []
    calls: list[ToolCall] = []
    results: list[UniversalMessage] = []
    for index, block in enumerate(blocks):
        where = f"{param}.content.{index}"
        kind = block["type"]
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_use(block, where))
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block, where, provider, lenient))
        elif lenient:
            texts.append(_opaque(block))
        else:
            raise _untranslatable(where, f"a {kind!r} block", provider)
    out = results
    text = "\n\n".join(texts)
    if role == "assistant":
        if text or calls:
            out.append(
                UniversalMessage(role="assistant", content=text or None, tool_calls=calls or None)
            )
    elif text or not results:
        out.append(UniversalMessage(role="user", content=text))
    return out


def _tool_use(block: Mapping[str, Any], param: str) -> ToolCall:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"{param}.id", "a tool_use block needs a string id")
    if not isinstance(name, str) or not name:
        raise _bad(f"{param}.name", "a tool_use block needs a name")
    if not isinstance(arguments, dict):
        raise _bad(f"{param}.input", "must be an object")
    text = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
    return ToolCall(id=call_id, function=FunctionCall(name=name, arguments=text))


def _tool_result(
    block: Mapping[str, Any], param: str, provider: str, lenient: bool
) -> UniversalMessage:
    """A ``tool_result`` as a tool message. Its content is a string or text blocks; an
    ``is_error`` result is marked in the text, the one place other vendors can see it."""
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"{param}.tool_use_id", "a tool_result block needs the id of its tool_use")
    content = block.get("content", "")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        pieces = []
        for index, part in enumerate(content):
            where = f"{param}.content.{index}"
            if isinstance(part, dict) and part.get("type") == "text":
                pieces.append(str(part.get("text", "")))
            elif lenient and isinstance(part, dict):
                pieces.append(_opaque(part))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _untranslatable(where, f"a {kind!r} block in a tool result", provider)
        text = "\n\n".join(pieces)
    else:
        raise _bad(f"{param}.content", "must be a string or a list of blocks")
    if block.get("is_error") is True:
        text = f"Error: {text}"
    return UniversalMessage(role="tool", tool_call_id=call_id, content=text)


def _tools(value: Any, provider: str, lenient: bool) -> list[ToolSchema] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _bad("tools", "must be a list")
    tools: list[ToolSchema] = []
    for index, tool in enumerate(value):
        param = f"tools.{index}"
        if not isinstance(tool, dict):
            raise _bad(param, "a tool must be an object")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            # A server tool (web search, code execution, ...): Anthropic runs it itself.
            if lenient:
                continue
            raise _untranslatable(f"{param}.type", f"the server tool {kind!r}", provider)
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise _bad(f"{param}.input_schema", "a tool needs an input_schema object")
        try:
            tools.append(
                ToolSchema(
                    name=tool.get("name"),
                    description=tool.get("description") or "",
                    parameters=schema,
                )
            )
        except ValidationError as exc:
            problem = exc.errors(include_url=False)[0]
            field = ".".join(str(part) for part in problem["loc"])
            raise _bad(f"{param}.{field}", problem["msg"]) from None
    return tools or None


def _tool_choice(value: Any) -> str | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool" and isinstance(value.get("name"), str):
        return str(value["name"])
    raise _bad("tool_choice", "must be {type: auto|any|none} or {type: tool, name}")


def _validation_error(exc: ValidationError) -> InvalidRequest:
    item = exc.errors(include_url=False)[0]
    loc = [str(part) for part in item["loc"]]
    message = item["msg"].removeprefix("Value error, ")
    if "max_tokens" in loc:
        field = "max_tokens"
    elif "toolChoice" in message or "tool_choice" in loc:
        field, message = "tool_choice", message.replace("toolChoice", "tool_choice")
    elif loc[:1] == ["tools"]:
        field = ".".join(loc)
    else:
        field = ".".join(loc) or "messages"
    return _bad(field, message)


def passthrough_body(raw: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The caller's JSON as Anthropic receives it: the same, with the model it routed to."""
    return {**raw, "model": model}


def forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The caller's ``anthropic-version`` and ``anthropic-beta`` headers, for a passthrough:
    a beta the caller opted into (a 1-hour cache, interleaved thinking) must reach Anthropic."""
    return {name: headers[name] for name in FORWARDED_HEADERS if name in headers}


# --- usage ------------------------------------------------------------------------------------


def usage_json(usage: Usage) -> dict[str, Any]:
    """``usage`` in Anthropic's terms: ``input_tokens`` is only the input that neither read
    nor wrote the prompt cache; the two cache kinds are counted beside it."""
    cache_read = usage.cached_prompt_tokens or 0
    cache_write = usage.cache_write_tokens or 0
    return {
        "input_tokens": max(0, usage.prompt_tokens - cache_read - cache_write),
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": cache_read,
    }


def usage_of(usage: Mapping[str, Any]) -> Usage:
    """Anthropic's ``usage`` object as the contract's ``Usage`` (cache tokens inside the
    prompt tokens, priced by kind); thinking is already inside ``output_tokens``."""
    input_tokens = _count(usage.get("input_tokens"))
    cache_read = usage.get("cache_read_input_tokens")
    cache_write = usage.get("cache_creation_input_tokens")
    output = _count(usage.get("output_tokens"))
    details = usage.get("output_tokens_details")
    thinking = details.get("thinking_tokens") if isinstance(details, dict) else None
    prompt = input_tokens + _count(cache_read) + _count(cache_write)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=output,
        total_tokens=prompt + output,
        cached_prompt_tokens=_count(cache_read) if cache_read is not None else None,
        cache_write_tokens=_count(cache_write) if cache_write is not None else None,
        reasoning_tokens=_count(thinking) if thinking is not None else None,
    )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class UsageTracker:
    """Follows the usage of a passed-through stream: ``message_start`` carries the input
    counts, ``message_delta`` the cumulative totals (overwriting; a count it leaves out keeps
    its ``message_start`` value, as the SDK's own accumulator does)."""

    def __init__(self) -> None:
        self._counts: dict[str, Any] = {}
        self.stop_reason: str | None = None
        self.stopped = False

    def see(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        usage: Any = None
        if kind == "message_start":
            message = event.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
        elif kind == "message_delta":
            usage = event.get("usage")
            delta = event.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str):
                self.stop_reason = delta["stop_reason"]
        elif kind == "message_stop":
            self.stopped = True
        if isinstance(usage, dict):
            self._counts.update({k: v for k, v in usage.items() if v is not None})

    def usage(self) -> Usage | None:
        return usage_of(self._counts) if self._counts else None


def finish_reason(stop_reason: str | None) -> FinishReason:
    return _FINISH_REASONS.get(stop_reason or "end_turn", "stop")


# --- writing ------------------------------------------------------------------------------------


def message_id(request_id: str) -> str:
    return "msg_" + request_id.removeprefix("req_")


def _input(call: ToolCall) -> Any:
    try:
        return call.parsed_arguments()
    except ValueError:
        raise UpstreamError(
            f"the model's arguments for tool call {call.id!r} are not valid JSON"
        ) from None


def message_json(message: AssistantMessage, *, model: str, request_id: str) -> dict[str, Any]:
    """An ``AssistantMessage`` as an Anthropic ``message`` object."""
    content: list[dict[str, Any]] = []
    if message.content or not message.tool_calls:
        content.append({"type": "text", "text": message.content or ""})
    for call in message.tool_calls or []:
        content.append(
            {"type": "tool_use", "id": call.id, "name": call.function.name, "input": _input(call)}
        )
    reason = message.metadata.finish_reason or "stop"
    return {
        "id": message_id(request_id),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _STOP_REASONS.get(reason, "end_turn"),
        "stop_sequence": None,
        "usage": usage_json(message.usage or Usage()),
    }


def frame(event: Mapping[str, Any]) -> bytes:
    """One SSE frame named after the event's ``type``, as Anthropic sends them."""
    return b"event: " + str(event["type"]).encode() + b"\ndata: " + _json(event) + b"\n\n"


def _json(value: Any) -> bytes:
    return pydantic_core.to_json(value)


PING_FRAME = frame({"type": "ping"})


class EventWriter:
    """Wire stream events -> Anthropic's SSE sequence. Text and each tool call become
    content blocks in the order they arrive (a block is closed when another one starts);
    the usage, known only at the end, goes into ``message_delta`` as cumulative totals
    (``message_start`` carries zeros, which the SDK overwrites from ``message_delta``)."""

    def __init__(self, *, request_id: str, model: str) -> None:
        self._request_id = request_id
        self._model = model
        self._blocks = 0
        #: The index of the open block and whether it is text; ``None``: none open.
        self._open: tuple[int, bool] | None = None
        #: Tool call index (wire) -> content block index.
        self._tool_blocks: dict[int, int] = {}
        self._usage: Usage | None = None

    def resume(self, blocks: int, open_text: int | None) -> None:
        """Write on in a stream already begun by someone else (a passed-through answer
        that broke and is continued): ``blocks`` content blocks were started, and the text
        block ``open_text`` is still open (its next text goes on in it)."""
        self._blocks = blocks
        self._open = (open_text, True) if open_text is not None else None

    def start(self) -> bytes:
        message: dict[str, Any] = {
            "id": message_id(self._request_id),
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_json(Usage()),
        }
        return frame({"type": "message_start", "message": message}) + PING_FRAME

    def _open_block(self, block: dict[str, Any], text: bool) -> bytes:
        out = self._close()
        index = self._blocks
        self._blocks += 1
        self._open = (index, text)
        start = {"type": "content_block_start", "index": index, "content_block": block}
        return out + frame(start)

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        index, _ = self._open
        self._open = None
        return frame({"type": "content_block_stop", "index": index})

    def event(self, event: StreamEvent) -> bytes:
        if isinstance(event, DeltaEvent):
            if not event.content:
                return b""
            out = b""
            if self._open is None or not self._open[1]:
                out = self._open_block({"type": "text", "text": ""}, True)
            assert self._open is not None
            delta = {"type": "text_delta", "text": event.content}
            return out + frame(
                {"type": "content_block_delta", "index": self._open[0], "delta": delta}
            )
        if isinstance(event, ToolCallEvent):
            out = b""
            if event.index not in self._tool_blocks:
                block = {"type": "tool_use", "id": event.id or "", "name": event.name or ""}
                out = self._open_block({**block, "input": {}}, False)
                assert self._open is not None
                self._tool_blocks[event.index] = self._open[0]
            if not event.arguments_delta:
                return out
            delta = {"type": "input_json_delta", "partial_json": event.arguments_delta}
            index = self._tool_blocks[event.index]
            return out + frame({"type": "content_block_delta", "index": index, "delta": delta})
        if isinstance(event, UsageEvent):
            self._usage = event.usage
            return b""
        if isinstance(event, DoneEvent):
            return self.finish(event.finish_reason)
        if isinstance(event, ErrorEvent):
            return error_frame(event)
        return b""  # ``restart``: only the Robota surface asks for continued streams

    def finish(self, reason: FinishReason) -> bytes:
        delta = {"stop_reason": _STOP_REASONS.get(reason, "end_turn"), "stop_sequence": None}
        usage = usage_json(self._usage or Usage())
        return (
            self._close()
            + frame({"type": "message_delta", "delta": delta, "usage": usage})
            + frame({"type": "message_stop"})
        )


# --- errors ---------------------------------------------------------------------------------


def error_type(code: str) -> str:
    return _ERROR_TYPES.get(code, "api_error")


def error_body(error: ProxyError, request_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "error",
        "error": {"type": error_type(error.code), "message": error.message},
    }
    if request_id is not None:
        body["request_id"] = request_id
    return body


def error_frame(event: ErrorEvent) -> bytes:
    """A failure after the stream started: the in-band ``event: error`` the SDK raises."""
    body = {"type": "error", "error": {"type": error_type(event.code), "message": event.message}}
    return frame(body)


def render_error(error: ProxyError, request_id: str | None) -> tuple[bytes, dict[str, str]]:
    """Anthropic's error shape, with its ``request-id`` header (the SDK's
    ``exc.request_id``); ``x-should-retry: false`` when the SDK's own retry would only repeat
    what the proxy already did (an upstream failure it retried) or cannot help (a monthly
    quota or budget)."""
    headers: dict[str, str] = {}
    if request_id is not None:
        headers["request-id"] = request_id
    if error.upstream_attempts is not None or error.code in ("quota_exceeded", "budget_exceeded"):
        headers["x-should-retry"] = "false"
    return _json(error_body(error, request_id)), headers
