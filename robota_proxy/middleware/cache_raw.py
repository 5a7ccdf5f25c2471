"""The response cache on the vendor-dialect surfaces (``/v1/chat/completions``,
``/v1/messages``): what ``CacheMiddleware`` keys, keeps and replays there.

Why not the Robota cache's ``AssistantMessage``: these surfaces answer in the caller's own
dialect, and for a passthrough target with the vendor's own JSON or chunks, carrying what
the universal message cannot (logprobs, thinking signatures, citations, the vendor's ids).
Rebuilding the answer from a message would lose that, so an entry keeps the exact bytes the
route sent (the JSON body, or the whole SSE byte sequence) with the usage the call record
got, and a hit replays those bytes: the SDK parses the same answer, and the hit is metered
with the same token counts at cost 0.

The key is the SHA-256 of the JSON of the tenant scope, the dialect, whether the call
streams, where it was routed (provider and model), the ``maxTokens`` the chain bounds it by
(metering may impose one), the caller's JSON less its
``stream`` field (everything else can change the answer or its bytes: images, ``seed``,
``cache_control``, ``stream_options``, the model name as written, which the answer echoes),
and for Anthropic the ``anthropic-version`` / ``anthropic-beta`` headers a passthrough
forwards. So keys never mix dialects, streamed and plain calls, or tenants, and no Robota
key (whose document has no ``dialect``) equals one of these.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pydantic_core
from pydantic import ValidationError

from robota_client.messages import ChatRequest, Usage
from robota_proxy.dialects import ANTHROPIC, OPENAI, Dialect, ParsedChat
from robota_proxy.dialects import anthropic as anthropic_dialect

#: Raw entries' format; a reader skips an entry of another format (another release's).
_FORMAT = 1
#: How a streamed answer of each dialect ends when it ended well: an error frame (the route
#: reports a failure midway in-band) or a cut stream does not end so.
_STREAM_END = {OPENAI.name: b"data: [DONE]\n\n", ANTHROPIC.name: b"event: message_stop\n"}


def cacheable_dialect(dialect: Dialect) -> bool:
    """The dialects whose chat answers are kept as raw bytes: OpenAI's chat completions and
    Anthropic's messages, not ``/v1/embeddings`` (OpenAI's name, another parse)."""
    return dialect is OPENAI or dialect is ANTHROPIC


def raw_cache_key(
    scope_name: str,
    dialect: Dialect,
    parsed: ParsedChat,
    request: ChatRequest,
    headers: Mapping[str, str],
) -> str:
    """SHA-256 of the key document (see the module's docstring). The caller's JSON is
    serialised with its top-level fields sorted and nested objects in the order sent, by
    pydantic-core: a fifth of the CPU of ``json.dumps(sort_keys=True)`` on a long
    conversation (about 60 us against 300 us for 20 KB). A client that reorders keys inside
    a message between two identical calls only misses; it can never be served another
    request's answer, as every byte sent is in the key."""
    raw = parsed.raw or {}
    document: dict[str, Any] = {
        "scope": scope_name,
        "dialect": dialect.name,
        "streamed": parsed.streamed,
        "provider": request.provider,
        "model": request.model,
        "maxTokens": request.options.max_tokens,
        "headers": anthropic_dialect.forwarded_headers(headers) if dialect is ANTHROPIC else None,
        "body": {name: raw[name] for name in sorted(raw) if name != "stream"},
    }
    return hashlib.sha256(pydantic_core.to_json(document)).hexdigest()


def stream_complete(dialect: Dialect, body: bytes) -> bool:
    """Whether a captured SSE body ends with its dialect's last frame (OpenAI's
    ``data: [DONE]``, Anthropic's ``message_stop``): a stream that failed midway ends with
    the route's in-band error frame instead, and a cut one with neither. Only the last frame
    is looked at, so the check costs nothing on a long stream."""
    end = _STREAM_END.get(dialect.name)
    if end is None or not body.endswith(b"\n\n"):
        return False
    before = body.rfind(b"\n\n", 0, len(body) - 2)
    last = body[before + 2 :] if before >= 0 else body
    return last.startswith(end)


@dataclass(slots=True)
class RawAnswer:
    """One stored answer of a vendor-dialect surface: the bytes, and what metering needs."""

    content_type: str
    body: bytes
    provider: str
    model: str
    usage: Usage | None

    def to_bytes(self) -> bytes:
        """A one-line JSON header, a newline, the body as it was (no escaping of the body:
        a JSON header never holds a raw newline)."""
        usage = None
        if self.usage is not None:
            usage = self.usage.model_copy(update={"cost": None}).model_dump(
                mode="json", exclude_none=True
            )
        header = {
            "v": _FORMAT,
            "kind": "raw",
            "contentType": self.content_type,
            "provider": self.provider,
            "model": self.model,
            "usage": usage,
        }
        return json.dumps(header, separators=(",", ":")).encode() + b"\n" + self.body

    @classmethod
    def from_bytes(cls, raw: bytes) -> RawAnswer | None:
        """None for an entry this version cannot read (another release's, or a Robota one)."""
        head, newline, body = raw.partition(b"\n")
        if not newline:
            return None
        try:
            data = json.loads(head)
            if not isinstance(data, dict) or data.get("v") != _FORMAT or data["kind"] != "raw":
                return None
            usage = data.get("usage")
            return cls(
                content_type=str(data["contentType"]),
                body=body,
                provider=str(data["provider"]),
                model=str(data["model"]),
                usage=Usage.model_validate(usage) if usage is not None else None,
            )
        except (ValueError, KeyError, TypeError, ValidationError):
            return None
