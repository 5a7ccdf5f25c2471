"""Embeddings as OpenAI's ``POST /v1/embeddings`` and Gemini's ``embedContent`` /
``batchEmbedContents`` answer them, with vectors a test can predict.

Shapes follow the API references. OpenAI: ``{"object": "list", "data": [{"object":
"embedding", "index", "embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}``,
each ``embedding`` a list of floats or, with ``encoding_format: "base64"``, the base64 of its
little-endian float32 bytes (what the ``openai`` SDK asks for by default and decodes). Gemini:
``{"embedding": {"values": [...]}}`` for one content, ``{"embeddings": [{"values"}, ...]}`` for
a batch, whose every request must name the same ``models/{model}`` as the URL. Gemini reports
no token count for embeddings unless a scripted ``Reply`` sets ``prompt_tokens`` (then it is
``usageMetadata.promptTokenCount``), so tests can take both paths of the proxy.

``fake_vector(text, dimensions)`` is the vector every fake returns for ``text``: each value a
multiple of 1/1024 in [-0.977, 0.977], exact in float32, so a vector survives JSON, base64
and the SDK's decoding bit for bit and tests can compare with ``==``. Token counts are the
fake chat's: one token per whitespace-separated word (at least one per input), or one per id
of a token-array input.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Sequence
from typing import Any

from robota_proxy.testing.script import count_words
from robota_proxy.testing.wire import Json, as_dict, as_list

#: Dimensions of the models the fakes know; any other model gets ``DEFAULT_DIMENSIONS``.
DIMENSIONS: dict[str, int] = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
    "gemini-embedding-001": 3072,
    "text-embedding-004": 768,
}
DEFAULT_DIMENSIONS = 1536
#: The one OpenAI model that refuses ``dimensions``, as the real API does.
FIXED_DIMENSIONS = frozenset({"text-embedding-ada-002"})
_OPENAI_INVALID = (
    "'$.{field}' is invalid. Please check the API reference: "
    "https://platform.openai.com/docs/api-reference."
)


def fake_vector(text: str | Sequence[int], dimensions: int) -> list[float]:
    """The fakes' embedding of ``text`` (a string, or token ids)."""
    key = text if isinstance(text, str) else "tokens:" + ",".join(str(i) for i in text)
    values: list[float] = []
    block = 0
    while len(values) < dimensions:
        digest = hashlib.sha256(f"{block}:{key}".encode()).digest()
        for (number,) in struct.iter_unpack(">H", digest):
            values.append((number % 2001 - 1000) / 1024)
        block += 1
    return values[:dimensions]


def base64_vector(vector: Sequence[float]) -> str:
    """OpenAI's base64 encoding: the little-endian float32 bytes of the vector."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def input_tokens(item: str | Sequence[int]) -> int:
    return max(1, count_words(item)) if isinstance(item, str) else len(item)


def dimensions_of(model: str, wanted: Any) -> int:
    return wanted if isinstance(wanted, int) else DIMENSIONS.get(model, DEFAULT_DIMENSIONS)


# --- OpenAI -----------------------------------------------------------------------------------


def openai_inputs(body: Json) -> list[str | list[int]] | None:
    """The inputs of an embeddings body, one list whatever form ``input`` took; ``None``
    when it is none of OpenAI's four forms (or empty)."""
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and _is_tokens(value):
        return [list(value)]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return list(value)
        if all(_is_tokens(item) for item in value):
            return list(value)
    return None


def _is_tokens(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    )


def openai_invalid(body: Json) -> str | None:
    """Why OpenAI would answer this embeddings body with a 400, or None."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return "you must provide a model parameter"
    inputs = openai_inputs(body)
    if inputs is None or any(item == "" for item in inputs):
        return _OPENAI_INVALID.format(field="input")
    if len(inputs) > 2048:
        return _OPENAI_INVALID.format(field="input")
    if body.get("encoding_format", "float") not in ("float", "base64"):
        return _OPENAI_INVALID.format(field="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
            return _OPENAI_INVALID.format(field="dimensions")
        if model in FIXED_DIMENSIONS:
            return "This model does not support specifying dimensions."
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        return _OPENAI_INVALID.format(field="user")
    return None


def openai_reply(body: Json, prompt_tokens: int | None) -> Json:
    model = str(body["model"])
    inputs = openai_inputs(body) or []
    size = dimensions_of(model, body.get("dimensions"))
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(inputs):
        vector = fake_vector(item, size)
        data.append(
            {
                "object": "embedding",
                "index": index,
                "embedding": base64_vector(vector) if as_base64 else vector,
            }
        )
    tokens = prompt_tokens if prompt_tokens is not None else sum(input_tokens(i) for i in inputs)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


# --- Gemini -----------------------------------------------------------------------------------


def _gemini_text(request: Json) -> str | None:
    parts = as_list(as_dict(request.get("content")).get("parts"))
    texts = [part.get("text") for part in parts if isinstance(part, dict)]
    if not texts or not all(isinstance(text, str) for text in texts):
        return None
    return " ".join(str(text) for text in texts)


def gemini_requests(action: str, body: Json) -> list[Json]:
    """The embed requests of a body: the body itself for ``embedContent``."""
    if action == "embedContent":
        return [body]
    return [request for request in as_list(body.get("requests")) if isinstance(request, dict)]


def gemini_texts(action: str, body: Json) -> list[str]:
    return [text for r in gemini_requests(action, body) if (text := _gemini_text(r)) is not None]


def gemini_invalid(action: str, model: str, body: Json) -> str | None:
    """Why Gemini would answer this body with a 400, or None."""
    if action == "batchEmbedContents":
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            return "* BatchEmbedContentsRequest.requests: requests is not specified"
        if len(requests) > 100:
            return "* BatchEmbedContentsRequest.requests: at most 100 requests can be in one batch"
    for position, request in enumerate(gemini_requests(action, body)):
        where = "EmbedContentRequest" if action == "embedContent" else f"requests[{position}]"
        if action == "batchEmbedContents" and request.get("model") != f"models/{model}":
            return (
                f"* BatchEmbedContentsRequest.{where}.model: the model of every request must "
                f"be models/{model}"
            )
        if _gemini_text(request) is None:
            return f"* {where}.content: contents is not specified"
        wanted = request.get("outputDimensionality")
        if wanted is not None and (
            not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1
        ):
            return f"* {where}.output_dimensionality: must be a positive integer"
    return None


def gemini_reply(action: str, model: str, body: Json, prompt_tokens: int | None) -> Json:
    embeddings = [
        {
            "values": fake_vector(
                _gemini_text(request) or "",
                dimensions_of(model, request.get("outputDimensionality")),
            )
        }
        for request in gemini_requests(action, body)
    ]
    payload: Json = (
        {"embedding": embeddings[0]} if action == "embedContent" else {"embeddings": embeddings}
    )
    if prompt_tokens is not None:
        payload["usageMetadata"] = {
            "promptTokenCount": prompt_tokens,
            "totalTokenCount": prompt_tokens,
        }
    return payload
