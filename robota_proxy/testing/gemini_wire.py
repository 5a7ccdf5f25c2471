"""Google Gemini ``generateContent`` / ``streamGenerateContent`` as its REST API speaks it.

Shapes follow the API reference: a ``GenerateContentResponse`` with ``candidates[0].content``
(role ``model``, ``text`` or ``functionCall`` parts), ``finishReason`` and ``usageMetadata``.
Streamed with ``alt=sse`` every ``data:`` frame is a whole ``GenerateContentResponse``
holding the next piece; only the last one names the finish reason and the usage. There is
no ``[DONE]``, and the frames are CRLF-separated as Google's front end sends them. Errors are
``{"error": {"code", "message", "status"}}``, and a wrong key is the 400 ``API_KEY_INVALID``
Google really answers, not a 401.
"""

from __future__ import annotations

import json
from typing import Any

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
    as_dict,
    as_list,
    dumps,
    json_response,
    new_id,
    retry_headers,
    split_text,
    text_of,
)

FINISH_REASONS: dict[Finish, str] = {
    "stop": "STOP",
    "tool_calls": "STOP",
    "length": "MAX_TOKENS",
    "content_filter": "SAFETY",
}

_ERRORS: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request had invalid authentication credentials."),
    403: ("PERMISSION_DENIED", "The caller does not have permission."),
    404: ("NOT_FOUND", "Requested entity was not found."),
    429: ("RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    500: ("INTERNAL", "An internal error has occurred. Please retry or report the problem."),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "The request timed out. Please try again."),
}


def _function_response(part: Json) -> Json | None:
    response = part.get("functionResponse", part.get("function_response"))
    return response if isinstance(response, dict) else None


def _result_text(function_response: Json) -> str:
    """A tool result as text: a lone ``result``/``content``/``output`` string (the usual
    wrapping of a plain-text result), else the whole response object as JSON."""
    response = function_response.get("response")
    if isinstance(response, dict):
        if len(response) == 1:
            ((key, value),) = response.items()
            if key in ("result", "content", "output") and isinstance(value, str):
                return value
        return json.dumps(response)
    return "" if response is None else json.dumps(response)


def _parts(content: Any) -> list[Json]:
    return [part for part in as_list(as_dict(content).get("parts")) if isinstance(part, dict)]


def _words(parts: list[Json]) -> int:
    total = 0
    for part in parts:
        response = _function_response(part)
        if response is not None:
            total += count_words(_result_text(response))
        elif isinstance(part.get("text"), str):
            total += count_words(part["text"])
    return total


#: What a blocked prompt's ``promptFeedback`` rates, as the API lists them.
_BLOCKED_RATINGS = [
    {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"},
]


class GeminiWire:
    vendor: Vendor = "google"
    newline = "\r\n"
    #: The API's refusal of contents ending with a ``model`` turn, in its own grammar.
    prefill_refused = (
        "Please ensure that multiturn requests ends with a user role or a function response."
    )

    def headers(self) -> dict[str, str]:
        return {}

    def auth_error(self, request: Request, api_key: str) -> Response | None:
        given = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if given is None:
            return self.error(
                403,
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.",
            )
        if given == api_key:
            return None
        message = "API key not valid. Please pass a valid API key."
        return json_response(
            {
                "error": {
                    "code": 400,
                    "message": message,
                    "status": "INVALID_ARGUMENT",
                    "details": [
                        {
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "API_KEY_INVALID",
                            "domain": "googleapis.com",
                            "metadata": {"service": "generativelanguage.googleapis.com"},
                        }
                    ],
                }
            },
            400,
        )

    def summarize(self, body: Json) -> Conversation:
        system = body.get("systemInstruction", body.get("system_instruction"))
        contents = [
            content for content in as_list(body.get("contents")) if isinstance(content, dict)
        ]
        words = _words(_parts(system)) + sum(_words(_parts(content)) for content in contents)
        if not contents:
            return Conversation(words=words)
        parts = _parts(contents[-1])
        responses = [r for r in map(_function_response, parts) if r is not None]
        if responses:
            return Conversation("tool", "\n".join(map(_result_text, responses)), words)
        role: LastRole = "assistant" if contents[-1].get("role") == "model" else "user"
        return Conversation(role, text_of(parts), words)

    def invalid(self, body: Json) -> str | None:
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            return "* GenerateContentRequest.contents: contents is not specified"
        calls = 0
        for content in contents:
            role = content.get("role", "user") if isinstance(content, dict) else None
            if role not in ("user", "model", "function"):
                return "Please use a valid role: user, model."
            parts = _parts(content)
            responses = sum(1 for part in parts if _function_response(part) is not None)
            if responses:
                if not calls:
                    return (
                        "Please ensure that function response turn comes immediately after a "
                        "function call turn."
                    )
                if responses != calls:
                    return (
                        "Please ensure that the number of function response parts is equal to "
                        "the number of function call parts of the function call turn."
                    )
            calls = sum(1 for part in parts if "functionCall" in part or "function_call" in part)
        return None

    def error(
        self, status: int, message: str | None = None, retry_after: float | None = None
    ) -> Response:
        fallback = "INTERNAL" if status >= 500 else "INVALID_ARGUMENT"
        code, default_message = _ERRORS.get(status, (fallback, f"HTTP {status}"))
        error: Json = {"code": status, "message": message or default_message, "status": code}
        if retry_after is not None:
            error["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": f"{retry_after:g}s",
                }
            ]
        return json_response({"error": error}, status, retry_headers(retry_after))

    def kind_error(self, kind: ErrorKind, message: str | None = None) -> Response | None:
        """A too-long prompt is a 400 ``INVALID_ARGUMENT``; a refused one is a 200 whose
        prompt is blocked (None: the caller renders the refused plan)."""
        if kind == "content_policy":
            return None
        return self.error(
            400,
            message
            or "The input token count (1200000) exceeds the maximum number of tokens allowed "
            "(1048576).",
        )

    def reply(self, plan: Plan, model: str) -> Json:
        if plan.refused:
            return _blocked(plan, model, new_id(""))
        parts: list[Json] = []
        if plan.text or not plan.tool_calls:
            parts.append({"text": plan.text})
        parts += _call_parts(plan)
        return _response(parts, model, new_id(""), plan)

    def events(self, plan: Plan, model: str, body: Json) -> list[SSEEvent]:
        response_id = new_id("")
        if plan.refused:
            return [SSEEvent(dumps(_blocked(plan, model, response_id)), content=True)]
        pieces = split_text(plan.text)
        calls = _call_parts(plan)
        if plan.fault and plan.fault.no_terminal:
            # Gemini has no end marker: what ends a stream is the chunk naming the finish
            # reason, so that chunk is what goes missing; every piece still arrives.
            events = [
                SSEEvent(dumps(_response([{"text": piece}], model, response_id)), content=True)
                for piece in pieces
            ]
            if calls:
                events.append(SSEEvent(dumps(_response(calls, model, response_id)), content=True))
            return events
        if calls:
            last: list[Json] = calls
        else:
            last = [{"text": pieces.pop() if pieces else ""}]
        events = [
            SSEEvent(dumps(_response([{"text": piece}], model, response_id)), content=True)
            for piece in pieces
        ]
        events.append(SSEEvent(dumps(_response(last, model, response_id, plan)), content=True))
        return events


def _call_parts(plan: Plan) -> list[Json]:
    return [
        {"functionCall": {"name": call.name, "args": dict(call.arguments)}}
        for call in plan.tool_calls
    ]


def _response(parts: list[Json], model: str, response_id: str, plan: Plan | None = None) -> Json:
    """One ``GenerateContentResponse``; ``plan`` given for the final one, which carries the
    finish reason and usage."""
    candidate: Json = {"content": {"parts": parts, "role": "model"}, "index": 0}
    payload: Json = {"candidates": [candidate]}
    if plan is not None:
        candidate["finishReason"] = FINISH_REASONS[plan.finish]
        usage: Json = {
            "promptTokenCount": plan.prompt_tokens,
            "candidatesTokenCount": plan.completion_tokens - plan.reasoning_tokens,
            "totalTokenCount": plan.total_tokens,
        }
        if plan.cached_tokens:
            usage["cachedContentTokenCount"] = plan.cached_tokens
        if plan.reasoning_tokens:
            usage["thoughtsTokenCount"] = plan.reasoning_tokens
        payload["usageMetadata"] = usage
    payload["modelVersion"] = model
    payload["responseId"] = response_id
    return payload


def _blocked(plan: Plan, model: str, response_id: str) -> Json:
    """A ``GenerateContentResponse`` for a prompt the safety filters blocked: no candidate,
    the reason in ``promptFeedback``, only the prompt counted."""
    return {
        "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": _BLOCKED_RATINGS},
        "usageMetadata": {
            "promptTokenCount": plan.prompt_tokens,
            "totalTokenCount": plan.prompt_tokens,
        },
        "modelVersion": model,
        "responseId": response_id,
    }
