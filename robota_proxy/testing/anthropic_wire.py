"""Anthropic Messages as the official ``anthropic`` SDK expects it.

Shapes follow the API reference: a ``message`` object with ``text`` / ``tool_use`` content
blocks, and the streaming sequence ``message_start`` (input usage), ``content_block_start``,
``ping``, ``content_block_delta`` (``text_delta`` or ``input_json_delta``),
``content_block_stop``, ``message_delta`` (stop reason, cumulative usage), ``message_stop``.
Errors are ``{"type": "error", "error": {"type", "message"}, "request_id"}``.

A scripted ``thinking`` text comes first as a ``thinking`` block (``thinking_delta`` then
``signature_delta`` when streamed) whose signature is derived from its text; like the real
API, a thinking block sent back in a later turn with any other signature is a 400, so a
proxy that alters or drops it is caught. ``count_tokens`` answers ``{"input_tokens"}`` with
the prompt tokens a message call with the same body would report.
"""

from __future__ import annotations

import base64
import hashlib

from starlette.requests import Request
from starlette.responses import Response

from robota_proxy.testing.script import (
    Conversation,
    ErrorKind,
    Finish,
    LastRole,
    Plan,
    Vendor,
    count_words,
)
from robota_proxy.testing.sse import SSEEvent
from robota_proxy.testing.wire import (
    Json,
    as_list,
    dumps,
    json_response,
    new_id,
    retry_headers,
    split_json,
    split_text,
    text_of,
)

STOP_REASONS: dict[Finish, str] = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "length": "max_tokens",
    "content_filter": "refusal",
}

_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    503: ("overloaded_error", "Overloaded"),
    529: ("overloaded_error", "Overloaded"),
}


def _blocks(content: object) -> list[Json]:
    return [block for block in as_list(content) if isinstance(block, dict)]


def signature(thinking: str) -> str:
    """The signature the fake gives a thinking block: opaque to the caller, checkable here."""
    digest = hashlib.sha256(f"fake-thinking:{thinking}".encode()).digest()
    return base64.b64encode(digest).decode()


def _bad_thinking(messages: list[object]) -> str | None:
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        for index, block in enumerate(_blocks(message.get("content"))):
            if block.get("type") != "thinking":
                continue
            text = block.get("thinking")
            if not isinstance(text, str) or block.get("signature") != signature(text):
                return (
                    f"messages.{position}.content.{index}: Invalid `signature` in `thinking` block"
                )
    return None


def _words(content: object) -> int:
    if isinstance(content, str):
        return count_words(content)
    total = 0
    for block in _blocks(content):
        if block.get("type") == "tool_result":
            total += count_words(text_of(block.get("content")))
        elif isinstance(block.get("text"), str):
            total += count_words(block["text"])
    return total


class AnthropicWire:
    vendor: Vendor = "anthropic"
    newline = "\n"
    #: What the API answers, for models that cannot continue an assistant turn.
    prefill_refused = (
        "This model does not support assistant message prefill. "
        "The conversation must end with a user message."
    )

    def headers(self) -> dict[str, str]:
        return {"request-id": new_id("req_", 24)}

    def auth_error(self, request: Request, api_key: str) -> Response | None:
        # The classic header is x-api-key; recent official SDKs send the same key as
        # ``Authorization: Bearer``, so either is accepted.
        given = request.headers.get("x-api-key")
        if given is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else None
        if given is None:
            return self.error(401, "x-api-key header is required")
        if given != api_key:
            return self.error(401, "invalid x-api-key")
        if "anthropic-version" not in request.headers:
            return self.error(400, "anthropic-version: header is required")
        return None

    def summarize(self, body: Json) -> Conversation:
        messages = [
            message for message in as_list(body.get("messages")) if isinstance(message, dict)
        ]
        words = _words(body.get("system")) + sum(_words(m.get("content")) for m in messages)
        if not messages:
            return Conversation(words=words)
        last = messages[-1]
        results = [
            text_of(block.get("content"))
            for block in _blocks(last.get("content"))
            if block.get("type") == "tool_result"
        ]
        if results:
            return Conversation("tool", "\n".join(results), words)
        role: LastRole = "assistant" if last.get("role") == "assistant" else "user"
        return Conversation(role, text_of(last.get("content")), words)

    def invalid(self, body: Json) -> str | None:
        if not isinstance(body.get("model"), str) or not body["model"]:
            return "model: Field required"
        if not isinstance(body.get("max_tokens"), int):
            return "max_tokens: Field required"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages: Field required"
        bad_thinking = _bad_thinking(messages)
        if bad_thinking is not None:
            return bad_thinking
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
            prefill = text_of(last.get("content"))
            if prefill != prefill.rstrip():
                return "messages: final assistant content cannot end with trailing whitespace"
        pending: list[str] = []
        for position, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role == "system":
                return (
                    'messages: Unexpected role "system". The Messages API accepts a top-level '
                    '`system` parameter, not "system" as an input message role.'
                )
            if role not in ("user", "assistant"):
                return f"messages.{position}.role: Input should be 'user' or 'assistant'"
            blocks = _blocks(message.get("content"))
            answered = [
                block.get("tool_use_id") for block in blocks if block.get("type") == "tool_result"
            ]
            stray = [call_id for call_id in answered if call_id not in pending]
            if stray:
                return (
                    f"messages.{position}.content: unexpected `tool_use_id` found in "
                    f"`tool_result` blocks: {stray[0]}. Each `tool_result` block must have a "
                    "corresponding `tool_use` block in the previous message."
                )
            missing = [call_id for call_id in pending if call_id not in answered]
            if missing:
                return (
                    f"messages.{position - 1}: `tool_use` ids were found without `tool_result` "
                    f"blocks immediately after: {', '.join(missing)}. Each `tool_use` block must "
                    "have a corresponding `tool_result` block in the next message."
                )
            pending = [
                block["id"]
                for block in blocks
                if block.get("type") == "tool_use" and isinstance(block.get("id"), str)
            ]
        return None

    def error(
        self, status: int, message: str | None = None, retry_after: float | None = None
    ) -> Response:
        fallback = "api_error" if status >= 500 else "invalid_request_error"
        kind, default_message = _ERRORS.get(status, (fallback, f"HTTP {status}"))
        headers = self.headers()
        body = {
            "type": "error",
            "error": {"type": kind, "message": message or default_message},
            "request_id": headers["request-id"],
        }
        return json_response(body, status, {**headers, **retry_headers(retry_after)})

    def kind_error(self, kind: ErrorKind, message: str | None = None) -> Response | None:
        """A too-long prompt is a 400; a refusal is no error at all but a 200 message whose
        ``stop_reason`` is ``refusal`` (None: the caller renders the refused plan)."""
        if kind == "content_policy":
            return None
        return self.error(400, message or "prompt is too long: 210000 tokens > 200000 maximum")

    def count_tokens(self, body: Json) -> Json:
        """``messages.count_tokens``: the prompt tokens the same body would be billed."""
        return {"input_tokens": max(1, self.summarize(body).words)}

    def reply(self, plan: Plan, model: str) -> Json:
        content: list[Json] = []
        if plan.thinking is not None:
            content.append(
                {
                    "type": "thinking",
                    "thinking": plan.thinking,
                    "signature": signature(plan.thinking),
                }
            )
        if plan.text or not (plan.tool_calls or plan.refused):
            content.append({"type": "text", "text": plan.text})
        content += [
            {
                "type": "tool_use",
                "id": call.id or new_id("toolu_"),
                "name": call.name,
                "input": dict(call.arguments),
            }
            for call in plan.tool_calls
        ]
        return {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": STOP_REASONS[plan.finish],
            "stop_sequence": None,
            "usage": _usage(plan, plan.completion_tokens),
        }

    def events(self, plan: Plan, model: str, body: Json) -> list[SSEEvent]:
        def event(payload: Json, content: bool = False) -> SSEEvent:
            return SSEEvent(dumps(payload), event=payload["type"], content=content)

        start: Json = {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _usage(plan, 1),
        }
        events = [event({"type": "message_start", "message": start})]
        blocks: list[tuple[Json, list[Json]]] = []
        if plan.thinking is not None:
            thinking = [
                {"type": "thinking_delta", "thinking": piece} for piece in split_text(plan.thinking)
            ]
            thinking.append({"type": "signature_delta", "signature": signature(plan.thinking)})
            blocks.append(({"type": "thinking", "thinking": "", "signature": ""}, thinking))
        if plan.text or not (plan.tool_calls or plan.refused):
            deltas = [{"type": "text_delta", "text": piece} for piece in split_text(plan.text)]
            blocks.append(({"type": "text", "text": ""}, deltas))
        for call in plan.tool_calls:
            opening = {
                "type": "tool_use",
                "id": call.id or new_id("toolu_"),
                "name": call.name,
                "input": {},
            }
            fragments = split_json(dumps(dict(call.arguments)))
            blocks.append(
                (opening, [{"type": "input_json_delta", "partial_json": f} for f in fragments])
            )
        for index, (opening, deltas) in enumerate(blocks):
            events.append(
                event({"type": "content_block_start", "index": index, "content_block": opening})
            )
            if index == 0:
                events.append(event({"type": "ping"}))
            events += [
                event({"type": "content_block_delta", "index": index, "delta": delta}, True)
                for delta in deltas
            ]
            events.append(event({"type": "content_block_stop", "index": index}))
        events.append(
            event(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": STOP_REASONS[plan.finish], "stop_sequence": None},
                    "usage": _delta_usage(plan),
                }
            )
        )
        if not (plan.fault and plan.fault.no_terminal):
            events.append(event({"type": "message_stop"}))
        return events


def _usage(plan: Plan, output_tokens: int) -> Json:
    # Anthropic's input_tokens leaves out the tokens read from (or written to) the cache.
    usage: Json = {
        "input_tokens": plan.prompt_tokens - plan.cached_tokens - plan.cache_write_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": plan.cache_write_tokens,
        "cache_read_input_tokens": plan.cached_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": plan.cache_write_tokens,
            "ephemeral_1h_input_tokens": 0,
        },
        "service_tier": "standard",
    }
    if output_tokens == plan.completion_tokens and plan.reasoning_tokens:
        # Thinking is inside output_tokens; the details only break it down.
        usage["output_tokens_details"] = {"thinking_tokens": plan.reasoning_tokens}
    return usage


def _delta_usage(plan: Plan) -> Json:
    """The closing counts, cumulative, as the current API sends them: the input counts
    again (the same as in ``message_start``) beside the final output count."""
    usage = _usage(plan, plan.completion_tokens)
    return {
        key: usage[key]
        for key in (
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "output_tokens_details",
        )
        if key in usage
    }
