"""OpenAI Chat Completions, and any server that speaks it (vLLM, Ollama, LiteLLM, ...).

Only request fields that compatible servers widely understand are sent. The one difference
made between the official API and a custom ``base_url`` is the name of the output limit:
OpenAI's newer models accept only ``max_completion_tokens``, while most compatible servers
know only ``max_tokens``.

Spoken directly over one pooled aiohttp session (``vendor_http``): the params built here
are already the wire JSON, and answers are read as the JSON dicts, so the SDK was only an
expensive ``post()`` (see ``vendor_http``). The official ``openai`` SDK stays where it is the
best judge: as a client of our OpenAI surface, and as the parser that proves our fake vendor
speaks OpenAI's wire (the tests).

Embeddings (``embed``) go to ``POST /embeddings`` the same way. The vendor is always asked
for floats (``encoding_format: "float"``), which every compatible server understands; the
route encodes base64 for callers that want it. A vector that comes back base64 anyway is
decoded (little-endian float32, as OpenAI defines it).

Not mapped: ``n`` > 1 (only the first choice is read), audio and image output, logprobs,
the deprecated ``function_call`` message field, and custom (free-form) tool calls.
A refusal is passed on as the message text, since the wire contract has no refusal field.
"""

from __future__ import annotations

import array
import base64
import binascii
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

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
from robota_proxy.upstreams._convert import (
    JSONDict,
    make_usage,
    malformed_response_error,
)
from robota_proxy.upstreams.base import (
    EmbeddingRequest,
    EmbeddingResult,
    FinishEvent,
    UpstreamEvent,
)
from robota_proxy.upstreams.errors import broken_stream_error
from robota_proxy.upstreams.vendor_http import VendorHTTP

OFFICIAL_BASE_URL = "https://api.openai.com/v1"
_PATH = "/chat/completions"
_EMBED_PATH = "/embeddings"

_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


class OpenAIUpstream:
    """One OpenAI(-compatible) endpoint behind one connection pool."""

    #: The wire it speaks: the OpenAI surface passes a caller's JSON through to it.
    dialect = "openai"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        models: list[str] | None = None,
        name: str = "openai",
        max_connections: int = 0,
    ) -> None:
        self.name = name
        self._models = list(models) if models is not None else None
        # No base URL means the official API (see the module doc for why it matters).
        self._max_tokens_field = "max_completion_tokens" if base_url is None else "max_tokens"
        self._http = VendorHTTP(
            vendor=name,
            # Explicit, so that an OPENAI_BASE_URL in the environment cannot redirect the
            # proxy's key somewhere else.
            base_url=base_url or OFFICIAL_BASE_URL,
            headers={"authorization": f"Bearer {api_key}"},
            secrets=[api_key],
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
        completion = await self._http.post_json(_PATH, self._params(request))
        return self._message(request, completion)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[UpstreamEvent, None]:
        params = self._params(request)
        params["stream"] = True
        params["stream_options"] = {"include_usage": True}
        reader = _ChunkReader()
        async with self._chunks(params) as vendor_chunks:
            async for chunk in vendor_chunks:
                for event in reader.events(chunk):
                    yield event
        if reader.finish_reason is None:
            raise broken_stream_error(self.name)
        if reader.usage is not None:
            yield UsageEvent(usage=reader.usage)
        yield FinishEvent(reader.finish_reason)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """One ``POST /embeddings`` for every input (texts or token arrays, passed as given)."""
        answer = await self._http.post_json(_EMBED_PATH, embedding_params(request))
        return embedding_result(answer, request, self.name)

    # --- passthrough (the OpenAI surface, robota_proxy.routes.openai_compat) ----------------

    def passthrough_body(self, body: JSONDict, model: str, max_tokens: int | None) -> JSONDict:
        """A caller's own chat-completions JSON for this endpoint: the model rewritten and,
        when the proxy imposed an output limit (a budgeted caller that set none), that limit
        under the name this endpoint knows. Nothing else is touched."""
        sent = {**body, "model": model}
        if (
            max_tokens is not None
            and "max_tokens" not in body
            and "max_completion_tokens" not in body
        ):
            sent[self._max_tokens_field] = max_tokens
        return sent

    async def chat_raw(self, body: JSONDict) -> tuple[JSONDict, Usage | None]:
        """One call with the caller's JSON: the vendor's answer as it came, and its usage."""
        completion = await self._http.post_json(_PATH, body)
        usage = completion.get("usage")
        return completion, _usage(usage) if isinstance(usage, dict) else None

    async def stream_raw(self, body: JSONDict) -> AsyncGenerator[JSONDict, None]:
        """The vendor's ``chat.completion.chunk`` objects as they came; usage is always
        asked for (the proxy meters it), and whether to forward it is the route's affair."""
        params = {**body, "stream": True}
        params["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        async with self._chunks(params) as vendor_chunks:
            async for chunk in vendor_chunks:
                yield chunk

    @asynccontextmanager
    async def _chunks(self, params: JSONDict) -> AsyncIterator[AsyncGenerator[JSONDict, None]]:
        """The ``chat.completion.chunk`` objects of one streamed call (a malformed chunk is
        skipped, not fatal), with the vendor's failures mapped to wire errors; the response
        is closed however the reading ends."""
        async with (
            self._http.post_events(_PATH, params, done="[DONE]") as events,
            aclosing(_chunk_objects(events, self.name)) as chunks,
        ):
            yield chunks

    # --- request ---------------------------------------------------------------------------

    def _params(self, request: ChatRequest) -> JSONDict:
        params: JSONDict = {
            "model": request.model,
            "messages": [_message_param(message) for message in request.messages],
        }
        if request.tools:
            params["tools"] = [_tool_param(tool) for tool in request.tools]
        options = request.options
        if options.temperature is not None:
            params["temperature"] = options.temperature
        if options.top_p is not None:
            params["top_p"] = options.top_p
        if options.max_tokens is not None:
            params[self._max_tokens_field] = options.max_tokens
        if options.stop:
            params["stop"] = options.stop
        # Vendors reject a tool choice without tools, so one without them is dropped.
        if options.tool_choice and request.tools:
            params["tool_choice"] = _tool_choice_param(options.tool_choice)
        if options.response_format == "json":
            params["response_format"] = {"type": "json_object"}
        return params

    # --- response --------------------------------------------------------------------------

    def _message(self, request: ChatRequest, completion: JSONDict) -> AssistantMessage:
        choices = completion.get("choices")
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise malformed_response_error(self.name)
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise malformed_response_error(self.name)
        calls = _tool_calls(message.get("tool_calls"))
        text = message.get("content") or message.get("refusal") or ""
        usage = completion.get("usage")
        return AssistantMessage(
            content=text if text or not calls else None,
            tool_calls=calls,
            usage=_usage(usage) if isinstance(usage, dict) else None,
            metadata=ResponseMetadata(
                provider=self.name,
                model=completion.get("model") or request.model,
                finish_reason=_finish_reason(choice.get("finish_reason")),
            ),
        )


async def _chunk_objects(
    events: AsyncGenerator[tuple[str, JSONDict], None], vendor: str
) -> AsyncGenerator[JSONDict, None]:
    """The chunks; an ``error`` object midway (what OpenAI sends when it fails after the
    stream started) ends the stream as broken, as the SDK's reader did."""
    async with aclosing(events):
        async for _, chunk in events:
            if "error" in chunk:
                raise broken_stream_error(vendor)
            yield chunk


class _ChunkReader:
    """Turns chunks into wire events and remembers what only arrives at the end."""

    def __init__(self) -> None:
        self._started_calls: set[int] = set()
        self.usage: Usage | None = None
        self.finish_reason: FinishReason | None = None

    def events(self, chunk: JSONDict) -> list[UpstreamEvent]:
        """One ``chat.completion.chunk`` as the JSON dict the vendor sent."""
        usage = chunk.get("usage")
        if usage:
            # Kept, not yielded: a server reporting usage on every chunk must still
            # produce exactly one usage event, and the last report is the complete one.
            self.usage = _usage(usage)
        choices = chunk.get("choices")
        if not choices:
            return []
        choice = choices[0]
        reason = choice.get("finish_reason")
        if reason is not None:
            self.finish_reason = _finish_reason(reason)
        delta = choice.get("delta") or {}
        events: list[UpstreamEvent] = []
        text = (delta.get("content") or "") + (delta.get("refusal") or "")
        if text:
            events.append(DeltaEvent(content=text))
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            events.append(self._call_event(call.get("index", 0), call.get("id"), function))
        return events

    def _call_event(self, index: int, call_id: str | None, function: JSONDict) -> ToolCallEvent:
        name = function.get("name")
        arguments = function.get("arguments") or ""
        if index in self._started_calls:
            # Compatible servers sometimes repeat id and name on every piece; the contract
            # wants them on the first only.
            return ToolCallEvent(index=index, arguments_delta=arguments)
        self._started_calls.add(index)
        return ToolCallEvent(
            index=index,
            id=call_id or f"call_{index}",
            name=name or "",
            arguments_delta=arguments,
        )


def _message_param(message: UniversalMessage) -> JSONDict:
    if message.role == "tool":
        # Tool messages take no ``name`` in Chat Completions.
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    param: JSONDict = {"role": message.role}
    if message.content is not None:
        param["content"] = message.content
    if message.tool_calls:
        param["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
            for call in message.tool_calls
        ]
    if message.name:
        param["name"] = message.name
    return param


def _tool_param(tool: ToolSchema) -> JSONDict:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }


def _tool_choice_param(choice: str) -> str | JSONDict:
    if choice in ("auto", "none", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def _tool_calls(calls: list[Any] | None) -> list[ToolCall] | None:
    """Function calls only; no check of ``type`` because a compatible server's calls may
    lack it."""
    result = [
        ToolCall(
            id=call.get("id"),
            function=FunctionCall(
                name=call["function"].get("name"), arguments=call["function"].get("arguments")
            ),
        )
        for call in calls or []
        if isinstance(call, dict) and isinstance(call.get("function"), dict)
    ]
    return result or None


def chunk_usage(chunk: JSONDict) -> Usage | None:
    """The usage a passed-through stream chunk reports, in the contract's shape."""
    usage = chunk.get("usage")
    return _usage(usage) if isinstance(usage, dict) else None


def _usage(usage: JSONDict) -> Usage:
    """The contract's usage from OpenAI's ``usage`` object (its detail objects optional)."""
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    return make_usage(
        prompt=usage.get("prompt_tokens") or 0,
        completion=usage.get("completion_tokens") or 0,
        total=usage.get("total_tokens"),
        cached=prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else None,
        reasoning=(
            completion_details.get("reasoning_tokens")
            if isinstance(completion_details, dict)
            else None
        ),
    )


def _finish_reason(reason: str | None) -> FinishReason:
    """Unknown or missing reasons (some compatible servers send their own) count as a
    normal stop: the text is there, and calling it an error would discard it."""
    return _FINISH_REASONS.get(reason or "stop", "stop")


# --- embeddings ------------------------------------------------------------------------------


def embedding_params(request: EmbeddingRequest) -> JSONDict:
    """The ``/embeddings`` body: one input is sent as a bare string or token array (as the
    SDK sends it), several as a list; optional fields only when the caller set them."""
    inputs = [item if isinstance(item, str) else list(item) for item in request.inputs]
    params: JSONDict = {
        "model": request.model,
        "input": inputs[0] if len(inputs) == 1 else inputs,
        "encoding_format": "float",
    }
    if request.dimensions is not None:
        params["dimensions"] = request.dimensions
    if request.user is not None:
        params["user"] = request.user
    return params


def embedding_result(answer: JSONDict, request: EmbeddingRequest, vendor: str) -> EmbeddingResult:
    """The vectors of a ``list`` answer put back in input order by their ``index``; an answer
    that does not hold exactly one vector per input is malformed, never passed on short."""
    data = answer.get("data")
    if not isinstance(data, list):
        raise malformed_response_error(vendor)
    vectors: dict[int, list[float]] = {}
    for item in data:
        if not isinstance(item, dict):
            raise malformed_response_error(vendor)
        index = item.get("index", len(vectors))
        vector = _vector(item.get("embedding"))
        if not isinstance(index, int) or vector is None or index in vectors:
            raise malformed_response_error(vendor)
        vectors[index] = vector
    if sorted(vectors) != list(range(len(request.inputs))):
        raise malformed_response_error(vendor)
    usage = answer.get("usage")
    prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    model = answer.get("model")
    return EmbeddingResult(
        vectors=[vectors[index] for index in range(len(request.inputs))],
        model=model if isinstance(model, str) and model else request.model,
        usage=(
            Usage(prompt_tokens=prompt, total_tokens=prompt)
            if isinstance(prompt, int) and not isinstance(prompt, bool) and prompt >= 0
            else None
        ),
    )


def _vector(value: object) -> list[float] | None:
    """A JSON list of numbers, or OpenAI's base64 of little-endian float32."""
    if isinstance(value, list):
        if all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
            return [float(x) for x in value]
        return None
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(raw) % 4:
            return None
        floats = array.array("f", raw)
        if sys.byteorder == "big":  # pragma: no cover - the wire is little-endian
            floats.byteswap()
        return floats.tolist()
    return None
