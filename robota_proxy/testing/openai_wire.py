"""OpenAI Chat Completions as the official ``openai`` SDK expects it.

Shapes follow the API reference: ``chat.completion`` / ``chat.completion.chunk`` objects,
tool-call deltas keyed by ``index`` (id, type and name only on a call's first delta), a
``choices: []`` usage chunk before ``data: [DONE]`` when ``stream_options.include_usage``
is set (other chunks then carry ``usage: null``), and errors as
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from robota_proxy.testing.script import (
    Conversation,
    ErrorKind,
    LastRole,
    Plan,
    Vendor,
    count_words,
)
from robota_proxy.testing.sse import SSEEvent
from robota_proxy.testing.wire import (
    Json,
    as_dict,
    as_list,
    dumps,
    json_response,
    new_id,
    retry_headers,
    split_json,
    split_text,
    text_of,
)

MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o4-mini")
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_KEY_PAGE = "https://platform.openai.com/account/api-keys"

# (type, code, message) by status, as OpenAI words them.
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests per min (RPM). Please try again later.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


# (message, param, code) of the request errors ``Fault.error_kind`` names, as OpenAI sends them.
_KIND_ERRORS: dict[ErrorKind, tuple[str, str | None, str]] = {
    "context_length": (
        "This model's maximum context length is 128000 tokens. However, your messages "
        "resulted in 130000 tokens. Please reduce the length of the messages.",
        "messages",
        "context_length_exceeded",
    ),
    "content_policy": (
        "Your request was rejected as a result of our safety system.",
        None,
        "content_policy_violation",
    ),
}


def masked_key(key: str) -> str:
    """The key as OpenAI quotes it in a 401: first 8 and last 4 characters kept."""
    if len(key) <= 12:
        return key
    return key[:8] + "*" * (len(key) - 12) + key[-4:]


class OpenAIWire:
    vendor: Vendor = "openai"
    newline = "\n"
    #: The real API never refuses a final assistant message (it answers afresh), so this
    #: wording is the fake's own, in OpenAI's style, for the ``reject`` prefill mode.
    prefill_refused = (
        "Invalid value for 'messages': the last message must not have role 'assistant'; "
        "assistant message prefill is not supported."
    )

    def headers(self) -> dict[str, str]:
        return {"x-request-id": new_id("req_", 32), "openai-processing-ms": "1"}

    def auth_error(self, request: Request, api_key: str) -> Response | None:
        header = request.headers.get("authorization")
        if not header:
            return self._error(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). "
                f"You can obtain an API key from {_KEY_PAGE}.",
                None,
                code=None,
            )
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and given.strip() == api_key:
            return None
        return self.error(
            401,
            f"Incorrect API key provided: {masked_key(given.strip() or header)}. "
            f"You can find your API key at {_KEY_PAGE}.",
        )

    def summarize(self, body: Json) -> Conversation:
        messages = [
            message for message in as_list(body.get("messages")) if isinstance(message, dict)
        ]
        words = sum(count_words(text_of(message.get("content"))) for message in messages)
        if not messages:
            return Conversation(words=words)
        role = messages[-1].get("role")
        if role == "tool":
            results: list[str] = []
            for message in reversed(messages):
                if message.get("role") != "tool":
                    break
                results.append(text_of(message.get("content")))
            return Conversation("tool", "\n".join(reversed(results)), words)
        last_role: LastRole = (
            "system"
            if role in ("system", "developer")
            else "assistant"
            if role == "assistant"
            else "user"
        )
        return Conversation(last_role, text_of(messages[-1].get("content")), words)

    def invalid(self, body: Json) -> str | None:
        if not isinstance(body.get("model"), str) or not body["model"]:
            return "you must provide a model parameter"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "[] is too short - 'messages'"
        unanswered: list[str] = []
        for position, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in _ROLES:
                return (
                    f"Invalid value for 'messages[{position}].role'. Supported values are: "
                    "'system', 'assistant', 'user', 'function', 'tool', and 'developer'."
                )
            role = message["role"]
            if role == "tool":
                call_id = message.get("tool_call_id")
                if not isinstance(call_id, str):
                    return f"Missing required parameter: 'messages[{position}].tool_call_id'."
                if call_id not in unanswered:
                    return (
                        "Invalid parameter: messages with role 'tool' must be a response to a "
                        "preceeding message with 'tool_calls'."
                    )
                unanswered.remove(call_id)
                continue
            if unanswered:
                return (
                    "An assistant message with 'tool_calls' must be followed by tool messages "
                    "responding to each 'tool_call_id'. The following tool_call_ids did not "
                    f"have response messages: {', '.join(unanswered)}"
                )
            if role == "assistant":
                unanswered = [
                    call["id"]
                    for call in as_list(message.get("tool_calls"))
                    if isinstance(call, dict) and isinstance(call.get("id"), str)
                ]
        return None

    def error(
        self, status: int, message: str | None = None, retry_after: float | None = None
    ) -> Response:
        return self._error(status, message, retry_after, code=_kind(status)[1])

    def kind_error(self, kind: ErrorKind, message: str | None = None) -> Response | None:
        """Both kinds are a 400 ``invalid_request_error`` with OpenAI's code and param."""
        default_message, param, code = _KIND_ERRORS[kind]
        return self._error(400, message or default_message, None, code=code, param=param)

    def _error(
        self,
        status: int,
        message: str | None,
        retry_after: float | None,
        *,
        code: str | None,
        param: str | None = None,
    ) -> Response:
        kind, _, default_message = _kind(status)
        body = {
            "error": {
                "message": message or default_message,
                "type": kind,
                "param": param,
                "code": code,
            }
        }
        return json_response(body, status, {**self.headers(), **retry_headers(retry_after)})

    def reply(self, plan: Plan, model: str) -> Json:
        message: Json = {
            "role": "assistant",
            "content": plan.text if plan.text or not plan.tool_calls else None,
            "refusal": None,
            "annotations": [],
        }
        if plan.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id or new_id("call_"),
                    "type": "function",
                    "function": {"name": call.name, "arguments": dumps(dict(call.arguments))},
                }
                for call in plan.tool_calls
            ]
        return {
            "id": new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": plan.finish}
            ],
            "usage": _usage(plan),
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }

    def events(self, plan: Plan, model: str, body: Json) -> list[SSEEvent]:
        include_usage = as_dict(body.get("stream_options")).get("include_usage") is True
        base: Json = {
            "id": new_id("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
        if include_usage:
            base["usage"] = None

        def chunk(delta: Json, finish: str | None = None, content: bool = False) -> SSEEvent:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return SSEEvent(dumps({**base, "choices": [choice]}), content=content)

        events = [
            chunk({"role": "assistant", "content": "" if plan.text else None, "refusal": None})
        ]
        events += [chunk({"content": piece}, content=True) for piece in split_text(plan.text)]
        for index, call in enumerate(plan.tool_calls):
            opening = {
                "index": index,
                "id": call.id or new_id("call_"),
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            events.append(chunk({"tool_calls": [opening]}))
            events += [
                chunk(
                    {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}, None, True
                )
                for piece in split_json(dumps(dict(call.arguments)))
            ]
        events.append(chunk({}, plan.finish))
        if include_usage:
            events.append(SSEEvent(dumps({**base, "choices": [], "usage": _usage(plan)})))
        if not (plan.fault and plan.fault.no_terminal):
            events.append(SSEEvent("[DONE]"))
        return events


def _kind(status: int) -> tuple[str, str | None, str]:
    fallback = "server_error" if status >= 500 else "invalid_request_error"
    return _ERRORS.get(status, (fallback, None, f"HTTP {status}"))


def _usage(plan: Plan) -> dict[str, Any]:
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.completion_tokens,
        "total_tokens": plan.total_tokens,
        "prompt_tokens_details": {"cached_tokens": plan.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": plan.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def models_list() -> Json:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "openai"}
            for name in MODELS
        ],
    }
