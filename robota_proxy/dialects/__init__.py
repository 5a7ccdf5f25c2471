"""Dialects: the wire languages in which callers reach the one chat chain.

The chain (auth, rate limits, metering, cache, resilience, adapters) sees one shape, the
universal ``ChatRequest``. A dialect is what a surface adds around it: how its body is parsed
into that ``ChatRequest`` (the caller's own JSON kept too, for a passthrough to a target of
the same vendor), whether a call streams, and how an error is rendered so that the vendor's
own SDK raises its own typed exception. A wire-level layer: middleware and routes import it;
it imports only ``robota_client.messages``, ``robota_proxy.errors``, ``robota_proxy.scope``
and ``robota_proxy.chat_body``'s JSON helpers.

How to add a dialect (``/v1/messages`` for Anthropic, say):

1. write ``dialects/<name>.py`` with a ``parse(body: bytes, router: ModelRouter) ->
   ParsedChat`` (errors as ``InvalidRequest`` whose ``param`` names the field in the
   dialect's own terms) and a ``render_error(error, request_id) -> (body bytes, headers)``;
2. add one ``Dialect`` for it to ``DIALECTS`` and one ``ChatSurface`` per chat path to
   ``CHAT_SURFACES`` (the middleware then authorizes, limits, meters and caches the path as a
   chat call), and its path prefix to ``_ERROR_PREFIXES`` (every error under that prefix, a
   middleware refusal or a route's, is then rendered in the dialect);
3. add its name to ``Surface`` (it is the ledger row's ``surface``) and a route that answers.

The model a caller names is resolved by the ``ModelRouter`` the app puts in the scope
(``robota_proxy.scope.MODEL_ROUTER``; ``upstreams.registry.route_model`` behind it), the same
for every surface.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from robota_client.messages import ChatRequest
from robota_proxy import scope as keys
from robota_proxy.errors import ProxyError

#: Which surface a call came in on; recorded in the ledger's ``surface`` column.
Surface = Literal["robota", "openai", "anthropic"]
Feature = Literal["chat", "stream", "embeddings"]


@dataclass(frozen=True, slots=True)
class RoutedModel:
    """Where a model name a caller sent goes: ``provider`` ``auto`` for a fallback alias.
    ``native``: the target speaks the surface's own wire, so the caller's JSON can be passed
    through with only the model rewritten."""

    provider: str
    model: str
    native: bool = False


#: ``(model name as sent, the surface's own vendor) -> RoutedModel``; raises ``ProxyError``
#: (400 ambiguous, with the candidates).
ModelRouter = Callable[[str, str], RoutedModel]


def syntactic_router(name: str, vendor: str) -> RoutedModel:
    """The router of middleware mounted without the proxy app: ``provider/model`` split at
    the first slash, a bare name to the surface's vendor."""
    provider, slash, model = name.partition("/")
    if slash and provider and model:
        return RoutedModel(provider, model, provider == vendor)
    return RoutedModel(vendor, name, True)


@dataclass(frozen=True, slots=True)
class ParsedChat:
    request: ChatRequest
    #: The caller's own JSON object; ``None`` for the Robota dialect, whose body *is* the
    #: ``ChatRequest``.
    raw: dict[str, Any] | None = None
    #: For a dialect whose body says whether to stream (OpenAI's ``stream: true``).
    streamed: bool = False
    #: The target speaks this dialect: a passthrough of ``raw`` is possible.
    native: bool = False


@dataclass(frozen=True, slots=True)
class Dialect:
    name: Surface
    parse: Callable[[bytes, ModelRouter], ParsedChat]
    #: ``(error, request id) -> (JSON body, extra headers)``; the status is ``error.status``.
    render_error: Callable[[ProxyError, str | None], tuple[bytes, dict[str, str]]]


@dataclass(frozen=True, slots=True)
class ChatSurface:
    dialect: Dialect
    #: ``"chat"`` or ``"stream"`` when the path decides; ``None`` when the body does.
    feature: Feature | None


def _robota_parse(body: bytes, router: ModelRouter) -> ParsedChat:
    from robota_proxy.chat_body import parse_chat_request

    return ParsedChat(parse_chat_request(body))


def _robota_error(error: ProxyError, request_id: str | None) -> tuple[bytes, dict[str, str]]:
    return error.body(request_id).to_json().encode(), {}


def _openai_parse(body: bytes, router: ModelRouter) -> ParsedChat:
    from robota_proxy.dialects.openai import parse

    return parse(body, router)


def _openai_error(error: ProxyError, request_id: str | None) -> tuple[bytes, dict[str, str]]:
    from robota_proxy.dialects.openai import render_error

    return render_error(error, request_id)


def _openai_embeddings_parse(body: bytes, router: ModelRouter) -> ParsedChat:
    from robota_proxy.dialects import openai_embeddings

    return openai_embeddings.parse(body, router)


def _anthropic_parse(body: bytes, router: ModelRouter) -> ParsedChat:
    from robota_proxy.dialects import anthropic

    return anthropic.parse(body, router)


def _anthropic_error(error: ProxyError, request_id: str | None) -> tuple[bytes, dict[str, str]]:
    from robota_proxy.dialects import anthropic

    return anthropic.render_error(error, request_id)


ROBOTA = Dialect("robota", _robota_parse, _robota_error)
OPENAI = Dialect("openai", _openai_parse, _openai_error)
ANTHROPIC = Dialect("anthropic", _anthropic_parse, _anthropic_error)
#: ``/v1/embeddings``: OpenAI's surface (and errors) with the embeddings body's parse.
OPENAI_EMBEDDINGS = Dialect("openai", _openai_embeddings_parse, _openai_error)
DIALECTS: Mapping[Surface, Dialect] = MappingProxyType(
    {"robota": ROBOTA, "openai": OPENAI, "anthropic": ANTHROPIC}
)

OPENAI_CHAT_PATH = "/v1/chat/completions"
ANTHROPIC_MESSAGES_PATH = "/v1/messages"
OPENAI_EMBEDDINGS_PATH = "/v1/embeddings"
#: Every chat route (below any mount point), its dialect and, when the path decides it, its
#: feature. ``robota_proxy.wire.paths.CHAT_PATHS`` is derived from it.
CHAT_SURFACES: Mapping[str, ChatSurface] = MappingProxyType(
    {
        "/ai/chat": ChatSurface(ROBOTA, "chat"),
        "/ai/chat/stream": ChatSurface(ROBOTA, "stream"),
        OPENAI_CHAT_PATH: ChatSurface(OPENAI, None),
        ANTHROPIC_MESSAGES_PATH: ChatSurface(ANTHROPIC, None),
        OPENAI_EMBEDDINGS_PATH: ChatSurface(OPENAI_EMBEDDINGS, "embeddings"),
    }
)
#: Path prefixes whose errors are rendered in a dialect other than Robota's, most specific
#: first (``/v1/messages`` will come before ``/v1/``).
_ERROR_PREFIXES: tuple[tuple[str, Dialect], ...] = (
    (ANTHROPIC_MESSAGES_PATH, ANTHROPIC),  # count_tokens too
    ("/v1/", OPENAI),
)


def dialect_of_path(path: str) -> Dialect:
    """The dialect errors under ``path`` (below the mount point) are rendered in."""
    for prefix, dialect in _ERROR_PREFIXES:
        if path.startswith(prefix):
            return dialect
    return ROBOTA


def dialect_of(scope: Mapping[str, Any]) -> Dialect:
    return dialect_of_path(keys.route_path(scope))


def feature_of(path: str, parsed: ParsedChat | None) -> Feature:
    """``stream`` or ``chat`` for a call to a chat path: the path's, or the body's."""
    surface = CHAT_SURFACES.get(path)
    if surface is not None and surface.feature is not None:
        return surface.feature
    return "stream" if parsed is not None and parsed.streamed else "chat"


def surface_of(scope: Mapping[str, Any]) -> Surface:
    """The surface a chat call came in on, for the ledger."""
    surface = CHAT_SURFACES.get(keys.route_path(scope))
    return surface.dialect.name if surface is not None else "robota"


def scope_feature(scope: Mapping[str, Any]) -> Feature:
    """The feature of the chat call in ``scope`` (its body parsed or not yet)."""
    parsed = scope.get(keys.PARSED_CHAT)
    return feature_of(keys.route_path(scope), parsed if isinstance(parsed, ParsedChat) else None)


def parse_for_path(path: str, body: bytes, router: ModelRouter | None) -> ParsedChat:
    surface = CHAT_SURFACES.get(path)
    dialect = surface.dialect if surface is not None else ROBOTA
    return dialect.parse(body, router or syntactic_router)
