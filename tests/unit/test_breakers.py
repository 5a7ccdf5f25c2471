"""``MemoryBreakers``: when a target is skipped, when it is probed, and what is logged.

The clock is injected, so cool-downs of 30 s pass in no time."""

from __future__ import annotations

import asyncio
import logging

import pytest

from robota_proxy.upstreams.breakers import BreakerPolicy, Breakers, BreakerState, MemoryBreakers

pytestmark = pytest.mark.anyio

T = "openai/gpt-4o"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, **policy: float | int | None) -> MemoryBreakers:
    return MemoryBreakers(BreakerPolicy(**policy), clock=clock)  # type: ignore[arg-type]


def test_defaults_and_the_protocol() -> None:
    policy = BreakerPolicy()
    assert (policy.failures, policy.error_rate, policy.window_seconds, policy.min_calls) == (
        5,
        0.5,
        30.0,
        10,
    )
    assert (policy.cooldown_seconds, policy.probe_timeout_seconds) == (30.0, 60.0)
    breakers: Breakers = MemoryBreakers()
    assert isinstance(breakers, MemoryBreakers)


@pytest.mark.parametrize(
    "policy",
    [
        {"failures": 0},
        {"error_rate": 0.0},
        {"error_rate": 1.5},
        {"window_seconds": 0},
        {"cooldown_seconds": -1},
        {"min_calls": 0},
        {"probe_timeout_seconds": 0},
    ],
)
def test_a_policy_that_could_never_work_is_refused(policy: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerPolicy(**policy)  # type: ignore[arg-type]


async def test_opens_after_exactly_n_consecutive_failures() -> None:
    breakers = make(Clock(), failures=3, error_rate=None)
    await breakers.failure(T)
    await breakers.failure(T)
    assert await breakers.allow(T) is True
    assert await breakers.snapshot() == {T: "closed"}
    await breakers.failure(T)
    assert await breakers.snapshot() == {T: "open"}
    assert await breakers.allow(T) is False


async def test_a_success_between_failures_resets_the_count() -> None:
    breakers = make(Clock(), failures=3, error_rate=None)
    for _ in range(2):
        await breakers.failure(T)
    await breakers.success(T)
    for _ in range(2):
        await breakers.failure(T)
    assert await breakers.snapshot() == {T: "closed"}
    await breakers.failure(T)
    assert await breakers.snapshot() == {T: "open"}


async def test_targets_are_independent() -> None:
    breakers = make(Clock(), failures=1)
    await breakers.failure("a")
    await breakers.success("b")
    assert await breakers.allow("a") is False
    assert await breakers.allow("b") is True
    assert await breakers.snapshot() == {"a": "open", "b": "closed"}


async def test_error_rate_opens_from_min_calls_on() -> None:
    breakers = make(Clock(), failures=100, error_rate=0.5, min_calls=10)
    # 9 calls, 5 of them failed (never 2 in a row): under min_calls, still closed.
    for i in range(9):
        await (breakers.failure(T) if i % 2 == 0 else breakers.success(T))
    assert await breakers.snapshot() == {T: "closed"}
    await breakers.success(T)  # 10 calls, 5 failed: a success never opens it
    assert await breakers.snapshot() == {T: "closed"}
    await breakers.failure(T)  # 11 calls, 6 failed: 0.545 >= 0.5
    assert await breakers.snapshot() == {T: "open"}


async def test_error_rate_below_the_threshold_stays_closed() -> None:
    breakers = make(Clock(), failures=100, error_rate=0.5, min_calls=10)
    for i in range(30):
        await (breakers.failure(T) if i % 3 == 0 else breakers.success(T))
    assert await breakers.snapshot() == {T: "closed"}


async def test_failures_that_left_the_window_no_longer_count() -> None:
    clock = Clock()
    breakers = make(clock, failures=100, error_rate=0.5, min_calls=4, window_seconds=30)
    for _ in range(3):
        await breakers.failure(T)  # 3 of 3: under min_calls
    clock.now += 30.0  # all three leave the window
    for _ in range(3):
        await breakers.success(T)
    await breakers.failure(T)  # 1 of 4 (4 of 7 had the old ones counted)
    await breakers.failure(T)  # 2 of 5
    assert await breakers.snapshot() == {T: "closed"}
    await breakers.failure(T)  # 3 of 6
    assert await breakers.snapshot() == {T: "open"}


async def test_skipped_during_the_cooldown_then_one_probe() -> None:
    clock = Clock()
    breakers = make(clock, failures=1, cooldown_seconds=30)
    await breakers.failure(T)
    clock.now += 29.999
    assert await breakers.allow(T) is False
    assert await breakers.snapshot() == {T: "open"}
    clock.now = 1030.0
    assert await breakers.allow(T) is True
    assert await breakers.snapshot() == {T: "half_open"}
    assert await breakers.allow(T) is False


async def test_exactly_one_probe_among_many_concurrent_callers() -> None:
    clock = Clock()
    breakers = make(clock, failures=1, cooldown_seconds=30)
    await breakers.failure(T)
    clock.now += 30
    answers = await asyncio.gather(*(breakers.allow(T) for _ in range(50)))
    assert answers.count(True) == 1
    assert answers.count(False) == 49


async def test_the_probe_succeeding_closes_with_fresh_counts() -> None:
    clock = Clock()
    breakers = make(clock, failures=2, cooldown_seconds=30)
    await breakers.failure(T)
    await breakers.failure(T)
    clock.now += 30
    assert await breakers.allow(T) is True
    await breakers.success(T)
    assert await breakers.snapshot() == {T: "closed"}
    assert [await breakers.allow(T) for _ in range(3)] == [True, True, True]
    await breakers.failure(T)  # 1 of 2: the failures before the probe are forgotten
    assert await breakers.snapshot() == {T: "closed"}


async def test_the_probe_failing_opens_for_another_full_cooldown() -> None:
    clock = Clock()
    breakers = make(clock, failures=1, cooldown_seconds=30)
    await breakers.failure(T)
    clock.now += 30
    assert await breakers.allow(T) is True
    clock.now += 5  # the probe took 5 s to fail
    await breakers.failure(T)
    assert await breakers.snapshot() == {T: "open"}
    clock.now += 29.9
    assert await breakers.allow(T) is False
    clock.now += 0.1
    assert await breakers.allow(T) is True
    assert await breakers.allow(T) is False


async def test_a_probe_that_never_reports_expires() -> None:
    clock = Clock()
    breakers = make(clock, failures=1, cooldown_seconds=30, probe_timeout_seconds=60)
    await breakers.failure(T)
    clock.now += 30
    assert await breakers.allow(T) is True  # this probe's process dies
    clock.now += 59.9
    assert await breakers.allow(T) is False
    clock.now += 0.1
    answers = await asyncio.gather(*(breakers.allow(T) for _ in range(10)))
    assert answers.count(True) == 1
    await breakers.success(T)
    assert await breakers.snapshot() == {T: "closed"}


async def test_a_straggling_success_does_not_cut_the_cooldown_short() -> None:
    clock = Clock()
    breakers = make(clock, failures=1, cooldown_seconds=30)
    await breakers.failure(T)
    await breakers.success(T)  # let through before the breaker opened
    await breakers.failure(T)  # the same
    assert await breakers.snapshot() == {T: "open"}
    clock.now += 29
    assert await breakers.allow(T) is False


async def test_transitions_are_logged_and_hooked_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    seen: list[tuple[str, BreakerState, int]] = []
    breakers = MemoryBreakers(
        BreakerPolicy(failures=2, cooldown_seconds=30),
        clock=clock,
        on_change=lambda *change: seen.append(change),
    )
    caplog.set_level(logging.DEBUG, logger="robota_proxy.upstream")
    await breakers.failure(T)
    await breakers.success(T)  # no transition, no line
    await breakers.failure(T)
    await breakers.failure(T)
    clock.now += 30
    await breakers.allow(T)
    await breakers.failure(T)
    clock.now += 30
    await breakers.allow(T)
    await breakers.success(T)
    assert seen == [
        (T, "open", 2),
        (T, "half_open", 2),
        (T, "open", 3),
        (T, "half_open", 3),
        (T, "closed", 0),
    ]
    lines = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            "robota_proxy.upstream",
            "WARNING",
            f"circuit breaker {T}: open (2 consecutive failures, 3 of 4 calls failed lately)",
        ),
        (
            "robota_proxy.upstream",
            "INFO",
            f"circuit breaker {T}: half_open (2 consecutive failures)",
        ),
        (
            "robota_proxy.upstream",
            "WARNING",
            f"circuit breaker {T}: open (3 consecutive failures)",
        ),
        (
            "robota_proxy.upstream",
            "INFO",
            f"circuit breaker {T}: half_open (3 consecutive failures)",
        ),
        ("robota_proxy.upstream", "INFO", f"circuit breaker {T}: closed (0 consecutive failures)"),
    ]


async def test_a_hook_that_raises_does_not_reach_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(target: str, state: BreakerState, failures: int) -> None:
        raise RuntimeError("metrics down")

    breakers = MemoryBreakers(BreakerPolicy(failures=1), clock=Clock(), on_change=broken)
    await breakers.failure(T)
    assert await breakers.snapshot() == {T: "open"}
    assert any(r.getMessage() == f"circuit breaker hook failed for {T}" for r in caplog.records)
