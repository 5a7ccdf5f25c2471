"""Pieces the vendor adapters share, kept vendor-neutral so that they stay in step."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

from robota_client.messages import ToolCall, Usage
from robota_proxy.errors import InvalidRequest, ProxyError, UpstreamError
from robota_proxy.upstreams.errors import error_for_status, retry_after_seconds

JSONDict: TypeAlias = dict[str, Any]

#: Longest vendor error text passed on; a proxy answering with a whole HTML error page helps
#: nobody.
_MAX_VENDOR_MESSAGE = 500


def tool_arguments(call: ToolCall, vendor: str) -> JSONDict:
    """A tool call's arguments as the JSON object vendors with structured input require.

    Raised as the caller's mistake: the arguments came from the conversation it sent, and
    sending them on would only earn a vendor 400 with a less helpful message.
    """
    try:
        arguments = call.parsed_arguments()
    except ValueError:
        raise InvalidRequest(
            f"tool call {call.id!r} has arguments that are not valid JSON; "
            f"{vendor} needs them as a JSON object"
        ) from None
    if not isinstance(arguments, dict):
        raise InvalidRequest(
            f"tool call {call.id!r} has arguments that are not a JSON object, "
            f"which {vendor} requires"
        )
    return arguments


def vendor_message(body: object) -> str | None:
    """The human-readable text of a vendor error body, in any of the shapes vendors send.

    OpenAI and Anthropic wrap it in an ``error`` object (the envelope is passed here whole),
    and a compatible server may answer with plain text.
    """
    if isinstance(body, Mapping):
        inner = body.get("error")
        if isinstance(inner, Mapping):
            body = inner
        message = body.get("message")
        text = message if isinstance(message, str) else None
    else:
        text = body if isinstance(body, str) else None
    if not text or not text.strip():
        return None
    return text.strip()[:_MAX_VENDOR_MESSAGE]


def vendor_code(body: object) -> str | None:
    """The vendor's own error code (OpenAI's ``code``, e.g. ``context_length_exceeded``)."""
    if not isinstance(body, Mapping):
        return None
    inner = body.get("error")
    code = (inner if isinstance(inner, Mapping) else body).get("code")
    return code if isinstance(code, str) else None


def status_error(
    vendor: str,
    status: int,
    *,
    body: object,
    headers: Mapping[str, str] | None,
    secrets: Iterable[str],
) -> ProxyError:
    """The wire error for a vendor HTTP error, with the key cut out of anything echoed."""
    return error_for_status(
        vendor,
        status,
        vendor_message=vendor_message(body),
        vendor_code=vendor_code(body),
        retry_after=retry_after_seconds(headers),
        secrets=secrets,
    )


def malformed_response_error(vendor: str) -> UpstreamError:
    """For a complete (non-streamed) answer we could not make sense of."""
    return UpstreamError(f"{vendor} sent a response the proxy could not read")


def arguments_json(arguments: object) -> str:
    """Structured tool input as the JSON string the wire contract carries."""
    return json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


def make_usage(
    *,
    prompt: int,
    completion: int,
    total: int | None = None,
    cached: int | None = None,
    reasoning: int | None = None,
) -> Usage:
    """A ``Usage``; the total is the vendor's where it reports one, else the sum."""
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total if total is not None else prompt + completion,
        cached_prompt_tokens=cached,
        reasoning_tokens=reasoning,
    )
