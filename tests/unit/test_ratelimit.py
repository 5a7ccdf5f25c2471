"""``RateLimiter`` on its own: memory storage under a hand-moved clock, and real Redis."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator

import anyio
import pytest
from limits.aio.storage import MemoryStorage

from robota_client.messages import ChatRequest
from robota_proxy.policy.pricing import prompt_token_bound
from robota_proxy.policy.principals import Principal, UserPermissions
from robota_proxy.policy.ratelimits import (
    RateLimiter,
    estimate_from_bound,
    estimate_prompt_tokens,
)
from robota_proxy.storage.limits_storage import LimitsStorage


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    """Stands in for ``time`` in ``limits`` and the limiter, so windows move only when told."""

    def __init__(self) -> None:
        # 10 s into a minute (and a day): the memory storage's windows are clock-aligned.
        self.now = 1_800_000_000.0 - 1_800_000_000.0 % 86_400 + 10.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    fake = Clock()
    for module in ("limits.aio.storage.memory", "limits.aio.strategies"):
        monkeypatch.setattr(f"{module}.time", fake)
    monkeypatch.setattr("robota_proxy.policy.ratelimits.time", fake)
    yield fake


def user(
    *, rpm: int | None = None, daily_requests: int | None = None, tpm: int | None = None
) -> Principal:
    permissions = UserPermissions(rpm=rpm, daily_requests=daily_requests, tpm=tpm)
    return Principal(f"user-{uuid.uuid4().hex[:8]}", permissions=permissions)


@pytest.mark.anyio
async def test_a_principal_without_limits_touches_no_storage() -> None:
    storage = MemoryStorage()
    limiter = RateLimiter(storage)
    for _ in range(5):
        admission = await limiter.admit(Principal("free"), prompt_tokens=10**6)
        assert admission.allowed and admission.requests is None and admission.tokens is None
    await limiter.charge_tokens(Principal("free"), 10**6)
    assert await limiter.remaining(Principal("free")) == {}
    assert not storage.storage


@pytest.mark.anyio
async def test_rpm_lets_the_limit_through_then_refuses_naming_it(clock: Clock) -> None:
    limiter = RateLimiter(MemoryStorage())
    alice = user(rpm=3)
    left = []
    for _ in range(3):
        admission = await limiter.admit(alice)
        assert admission.allowed and admission.requests is not None
        assert admission.requests.name == "rpm" and admission.requests.limit == 3
        left.append(admission.requests.remaining)
    assert left == [2, 1, 0]
    refused = await limiter.admit(alice)
    assert not refused.allowed and refused.refused_by is not None
    assert refused.refused_by.name == "rpm"
    assert "3 requests per minute (rpm)" in refused.reason
    assert 0 < refused.refused_by.reset_header <= 60
    # Refusals count nothing, and two minutes later the window is empty again.
    assert (await limiter.remaining(alice))["rpm"]["remaining"] == 0
    clock.now += 120
    assert (await limiter.remaining(alice))["rpm"] == {
        "limit": 3,
        "remaining": 3,
        "resetSeconds": 0,
    }
    assert (await limiter.admit(alice)).allowed


@pytest.mark.anyio
async def test_users_are_counted_apart(clock: Clock) -> None:
    limiter = RateLimiter(MemoryStorage())
    alice, bob = user(rpm=1), user(rpm=1)
    assert (await limiter.admit(alice)).allowed
    assert not (await limiter.admit(alice)).allowed
    assert (await limiter.admit(bob)).allowed
    # The same user through another key (another principal) shares the count.
    alice_other_key = Principal(alice.user, key_id="key_other", permissions=alice.permissions)
    assert not (await limiter.admit(alice_other_key)).allowed


@pytest.mark.anyio
async def test_daily_limit_refuses_without_spending_the_minute(clock: Clock) -> None:
    limiter = RateLimiter(MemoryStorage())
    carol = user(rpm=10, daily_requests=2)
    for expected in (1, 0):
        admission = await limiter.admit(carol)
        assert admission.requests is not None
        # The tightest request limit is the one on the headers.
        assert admission.requests.name == "dailyRequestLimit"
        assert admission.requests.remaining == expected
    refused = await limiter.admit(carol)
    assert refused.refused_by is not None and refused.refused_by.name == "dailyRequestLimit"
    assert "2 requests per day (dailyRequestLimit)" in refused.reason
    assert (await limiter.remaining(carol))["rpm"]["remaining"] == 8
    clock.now += 3600  # an hour later, the minute is free but the day is not
    assert not (await limiter.admit(carol)).allowed


@pytest.mark.anyio
async def test_tpm_needs_the_prompt_to_fit_and_charges_the_real_tokens(clock: Clock) -> None:
    limiter = RateLimiter(MemoryStorage())
    dave = user(tpm=100)
    first = await limiter.admit(dave, prompt_tokens=30)
    assert first.allowed and first.requests is None
    assert first.tokens is not None and first.tokens.remaining == 100
    # Checking consumes nothing: only the call's real usage is charged.
    assert (await limiter.remaining(dave))["tpm"]["remaining"] == 100
    await limiter.charge_tokens(dave, 90)
    assert (await limiter.remaining(dave))["tpm"]["remaining"] == 10
    refused = await limiter.admit(dave, prompt_tokens=20)
    assert refused.refused_by is not None and refused.refused_by.name == "tpm"
    assert "about 20 prompt tokens" in refused.reason and "10 left" in refused.reason
    assert (await limiter.admit(dave, prompt_tokens=5)).allowed


@pytest.mark.anyio
async def test_an_answer_larger_than_what_is_left_fills_the_window(clock: Clock) -> None:
    limiter = RateLimiter(MemoryStorage())
    erin = user(tpm=50)
    await limiter.charge_tokens(erin, 20)
    await limiter.charge_tokens(erin, 1000)
    assert (await limiter.remaining(erin))["tpm"]["remaining"] == 0
    refused = await limiter.admit(erin)  # no chat body: still needs one token of room
    assert refused.refused_by is not None and refused.refused_by.name == "tpm"
    clock.now += 120
    # A prompt larger than the whole limit waits for an empty window, not forever.
    assert (await limiter.admit(erin, prompt_tokens=500)).allowed


@pytest.mark.anyio
async def test_remaining_reads_without_consuming(clock: Clock) -> None:
    limiter = RateLimiter(MemoryStorage())
    frank = user(rpm=5, daily_requests=100, tpm=1000)
    await limiter.admit(frank, prompt_tokens=10)
    await limiter.charge_tokens(frank, 40)
    for _ in range(3):
        assert await limiter.remaining(frank) == {
            "rpm": {"limit": 5, "remaining": 4, "resetSeconds": 50},
            "dailyRequestLimit": {"limit": 100, "remaining": 99, "resetSeconds": 86_390},
            "tpm": {"limit": 1000, "remaining": 960, "resetSeconds": 50},
        }
    assert await limiter.remaining(user(rpm=2)) == {
        "rpm": {"limit": 2, "remaining": 2, "resetSeconds": 0}
    }


@pytest.mark.anyio
async def test_concurrent_requests_never_pass_more_than_the_limit_in_memory(clock: Clock) -> None:
    limiter = RateLimiter(MemoryStorage())
    grace = user(rpm=5)
    allowed: list[bool] = []

    async def one() -> None:
        allowed.append((await limiter.admit(grace)).allowed)

    async with anyio.create_task_group() as group:
        for _ in range(20):
            group.start_soon(one)
    assert allowed.count(True) == 5


@pytest.mark.anyio
async def test_redis_limits_hold_across_limiters_and_concurrent_requests(
    redis_url: str, redis_prefix: str
) -> None:
    # Two limiters, each with its own connection pool: two processes as far as Redis knows.
    pools = (
        LimitsStorage(redis_url, prefix=redis_prefix),
        LimitsStorage(redis_url, prefix=redis_prefix),
    )
    first, second = RateLimiter(pools[0].storage), RateLimiter(pools[1].storage)
    henry = user(rpm=4, tpm=100)
    verdicts = [(await limiter.admit(henry)).allowed for limiter in (first, second) * 3]
    assert verdicts == [True, True, True, True, False, False]
    await first.charge_tokens(henry, 70)
    assert (await second.remaining(henry))["tpm"]["remaining"] == 30

    iris = user(rpm=5)
    allowed: list[bool] = []

    async def one(limiter: RateLimiter) -> None:
        allowed.append((await limiter.admit(iris)).allowed)

    async with anyio.create_task_group() as group:
        for index in range(20):
            group.start_soon(one, (first, second)[index % 2])
    assert allowed.count(True) == 5
    for pool in pools:
        await pool.aclose()


def test_prompt_estimate_is_a_quarter_of_the_prompt_bound() -> None:
    """The ``tpm`` estimate starts from the metering's bound (one walk over the prompt per
    request): a token per four bytes of it, rounded up."""
    request = ChatRequest.model_validate(
        {
            "provider": "mock",
            "model": "mock-1",
            "messages": [
                {"role": "system", "content": "x" * 10},
                {"role": "user", "content": "é" * 7},  # 14 bytes
            ],
        }
    )
    # 16 for the request, 8 per message, 24 bytes of text.
    assert prompt_token_bound(request) == 56
    assert estimate_prompt_tokens(request) == 14 == estimate_from_bound(56)
    assert estimate_from_bound(57) == 15
    tool = {"name": "weather", "description": "in a city", "parameters": {"type": "object"}}
    with_tools = ChatRequest.model_validate({**request.model_dump(by_alias=True), "tools": [tool]})
    # The schema counts as the JSON the vendor sees: more tokens than without it.
    assert estimate_prompt_tokens(with_tools) == math.ceil(prompt_token_bound(with_tools) / 4)
    assert estimate_prompt_tokens(with_tools) > estimate_prompt_tokens(request) + 8
