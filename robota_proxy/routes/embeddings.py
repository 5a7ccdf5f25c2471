"""``POST /v1/embeddings``: OpenAI's embeddings API in front of every upstream that has one.

Any OpenAI client works with ``base_url=<proxy>/v1``: ``client.embeddings.create(...)``. The
body was parsed by ``robota_proxy.dialects.openai_embeddings`` into a ``ChatRequest`` (one user
message per input) for the chain, so keys and JWTs, permissions (the ``embeddings`` feature,
provider and model globs), rate limits, the token quota and the budget apply exactly as to
chat; metering holds the input's upper bound and no output (an embedding produces none). This
route makes the call through the same retries and fallbacks as chat (``Resilience.run``),
and answers in OpenAI's list shape, errors included (the app renders ``/v1/*`` errors in
OpenAI's shape, so the SDK raises its typed exceptions).

Vectors always come back from the adapters as floats; ``encoding_format: "base64"`` is
encoded here, as OpenAI does (little-endian float32), which is also what the ``openai`` SDK
asks for when the caller names no format. A target without embeddings (Anthropic, the mock)
is refused with a 400 naming it before any vendor is called. When the vendor reports no
token count (Gemini usually does not), the usage is estimated, a token per four characters
of each input rounded up, and the ledger row is marked ``estimated``.
"""

from __future__ import annotations

import math
import struct
from base64 import b64encode
from collections.abc import Sequence

import pydantic_core
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from robota_client.messages import ChatRequest, Usage
from robota_proxy import scope as keys
from robota_proxy.call_record import call_record
from robota_proxy.chat_body import chat_request
from robota_proxy.dialects import OPENAI_EMBEDDINGS_PATH, ParsedChat
from robota_proxy.dialects.openai_embeddings import EmbeddingFields, embedding_fields
from robota_proxy.errors import InvalidRequest, ProxyError, UpstreamError
from robota_proxy.policy.principals import Principal
from robota_proxy.upstreams.base import Embedder, EmbeddingRequest, EmbeddingResult, Upstream
from robota_proxy.upstreams.resilience import Resilience


class EmbeddingRoutes:
    def __init__(self, resilience: Resilience, *, max_body_bytes: int) -> None:
        self.resilience = resilience
        self.max_body_bytes = max_body_bytes

    def routes(self) -> list[Route]:
        return [Route(OPENAI_EMBEDDINGS_PATH, self.embeddings, methods=["POST"])]

    async def embeddings(self, request: Request) -> Response:
        body = await chat_request(request, self.max_body_bytes)
        parsed = request.scope.get(keys.PARSED_CHAT)
        if not isinstance(parsed, ParsedChat) or parsed.raw is None:  # another parse: a bug
            raise UpstreamError("the request was not parsed as an embeddings request")
        fields = embedding_fields(parsed.raw)
        record = call_record(request.scope, keys.request_id(request.scope))
        vendor_called = False

        async def call(upstream: Upstream, sent: ChatRequest) -> EmbeddingResult:
            nonlocal vendor_called
            if not isinstance(upstream, Embedder):
                # The chain marks a target as called before trying it; this one never
                # reached a vendor, so unless an earlier target did, it is no ledger row.
                record.upstream_called = vendor_called
                raise InvalidRequest(
                    f"model {sent.model!r}: provider {sent.provider!r} has no embeddings API "
                    "on this proxy; use an OpenAI-compatible or Google model",
                    param="model",
                )
            vendor_called = True
            return await upstream.embed(_embedding_request(fields, sent))

        principal = request.scope.get(keys.PRINCIPAL)
        try:
            result, served = await self.resilience.run(
                body,
                principal if isinstance(principal, Principal) else None,
                "embeddings",
                record,
                call,
            )
        except ProxyError as exc:
            record.status = exc.code
            raise
        usage = result.usage
        if usage is None:
            usage = estimated_usage(fields.inputs)
            record.usage_estimated = True
        sent = served.request
        record.settle_usage(sent.provider, sent.model, usage)
        return Response(
            pydantic_core.to_json(answer(result, usage, fields.encoding_format)),
            media_type="application/json",
        )


def _embedding_request(fields: EmbeddingFields, sent: ChatRequest) -> EmbeddingRequest:
    """The adapter's request for the target the chain chose (after fallbacks)."""
    return EmbeddingRequest(
        provider=sent.provider,
        model=sent.model,
        inputs=fields.inputs,
        dimensions=fields.dimensions,
        user=fields.user,
    )


def estimated_usage(inputs: Sequence[str | Sequence[int]]) -> Usage:
    """A token per four characters of each text (rounded up, at least one), or one per id
    of a token array: the same rule as for text a stream produced without a count."""
    tokens = sum(
        max(1, math.ceil(len(item) / 4)) if isinstance(item, str) else len(item) for item in inputs
    )
    return Usage(prompt_tokens=tokens, total_tokens=tokens)


def answer(result: EmbeddingResult, usage: Usage, encoding: str) -> dict[str, object]:
    """OpenAI's ``list`` of ``embedding`` objects."""
    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": index,
                "embedding": base64_floats(vector) if encoding == "base64" else list(vector),
            }
            for index, vector in enumerate(result.vectors)
        ],
        "model": result.model,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
    }


def base64_floats(vector: Sequence[float]) -> str:
    """OpenAI's base64 form: the vector's little-endian float32 bytes."""
    return b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
