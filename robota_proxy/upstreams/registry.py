"""Which upstreams this proxy serves, built from the settings, looked up per request."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from robota_client.messages import ChatRequest
from robota_proxy.dialects import RoutedModel
from robota_proxy.errors import InvalidRequest, NotFound
from robota_proxy.settings import Settings
from robota_proxy.upstreams.base import Upstream

#: Provider names that are read as a ``provider/`` prefix even when not configured here, so
#: that ``anthropic/claude-...`` on a proxy without Anthropic is "not configured" (404), not
#: a bare model name sent to the surface's own vendor.
KNOWN_PROVIDERS = frozenset({"openai", "anthropic", "google", "mock"})


def route_model(
    name: str,
    vendor: str,
    *,
    catalogue: Mapping[str, list[str] | None],
    aliases: Collection[str],
    dialects: Mapping[str, str | None],
) -> RoutedModel:
    """Where a model name sent to a compatible surface goes; the one rule for every surface.

    ``provider/model`` (a configured or known provider) names its target; otherwise the
    whole name is a fallback alias (provider ``auto``, resolved by the chain) or a model some
    provider's model list claims; claimed by several, it is a 400 listing the candidates;
    claimed by none, it goes to the surface's own ``vendor``. ``dialects``: the wire each
    provider speaks (``openai`` for any OpenAI-compatible server), which decides whether the
    caller's JSON can be passed through (``native``)."""
    provider, slash, model = name.partition("/")
    if slash and model and (provider in catalogue or provider in KNOWN_PROVIDERS):
        return RoutedModel(provider, model, dialects.get(provider) == vendor)
    candidates: list[RoutedModel] = []
    if name in aliases:
        candidates.append(RoutedModel("auto", name))
    for claimant, models in sorted(catalogue.items()):
        if models is not None and name in models:
            candidates.append(RoutedModel(claimant, name, dialects.get(claimant) == vendor))
    if len(candidates) > 1:
        listed = ", ".join(
            "alias " + c.model if c.provider == "auto" else f"{c.provider}/{c.model}"
            for c in candidates
        )
        raise InvalidRequest(
            f"model {name!r} is ambiguous: it could be {listed}; name one as provider/model",
            param="model",
        )
    if candidates:
        return candidates[0]
    return RoutedModel(vendor, name, dialects.get(vendor) == vendor)


def build_upstreams(settings: Settings) -> dict[str, Upstream]:
    """One adapter per configured vendor. A vendor is configured by its key, or for OpenAI
    also by a base URL alone (a local vLLM or Ollama needs no key)."""
    # Imported here so that a proxy without, say, Anthropic configured never imports its SDK.
    upstreams: dict[str, Upstream] = {}
    timeout, pool = settings.upstream_timeout, settings.max_connections_per_vendor
    if settings.mock_enabled:
        from robota_proxy.upstreams.mock import MockUpstream

        upstreams["mock"] = MockUpstream(models=list(settings.mock_models))
    if settings.openai_api_key or settings.openai_base_url:
        from robota_proxy.upstreams.openai import OpenAIUpstream

        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else "none"
        upstreams["openai"] = OpenAIUpstream(
            api_key=key,
            base_url=settings.openai_base_url,
            models=settings.openai_models,
            timeout=timeout,
            connect_timeout=settings.upstream_connect_timeout,
            max_connections=pool,
        )
    if settings.anthropic_api_key:
        from robota_proxy.upstreams.anthropic import AnthropicUpstream

        upstreams["anthropic"] = AnthropicUpstream(
            api_key=settings.anthropic_api_key.get_secret_value(),
            base_url=settings.anthropic_base_url,
            models=settings.anthropic_models,
            default_max_tokens=settings.anthropic_default_max_tokens,
            timeout=timeout,
            connect_timeout=settings.upstream_connect_timeout,
            max_connections=pool,
        )
    if settings.google_api_key:
        from robota_proxy.upstreams.google import GoogleUpstream

        upstreams["google"] = GoogleUpstream(
            api_key=settings.google_api_key.get_secret_value(),
            base_url=settings.google_base_url,
            models=settings.google_models,
            timeout=timeout,
            connect_timeout=settings.upstream_connect_timeout,
            max_connections=pool,
        )
    return upstreams


class UpstreamRegistry:
    """Holds the adapters between ``open`` and ``aclose``; the lifespan owns it."""

    def __init__(self, build: Callable[[], Mapping[str, Upstream]]) -> None:
        self._build = build
        self._upstreams: dict[str, Upstream] = {}

    def open(self) -> None:
        self._upstreams = dict(self._build())

    async def aclose(self) -> None:
        upstreams, self._upstreams = self._upstreams, {}
        for upstream in upstreams.values():
            await upstream.aclose()

    def names(self) -> list[str]:
        return sorted(self._upstreams)

    def catalogue(self) -> dict[str, list[str] | None]:
        return {name: upstream.models() for name, upstream in sorted(self._upstreams.items())}

    def route(self, name: str, vendor: str, aliases: Collection[str] = ()) -> RoutedModel:
        """``route_model`` over the upstreams served here (see there)."""
        return route_model(
            name,
            vendor,
            catalogue=self.catalogue(),
            aliases=aliases,
            dialects={
                key: getattr(upstream, "dialect", None) for key, upstream in self._upstreams.items()
            },
        )

    def resolve(self, request: ChatRequest) -> Upstream:
        """The adapter for the request, refusing unknown providers and models up front so
        that no vendor is ever called for a request we already know is wrong."""
        upstream = self._upstreams.get(request.provider)
        if upstream is None:
            configured = ", ".join(self.names()) or "none"
            raise NotFound(
                f"provider {request.provider!r} is not configured on this proxy "
                f"(configured: {configured})"
            )
        models = upstream.models()
        if models is not None and request.model not in models:
            raise NotFound(
                f"model {request.model!r} is not offered for provider {request.provider!r} "
                f"(offered: {', '.join(models)})"
            )
        return upstream
