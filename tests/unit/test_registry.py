"""Which providers a configuration enables, and how unknown ones are refused."""

from __future__ import annotations

import pytest

from robota_client.messages import ChatRequest
from robota_proxy.errors import NotFound
from robota_proxy.settings import Settings
from robota_proxy.upstreams.registry import UpstreamRegistry, build_upstreams


def settings(**values: object) -> Settings:
    base: dict[str, object] = {
        "openai_api_key": None,
        "anthropic_api_key": None,
        "google_api_key": None,
    }
    return Settings(_env_file=None, **{**base, **values})  # type: ignore[arg-type]


def request(provider: str, model: str) -> ChatRequest:
    return ChatRequest(provider=provider, model=model, messages=[{"role": "user", "content": "x"}])


@pytest.mark.anyio
async def test_only_what_is_configured() -> None:
    found = build_upstreams(settings())
    assert set(found) == {"mock"}
    assert build_upstreams(settings(mock_enabled=False)) == {}
    # An OpenAI-compatible server (Ollama, vLLM) needs only its base URL.
    local = build_upstreams(settings(openai_base_url="http://127.0.0.1:11434/v1"))
    assert set(local) == {"mock", "openai"}
    everything = build_upstreams(
        settings(openai_api_key="a", anthropic_api_key="b", google_api_key="c")
    )
    assert set(everything) == {"mock", "openai", "anthropic", "google"}
    for upstreams in (found, local, everything):
        for upstream in upstreams.values():
            await upstream.aclose()


@pytest.mark.anyio
async def test_resolve_refuses_unknown_provider_and_model() -> None:
    registry = UpstreamRegistry(
        lambda: build_upstreams(settings(openai_api_key="k", openai_models=["gpt-4o"]))
    )
    registry.open()
    try:
        assert registry.resolve(request("openai", "gpt-4o")).name == "openai"
        with pytest.raises(NotFound, match="gpt-3"):
            registry.resolve(request("openai", "gpt-3"))
        with pytest.raises(NotFound, match="configured: mock, openai"):
            registry.resolve(request("google", "gemini"))
        assert registry.catalogue() == {"mock": ["mock-1"], "openai": ["gpt-4o"]}
    finally:
        await registry.aclose()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
