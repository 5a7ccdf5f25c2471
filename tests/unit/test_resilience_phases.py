"""Resilience's limits by phase and what moves a chain on (issue 11): a silent target, a slow
first token and a stalled stream each cost one limit and are not retried on the same target;
a context-window overflow goes to the next target at once; a content refusal does not; a
``Retry-After: 0`` does not turn retries into a burst.

In-process stand-ins for the vendors with the clock's real time, limits of a fraction of a
second: what is asserted is the order, number and spacing of calls.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncGenerator

import anyio
import pytest

from robota_client.messages import AssistantMessage, ChatRequest, DeltaEvent, ResponseMetadata
from robota_proxy.errors import (
    InvalidRequest,
    ProxyError,
    RateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from robota_proxy.settings import TargetOverrides
from robota_proxy.upstreams.base import FinishEvent, Upstream, UpstreamEvent
from robota_proxy.upstreams.breakers import BreakerPolicy, MemoryBreakers
from robota_proxy.upstreams.errors import (
    ContentRefused,
    ContextWindowExceeded,
    PhaseTimeout,
    VendorServerError,
    error_for_status,
)
from robota_proxy.upstreams.registry import UpstreamRegistry
from robota_proxy.upstreams.resilience import Resilience, RetryPolicy
from robota_proxy.upstreams.target_options import PhaseLimits, TargetTable, known_prefill

pytestmark = pytest.mark.anyio

LIMITS = PhaseLimits(headers=0.2, first_token=0.2, idle=0.2)
POLICY = RetryPolicy(retries=2, backoff_base=0.05, backoff_max=0.1, retry_after_max=1.0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Vendor:
    """Plays its steps in order (the last repeats) and notes when each call arrived."""

    def __init__(
        self,
        name: str,
        *steps: str | ProxyError,
        wait: float = 0.0,
        first_wait: float = 0.0,
        stall_after: int | None = None,
    ) -> None:
        self.name = name
        self.steps = list(steps)
        self.wait = wait
        self.first_wait = first_wait
        self.stall_after = stall_after
        self.arrivals: list[float] = []

    def models(self) -> list[str] | None:
        return None

    def _step(self) -> str:
        self.arrivals.append(time.monotonic())
        step = self.steps[min(len(self.arrivals) - 1, len(self.steps) - 1)]
        if isinstance(step, ProxyError):
            raise step
        return step

    async def chat(self, request: ChatRequest) -> AssistantMessage:
        text = self._step()
        await anyio.sleep(self.wait)
        return AssistantMessage(
            content=text, metadata=ResponseMetadata(provider=self.name, model=request.model)
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[UpstreamEvent, None]:
        text = self._step()
        await anyio.sleep(self.first_wait)
        for index, word in enumerate(text.split(" ")):
            if index == self.stall_after:
                await anyio.sleep_forever()
            yield DeltaEvent(content=word if index == 0 else f" {word}")
        yield FinishEvent("stop")

    async def aclose(self) -> None:
        return None


def chain(*vendors: Vendor, refusals_fall_back: bool = False) -> Resilience:
    table: dict[str, Upstream] = {vendor.name: vendor for vendor in vendors}
    registry = UpstreamRegistry(lambda: table)
    registry.open()
    fallbacks = {"a/m": [f"{vendor.name}/m" for vendor in vendors[1:]]}
    return Resilience(
        registry,
        policy=POLICY,
        fallbacks=fallbacks,
        max_timeout=30,
        targets=TargetTable(LIMITS),
        refusals_fall_back=refusals_fall_back,
    )


def ask() -> ChatRequest:
    return ChatRequest.model_validate(
        {"provider": "a", "model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )


async def test_a_silent_target_costs_one_headers_limit_and_the_fallback_answers() -> None:
    silent, backup = Vendor("a", "never", wait=60), Vendor("b", "from b")
    started = time.monotonic()
    message, served = await chain(silent, backup).chat(ask(), None, None)
    waited = time.monotonic() - started
    assert message.content == "from b"
    assert (len(silent.arrivals), len(backup.arrivals)) == (1, 1)
    assert [attempt.outcome for attempt in served.attempts] == ["upstream_timeout", "ok"]
    assert 0.2 <= waited < 0.6


async def test_a_slow_first_token_moves_to_the_fallback_without_a_retry() -> None:
    slow, backup = Vendor("a", "late words", first_wait=60), Vendor("b", "quick words")
    opened = await chain(slow, backup).open_stream(ask(), None, None)
    words = [opened.first, *[event async for event in opened.events]]
    assert [w.content for w in words if isinstance(w, DeltaEvent)] == ["quick", " words"]
    assert (len(slow.arrivals), len(backup.arrivals)) == (1, 1)
    assert str(opened.served.target) == "b/m"


async def test_a_stream_that_stalls_is_cut_at_the_idle_limit_and_started_again_once() -> None:
    stalling = Vendor("a", "one two three four", stall_after=2)
    opened = await chain(stalling).open_stream(ask(), None, None)
    received: list[str] = []
    started = time.monotonic()
    with pytest.raises(PhaseTimeout) as caught:
        async for event in opened.events:
            received.append(
                event.content if isinstance(event, DeltaEvent) else type(event).__name__
            )
    # Stalled, restarted on the same target (no prefill there), stalled again: given up.
    assert received == ["one", " two", "RestartEvent", "one", " two"]
    assert 0.4 <= time.monotonic() - started < 1.0
    assert caught.value.message == "a/m sent nothing for 0.2 s: the stream stalled"
    assert caught.value.code == "upstream_timeout"
    assert len(stalling.arrivals) == 2


async def test_a_context_window_overflow_goes_to_the_next_target_without_a_retry() -> None:
    overflow = error_for_status(
        "openai",
        400,
        vendor_message="This model's maximum context length is 128000 tokens.",
        vendor_code="context_length_exceeded",
    )
    assert isinstance(overflow, ContextWindowExceeded)
    small, large = Vendor("a", overflow), Vendor("b", "fits")
    message, served = await chain(small, large).chat(ask(), None, None)
    assert message.content == "fits"
    assert (len(small.arrivals), len(large.arrivals)) == (1, 1)
    assert [attempt.outcome for attempt in served.attempts] == ["invalid_request", "ok"]


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("prompt is too long: 210000 tokens > 200000 maximum", None),
        (
            "The input token count (1200000) exceeds the maximum number of tokens allowed "
            "(1048576).",
            None,
        ),
        ("anything at all", "context_length_exceeded"),
    ],
)
async def test_each_vendor_wording_of_an_overflow_is_recognised(
    message: str, code: str | None
) -> None:
    error = error_for_status("v", 400, vendor_message=message, vendor_code=code)
    assert type(error) is ContextWindowExceeded
    assert error.status == 400


async def test_a_content_policy_refusal_is_returned_with_its_reason_and_never_retried() -> None:
    refusal = error_for_status(
        "openai",
        400,
        vendor_message="Your request was rejected as a result of our safety system.",
        vendor_code="content_policy_violation",
    )
    assert type(refusal) is ContentRefused
    strict, backup = Vendor("a", refusal), Vendor("b", "would answer")
    with pytest.raises(ContentRefused) as caught:
        await chain(strict, backup).chat(ask(), None, None)
    assert caught.value.message == (
        "openai refused the request's content (HTTP 400): Your request was rejected as a "
        "result of our safety system."
    )
    assert caught.value.status == 400
    assert (len(strict.arrivals), len(backup.arrivals)) == (1, 0)


@pytest.mark.parametrize("code", ["content_policy_violation", "content_filter"])
async def test_a_refusal_moves_on_only_where_the_operator_asked_for_it(code: str) -> None:
    """``ROBOTA_FALLBACK_ON_REFUSAL``: the refusing target once, then the next one answers;
    any other 400 is still the caller's answer."""
    refusal = error_for_status("openai", 400, vendor_message="no", vendor_code=code)
    strict, backup = Vendor("a", refusal), Vendor("b", "would answer")
    message, served = await chain(strict, backup, refusals_fall_back=True).chat(ask(), None, None)
    assert (message.content, str(served.target)) == ("would answer", "b/m")
    assert (len(strict.arrivals), len(backup.arrivals)) == (1, 1)
    plain = Vendor("a", error_for_status("openai", 400, vendor_message="bad", vendor_code="x"))
    other = Vendor("b", "would answer")
    with pytest.raises(InvalidRequest):
        await chain(plain, other, refusals_fall_back=True).chat(ask(), None, None)
    assert (len(plain.arrivals), len(other.arrivals)) == (1, 0)


async def test_retries_of_one_target_are_spaced_even_when_it_says_retry_after_0() -> None:
    busy = Vendor("a", RateLimited("busy", retry_after=0.0), RateLimited("busy", retry_after=0.0))
    with pytest.raises(RateLimited):
        await chain(busy).chat(ask(), None, None)
    gaps = [later - earlier for earlier, later in itertools.pairwise(busy.arrivals)]
    assert len(busy.arrivals) == 3
    assert all(gap >= POLICY.backoff_base for gap in gaps), gaps


async def test_an_ordinary_timeout_of_the_vendor_is_still_retried() -> None:
    """Only a missed phase limit skips the retries; the adapter's own timeout (a read that
    hung at the socket) is retried like any transient failure."""
    flaky = Vendor("a", UpstreamTimeout("openai did not answer in time"), "second try")
    message, served = await chain(flaky).chat(ask(), None, None)
    assert message.content == "second try"
    assert [attempt.outcome for attempt in served.attempts] == ["upstream_timeout", "ok"]


async def test_limits_and_prefill_per_target_come_from_the_first_matching_pattern() -> None:
    table = TargetTable(
        LIMITS,
        {
            "openai/o3*": TargetOverrides(first_token_timeout=60),
            "openai/*": TargetOverrides(idle_timeout=5, prefill=True),
        },
    )
    reasoning = table.get("openai", "o3-mini")
    assert (reasoning.limits, reasoning.prefill) == (
        PhaseLimits(headers=0.2, first_token=60, idle=0.2),
        False,
    )
    chat = table.get("openai", "gpt-4o")
    assert (chat.limits, chat.prefill) == (PhaseLimits(headers=0.2, first_token=0.2, idle=5), True)
    assert table.get("anthropic", "claude-sonnet-4-5").prefill is True


@pytest.mark.parametrize(
    ("provider", "model", "accepts"),
    [
        ("anthropic", "claude-3-5-sonnet-latest", True),
        ("anthropic", "claude-sonnet-4-5-20250929", True),
        ("anthropic", "claude-opus-4-1", True),
        ("anthropic", "claude-opus-4-6", False),
        ("anthropic", "claude-sonnet-4-6", False),
        ("anthropic", "claude-opus-4-7-20260101", False),
        ("anthropic", "claude-sonnet-5", False),
        ("openai", "gpt-4o", False),
        ("google", "gemini-2.5-pro", False),
    ],
)
def test_known_prefill_defaults(provider: str, model: str, accepts: bool) -> None:
    assert known_prefill(provider, model) is accepts


async def test_a_target_that_is_down_is_skipped_by_its_breaker_then_probed_once() -> None:
    """15 requests while ``a`` is down: its first request's three tries open the breaker,
    the other 14 go straight to ``b``; after the cool-down one probe finds ``a`` back."""
    now = [0.0]
    breakers = MemoryBreakers(
        BreakerPolicy(failures=3, error_rate=None, cooldown_seconds=30), clock=lambda: now[0]
    )
    down = VendorServerError("a failed (HTTP 503)")
    a, b = Vendor("a", down, down, down, "a is back"), Vendor("b", "from b")
    subject = chain(a, b)
    subject.breakers = breakers
    served_by = [str((await subject.chat(ask(), None, None))[1].target) for _ in range(15)]
    assert served_by == ["b/m"] * 15
    assert (len(a.arrivals), len(b.arrivals)) == (3, 15)
    assert await breakers.snapshot() == {"a/m": "open", "b/m": "closed"}
    now[0] = 31.0
    message, served = await subject.chat(ask(), None, None)
    assert (message.content, str(served.target), len(a.arrivals)) == ("a is back", "a/m", 4)
    assert await breakers.snapshot() == {"a/m": "closed", "b/m": "closed"}


async def test_when_every_target_is_open_the_caller_hears_it_without_a_vendor_call() -> None:
    now = [0.0]
    breakers = MemoryBreakers(BreakerPolicy(failures=1, error_rate=None), clock=lambda: now[0])
    a = Vendor("a", VendorServerError("a failed (HTTP 500)"))
    subject = chain(a)
    subject.breakers = breakers
    with pytest.raises(VendorServerError):
        await subject.chat(ask(), None, None)
    with pytest.raises(UpstreamUnavailable) as caught:
        await subject.chat(ask(), None, None)
    assert caught.value.message == (
        "a/m is failing and was not called (its circuit breaker is open)"
    )
    assert caught.value.upstream_attempts == 0
    assert len(a.arrivals) == 3
