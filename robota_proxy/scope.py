"""The documented keys under which the middleware pieces share state in the ASGI scope.

Each middleware works alone in someone else's app; when several run together they meet only
through these keys, never by importing each other.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
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
#: ``Authorized``: the chat request the auth middleware authorized, for whom and for which
#: feature (``note_authorized``); ``Resilience`` then does not authorize the same target again.
AUTHORIZED = "robota.authorized"
#: ``async (event name, event id, data JSON) -> None``: put in an internal call's scope by a
#: caller that wants a stream's events as they are rather than as SSE bytes to parse back
#: (``/ai/ws``); the stream responses (``robota_proxy.streams.response.deliver``) and the
#: cache's replay hand each event to it instead of writing a frame. Never set from outside.
EVENT_SINK = "robota.event_sink"
#: ``(ChatRequest, int)``: the request's prompt-token bound (``policy.pricing.
#: prompt_token_bound``), worked out once by the first layer that needs it
#: (``robota_proxy.policy.prompts.prompt_bound``) for the rate limits and the metering alike.
PROMPT_TOKEN_BOUND = "robota.prompt_token_bound"


@dataclass(frozen=True, slots=True)
class Authorized:
    """``principal`` may call ``request`` (the very parsed object) as ``feature``."""

    principal: object
    request: object
    feature: str

    def covers(self, principal: object, request: object, feature: str) -> bool:
        return self.principal is principal and self.request is request and self.feature == feature


def note_authorized(scope: MutableMapping[str, Any], feature: str | None) -> None:
    """Called by ``AuthMiddleware`` once it let a request through: a POST to one of its chat
    paths (``feature`` is that path's) had its parsed chat request authorized for ``feature``
    and the scope's principal, and the scope says so. Anything else is not noted."""
    if feature is None or scope["type"] != "http" or scope["method"] != "POST":
        return
    request, principal = scope.get(CHAT_REQUEST), scope.get(PRINCIPAL)
    if request is not None and principal is not None:
        scope[AUTHORIZED] = Authorized(principal, request, feature)


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
