"""The documented keys under which the middleware pieces share state in the ASGI scope.

Each middleware works alone in someone else's app; when several run together they meet only
through these keys, never by importing each other.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any

#: ``str``: the request id, set by ``RequestContextMiddleware`` (or generated on first use).
REQUEST_ID = "robota.request_id"
#: The same request id for code that never sees the scope (a vendor adapter's log line), set
#: by ``RequestContextMiddleware`` for the duration of the request and inherited by the tasks
#: it starts (a stream's producer).
current_request_id: ContextVar[str | None] = ContextVar("robota_request_id", default=None)
#: ``str``: the caller's own ``X-Request-ID`` when it sent a usable one (then it is also the
#: request id above, echoed back). Not unique: the ledger keeps it beside a key of its own.
CORRELATION_ID = "robota.correlation_id"
#: ``robota_proxy.policy.principals.Principal``: who is calling, set by ``AuthMiddleware``.
PRINCIPAL = "robota.principal"
#: ``robota_client.messages.ChatRequest``: the parsed chat body, read once and kept here.
CHAT_REQUEST = "robota.chat_request"
#: ``robota_proxy.dialects.ParsedChat``: the chat body as its dialect parsed it: the same
#: ``ChatRequest`` as above, plus, for a compatible surface (``/v1/...``), the caller's own JSON
#: object (``.raw``, read-only: passed through to a target of the same vendor), whether it
#: streams and whether the target speaks the dialect natively. Set with ``CHAT_REQUEST``.
PARSED_CHAT = "robota.parsed_chat"
#: ``robota_proxy.dialects.ModelRouter``: resolves a model name a compatible surface received
#: (``provider/model``, an alias, a bare name) to a provider and model. Put here by the proxy
#: app on every request; without it a syntactic split is used.
MODEL_ROUTER = "robota.model_router"
#: ``robota_proxy.call_record.CallRecord``: the call's accounting slip (usage, cost, status),
#: created by ``MeteringMiddleware`` or on first use, filled by the route.
CALL = "robota.call"
#: ``str``: the wire error code of the error answer sent (set by ``responses.error_response``),
#: so that the outermost layer can count refusals by reason without parsing the body.
ERROR_CODE = "robota.error_code"


def request_id(scope: MutableMapping[str, Any]) -> str:
    """The request id, creating one when no request-context middleware ran."""
    existing = scope.get(REQUEST_ID)
    if isinstance(existing, str):
        return existing
    created = new_request_id()
    scope[REQUEST_ID] = created
    return created


def route_path(scope: Mapping[str, Any]) -> str:
    """The path below the mount point: ``/llm/ai/chat`` mounted at ``/llm`` is ``/ai/chat``."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"
