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

  - which tool: the tool named by ``toolChoice`` when it names one; otherwise every tool
    when the user text contains the word ``parallel`` (parallel tool calls, in ``tools``
    order); otherwise the first tool whose name appears in the user text (case-insensitive);
    otherwise the first tool;
  - arguments: the first JSON object written in the user text (``weather please
    {"city": "Paris"}`` gives ``{"city": "Paris"}``), the same object for every tool called.
    Without one, each *required* property of the tool's schema is filled from its schema:
    the first ``enum`` value if it has one, else by type: string ``"mock"``, integer and
    number ``1``, boolean ``true``, array ``[]``, object ``{}``, null ``null`` (any other
    or missing type: ``"mock"``). Arguments are serialised with ``json.dumps``;
  - ids: ``call_mock_<n>``, where ``n`` is the number of tool calls already made by
    assistant messages in the conversation plus one (and counts on across parallel calls);
  - finish reason ``tool_calls``.
* **Otherwise**: ``You said: <content of the last user message>`` (empty when there is
  none), finish reason ``stop``.

``maxTokens`` cuts the text reply to that many whitespace-separated words (trailing
whitespace dropped) and the finish reason becomes ``length``; tool calls are never cut.

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
import re
from collections.abc import AsyncGenerator, Callable, Sequence
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
#: Factories rather than values so that no two calls ever share a list or dict.
_FILL_BY_TYPE: dict[str, Callable[[], Any]] = {
    "string": lambda: "mock",
    "integer": lambda: 1,
    "number": lambda: 1,
    "boolean": lambda: True,
    "array": list,
    "object": dict,
    "null": lambda: None,
}


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
    limit = request.options.max_tokens
    if limit is not None and len(text.split()) > limit:
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
                name=tool.name,
                arguments=json.dumps(written if written is not None else fill_required(tool)),
            ),
        )
        for offset, tool in enumerate(choose_tools(tools, text, request.options.tool_choice), 1)
    ]


def choose_tools(tools: Sequence[ToolSchema], text: str, choice: str | None) -> list[ToolSchema]:
    if choice and choice not in ("auto", "required", "none"):
        return [tool for tool in tools if tool.name == choice][:1]
    if _PARALLEL.search(text):
        return list(tools)
    lowered = text.lower()
    for tool in tools:
        if tool.name.lower() in lowered:
            return [tool]
    return [tools[0]]


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


def fill_required(tool: ToolSchema) -> dict[str, Any]:
    properties = tool.parameters.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    required = tool.parameters.get("required")
    names = (
        [name for name in required if isinstance(name, str)] if isinstance(required, list) else []
    )
    return {name: mock_value(properties.get(name)) for name in names}


def mock_value(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return "mock"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    fill = _FILL_BY_TYPE.get(kind) if isinstance(kind, str) else None
    return fill() if fill is not None else "mock"


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
