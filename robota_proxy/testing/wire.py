"""What every fake vendor module provides, and the helpers they share.

The HTTP handling (recording, auth, faults, choosing a reply) lives once in ``app.py``;
a vendor module only knows its own formats, behind this small interface.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response

from robota_proxy.testing.script import Conversation, ErrorKind, Plan, Vendor
from robota_proxy.testing.sse import SSEEvent

Json = dict[str, Any]

_PIECES = re.compile(r"\s*\S+\s*")
#: Tool arguments are streamed in this many fragments (fewer for tiny documents).
ARGUMENT_FRAGMENTS = 3


class VendorWire(Protocol):
    vendor: Vendor
    #: Line ending in the SSE framing.
    newline: str
    #: The 400 message refusing a final assistant turn (prefill mode ``reject``).
    prefill_refused: str

    def auth_error(self, request: Request, api_key: str) -> Response | None:
        """The vendor's refusal when the request does not carry ``api_key`` as it should."""
        ...

    def summarize(self, body: Json) -> Conversation:
        """Never raises: a body of the wrong shape summarizes as empty."""
        ...

    def invalid(self, body: Json) -> str | None:
        """Why the vendor would reject this body with a 400, or None."""
        ...

    def error(
        self, status: int, message: str | None = None, retry_after: float | None = None
    ) -> Response: ...

    def kind_error(self, kind: ErrorKind, message: str | None = None) -> Response | None:
        """The vendor's error response for ``kind``, or None when the vendor answers it
        with a 200 refusal instead (rendered from ``script.refusal(plan)``)."""
        ...

    def reply(self, plan: Plan, model: str) -> Json: ...

    def events(self, plan: Plan, model: str, body: Json) -> list[SSEEvent]: ...

    def headers(self) -> dict[str, str]:
        """Per-response headers (request ids) the vendor always sends."""
        ...


def dumps(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def json_response(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        dumps(payload).encode(), status_code=status, headers=headers, media_type="application/json"
    )


def retry_headers(retry_after: float | None) -> dict[str, str]:
    return {} if retry_after is None else {"retry-after": f"{retry_after:g}"}


def split_text(text: str) -> list[str]:
    """Word by word, spaces kept, so the pieces join back to exactly ``text``."""
    pieces: list[str] = _PIECES.findall(text)
    if not pieces:
        return [text] if text else []
    return pieces


def split_json(document: str) -> list[str]:
    size = max(1, math.ceil(len(document) / ARGUMENT_FRAGMENTS))
    return [document[start : start + size] for start in range(0, len(document), size)] or [""]


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + uuid.uuid4().hex[:length]


def text_of(value: Any) -> str:
    """Text of a content field in the shapes vendors accept: a string, or a list of parts
    with ``text`` (OpenAI content parts, Anthropic text blocks, Gemini parts)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = [
            part["text"]
            for part in value
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts)
    return ""


def as_dict(value: Any) -> Json:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
