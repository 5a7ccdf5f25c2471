"""The offline ``mock`` provider: deterministic answers with no vendor, key or network.

It exists so that a fresh install answers at once (the quickstart runs against it) and so
that applications can test their tool loops against the proxy for free. Every answer is a
pure function of the request, so the same request always gets the same answer.

What it answers, checked in this order:

* **After tool results** (the last message is a ``tool`` message): one
  ``Tool <name> returned: <content>`` per tool message since the last assistant message, in
  order, joined by ``"; "``. ``<name>`` is the name of the assistant tool call whose id the
  tool message answers (the tool message's own ``name``, else ``unknown``, when no call has
  that id). Finish reason ``stop``.
* **A tool call** (the request has ``tools``, the last message is a ``user`` message and
  ``toolChoice`` is not ``none``): the mock calls tools and sends no text:

  - which tools: the tool named by ``toolChoice`` when it names one; otherwise every tool
    when the user text contains the word ``parallel`` (parallel tool calls, in ``tools``
    order); otherwise every tool the user text mentions, in ``tools`` order: by its whole
    name (case-insensitive), or by a word of its name of at least four letters (names split
    at ``_``, ``-``, ``.`` and lower-to-upper case changes), so that "the weather in Paris
    and the time in Tokyo" calls both ``get_weather`` and ``get_time``; otherwise the first
    tool;
  - arguments, per tool: the properties of the first JSON object written in the user text
    (``weather please {"city": "Paris"}``) that the tool's schema declares (the whole object
    when it declares none), so that a parallel call never hands one tool another's
    arguments. Each *required* property still missing is filled from its schema, so that
    the arguments validate against it: its ``const``, else its first ``enum`` value, else
    its ``default``, else the first ``anyOf``/``oneOf`` alternative, else by type: a string
    by its ``format`` (``date-time``, ``date``, ``time``, ``email``, ``uri``, ``uuid``),
    else by its property name (a city for ``city``/``location``, ``Europe/Paris`` for
    ``timezone``/``tz``, the user text for ``query``; see ``_STRING_BY_NAME``), else
    ``"mock"``, fitted to ``minLength``/``maxLength``; integer and number ``1`` moved into
    ``minimum``/``maximum``; boolean ``true``; array ``minItems`` items filled from
    ``items``; object its own required properties, filled the same way; null ``null``
    (any other or missing type: a string). Arguments are serialised with ``json.dumps``;
  - ids: ``call_mock_<n>``, where ``n`` is the number of tool calls already made by
    assistant messages in the conversation plus one (and counts on across parallel calls);
  - finish reason ``tool_calls``.
* **Otherwise**: ``You said: <content of the last user message>`` (empty when there is
  none), finish reason ``stop``.

``maxTokens`` cuts the text reply to that many whitespace-separated words (trailing
whitespace dropped) and the finish reason becomes ``length``; tool calls are never cut. Like a
real model's output limit, a reply is never longer than ``MAX_REPLY_WORDS`` whatever the
request says: the echo of a multi-megabyte prompt would otherwise be a stream of millions of
events (the mock is on by default, so anyone with a key could use it to fill memory).

Usage: ``promptTokens`` is the number of whitespace-separated words over the content of all
messages (at least 1); ``completionTokens`` is the number of words in the reply plus 5 per
tool call; ``totalTokens`` is their sum. ``metadata.provider`` is the mock's name and
``metadata.model`` the requested model.

Streaming yields the same reply: the text as one delta per word, each carrying the
whitespace that follows it (so joining the deltas gives exactly the non-streamed text),
``chunk_delay`` seconds apart; then each tool call as two ``tool_call`` events, the first
with the id, the name and the first half of the arguments JSON, the second with the rest;
then one ``usage`` event and the finish event.

The mock does not check the model name (the proxy checks it against ``models()``), never
fails, and holds no resources.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

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
from robota_proxy.upstreams.base import FinishEvent, UpstreamEvent

#: Completion tokens charged per tool call, so tool turns do not look free.
TOKENS_PER_TOOL_CALL = 5

_WORD_PIECE = re.compile(r"\s*\S+\s*")
_PARALLEL = re.compile(r"\bparallel\b", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+")
#: The words of a tool name: ``get_weather`` -> get, weather; ``getTimeZone`` -> get, Time, Zone.
_NAME_PART = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
#: How deep nested schemas (objects in arrays in objects...) are filled.
_MAX_DEPTH = 4
#: Strings by JSON Schema ``format``, each one a valid instance of it.
_STRING_BY_FORMAT = {
    "date-time": "2026-01-01T12:00:00Z",
    "date": "2026-01-01",
    "time": "12:00:00",
    "email": "mock@example.com",
    "uri": "https://example.com",
    "url": "https://example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
}
#: Strings by property name (lower case, without ``_`` or ``-``): what a tool that takes a
#: ``city`` can do something with, rather than ``"mock"``.
_STRING_BY_NAME = {
    "city": "Paris",
    "location": "Paris",
    "place": "Paris",
    "country": "France",
    "timezone": "Europe/Paris",
    "tz": "Europe/Paris",
    "zone": "Europe/Paris",
    "language": "en",
    "lang": "en",
    "locale": "en-US",
    "currency": "EUR",
    "date": "2026-01-01",
    "time": "12:00",
    "email": "mock@example.com",
    "url": "https://example.com",
    "uri": "https://example.com",
}
#: Properties that get the user's own text (a search tool's query).
_USER_TEXT_NAMES = frozenset({"query", "q", "question", "prompt", "text"})


@dataclass(frozen=True)
class MockReply:
    """Everything one answer consists of, shared by ``chat`` and ``stream`` so that the two
    can never disagree."""

    text: str
    tool_calls: list[ToolCall]
    finish_reason: FinishReason
    usage: Usage


class MockUpstream:
    """The ``mock`` provider; see the module docstring for exactly what it answers."""

    def __init__(
        self, *, models: list[str] | None = None, name: str = "mock", chunk_delay: float = 0.0
    ) -> None:
        self.name = name
        self._models = list(models) if models is not None else ["mock-1"]
        self._chunk_delay = chunk_delay

    def models(self) -> list[str] | None:
        return list(self._models)

    async def chat(self, request: ChatRequest) -> AssistantMessage:
        reply = plan_reply(request)
        return AssistantMessage(
            content=reply.text if reply.text or not reply.tool_calls else None,
            tool_calls=reply.tool_calls or None,
            usage=reply.usage,
            metadata=ResponseMetadata(
                provider=self.name, model=request.model, finish_reason=reply.finish_reason
            ),
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[UpstreamEvent, None]:
        reply = plan_reply(request)
        for position, piece in enumerate(word_pieces(reply.text)):
            if position:
                await anyio.sleep(self._chunk_delay)
            yield DeltaEvent(content=piece)
        for index, call in enumerate(reply.tool_calls):
            arguments = call.function.arguments
            half = len(arguments) // 2
            yield ToolCallEvent(
                index=index, id=call.id, name=call.function.name, arguments_delta=arguments[:half]
            )
            yield ToolCallEvent(index=index, arguments_delta=arguments[half:])
        yield UsageEvent(usage=reply.usage)
        yield FinishEvent(finish_reason=reply.finish_reason)

    async def aclose(self) -> None:
        """Nothing to close; present because every upstream is closed the same way."""


#: The longest reply, in words, the mock ever gives (its "output token limit").
MAX_REPLY_WORDS = 1000


def plan_reply(request: ChatRequest) -> MockReply:
    messages = request.messages
    last = messages[-1]
    calls: list[ToolCall] = []
    if last.role == "tool":
        text = tool_results_summary(messages)
    elif request.tools and last.role == "user" and request.options.tool_choice != "none":
        text = ""
        calls = mock_tool_calls(request.tools, last.content or "", request)
    else:
        text = f"You said: {last_user_text(messages)}"
    finish: FinishReason = "tool_calls" if calls else "stop"
    asked = request.options.max_tokens
    limit = MAX_REPLY_WORDS if asked is None else min(asked, MAX_REPLY_WORDS)
    if len(text.split()) > limit:
        text = "".join(word_pieces(text)[:limit]).rstrip()
        finish = "length"
    return MockReply(
        text=text, tool_calls=calls, finish_reason=finish, usage=usage(request, text, calls)
    )


def last_user_text(messages: Sequence[UniversalMessage]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return message.content or ""
    return ""


def tool_results_summary(messages: Sequence[UniversalMessage]) -> str:
    names = {
        call.id: call.function.name
        for message in messages
        if message.role == "assistant"
        for call in message.tool_calls or []
    }
    results: list[str] = []
    for message in reversed(messages):
        if message.role == "assistant":
            break
        if message.role == "tool":
            name = names.get(message.tool_call_id or "") or message.name or "unknown"
            results.append(f"Tool {name} returned: {message.content}")
    return "; ".join(reversed(results))


def mock_tool_calls(tools: Sequence[ToolSchema], text: str, request: ChatRequest) -> list[ToolCall]:
    already = sum(
        len(message.tool_calls or []) for message in request.messages if message.role == "assistant"
    )
    written = first_json_object(text)
    return [
        ToolCall(
            id=f"call_mock_{already + offset}",
            function=FunctionCall(
                name=tool.name, arguments=json.dumps(tool_arguments(tool, written, text))
            ),
        )
        for offset, tool in enumerate(choose_tools(tools, text, request.options.tool_choice), 1)
    ]


def choose_tools(tools: Sequence[ToolSchema], text: str, choice: str | None) -> list[ToolSchema]:
    if choice and choice not in ("auto", "required", "none"):
        return [tool for tool in tools if tool.name == choice][:1]
    if _PARALLEL.search(text):
        return list(tools)
    words = set(_WORD.findall(text.lower()))
    lowered = text.lower()
    mentioned = [tool for tool in tools if is_mentioned(tool.name, lowered, words)]
    return mentioned or [tools[0]]


def is_mentioned(name: str, lowered_text: str, words: set[str]) -> bool:
    """Whether the text names the tool: whole, or by one telling word of its name (``weather``
    in ``get_weather``; words under four letters such as ``get`` tell nothing)."""
    if name.lower() in lowered_text:
        return True
    parts = _NAME_PART.findall(name)
    return any(len(part) >= 4 and part.lower() in words for part in parts)


def first_json_object(text: str) -> dict[str, Any] | None:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def tool_arguments(tool: ToolSchema, written: dict[str, Any] | None, text: str) -> dict[str, Any]:
    """What the user wrote that this tool declares, and its missing required properties
    filled from their schemas."""
    schema = tool.parameters
    properties = schema.get("properties")
    arguments: dict[str, Any] = {}
    if written is not None:
        if isinstance(properties, dict):
            arguments = {key: value for key, value in written.items() if key in properties}
        elif schema.get("additionalProperties") is not False:
            arguments = dict(written)
    for name, value in fill_required(schema, text).items():
        arguments.setdefault(name, value)
    return arguments


def fill_required(schema: dict[str, Any], text: str, depth: int = 0) -> dict[str, Any]:
    """An object schema's required properties, each with a value that fits its schema."""
    properties = schema.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    required = schema.get("required")
    names = (
        [name for name in required if isinstance(name, str)] if isinstance(required, list) else []
    )
    return {name: mock_value(properties.get(name), name, text, depth) for name in names}


def mock_value(schema: Any, name: str = "", text: str = "", depth: int = 0) -> Any:
    """A value for property ``name`` that fits ``schema``. Nested schemas are followed a few
    levels deep only, so that a recursive schema cannot make the mock loop."""
    if not isinstance(schema, dict):
        return mock_string({}, name, text)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    if "default" in schema:
        return schema["default"]
    for combinator in ("anyOf", "oneOf"):
        alternatives = schema.get(combinator)
        if isinstance(alternatives, list) and alternatives and depth < _MAX_DEPTH:
            return mock_value(alternatives[0], name, text, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind in ("integer", "number"):
        return mock_number(schema)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    if kind == "array":
        count = schema.get("minItems")
        count = count if isinstance(count, int) and count > 0 and depth < _MAX_DEPTH else 0
        return [mock_value(schema.get("items"), name, text, depth + 1) for _ in range(count)]
    if kind == "object":
        return fill_required(schema, text, depth + 1) if depth < _MAX_DEPTH else {}
    return mock_string(schema, name, text)


def mock_number(schema: dict[str, Any]) -> int | float:
    value: int | float = 1
    low, high = schema.get("minimum"), schema.get("maximum")
    if isinstance(low, int | float) and not isinstance(low, bool) and value < low:
        value = low
    if isinstance(high, int | float) and not isinstance(high, bool) and value > high:
        value = high
    if schema.get("type") == "integer" and isinstance(value, float):
        value = math.ceil(value)
    return value


def mock_string(schema: dict[str, Any], name: str, text: str) -> str:
    by_format = _STRING_BY_FORMAT.get(str(schema.get("format", "")))
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    value = by_format or (text if key in _USER_TEXT_NAMES else _STRING_BY_NAME.get(key, "mock"))
    longest, shortest = schema.get("maxLength"), schema.get("minLength")
    if isinstance(longest, int) and len(value) > longest:
        value = value[:longest]
    if isinstance(shortest, int) and len(value) < shortest:
        value = value.ljust(shortest, "x")
    return value


def word_pieces(text: str) -> list[str]:
    """The text as words each carrying its surrounding whitespace; they join back to it."""
    pieces: list[str] = _WORD_PIECE.findall(text)
    return pieces if pieces or not text else [text]


def usage(request: ChatRequest, text: str, calls: Sequence[ToolCall]) -> Usage:
    prompt = max(1, sum(len((message.content or "").split()) for message in request.messages))
    completion = len(text.split()) + TOKENS_PER_TOOL_CALL * len(calls)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
