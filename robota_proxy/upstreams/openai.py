"""OpenAI Chat Completions, and any server that speaks it (vLLM, Ollama, LiteLLM, ...).

Only request fields that compatible servers widely understand are sent. The one difference
made between the official API and a custom ``base_url`` is the name of the output limit:
OpenAI's newer models accept only ``max_completion_tokens``, while most compatible servers
know only ``max_tokens``.

The connection pool is the SDK's ``DefaultAioHttpClient`` (``openai[aiohttp]``): the SDK's
``httpx2`` client on an aiohttp transport. The default httpcore pool scans every pooled
connection (a ``poll`` per idle socket) on each request, which made it most of the proxy's CPU
under concurrency; aiohttp's connector does not (chat at c=50: 8.2 -> 2.4 ms CPU a request).
Tests pass ``http_client`` (an ``httpx`` client that ``respx`` mocks).

Not mapped: ``n`` > 1 (only the first choice is read), audio and image output, logprobs,
the deprecated ``function_call`` message field, and custom (free-form) tool calls.
A refusal is passed on as the message text, since the wire contract has no refusal field.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import aiohttp
import httpx
import httpx2
import openai
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk

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
    make_usage,
    malformed_response_error,
    mapped_errors,
    status_error,
)
from robota_proxy.upstreams.base import FinishEvent, UpstreamEvent
from robota_proxy.upstreams.errors import (
    broken_stream_error,
    timeout_error,
    unavailable_error,
)

OFFICIAL_BASE_URL = "https://api.openai.com/v1"

_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}

#: Everything a call can raise that is the vendor's (or the network's) doing. ``ValueError``
#: covers a body or stream chunk that is not JSON. The SDK wraps errors of the request itself;
#: ones in the middle of a stream come unwrapped from the transport: ``httpx2`` (aiohttp's
#: mapped), ``aiohttp`` (the few it leaves unmapped) or ``httpx`` (an injected client).
_CALL_ERRORS = (
    openai.OpenAIError,
    httpx.HTTPError,
    httpx2.HTTPError,
    aiohttp.ClientError,
    ValueError,
)
_TIMEOUTS = (openai.APITimeoutError, httpx.TimeoutException, httpx2.TimeoutException)
_UNREACHABLE = (
    openai.APIConnectionError,
    httpx.TransportError,
    httpx2.TransportError,
    aiohttp.ClientConnectionError,
)


class OpenAIUpstream:
    """One OpenAI(-compatible) endpoint behind one connection pool."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 60.0,
        models: list[str] | None = None,
        name: str = "openai",
        max_connections: int = 1000,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.name = name
        self._api_key = api_key
        self._models = list(models) if models is not None else None
        # No base URL means the official API (see the module doc for why it matters).
        self._max_tokens_field = "max_completion_tokens" if base_url is None else "max_tokens"
        self._http: httpx.AsyncClient | httpx2.AsyncClient = (
            http_client
            or openai.DefaultAioHttpClient(
                limits=httpx2.Limits(
                    max_connections=max_connections,
                    max_keepalive_connections=max_connections,
                ),
                timeout=httpx2.Timeout(timeout),
                follow_redirects=True,
            )
        )
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            # Explicit, so that an OPENAI_BASE_URL in the environment cannot redirect the
            # proxy's key somewhere else.
            base_url=base_url or OFFICIAL_BASE_URL,
            timeout=timeout,
            max_retries=0,
            http_client=self._http,  # type: ignore[arg-type]  # an injected httpx client
        )

    def models(self) -> list[str] | None:
        return list(self._models) if self._models is not None else None

    async def aclose(self) -> None:
        await self._client.close()

    # --- calls -----------------------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> AssistantMessage:
        try:
            completion = await self._client.chat.completions.create(**self._params(request))
        except _CALL_ERRORS as exc:
            raise self._proxy_error(exc, streaming=False) from None
        return self._message(request, completion)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[UpstreamEvent, None]:
        try:
            chunks = await self._client.chat.completions.create(
                **self._params(request),
                stream=True,
                stream_options={"include_usage": True},
            )
        except _CALL_ERRORS as exc:
            raise self._proxy_error(exc, streaming=False) from None
        # ``async with`` closes the vendor response however this generator ends: drained,
        # failed, closed early by the consumer, or cancelled.
        async with (
            chunks,
            aclosing(mapped_errors(chunks, _CALL_ERRORS, self._stream_error)) as vendor_chunks,
        ):
            reader = _ChunkReader()
            async for chunk in vendor_chunks:
                for event in reader.events(chunk):
                    yield event
        if reader.finish_reason is None:
            raise broken_stream_error(self.name)
        if reader.usage is not None:
            yield UsageEvent(usage=reader.usage)
        yield FinishEvent(reader.finish_reason)

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

    def _message(self, request: ChatRequest, completion: ChatCompletion) -> AssistantMessage:
        if not completion.choices:
            raise malformed_response_error(self.name)
        choice = completion.choices[0]
        message = choice.message
        calls = _tool_calls(message.tool_calls)
        text = message.content or message.refusal or ""
        return AssistantMessage(
            content=text if text or not calls else None,
            tool_calls=calls,
            usage=_usage(completion.usage) if completion.usage else None,
            metadata=ResponseMetadata(
                provider=self.name,
                model=completion.model or request.model,
                finish_reason=_finish_reason(choice.finish_reason),
            ),
        )

    # --- errors ----------------------------------------------------------------------------

    def _stream_error(self, exc: Exception) -> ProxyError:
        return self._proxy_error(exc, streaming=True)

    def _proxy_error(self, exc: Exception, *, streaming: bool) -> ProxyError:
        """``streaming`` says the response had started, so a broken connection means a
        truncated answer rather than an unreachable vendor."""
        if isinstance(exc, openai.APIStatusError):
            return status_error(
                self.name,
                exc.status_code,
                body=exc.body,
                headers=exc.response.headers,
                secrets=[self._api_key],
            )
        if isinstance(exc, httpx2.ConnectTimeout) and streaming:
            # aiohttp's transport maps a dropped connection (ClientConnectionError) to this.
            return broken_stream_error(self.name)
        if isinstance(exc, _TIMEOUTS):
            return timeout_error(self.name)
        if isinstance(exc, _UNREACHABLE) and not streaming:
            return unavailable_error(self.name)
        if streaming:
            return broken_stream_error(self.name)
        return malformed_response_error(self.name)


class _ChunkReader:
    """Turns chunks into wire events and remembers what only arrives at the end."""

    def __init__(self) -> None:
        self._started_calls: set[int] = set()
        self.usage: Usage | None = None
        self.finish_reason: FinishReason | None = None

    def events(self, chunk: ChatCompletionChunk) -> list[UpstreamEvent]:
        if chunk.usage is not None:
            # Kept, not yielded: a server reporting usage on every chunk must still
            # produce exactly one usage event, and the last report is the complete one.
            self.usage = _usage(chunk.usage)
        if not chunk.choices:
            return []
        choice = chunk.choices[0]
        if choice.finish_reason is not None:
            self.finish_reason = _finish_reason(choice.finish_reason)
        delta = choice.delta
        events: list[UpstreamEvent] = []
        text = (delta.content or "") + (delta.refusal or "")
        if text:
            events.append(DeltaEvent(content=text))
        for call in delta.tool_calls or []:
            events.append(self._call_event(call.index, call.id, call.function))
        return events

    def _call_event(self, index: int, call_id: str | None, function: Any) -> ToolCallEvent:
        name = getattr(function, "name", None)
        arguments = getattr(function, "arguments", None) or ""
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
    """Function calls only; attribute access rather than type checks because a compatible
    server's calls may lack the ``type`` the SDK discriminates on."""
    result = [
        ToolCall(
            id=call.id,
            function=FunctionCall(name=call.function.name, arguments=call.function.arguments),
        )
        for call in calls or []
        if getattr(call, "function", None) is not None
    ]
    return result or None


def _usage(usage: CompletionUsage) -> Usage:
    prompt_details = usage.prompt_tokens_details
    completion_details = usage.completion_tokens_details
    return make_usage(
        prompt=usage.prompt_tokens or 0,
        completion=usage.completion_tokens or 0,
        total=usage.total_tokens,
        cached=prompt_details.cached_tokens if prompt_details else None,
        reasoning=completion_details.reasoning_tokens if completion_details else None,
    )


def _finish_reason(reason: str | None) -> FinishReason:
    """Unknown or missing reasons (some compatible servers send their own) count as a
    normal stop: the text is there, and calling it an error would discard it."""
    return _FINISH_REASONS.get(reason or "stop", "stop")
