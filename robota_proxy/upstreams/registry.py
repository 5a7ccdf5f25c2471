"""Which upstreams this proxy serves, built from the settings, looked up per request."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from pydantic import SecretStr

from robota_client.messages import ChatRequest
from robota_proxy.dialects import RoutedModel
from robota_proxy.errors import InvalidRequest, NotFound
from robota_proxy.settings import Settings
from robota_proxy.upstreams.base import Upstream
from robota_proxy.upstreams.deployments import Balancer, Deployment

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
    upstreams: dict[str, Upstream] = {}
    if settings.mock_enabled:
        from robota_proxy.upstreams.mock import MockUpstream

        upstreams["mock"] = MockUpstream(models=list(settings.mock_models))
    if settings.openai_api_key or settings.openai_base_url:
        upstreams["openai"] = _adapter(
            settings,
            "openai",
            settings.openai_api_key,
            settings.openai_base_url,
            settings.openai_models,
        )
    if settings.anthropic_api_key:
        upstreams["anthropic"] = _adapter(
            settings,
            "anthropic",
            settings.anthropic_api_key,
            settings.anthropic_base_url,
            settings.anthropic_models,
        )
    if settings.google_api_key:
        upstreams["google"] = _adapter(
            settings,
            "google",
            settings.google_api_key,
            settings.google_base_url,
            settings.google_models,
        )
    return upstreams


def build_deployments(settings: Settings) -> list[Deployment]:
    """The adapters of ``ROBOTA_DEPLOYMENTS``, each with its own key, base URL and pool."""
    return [
        Deployment(
            spec.name,
            spec.provider,
            _adapter(
                settings,
                spec.provider,
                spec.api_key,
                spec.base_url,
                spec.models,
                connect_timeout=spec.connect_timeout,
            ),
            spec.weight,
            spec.rpm,
            spec.tpm,
        )
        for spec in settings.deployments
    ]


def _adapter(
    settings: Settings,
    vendor: str,
    key: SecretStr | None,
    base_url: str | None,
    models: list[str] | None,
    *,
    connect_timeout: float | None = None,
) -> Upstream:
    """One vendor adapter with its own connection pool. Imported here, so that a proxy
    without, say, Anthropic configured never imports its adapter."""
    common: dict[str, Any] = {
        "api_key": key.get_secret_value() if key else "none",
        "models": models,
        "timeout": settings.upstream_timeout,
        "connect_timeout": connect_timeout or settings.upstream_connect_timeout,
        "max_connections": settings.max_connections_per_vendor or 0,  # 0: no cap
    }
    if vendor == "openai":
        from robota_proxy.upstreams.openai import OpenAIUpstream

        return OpenAIUpstream(base_url=base_url, **common)
    if vendor == "anthropic":
        from robota_proxy.upstreams.anthropic import AnthropicUpstream

        return AnthropicUpstream(
            base_url=base_url, default_max_tokens=settings.anthropic_default_max_tokens, **common
        )
    from robota_proxy.upstreams.google import GoogleUpstream

    return GoogleUpstream(base_url=base_url or settings.google_base_url, **common)


class UpstreamRegistry:
    """Holds the adapters between ``open`` and ``aclose``; the lifespan owns it.

    Each provider is served by one or more deployments (``deployments``): the provider's own
    adapter, named after it, and those ``ROBOTA_DEPLOYMENTS`` adds; ``pick`` chooses one per
    try through the ``Balancer``."""

    def __init__(
        self,
        build: Callable[[], Mapping[str, Upstream]],
        *,
        deployments: Callable[[], Sequence[Deployment]] | None = None,
        balancer: Balancer | None = None,
    ) -> None:
        self._build = build
        self._build_deployments = deployments
        self.balancer = balancer if balancer is not None else Balancer()
        self._upstreams: dict[str, Upstream] = {}
        self._deployments: dict[str, list[Deployment]] = {}

    def open(self) -> None:
        self._upstreams = dict(self._build())
        pools = {name: [Deployment(name, name, up)] for name, up in self._upstreams.items()}
        for extra in self._build_deployments() if self._build_deployments else ():
            pools.setdefault(extra.provider, []).append(extra)
            self._upstreams.setdefault(extra.provider, extra.upstream)
        self._deployments = pools

    async def aclose(self) -> None:
        pools, self._deployments, self._upstreams = self._deployments, {}, {}
        for pool in pools.values():
            for deployment in pool:
                await deployment.upstream.aclose()

    def deployments(self, provider: str) -> list[Deployment]:
        return list(self._deployments.get(provider, ()))

    async def pick(self, request: ChatRequest) -> Deployment:
        """The deployment for one try of ``request`` (already ``resolve``d): one that offers
        the model, chosen by the balancer."""
        pool = self._deployments[request.provider]
        if len(pool) == 1 and not pool[0].limited:
            return await self.balancer.pick(pool, 0)
        pool = [one for one in pool if _offers(one.upstream, request.model)]
        tokens = _rough_tokens(request) if any(one.limited for one in pool) else 0
        return await self.balancer.pick(pool, tokens)

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
        pool = self._deployments.get(request.provider, [])
        if pool and not any(_offers(one.upstream, request.model) for one in pool):
            models = list(dict.fromkeys(m for one in pool for m in one.upstream.models() or ()))
            raise NotFound(
                f"model {request.model!r} is not offered for provider {request.provider!r} "
                f"(offered: {', '.join(models)})"
            )
        return upstream


def _rough_tokens(request: ChatRequest) -> int:
    """What a call may use of a deployment's tokens-per-minute: about four characters a
    token of the prompt, plus the answer's cap."""
    chars = sum(len(message.content or "") for message in request.messages)
    return chars // 4 + (request.options.max_tokens or 0)


def _offers(upstream: Upstream, model: str) -> bool:
    models = upstream.models()
    return models is None or model in models
