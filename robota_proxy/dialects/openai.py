"""OpenAI Chat Completions as a dialect: what ``/v1/chat/completions`` reads and writes.

Read: a ``chat.completions.create`` body becomes the universal ``ChatRequest`` the chain
sees (auth, limits, metering and cache work on it), and the body itself is kept for a
passthrough when the target speaks OpenAI's wire (``native``). Crossing to another vendor,
a field the translation cannot carry is refused with a 400 whose ``param`` names it
(``messages.2.content.1``, ``seed``) rather than dropped, because dropping it would change
the answer; fields that never change the answer (``user``, ``metadata``, ``store``) are let
go. Written: an ``AssistantMessage`` as a ``chat.completion``, wire stream events as
``chat.completion.chunk`` frames (usage after the finish chunk, then ``[DONE]``; a failure
midway as an in-band ``{"error": ...}`` frame), and a ``ProxyError`` in OpenAI's error shape
and status, with the ``x-should-retry`` header the SDK obeys when a retry cannot help.
"""

from __future__ import annotations

import time
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
from robota_proxy.errors import InvalidRequest, ProxyError

VENDOR = "openai"
#: Fields translated into the ``ChatRequest`` (or read by the route: stream, stream_options).
_TRANSLATED = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "tools",
        "tool_choice",
        "response_format",
        "n",
        "parallel_tool_calls",
    }
)
#: Fields that never change the answer: let go when the target is another vendor.
_IGNORABLE = frozenset({"user", "metadata", "store"})
#: Providers whose adapter honours ``response_format: json_object``.
_JSON_MODE = frozenset({"openai", "google"})
_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
#: Keys an assistant message from the SDK's own answer carries, empty, when sent back.
_EMPTY_OK = frozenset({"refusal", "annotations", "audio", "function_call"})

#: OpenAI's error ``type`` for each wire code; the ``code`` is the wire code itself.
_ERROR_TYPES = {
    "invalid_request": "invalid_request_error",
    "unauthenticated": "authentication_error",
    "forbidden": "permission_error",
    "not_found": "invalid_request_error",
    "payload_too_large": "invalid_request_error",
    "rate_limited": "rate_limit_error",
    "quota_exceeded": "insufficient_quota",
    "budget_exceeded": "insufficient_quota",
}
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {message}", param=param)


# --- reading --------------------------------------------------------------------------------


def parse(body: bytes, router: ModelRouter) -> ParsedChat:
    """The body as a ``ChatRequest`` routed by ``router``; raises ``InvalidRequest`` naming
    the OpenAI field at fault."""
    if not body.strip():
        raise InvalidRequest("the request body is empty; send a chat.completions JSON object")
    raw = parse_json(body)
    if not isinstance(raw, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "a model name is required, such as 'gpt-4o-mini'")
    routed = router(model, VENDOR)
    native = routed.native
    if not native:
        _refuse_untranslatable(raw, routed.provider)
    messages = raw.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of messages is required")
    universal = [_message(item, f"messages.{i}", native) for i, item in enumerate(messages)]
    tools = _tools(raw.get("tools"), native)
    stream = raw.get("stream")
    if stream not in (None, True, False):
        raise _bad("stream", "must be true or false")
    try:
        options = ChatOptions(
            temperature=raw.get("temperature"),
            top_p=raw.get("top_p"),
            max_tokens=_max_tokens(raw),
            stop=raw.get("stop"),
            tool_choice=_tool_choice(raw.get("tool_choice")),
            response_format=_response_format(raw.get("response_format"), routed.provider, native),
        )
        request = ChatRequest(
            provider=routed.provider,
            model=routed.model,
            messages=universal,
            options=options,
            tools=tools,
        )
    except ValidationError as exc:
        raise _validation_error(exc, raw) from None
    return ParsedChat(request, raw, streamed=stream is True, native=native)


def _refuse_untranslatable(raw: Mapping[str, Any], provider: str) -> None:
    for name, value in raw.items():
        if name in _TRANSLATED or name in _IGNORABLE or value is None:
            continue
        raise _bad(name, f"not supported when the model is served by {provider!r}")
    if raw.get("n") not in (None, 1):
        raise _bad("n", f"only n=1 is supported when the model is served by {provider!r}")
    if raw.get("parallel_tool_calls") is False:
        raise _bad("parallel_tool_calls", f"false is not supported when served by {provider!r}")


def _text(content: Any, param: str, native: bool, role: str) -> str | None:
    """A message's content as text: a string, or text parts joined. Other parts (images,
    audio, files) only reach a target that speaks OpenAI's wire."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(param, "must be a string or a list of content parts")
    pieces: list[str] = []
    for index, part in enumerate(content):
        where = f"{param}.{index}"
        if not isinstance(part, dict):
            raise _bad(where, "a content part must be an object")
        kind = part.get("type")
        if kind == "text" or (kind == "refusal" and role == "assistant"):
            value = part.get(kind)
            if not isinstance(value, str):
                raise _bad(f"{where}.{kind}", "must be a string")
            pieces.append(value)
        elif native:
            continue  # passed through as sent; the ChatRequest keeps the text only
        else:
            raise _bad(
                where,
                f"a {kind!r} content part cannot be translated for this model's provider; "
                "only text parts can (images reach OpenAI-compatible models)",
            )
    return "\n".join(pieces)


def _message(item: Any, param: str, native: bool) -> UniversalMessage:
    if not isinstance(item, dict):
        raise _bad(param, "a message must be an object")
    role = item.get("role")
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant", "tool"):
        raise _bad(f"{param}.role", "must be system, developer, user, assistant or tool")
    if not native:
        for key, value in item.items():
            if key in _MESSAGE_KEYS or (value in (None, []) and key in _EMPTY_OK):
                continue
            raise _bad(f"{param}.{key}", "not supported when the model is another vendor's")
    content = _text(item.get("content"), f"{param}.content", native, role)
    calls = _calls(item.get("tool_calls"), f"{param}.tool_calls") if role == "assistant" else None
    name = item.get("name")
    try:
        return UniversalMessage(
            role=role,
            content=content if content is not None or role == "assistant" else "",
            tool_calls=calls,
            tool_call_id=item.get("tool_call_id"),
            name=name if isinstance(name, str) and role != "tool" else None,
        )
    except ValidationError as exc:
        problem = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
        raise _bad(param, problem.replace("toolCallId", "tool_call_id")) from None


def _calls(value: Any, param: str) -> list[ToolCall] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _bad(param, "must be a list")
    calls = []
    for index, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _bad(f"{param}.{index}.function", "a function call needs a name")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str) or not isinstance(call.get("id"), str):
            raise _bad(f"{param}.{index}", "a tool call needs a string id and arguments")
        named = FunctionCall(name=function["name"], arguments=arguments)
        calls.append(ToolCall(id=call["id"], function=named))
    return calls or None


def _tools(value: Any, native: bool) -> list[ToolSchema] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _bad("tools", "must be a list")
    tools = []
    for index, tool in enumerate(value):
        param = f"tools.{index}"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise _bad(f"{param}.type", "only function tools are supported")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _bad(f"{param}.function", "a function tool needs a function object")
        if function.get("strict") and not native:
            raise _bad(f"{param}.function.strict", "strict schemas need an OpenAI model")
        try:
            tools.append(
                ToolSchema(
                    name=function.get("name"),
                    description=function.get("description") or "",
                    parameters=function.get("parameters") or {"type": "object", "properties": {}},
                )
            )
        except ValidationError as exc:
            loc = exc.errors(include_url=False)[0]
            field = ".".join(str(part) for part in loc["loc"])
            raise _bad(f"{param}.function.{field}", loc["msg"]) from None
    return tools or None


def _max_tokens(raw: Mapping[str, Any]) -> Any:
    newer = raw.get("max_completion_tokens")
    return newer if newer is not None else raw.get("max_tokens")


def _tool_choice(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        function = value.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return str(function["name"])
    raise _bad("tool_choice", "must be auto, none, required or {type: function, function: {name}}")


def _response_format(value: Any, provider: str, native: bool) -> str | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        if native or provider in _JSON_MODE:
            return "json"
        raise _bad("response_format", f"JSON mode is not available for provider {provider!r}")
    if kind == "json_schema":
        if native:
            return "json"  # the schema itself is in the passed-through body
        raise _bad(
            "response_format.json_schema",
            f"structured outputs need an OpenAI-compatible model, not provider {provider!r}",
        )
    raise _bad("response_format.type", "must be text, json_object or json_schema")


#: ``ChatRequest`` field paths -> the OpenAI field a caller wrote.
_OPTION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "stop": "stop"}


def _validation_error(exc: ValidationError, raw: Mapping[str, Any]) -> InvalidRequest:
    item = exc.errors(include_url=False)[0]
    loc = [str(part) for part in item["loc"]]
    message = item["msg"].removeprefix("Value error, ")
    if loc[:1] == ["max_tokens"] or loc[-1:] == ["max_tokens"]:
        field = "max_completion_tokens" if "max_completion_tokens" in raw else "max_tokens"
    elif loc and loc[-1] in _OPTION_FIELDS:
        field = _OPTION_FIELDS[loc[-1]]
    elif "toolChoice" in message or loc[-1:] == ["tool_choice"]:
        field, message = "tool_choice", message.replace("toolChoice", "tool_choice")
    else:
        field = ".".join(loc) or "model"
    return _bad(field, message)


# --- writing --------------------------------------------------------------------------------


def completion_id(request_id: str) -> str:
    return "chatcmpl-" + request_id.removeprefix("req_")


def usage_json(usage: Usage) -> dict[str, Any]:
    """``usage`` in OpenAI's terms: cached input and reasoning as its ``*_details``."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens or 0},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens or 0},
    }


def _calls_json(calls: list[ToolCall] | None) -> list[dict[str, Any]] | None:
    if not calls:
        return None
    return [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": call.function.name, "arguments": call.function.arguments},
        }
        for call in calls
    ]


def completion(message: AssistantMessage, *, model: str, request_id: str) -> dict[str, Any]:
    """An ``AssistantMessage`` as a ``chat.completion`` object."""
    body: dict[str, Any] = {"role": "assistant", "content": message.content, "refusal": None}
    calls = _calls_json(message.tool_calls)
    if calls:
        body["tool_calls"] = calls
    reason = message.metadata.finish_reason or "stop"
    answer: dict[str, Any] = {
        "id": completion_id(request_id),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": body,
                "logprobs": None,
                "finish_reason": _FINISH.get(reason, reason),
            }
        ],
        "system_fingerprint": None,
    }
    if message.usage is not None:
        answer["usage"] = usage_json(message.usage)
    return answer


def sse(data: Any) -> bytes:
    """One SSE frame of compact JSON (or the literal ``[DONE]``)."""
    payload = data.encode() if isinstance(data, str) else pydantic_core.to_json(data)
    return b"data: " + payload + b"\n\n"


DONE_FRAME = b"data: [DONE]\n\n"


class ChunkWriter:
    """Wire stream events -> ``chat.completion.chunk`` frames, in OpenAI's order: a role
    chunk, content and tool-call deltas (``index``, with ``id``, ``type`` and ``name`` on a
    call's first piece), a finish chunk, the usage chunk (``choices: []``, only with
    ``stream_options.include_usage``; other chunks then carry ``usage: null``), ``[DONE]``."""

    def __init__(self, *, request_id: str, model: str, include_usage: bool) -> None:
        self._base: dict[str, Any] = {
            "id": completion_id(request_id),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
        }
        if include_usage:
            self._base["usage"] = None
        self.include_usage = include_usage
        self._usage: Usage | None = None

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**self._base, "choices": [choice]})

    def start(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def resume(self, chunk: dict[str, Any], model: str) -> None:
        """Write on in a stream already begun by someone else (a passed-through answer that
        broke and is continued): its chunks' id and creation time carry on; ``model`` is the
        one that writes the rest."""
        for key in ("id", "created", "system_fingerprint"):
            if key in chunk:
                self._base[key] = chunk[key]
        self._base["model"] = model

    def finish(self, reason: FinishReason) -> bytes:
        """The finish chunk, the usage chunk when asked for, ``[DONE]``."""
        frames = self._chunk({}, _FINISH.get(reason, reason))
        if self.include_usage and self._usage is not None:
            frames += sse({**self._base, "choices": [], "usage": usage_json(self._usage)})
        return frames + DONE_FRAME

    def event(self, event: StreamEvent) -> bytes:
        if isinstance(event, DeltaEvent):
            return self._chunk({"content": event.content})
        if isinstance(event, ToolCallEvent):
            call: dict[str, Any] = {"index": event.index}
            if event.id is not None:
                call["id"] = event.id
                call["type"] = "function"
                call["function"] = {"name": event.name or "", "arguments": event.arguments_delta}
            else:
                call["function"] = {"arguments": event.arguments_delta}
            return self._chunk({"tool_calls": [call]})
        if isinstance(event, UsageEvent):
            self._usage = event.usage  # sent after the finish chunk, as OpenAI does
            return b""
        if isinstance(event, DoneEvent):
            return self.finish(event.finish_reason)
        if isinstance(event, ErrorEvent):
            return error_frame(event)
        return b""  # ``restart``: only the Robota surface asks for continued streams


def error_frame(event: ErrorEvent) -> bytes:
    """A failure after the stream started: an in-band error the SDK raises as ``APIError``."""
    detail = {
        "message": event.message,
        "type": "server_error" if event.code.startswith("upstream") else event.code,
        "param": None,
        "code": event.code,
    }
    return sse({"error": detail})


def error_body(error: ProxyError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(error.code, "server_error" if error.status >= 500 else "api_error")
    return {
        "error": {
            "message": error.message,
            "type": kind,
            "param": error.param,
            "code": error.code,
        }
    }


def render_error(error: ProxyError, request_id: str | None) -> tuple[bytes, dict[str, str]]:
    """OpenAI's error shape; ``x-should-retry: false`` when the SDK's own retry would only
    repeat what the proxy already did (an upstream failure it retried) or cannot help (a
    monthly quota)."""
    headers: dict[str, str] = {}
    if error.upstream_attempts is not None or error.code in ("quota_exceeded", "budget_exceeded"):
        headers["x-should-retry"] = "false"
    return pydantic_core.to_json(error_body(error)), headers
