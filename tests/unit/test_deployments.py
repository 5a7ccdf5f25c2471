"""Deployments of one provider and the balancer that picks one per try (issue 11, part 6):
the three strategies, a 429's cool-down, each deployment's own rpm/tpm counted in the
``limits`` storage, and a retry after a 429 landing on the other deployment."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import pytest
from limits.aio.storage import MemoryStorage

from robota_client.messages import AssistantMessage, ChatRequest, ResponseMetadata
from robota_proxy.call_record import CallRecord
from robota_proxy.errors import RateLimited
from robota_proxy.settings import DeploymentSettings, Settings
from robota_proxy.upstreams.base import UpstreamEvent
from robota_proxy.upstreams.deployments import DEFAULT_COOLDOWN, Balancer, Deployment
from robota_proxy.upstreams.registry import UpstreamRegistry, build_deployments
from robota_proxy.upstreams.resilience import Resilience, RetryPolicy

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Stub:
    """An adapter that answers with its name, or raises its errors first."""

    def __init__(self, name: str, *errors: Exception) -> None:
        self.name = name
        self.errors = list(errors)
        self.calls = 0

    def models(self) -> list[str] | None:
        return None

    async def chat(self, request: ChatRequest) -> AssistantMessage:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return AssistantMessage(
            content=self.name, metadata=ResponseMetadata(provider="openai", model=request.model)
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[UpstreamEvent, None]:
        raise NotImplementedError
        yield  # pragma: no cover

    async def aclose(self) -> None:
        return None


def deployment(name: str, weight: float = 1.0, **limits: int) -> Deployment:
    return Deployment(name, "openai", Stub(name), weight, limits.get("rpm"), limits.get("tpm"))


def first_of(options: Sequence[Deployment], weights: Sequence[float]) -> Deployment:
    return options[0]


async def test_weighted_picks_in_proportion_to_the_weights() -> None:
    seen: list[tuple[list[str], list[float]]] = []

    def record(options: Sequence[Deployment], weights: Sequence[float]) -> Deployment:
        seen.append(([one.name for one in options], list(weights)))
        return options[-1]

    pool = [deployment("east", 3), deployment("west", 1)]
    picked = await Balancer("weighted", choice=record).pick(pool, 0)
    assert picked.name == "west"
    assert seen == [(["east", "west"], [3.0, 1.0])]


async def test_weighted_with_real_randomness_follows_the_weights() -> None:
    pool = [deployment("east", 9), deployment("west", 1)]
    balancer = Balancer("weighted")
    names = [(await balancer.pick(pool, 0)).name for _ in range(2000)]
    assert 0.85 < names.count("east") / len(names) < 0.95


async def test_least_busy_picks_the_fewest_in_flight() -> None:
    east, west = deployment("east"), deployment("west")
    balancer = Balancer("least-busy")
    balancer.started(east)
    balancer.started(east)
    balancer.started(west)
    assert (await balancer.pick([east, west], 0)).name == "west"
    balancer.finished(east)
    balancer.finished(east)
    assert (await balancer.pick([east, west], 0)).name == "east"


async def test_lowest_latency_tries_an_unmeasured_one_first_then_the_fastest() -> None:
    east, west = deployment("east"), deployment("west")
    balancer = Balancer("lowest-latency")
    balancer.first_token(east, 0.4)
    assert (await balancer.pick([east, west], 0)).name == "west"
    balancer.first_token(west, 0.9)
    assert (await balancer.pick([east, west], 0)).name == "east"
    # A running average: one fast sample does not erase a slow history at once (0.66).
    balancer.first_token(west, 0.1)
    assert west.latency == pytest.approx(0.9 + 0.3 * (0.1 - 0.9))
    assert (await balancer.pick([east, west], 0)).name == "east"
    balancer.first_token(west, 0.1)
    balancer.first_token(west, 0.1)  # 0.66 -> 0.49 -> 0.37
    assert (await balancer.pick([east, west], 0)).name == "west"


async def test_a_429_cools_its_deployment_down_for_its_retry_after() -> None:
    now = [100.0]
    east, west = deployment("east", 5), deployment("west", 1)
    balancer = Balancer("weighted", clock=lambda: now[0], choice=first_of)
    balancer.cool_down(east, 7.0)
    assert (await balancer.pick([east, west], 0)).name == "west"
    balancer.cool_down(west, None)
    with pytest.raises(RateLimited) as caught:
        await balancer.pick([east, west], 0)
    assert caught.value.retry_after == 7.0
    assert caught.value.message == (
        "every deployment (east, west) is at its rate limit or cooling down"
    )
    now[0] = 107.0
    assert (await balancer.pick([east, west], 0)).name == "east"
    assert west.cooled_until == 100.0 + DEFAULT_COOLDOWN


async def test_each_deployment_keeps_to_its_own_rpm_and_tpm() -> None:
    east, west = deployment("east", 5, rpm=2), deployment("west", 1, tpm=1_000)
    balancer = Balancer("weighted", MemoryStorage(), choice=first_of)
    picks = [(await balancer.pick([east, west], 400)).name for _ in range(4)]
    # east: 2 requests a minute; west: 1000 tokens a minute, 400 a call -> 2 calls.
    assert picks == ["east", "east", "west", "west"]
    with pytest.raises(RateLimited):
        await balancer.pick([east, west], 400)


async def test_a_call_larger_than_a_tpm_limit_is_counted_as_the_whole_limit() -> None:
    only = deployment("only", tpm=100)
    balancer = Balancer("weighted", MemoryStorage())
    assert (await balancer.pick([only], 5_000)).name == "only"
    with pytest.raises(RateLimited):
        await balancer.pick([only], 1)


async def test_a_retry_after_a_429_goes_to_the_other_deployment_and_the_record_names_it() -> None:
    east = Stub("east", RateLimited("openai is rate limiting this proxy", retry_after=5))
    west = Stub("west")
    registry = UpstreamRegistry(
        lambda: {"openai": east},
        deployments=lambda: [Deployment("west", "openai", west)],
        balancer=Balancer("weighted", choice=first_of),
    )
    registry.open()
    resilience = Resilience(registry, policy=RetryPolicy(retries=1, backoff_base=0.01))
    record = CallRecord(request_id="r1")
    request = ChatRequest.model_validate(
        {"provider": "openai", "model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )
    message, served = await resilience.chat(request, None, record)
    assert (message.content, record.deployment) == ("west", "west")
    assert (east.calls, west.calls) == (1, 1)
    assert [attempt.outcome for attempt in served.attempts] == ["rate_limited", "ok"]
    assert [one.name for one in registry.deployments("openai")] == ["openai", "west"]
    assert registry.deployments("openai")[0].in_flight == 0


def test_deployment_names_are_unique_and_never_a_vendors_own() -> None:
    east = {"name": "east", "provider": "openai", "api_key": "sk-east-0123456789"}
    settings = Settings(deployments=[DeploymentSettings.model_validate(east)])
    assert settings.secrets()[-1] == "sk-east-0123456789"
    for names in (["east", "east"], ["openai"]):
        with pytest.raises(ValueError, match="is already taken"):
            Settings(
                deployments=[DeploymentSettings(name=name, provider="openai") for name in names]
            )


async def test_a_deployment_may_have_its_own_connect_limit() -> None:
    """A far region gets more time to connect; the others keep the global limit."""
    far = {"name": "far", "provider": "anthropic", "api_key": "k1", "connect_timeout": 12.5}
    near = {"name": "near", "provider": "openai", "api_key": "k2"}
    settings = Settings(
        upstream_connect_timeout=3.0,
        deployments=[DeploymentSettings.model_validate(one) for one in (far, near)],
    )
    built = build_deployments(settings)
    try:
        limits = {one.name: one.upstream._http._timeout.sock_connect for one in built}  # type: ignore[attr-defined]
        assert limits == {"far": 12.5, "near": 3.0}
    finally:
        for one in built:
            await one.upstream.aclose()
    with pytest.raises(ValueError, match="connect_timeout"):
        DeploymentSettings.model_validate({**near, "connect_timeout": 0})
