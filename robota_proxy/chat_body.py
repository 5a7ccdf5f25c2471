"""Reading the chat request body once, bounded, into a ``ChatRequest``.

The size limit is enforced while the body arrives, not after: a client announcing or sending
more than ``max_bytes`` is refused as soon as the limit is crossed, so an oversized or endless
body costs at most ``max_bytes`` of memory. The parsed request is kept in the scope so that the
middleware after us (rate limits, cache, metering) and the route share one parse.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import pydantic_core
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request

from robota_client.messages import ChatRequest
from robota_proxy import scope as keys
from robota_proxy.dialects import parse_for_path
from robota_proxy.errors import InvalidRequest, PayloadTooLarge


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"request body is larger than the limit of {max_bytes} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise PayloadTooLarge(f"request body is larger than the limit of {max_bytes} bytes")
    except ClientDisconnect as exc:
        raise InvalidRequest("the client went away before sending the whole body") from exc
    return bytes(body)


#: How deep JSON may nest: the limit of pydantic-core's parser, which reads every body and
#: frame. Python's own ``json`` recurses in C until it raises ``RecursionError`` (a 500) at
#: about 1,000 levels; no request needs more than a few dozen.
MAX_JSON_DEPTH = 200


def json_problem(reason: str) -> str:
    """pydantic-core's reason for refusing a document, in the caller's terms: the two a
    fuzzer finds are nesting (``recursion limit exceeded``) and a lone UTF-16 surrogate such
    as ``"\\ud800"``, which JSON's grammar allows but no database or UTF-8 encoder takes."""
    deep = "recursion limit exceeded"
    if reason.startswith(deep):
        return f"nested deeper than {MAX_JSON_DEPTH} levels ({reason.removeprefix(deep).strip()})"
    if "surrogate" in reason or "hex escape" in reason:
        return f"a \\u escape that is not a Unicode character, such as a lone surrogate ({reason})"
    return reason


def parse_json(body: bytes | str, what: str = "the request body") -> Any:
    """JSON through pydantic-core's parser rather than ``json.loads``: bounded in depth, and
    strict about lone surrogates, so what it returns can be stored and logged. Raises
    ``InvalidRequest`` saying what is wrong and where."""
    try:
        return pydantic_core.from_json(body)
    except ValueError as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {json_problem(str(exc))}") from None


def describe(error: ValidationError) -> str:
    """One line per problem, with the path into the body, so the caller can fix it."""
    problems = []
    for item in error.errors(include_url=False)[:10]:
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def parse_chat_request(body: bytes) -> ChatRequest:
    if not body.strip():
        raise InvalidRequest("the request body is empty; send a JSON ChatRequest")
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as exc:
        for item in exc.errors(include_url=False):
            if item["type"] == "json_invalid":
                reason = str((item.get("ctx") or {}).get("error", ""))
                detail = f": {json_problem(reason)}" if reason else ""
                raise InvalidRequest(f"the request body is not valid JSON{detail}") from None
        raise InvalidRequest(f"invalid chat request: {describe(exc)}") from None


def parse_into_scope(scope: MutableMapping[str, Any], body: bytes) -> ChatRequest:
    """Parse ``body`` in the dialect of the scope's path (``robota_proxy.dialects``) and keep
    the result in the scope: the ``ChatRequest`` under ``CHAT_REQUEST`` and the dialect's
    whole parse (the caller's own JSON included) under ``PARSED_CHAT``."""
    router = scope.get(keys.MODEL_ROUTER)
    parsed = parse_for_path(keys.route_path(scope), body, router if callable(router) else None)
    scope[keys.CHAT_REQUEST] = parsed.request
    scope[keys.PARSED_CHAT] = parsed
    return parsed.request


async def chat_request(request: Request, max_bytes: int) -> ChatRequest:
    cached = request.scope.get(keys.CHAT_REQUEST)
    if isinstance(cached, ChatRequest):
        return cached
    return parse_into_scope(request.scope, await read_body(request, max_bytes))
