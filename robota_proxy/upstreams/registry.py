"""Which upstreams this proxy serves, built from the settings, looked up per request."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from robota_client.messages import ChatRequest
from robota_proxy.errors import NotFound
from robota_proxy.settings import Settings
from robota_proxy.upstreams.base import Upstream


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
            max_connections=pool,
        )
    if settings.google_api_key:
        from robota_proxy.upstreams.google import GoogleUpstream

        upstreams["google"] = GoogleUpstream(
            api_key=settings.google_api_key.get_secret_value(),
            base_url=settings.google_base_url,
            models=settings.google_models,
            timeout=timeout,
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
