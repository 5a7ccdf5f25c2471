"""Google Gemini through its REST API (``generateContent`` / ``streamGenerateContent``).

Spoken directly over one pooled aiohttp session (``vendor_http``, shared with the other
adapters) instead of Google's SDK: the REST shape is small and stable, and owning the client
means owning the connection pool, the timeouts and every exception that can escape. The key
travels in the ``x-goog-api-key`` header, never in the URL, so that it cannot end up in an
access log or in an exception message that quotes the URL.

Gemini specifics the translation has to absorb:

* it has no tool-call ids, so ids are minted here (``call_<hex>``) and tool results are tied
  back to their call by *name*, looked up from the assistant message that made the call;
* tool parameters go out as ``parametersJsonSchema`` (full JSON Schema, v1beta) rather than
  ``parameters`` (an OpenAPI subset that rejects ``additionalProperties`` and friends);
* thinking models attach an opaque ``thoughtSignature`` to function calls and Gemini 3
  refuses a replayed function call without it. The wire contract has nowhere to carry it,
  so this adapter remembers the signatures it received per tool-call id (bounded, in memory)
  and falls back to Google's documented ``skip_thought_signature_validator`` sentinel for
  calls it never saw (another replica, a restart, or a call made by another vendor);
* an invalid key is answered with HTTP 400 ``API_KEY_INVALID``, which is treated as the
  credentials failure it is rather than as the caller's bad request, and a 429 names its
  delay in a ``RetryInfo`` detail: so Gemini's HTTP errors are mapped here
  (``status_error``), not by ``vendor_http``'s generic mapping;
* a failure can also arrive inside a 200 body or a stream chunk (``{"error": ...}``),
  mapped the same way (``raise_embedded_error``);
* embeddings (``embed``): one input is an ``embedContent`` call, several one
  ``batchEmbedContents`` call (each of its requests naming the model again, as Google
  requires). Gemini embeds text only, so token-id inputs are refused before any call;
  ``dimensions`` becomes ``outputDimensionality`` and OpenAI's ``user`` has no Gemini
  counterpart (dropped). The token count is read from ``usageMetadata.promptTokenCount``
  when the answer has one; Gemini's embedding answers usually have none, and then the
  result carries no usage for the proxy to estimate.
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from robota_client.messages import (
    AssistantMessage,
    ChatOptions,
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
from robota_proxy.errors import InvalidRequest, ProxyError, UpstreamError
from robota_proxy.upstreams.base import (
    EmbeddingRequest,
    EmbeddingResult,
    FinishEvent,
    UpstreamEvent,
)
from robota_proxy.upstreams.errors import (
    broken_stream_error,
    error_for_status,
    retry_after_seconds,
)
from robota_proxy.upstreams.vendor_http import VendorHTTP

VENDOR = "google"
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
#: Google's documented value for a function call whose real signature is not available.
SKIP_SIGNATURE = "skip_thought_signature_validator"
#: How many thought signatures one adapter remembers; each is a few hundred bytes to a few KB.
SIGNATURE_MEMORY = 4096

_CONTENT_FILTER = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
)
_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
#: JSON Schema keys that only describe the document itself; Gemini has no use for them.
_SCHEMA_META_KEYS = ("$schema", "$id")
#: ``streamGenerateContent`` answers with an event stream only when asked for one.
_SSE_PARAMS = {"alt": "sse"}

Json = dict[str, Any]


class GoogleUpstream:
    """One Gemini API key and its connection pool."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        models: list[str] | None = None,
        name: str = "google",
        max_connections: int = 0,
    ) -> None:
        self.name = name
        self._api_key = api_key
        self._models = list(models) if models is not None else None
        self._signatures = SignatureMemory(SIGNATURE_MEMORY)
        self._http = VendorHTTP(
            vendor=VENDOR,
            base_url=base_url,
            headers={"x-goog-api-key": api_key},
            secrets=[api_key],
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            status_error=self._status_error,
        )

    def models(self) -> list[str] | None:
        return list(self._models) if self._models is not None else None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def chat(self, request: ChatRequest) -> AssistantMessage:
        body = build_body(request, self._signatures)
        payload = await self._http.post_json(_path(request.model, "generateContent"), body)
        raise_embedded_error(payload, self._api_key)
        return parse_response(payload, request.model, self.name, self._signatures)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[UpstreamEvent, None]:
        body = build_body(request, self._signatures)
        state = StreamState(self._signatures)
        async with (
            self._http.post_events(
                _path(request.model, "streamGenerateContent"), body, params=_SSE_PARAMS
            ) as events,
            aclosing(events),
        ):
            async for _, chunk in events:
                raise_embedded_error(chunk, self._api_key)
                for event in state.feed(chunk):
                    yield event
        for event in state.finish():
            yield event

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """``embedContent`` for one input, ``batchEmbedContents`` for several: one call."""
        method, body = embedding_call(request)
        payload = await self._http.post_json(_path(request.model, method), body)
        raise_embedded_error(payload, self._api_key)
        return embedding_result(payload, request)

    def _status_error(self, status: int, body: Any, headers: Mapping[str, str]) -> ProxyError:
        return status_error(status, body, headers, self._api_key)


class SignatureMemory:
    """Thought signatures by tool-call id, oldest forgotten first.

    Gemini 3 rejects a replayed function call without the signature it came with, and the
    wire contract has no field for it, so the adapter keeps it for the conversation's next
    turn. Losing one only costs the model some reasoning context (the sentinel is sent).
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._by_call: OrderedDict[str, str] = OrderedDict()

    def remember(self, call_id: str, signature: Any) -> None:
        if not isinstance(signature, str) or not signature:
            return
        self._by_call[call_id] = signature
        self._by_call.move_to_end(call_id)
        while len(self._by_call) > self._limit:
            self._by_call.popitem(last=False)

    def recall(self, call_id: str) -> str | None:
        return self._by_call.get(call_id)


# --- request -------------------------------------------------------------------------------


def build_body(request: ChatRequest, signatures: SignatureMemory) -> Json:
    """The ``GenerateContentRequest`` for a wire request."""
    system, contents = translate_messages(request.messages, signatures)
    body: Json = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": text} for text in system]}
    if request.tools:
        body["tools"] = [{"functionDeclarations": [_declaration(t) for t in request.tools]}]
        tool_config = _tool_config(request.options.tool_choice)
        if tool_config:
            body["toolConfig"] = tool_config
    generation = _generation_config(request.options)
    if generation:
        body["generationConfig"] = generation
    return body


def translate_messages(
    messages: Iterable[UniversalMessage], signatures: SignatureMemory
) -> tuple[list[str], list[Json]]:
    """System texts and the merged ``contents`` list.

    Gemini wants strictly alternating turns and all answers to one round of parallel calls
    in a single content, so consecutive contents with the same role are merged.
    """
    system: list[str] = []
    contents: list[Json] = []
    call_names: dict[str, str] = {}
    for message in messages:
        if message.role == "system":
            system.append(message.content or "")
            continue
        if message.role == "assistant":
            for call in message.tool_calls or []:
                call_names[call.id] = call.function.name
            role, parts = "model", _assistant_parts(message, signatures)
        elif message.role == "tool":
            role, parts = "user", [_function_response(message, call_names)]
        else:
            role, parts = "user", [{"text": message.content or ""}]
        if not parts:
            continue
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    return system, contents


def _assistant_parts(message: UniversalMessage, signatures: SignatureMemory) -> list[Json]:
    parts: list[Json] = []
    if message.content:
        parts.append({"text": message.content})
    for position, call in enumerate(message.tool_calls or []):
        part: Json = {"functionCall": {"name": call.function.name, "args": _arguments(call)}}
        # Gemini puts the signature on the first call of a step; a parallel sibling has none.
        signature = signatures.recall(call.id) or (SKIP_SIGNATURE if position == 0 else None)
        if signature:
            part["thoughtSignature"] = signature
        parts.append(part)
    return parts


def _arguments(call: ToolCall) -> Any:
    try:
        arguments = call.parsed_arguments()
    except ValueError:
        raise InvalidRequest(
            f"the arguments of tool call {call.id!r} ({call.function.name}) are not valid JSON"
        ) from None
    if not isinstance(arguments, dict):
        raise InvalidRequest(
            f"the arguments of tool call {call.id!r} ({call.function.name}) must be a JSON object"
        )
    return arguments


def _function_response(message: UniversalMessage, call_names: Mapping[str, str]) -> Json:
    call_id = message.tool_call_id or ""
    name = call_names.get(call_id)
    if name is None:
        raise InvalidRequest(
            f"tool message answers toolCallId {call_id!r}, "
            "which no earlier assistant message called"
        )
    return {"functionResponse": {"name": name, "response": _tool_result(message.content or "")}}


def _tool_result(content: str) -> Json:
    """Gemini wants an object: a JSON object result is passed as is, anything else wrapped."""
    try:
        parsed = json.loads(content)
    except ValueError:
        return {"result": content}
    return parsed if isinstance(parsed, dict) else {"result": content}


def _declaration(tool: ToolSchema) -> Json:
    schema = {key: value for key, value in tool.parameters.items() if key not in _SCHEMA_META_KEYS}
    declaration: Json = {"name": tool.name, "parametersJsonSchema": schema}
    if tool.description:
        declaration["description"] = tool.description
    return declaration


def _tool_config(choice: str | None) -> Json | None:
    if not choice:
        return None
    mode = _MODES.get(choice)
    if mode:
        return {"functionCallingConfig": {"mode": mode}}
    return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [choice]}}


def _generation_config(options: ChatOptions) -> Json:
    config: Json = {}
    if options.temperature is not None:
        config["temperature"] = options.temperature
    if options.max_tokens is not None:
        config["maxOutputTokens"] = options.max_tokens
    if options.top_p is not None:
        config["topP"] = options.top_p
    if options.stop:
        config["stopSequences"] = list(options.stop)
    if options.response_format == "json":
        config["responseMimeType"] = "application/json"
    return config


def _path(model: str, method: str) -> str:
    # Callers may use Google's resource name ("models/gemini-2.5-flash"); quoting keeps any
    # other slash or "?" in a model name from reaching a different endpoint.
    name = model.removeprefix("models/")
    return f"/v1beta/models/{quote(name, safe='')}:{method}"


# --- embeddings ----------------------------------------------------------------------------


def embedding_call(request: EmbeddingRequest) -> tuple[str, Json]:
    """The method and body for ``request``: ``embedContent`` with one input,
    ``batchEmbedContents`` with several."""
    texts: list[str] = []
    for position, item in enumerate(request.inputs):
        if not isinstance(item, str):
            raise InvalidRequest(
                f"input[{position}] is a list of token ids, which {VENDOR} cannot embed: "
                f"send text to model {request.model!r}"
            )
        texts.append(item)
    name = "models/" + request.model.removeprefix("models/")

    def one(text: str) -> Json:
        body: Json = {"model": name, "content": {"parts": [{"text": text}]}}
        if request.dimensions is not None:
            body["outputDimensionality"] = request.dimensions
        return body

    if len(texts) == 1:
        return "embedContent", one(texts[0])
    return "batchEmbedContents", {"requests": [one(text) for text in texts]}


def embedding_result(payload: Json, request: EmbeddingRequest) -> EmbeddingResult:
    """``{"embedding": {"values"}}`` or ``{"embeddings": [{"values"}, ...]}`` in input order;
    anything but exactly one vector of numbers per input is a malformed answer."""
    if len(request.inputs) == 1:
        found: list[Any] = [payload.get("embedding")]
    else:
        found = _as_list(payload.get("embeddings"))
    vectors: list[list[float]] = []
    for item in found:
        values = _as_dict(item).get("values")
        if not isinstance(values, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in values
        ):
            raise UpstreamError(f"{VENDOR} sent a malformed embedding")
        vectors.append([float(x) for x in values])
    if len(vectors) != len(request.inputs):
        raise UpstreamError(
            f"{VENDOR} sent {len(vectors)} embeddings for {len(request.inputs)} inputs"
        )
    prompt = _count(_as_dict(payload.get("usageMetadata")), "promptTokenCount")
    return EmbeddingResult(
        vectors=vectors,
        model=request.model.removeprefix("models/"),
        usage=None if prompt is None else Usage(prompt_tokens=prompt, total_tokens=prompt),
    )


# --- response ------------------------------------------------------------------------------


def parse_response(
    payload: Json, requested_model: str, provider: str, signatures: SignatureMemory
) -> AssistantMessage:
    """A whole ``GenerateContentResponse`` as the wire's assistant message."""
    texts: list[str] = []
    calls: list[ToolCall] = []
    for part in _candidate_parts(payload):
        text = _visible_text(part)
        if text:
            texts.append(text)
        call = _tool_call(part)
        if call is not None:
            signatures.remember(call.id, part.get("thoughtSignature"))
            calls.append(call)
    reason = finish_reason(payload, has_calls=bool(calls))
    text = "".join(texts)
    return AssistantMessage(
        content=text if text or not calls else None,
        tool_calls=calls or None,
        usage=usage_from(payload.get("usageMetadata")),
        metadata=ResponseMetadata(
            provider=provider,
            model=_model_version(payload) or requested_model,
            finish_reason=reason,
        ),
    )


def finish_reason(payload: Json, *, has_calls: bool) -> FinishReason:
    candidates = _as_list(payload.get("candidates"))
    if not candidates and _as_dict(payload.get("promptFeedback")).get("blockReason"):
        return "content_filter"
    raw = _as_dict(candidates[0]).get("finishReason") if candidates else None
    return map_finish_reason(raw, has_calls=has_calls)


def map_finish_reason(raw: Any, *, has_calls: bool) -> FinishReason:
    if raw == "MAX_TOKENS":
        return "length"
    if raw in _CONTENT_FILTER:
        return "content_filter"
    return "tool_calls" if has_calls else "stop"


def usage_from(metadata: Any) -> Usage:
    """``usageMetadata`` as wire usage; thinking tokens count as completion tokens because
    they are billed as output."""
    meta = _as_dict(metadata)
    prompt = _count(meta, "promptTokenCount") or 0
    thoughts = _count(meta, "thoughtsTokenCount")
    completion = (_count(meta, "candidatesTokenCount") or 0) + (thoughts or 0)
    total = _count(meta, "totalTokenCount")
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total if total is not None else prompt + completion,
        cached_prompt_tokens=_count(meta, "cachedContentTokenCount"),
        reasoning_tokens=thoughts,
    )


def _count(meta: Json, key: str) -> int | None:
    value = meta.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _candidate_parts(payload: Json) -> list[Json]:
    candidates = _as_list(payload.get("candidates"))
    if not candidates:
        return []
    content = _as_dict(_as_dict(candidates[0]).get("content"))
    return [part for part in _as_list(content.get("parts")) if isinstance(part, dict)]


def _visible_text(part: Json) -> str:
    text = part.get("text")
    if not isinstance(text, str) or part.get("thought") is True:
        return ""
    return text


def _tool_call(part: Json) -> ToolCall | None:
    call = part.get("functionCall")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    call_id = call.get("id")
    args = call.get("args")
    return ToolCall(
        id=call_id if isinstance(call_id, str) and call_id else f"call_{uuid.uuid4().hex}",
        function=FunctionCall(
            name=call["name"], arguments=json.dumps(args if args is not None else {})
        ),
    )


def _model_version(payload: Json) -> str | None:
    version = payload.get("modelVersion")
    return version if isinstance(version, str) and version else None


def _as_dict(value: Any) -> Json:
    return value if isinstance(value, dict) else {}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


# --- streaming -----------------------------------------------------------------------------


@dataclass
class StreamState:
    """What a stream has said so far: Gemini repeats cumulative usage on every chunk and
    names the finish reason only on the last one, so both are held until the end."""

    signatures: SignatureMemory
    tool_calls: int = 0
    usage: Any = None
    raw_finish: Any = None
    blocked: bool = False

    def feed(self, chunk: Json) -> list[UpstreamEvent]:
        if chunk.get("usageMetadata") is not None:
            self.usage = chunk["usageMetadata"]
        candidates = _as_list(chunk.get("candidates"))
        if not candidates and _as_dict(chunk.get("promptFeedback")).get("blockReason"):
            self.blocked = True
        if candidates and _as_dict(candidates[0]).get("finishReason"):
            self.raw_finish = candidates[0]["finishReason"]
        return [event for part in _candidate_parts(chunk) for event in self._events(part)]

    def _events(self, part: Json) -> list[UpstreamEvent]:
        events: list[UpstreamEvent] = []
        text = _visible_text(part)
        if text:
            events.append(DeltaEvent(content=text))
        call = _tool_call(part)
        if call is not None:
            self.signatures.remember(call.id, part.get("thoughtSignature"))
            events.append(
                ToolCallEvent(
                    index=self.tool_calls,
                    id=call.id,
                    name=call.function.name,
                    arguments_delta=call.function.arguments,
                )
            )
            self.tool_calls += 1
        return events

    def finish(self) -> list[UpstreamEvent]:
        """The closing usage and finish events.

        A stream that ends without a finish reason was cut off: Gemini leaves the reason
        empty exactly while the model is still generating.
        """
        if self.blocked:
            reason: FinishReason = "content_filter"
        elif self.raw_finish is None:
            raise broken_stream_error(VENDOR)
        else:
            reason = map_finish_reason(self.raw_finish, has_calls=self.tool_calls > 0)
        events: list[UpstreamEvent] = []
        if self.usage is not None:
            events.append(UsageEvent(usage=usage_from(self.usage)))
        events.append(FinishEvent(finish_reason=reason))
        return events


# --- errors --------------------------------------------------------------------------------


def status_error(status: int, body: Any, headers: Mapping[str, str], api_key: str) -> ProxyError:
    """The wire error for a Gemini HTTP error (``body``: parsed JSON, or the text when it is
    none); only Google's ``{"error": {...}}`` envelope is read, a proxy's page is not."""
    error = _as_dict(_as_dict(body).get("error"))
    return google_error(error, status, headers, api_key)


def raise_embedded_error(payload: Any, api_key: str) -> None:
    """Gemini can report a failure inside a 200 body or an SSE frame (``{"error": ...}``)."""
    error = _as_dict(payload).get("error")
    if isinstance(error, dict):
        code = error.get("code")
        status = code if isinstance(code, int) and 400 <= code < 600 else 500
        raise google_error(error, status, None, api_key)


def google_error(
    error: Json, status: int, headers: Mapping[str, str] | None, api_key: str
) -> ProxyError:
    """Google's ``{"code", "message", "status", "details"}`` error as a wire error.

    Google answers a bad key with 400 ``API_KEY_INVALID``; it is reported as a 401 so the
    caller hears "the proxy's credentials" rather than "your request is wrong". A 429 names
    its delay in a ``RetryInfo`` detail rather than in a ``Retry-After`` header.
    """
    details = [_as_dict(detail) for detail in _as_list(error.get("details"))]
    if any(detail.get("reason") == "API_KEY_INVALID" for detail in details):
        status = 401
    retry_after = retry_after_seconds(headers)
    message = error.get("message")
    return error_for_status(
        VENDOR,
        status,
        vendor_message=message if isinstance(message, str) else None,
        retry_after=retry_after if retry_after is not None else _retry_delay(details),
        secrets=[api_key],
    )


def _retry_delay(details: list[Json]) -> float | None:
    """``retryDelay`` of a ``google.rpc.RetryInfo`` detail, a protobuf Duration like "37s"."""
    for detail in details:
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return max(0.0, float(delay[:-1]))
            except ValueError:
                return None
    return None
