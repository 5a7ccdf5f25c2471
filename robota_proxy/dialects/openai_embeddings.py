"""OpenAI's embeddings request as a dialect: what ``POST /v1/embeddings`` reads.

The chain (auth, rate limits, metering) works on a ``ChatRequest``, so the body is parsed
into one: the routed provider and model, and one user message per input. Those messages are
only there for the chain's estimates (``prompt_token_bound`` for the reservation, the ``tpm``
estimate), which is why a token-array input becomes its ids as decimal text: at least one
byte per id, so the byte-counting bound still bounds the vendor's count of one token per id.
The route reads the rest of the caller's JSON (``ParsedChat.raw``) through
``embedding_fields``. Errors are OpenAI's (``openai.render_error``) with ``param`` naming the
field; a field OpenAI's embeddings API does not have is refused rather than dropped, as
OpenAI itself does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from robota_client.messages import ChatRequest, UniversalMessage
from robota_proxy.chat_body import parse_json
from robota_proxy.dialects import ModelRouter, ParsedChat
from robota_proxy.errors import InvalidRequest

VENDOR = "openai"
#: OpenAI's own bound on the inputs of one request.
MAX_INPUTS = 2048
_FIELDS = frozenset({"model", "input", "dimensions", "encoding_format", "user"})
_INPUT_FORMS = (
    "a string, an array of strings, an array of token ids, or an array of token-id arrays"
)


@dataclass(frozen=True, slots=True)
class EmbeddingFields:
    """The caller's embeddings fields, checked."""

    model: str
    #: Texts, or token-id tuples; never a mix (OpenAI allows none).
    inputs: tuple[str | tuple[int, ...], ...]
    dimensions: int | None
    encoding_format: Literal["float", "base64"]
    user: str | None


def parse(body: bytes, router: ModelRouter) -> ParsedChat:
    """The body as a ``ChatRequest`` routed by ``router``; ``InvalidRequest`` naming the
    OpenAI field at fault otherwise."""
    if not body.strip():
        raise InvalidRequest("the request body is empty; send an embeddings JSON object")
    raw = parse_json(body)
    if not isinstance(raw, dict):
        raise InvalidRequest("the request body must be a JSON object")
    fields = embedding_fields(raw)
    routed = router(fields.model, VENDOR)
    messages = [
        UniversalMessage(
            role="user",
            content=item if isinstance(item, str) else " ".join(str(i) for i in item),
        )
        for item in fields.inputs
    ]
    try:
        request = ChatRequest(provider=routed.provider, model=routed.model, messages=messages)
    except ValueError as exc:
        raise _bad("model", f"model {fields.model!r} cannot be used: {exc}") from None
    return ParsedChat(request, raw=raw)


def embedding_fields(raw: dict[str, Any]) -> EmbeddingFields:
    """Check every field of an embeddings body (the route calls it again on ``raw``: the
    parse in the scope keeps only the ``ChatRequest`` and the JSON)."""
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise _bad(unknown[0], f"unrecognized request argument supplied: {unknown[0]}")
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "a model name is required, such as 'text-embedding-3-small'")
    dimensions = raw.get("dimensions")
    if dimensions is not None and (
        not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1
    ):
        raise _bad("dimensions", "dimensions must be a positive integer")
    encoding: Literal["float", "base64"]
    match raw.get("encoding_format"):
        case None | "float":
            encoding = "float"
        case "base64":
            encoding = "base64"
        case _:
            raise _bad("encoding_format", "encoding_format must be 'float' or 'base64'")
    user = raw.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", "user must be a string")
    return EmbeddingFields(model, _inputs(raw.get("input")), dimensions, encoding, user)


def _inputs(value: Any) -> tuple[str | tuple[int, ...], ...]:
    if value is None:
        raise _bad("input", f"input is required: {_INPUT_FORMS}")
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and value and all(_is_id(i) for i in value):
        items = [value]
    elif isinstance(value, list) and value:
        items = value
    else:
        raise _bad("input", f"input must be {_INPUT_FORMS}, and not empty")
    if len(items) > MAX_INPUTS:
        raise _bad("input", f"at most {MAX_INPUTS} inputs per request, not {len(items)}")
    texts = all(isinstance(item, str) for item in items)
    tokens = all(isinstance(item, list) and all(_is_id(i) for i in item) for item in items)
    if not (texts or tokens):
        raise _bad("input", f"input must be {_INPUT_FORMS}; texts and token ids cannot be mixed")
    for position, item in enumerate(items):
        if not item:
            raise _bad(f"input.{position}", "an input cannot be empty")
    return tuple(item if isinstance(item, str) else tuple(item) for item in items)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)
