"""Reading the chat request body once, bounded, into a ``ChatRequest``.

The size limit is enforced while the body arrives, not after: a client announcing or sending
more than ``max_bytes`` is refused as soon as the limit is crossed, so an oversized or endless
body costs at most ``max_bytes`` of memory. The parsed request is kept in the scope so that the
middleware after us (rate limits, cache, metering) and the route share one parse.
"""

from __future__ import annotations

from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request

from robota_client.messages import ChatRequest
from robota_proxy import scope as keys
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
        if any(item["type"] == "json_invalid" for item in exc.errors()):
            raise InvalidRequest("the request body is not valid JSON") from None
        raise InvalidRequest(f"invalid chat request: {describe(exc)}") from None


async def chat_request(request: Request, max_bytes: int) -> ChatRequest:
    cached = request.scope.get(keys.CHAT_REQUEST)
    if isinstance(cached, ChatRequest):
        return cached
    parsed = parse_chat_request(await read_body(request, max_bytes))
    request.scope[keys.CHAT_REQUEST] = parsed
    return parsed
