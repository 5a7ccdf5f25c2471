"""Resilience alone: retries, fallback order, permissions per target, the deadline.

The upstreams here are scripted in-process stand-ins (the e2e tests run the real adapters
against fake vendors over sockets); what is under test is only the order and number of calls.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import pytest
from tenacity import AsyncRetrying, RetryCallState

from robota_client.errors import UpstreamUnavailableError, error_from_response
from robota_client.messages import (
    AssistantMessage,
    ChatRequest,
    DeltaEvent,
    ResponseMetadata,
    RestartEvent,
)
from robota_proxy.call_record import CallRecord
from robota_proxy.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
    ProxyError,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from robota_proxy.policy.principals import Principal, UserPermissions
from robota_proxy.responses import error_response
from robota_proxy.scope import Authorized
from robota_proxy.upstreams.base import FinishEvent, Upstream, UpstreamEvent
from robota_proxy.upstreams.errors import VendorServerError, error_for_status
from robota_proxy.upstreams.registry import UpstreamRegistry
from robota_proxy.upstreams.resilience import AttemptCounter, Resilience, RetryPolicy, Target

pytestmark = pytest.mark.anyio

#: Back-off small enough that the tests do not wait; what is tested is the call count.
FAST = RetryPolicy(retries=2, backoff_base=0.001, backoff_max=0.002, retry_after_max=0.05)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Scripted:
    """Answers each call with the next item of its script (the last one repeats)."""

    def __init__(self, name: str, script: list[ProxyError | str], *, hang: bool = False) -> None:
        self.name = name
        self.script = script
        self.calls: list[str] = []
        self.hang = hang

    def models(self) -> list[str] | None:
        return None

    def _next(self, request: ChatRequest) -> str:
        self.calls.append(request.model)
        item = self.script[min(len(self.calls) - 1, len(self.script) - 1)]
        if isinstance(item, ProxyError):
            raise item
        return item

    async def chat(self, request: ChatRequest) -> AssistantMessage:
        if self.hang:
            await anyio.sleep_forever()
        text = self._next(request)
        return AssistantMessage(
            content=text, metadata=ResponseMetadata(provider=self.name, model=request.model)
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[UpstreamEvent, None]:
        text = self._next(request)
        for word in text.split():
            yield DeltaEvent(content=word)
        if text == "cut midway":
            raise UpstreamUnavailable("gone")
        yield FinishEvent("stop")

    async def aclose(self) -> None:
        return None


def resilience(
    *upstreams: Scripted, policy: RetryPolicy = FAST, fallbacks: dict[str, list[str]] | None = None
) -> Resilience:
    table: dict[str, Upstream] = {upstream.name: upstream for upstream in upstreams}
    registry = UpstreamRegistry(lambda: table)
    registry.open()
    return Resilience(registry, policy=policy, fallbacks=fallbacks, max_timeout=30)


def ask(provider: str = "a", model: str = "m1", timeout: float | None = None) -> ChatRequest:
    return ChatRequest.model_validate(
        {
            "provider": provider,
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"timeout": timeout} if timeout else {},
        }
    )


async def test_a_vendor_500_is_retried_and_the_answer_comes_from_the_second_call() -> None:
    vendor = Scripted("a", [error_for_status("a", 500), "fine"])
    message, served = await resilience(vendor).chat(ask(), None, None)
    assert message.content == "fine"
    assert vendor.calls == ["m1", "m1"]
    assert [a.outcome for a in served.attempts] == ["upstream_error", "ok"]
    assert isinstance(error_for_status("a", 500), VendorServerError)


@pytest.mark.parametrize(
    "error",
    [
        RateLimited("slow down", retry_after=0.01),
        UpstreamUnavailable("down"),
        UpstreamTimeout("late"),
    ],
)
async def test_retryable_failures_are_retried_up_to_the_limit(error: ProxyError) -> None:
    vendor = Scripted("a", [error])
    with pytest.raises(type(error)):
        await resilience(vendor).chat(ask(), None, None)
    assert len(vendor.calls) == 3  # one call and two retries


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequest("bad"),
        error_for_status("a", 401),  # the proxy's vendor key: another try will not help
        RateLimited("come back tomorrow", retry_after=3600),  # beyond the cap: passed on
    ],
)
async def test_other_failures_are_not_retried(error: ProxyError) -> None:
    vendor = Scripted("a", [error])
    with pytest.raises(type(error)) as raised:
        await resilience(vendor).chat(ask(), None, None)
    assert vendor.calls == ["m1"]
    assert raised.value.retry_after == error.retry_after


def test_retry_after_is_the_wait_up_to_the_cap() -> None:
    policy = RetryPolicy(retries=1, backoff_base=0.001, backoff_max=0.002, retry_after_max=5)
    subject = resilience(Scripted("a", ["x"]), policy=policy)

    class State:
        def __init__(self, error: BaseException) -> None:
            self.outcome = self
            self.attempt_number = 1
            self._error = error

        def exception(self) -> BaseException:
            return self._error

    assert subject._wait(State(RateLimited("x", retry_after=3))) == 3  # type: ignore[arg-type]
    assert subject._wait(State(UpstreamUnavailable("x"))) <= 0.002 + 0.001  # type: ignore[arg-type]
    assert subject._retryable(RateLimited("x", retry_after=5))
    assert not subject._retryable(RateLimited("x", retry_after=6))


async def test_an_alias_tries_its_chain_in_order_and_says_which_served() -> None:
    first = Scripted("a", [UpstreamUnavailable("down")])
    second = Scripted("b", ["from b"])
    subject = resilience(first, second, fallbacks={"fast": ["a/small", "b/other"]})
    record = CallRecord("req_1")
    message, served = await subject.chat(ask("auto", "fast"), None, record)
    assert message.content == "from b"
    assert served.target == Target("b", "other")
    assert (record.provider, record.model, record.upstream_called) == ("b", "other", True)
    assert len(first.calls) == 3 and second.calls == ["other"]
    assert served.vendor_calls == 4
    assert subject.counter.snapshot() == {"a/small upstream_unavailable": 3, "b/other ok": 1}


async def test_a_concrete_chain_starts_with_the_requested_model() -> None:
    vendor = Scripted("a", [error_for_status("a", 404), "second"])
    subject = resilience(vendor, fallbacks={"a/m1": ["a/m2"]})
    message, served = await subject.chat(ask("a", "m1"), None, None)
    assert vendor.calls == ["m1", "m2"] and message.content == "second"
    assert served.request.model == "m2"


async def test_targets_the_principal_may_not_use_are_skipped() -> None:
    a, b, c = Scripted("a", ["from a"]), Scripted("b", ["from b"]), Scripted("c", ["from c"])
    subject = resilience(a, b, c, fallbacks={"fast": ["a/x", "b/y", "c/z"]})
    only_c = Principal("u", permissions=UserPermissions(allowed_providers=("b", "c")))
    no_y = Principal("u", permissions=UserPermissions(allowed_models=("x", "z")))
    message, served = await subject.chat(ask("auto", "fast"), only_c, None)
    assert message.content == "from b" and a.calls == []
    assert [attempt.outcome for attempt in served.attempts] == ["skipped", "ok"]
    a.script = [UpstreamUnavailable("down")]
    message, _ = await subject.chat(ask("auto", "fast"), no_y, None)
    assert message.content == "from c" and b.calls == ["y"]


async def test_nothing_allowed_or_configured_is_the_first_refusal() -> None:
    subject = resilience(Scripted("a", ["x"]), fallbacks={"fast": ["a/x", "nowhere/y"]})
    nobody = Principal("u", permissions=UserPermissions(allowed_providers=("nowhere",)))
    with pytest.raises(Forbidden):
        await subject.chat(ask("auto", "fast"), nobody, None)
    with pytest.raises(NotFound):
        await subject.chat(ask("nowhere", "m"), None, None)


async def test_a_failure_that_is_the_callers_is_not_passed_to_the_next_target() -> None:
    a, b = Scripted("a", [InvalidRequest("bad tools")]), Scripted("b", ["from b"])
    with pytest.raises(InvalidRequest):
        await resilience(a, b, fallbacks={"fast": ["a/x", "b/y"]}).chat(
            ask("a", "fast"), None, None
        )
    assert b.calls == []


async def test_the_deadline_covers_the_call_and_is_clamped() -> None:
    subject = resilience(Scripted("a", ["never"], hang=True))
    with pytest.raises(UpstreamTimeout) as raised:
        await subject.chat(ask(timeout=0.05), None, None)
    assert "deadline" in raised.value.message
    assert subject.deadline(ask(timeout=10_000)) == 30
    assert subject.deadline(ask()) == 30
    assert subject.deadline(ask(timeout=2)) == 2


async def test_a_stream_is_retried_before_its_first_event_and_restarted_after_it() -> None:
    vendor = Scripted("a", [UpstreamUnavailable("down"), "one two"])
    opened = await resilience(vendor).open_stream(ask(), None, None)
    assert opened.first is None  # the first event leads the events of a continued stream
    rest = [event async for event in opened.events]
    assert rest == [DeltaEvent(content="one"), DeltaEvent(content="two"), FinishEvent("stop")]
    assert len(vendor.calls) == 2

    # Broken after content, on a target that takes no prefill: a restart, a fresh answer.
    cut = Scripted("a", ["cut midway", "fresh answer"])
    opened = await resilience(cut).open_stream(ask(), None, None)
    events = [event async for event in opened.events]
    assert events == [
        DeltaEvent(content="cut"),
        DeltaEvent(content="midway"),
        RestartEvent(reason="upstream_unavailable: gone"),
        DeltaEvent(content="fresh"),
        DeltaEvent(content="answer"),
        FinishEvent("stop"),
    ]
    assert cut.calls == ["m1", "m1"]

    # Broken again on the same target: each target continues a stream once.
    twice = Scripted("a", ["cut midway"])
    opened = await resilience(twice).open_stream(ask(), None, None)
    with pytest.raises(UpstreamUnavailable):
        async for _ in opened.events:
            pass
    assert twice.calls == ["m1", "m1"]


async def test_upstream_error_falls_back_too() -> None:
    a, b = Scripted("a", [UpstreamError("a sent garbage")]), Scripted("b", ["from b"])
    message, _ = await resilience(a, b, fallbacks={"fast": ["a/x", "b/y"]}).chat(
        ask("auto", "fast"), None, None
    )
    assert message.content == "from b" and a.calls == ["x"]


# --- what a failure tells the caller: the vendor calls made -------------------------------------


async def test_a_spent_target_reports_its_attempts() -> None:
    vendor = Scripted("a", [UpstreamUnavailable("down")])
    with pytest.raises(UpstreamUnavailable) as raised:
        await resilience(vendor).chat(ask(), None, None)
    assert len(vendor.calls) == 3
    assert raised.value.upstream_attempts == 3


async def test_a_refused_vendor_key_reports_one_attempt() -> None:
    vendor = Scripted("a", [error_for_status("a", 401)])
    with pytest.raises(UpstreamError) as raised:
        await resilience(vendor).chat(ask(), None, None)
    assert raised.value.upstream_attempts == 1
    assert raised.value.status == 502


async def test_a_chain_reports_the_attempts_of_all_its_targets() -> None:
    a = Scripted("a", [UpstreamUnavailable("a down")])
    b = Scripted("b", [UpstreamTimeout("b late")])
    with pytest.raises(UpstreamTimeout) as raised:
        await resilience(a, b, fallbacks={"fast": ["a/x", "nowhere/z", "b/y"]}).open_stream(
            ask("auto", "fast"), None, None
        )
    assert (len(a.calls), len(b.calls)) == (3, 3)
    assert raised.value.upstream_attempts == 6  # the skipped target is no vendor call


async def test_a_passed_deadline_reports_the_attempts_it_cut_short() -> None:
    with pytest.raises(UpstreamTimeout) as raised:
        await resilience(Scripted("a", ["never"], hang=True)).chat(ask(timeout=0.05), None, None)
    assert raised.value.upstream_attempts == 1


async def test_nothing_tried_reports_zero_attempts() -> None:
    with pytest.raises(NotFound) as raised:
        await resilience(Scripted("a", ["x"])).chat(ask("nowhere", "m"), None, None)
    assert raised.value.upstream_attempts == 0


def test_errors_raised_elsewhere_carry_no_attempts() -> None:
    assert UpstreamUnavailable("the ledger is down").upstream_attempts is None
    assert "upstreamAttempts" not in UpstreamUnavailable("x").body("r").to_json()


async def test_the_count_reaches_the_client_in_the_body_and_the_header() -> None:
    vendor = Scripted("a", [UpstreamUnavailable("down")])
    with pytest.raises(UpstreamUnavailable) as raised:
        await resilience(vendor).chat(ask(), None, None)
    response = error_response(raised.value, "req-1")
    assert response.status_code == 503
    assert response.headers["X-Robota-Upstream-Attempts"] == "3"
    assert json.loads(response.body)["error"] == {
        "code": "upstream_unavailable",
        "message": "down",
        "requestId": "req-1",
        "upstreamAttempts": 3,
    }
    seen = error_from_response(503, bytes(response.body), dict(response.headers))
    assert isinstance(seen, UpstreamUnavailableError)
    assert seen.upstream_attempts == 3
    assert "X-Robota-Upstream-Attempts" not in error_response(Forbidden("no"), "r").headers


# --- the hot path: no retry machinery, no second authorization, the imposed maxTokens ---------


class Sent(Scripted):
    """Also keeps each request as the target received it."""

    def __init__(self, name: str, script: list[ProxyError | str]) -> None:
        super().__init__(name, script)
        self.sent: list[ChatRequest] = []

    def _next(self, request: ChatRequest) -> str:
        self.sent.append(request)
        return super()._next(request)


class Decisions(AttemptCounter):
    def __init__(self) -> None:
        super().__init__()
        self.decisions: list[tuple[str, str]] = []

    def decided(self, target: Target, what: str) -> None:
        self.decisions.append((str(target), what))


async def test_tenacity_is_built_only_after_a_failure_it_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[int] = []
    real = AsyncRetrying

    def counted(*args: Any, **kwargs: Any) -> Any:
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("robota_proxy.upstreams.resilience.AsyncRetrying", counted)
    await resilience(Scripted("a", ["fine"])).chat(ask(), None, None)
    with pytest.raises(InvalidRequest):
        await resilience(Scripted("a", [InvalidRequest("bad")])).chat(ask(), None, None)
    once = Scripted("a", [error_for_status("a", 500)])
    with pytest.raises(UpstreamError):
        await resilience(once, policy=RetryPolicy(retries=0)).chat(ask(), None, None)
    assert once.calls == ["m1"]
    assert built == []
    await resilience(Scripted("a", [error_for_status("a", 500), "fine"])).chat(ask(), None, None)
    assert built == [1]


async def test_a_retried_target_waits_and_counts_as_tenacity_alone_did() -> None:
    """The bare first try's failure is tenacity's first attempt: the waits see attempts 1 and
    2 and the failure each followed, ``retry`` is decided before each wait, and every try
    is noted once."""
    failures = [error_for_status("a", 500), error_for_status("a", 500)]
    vendor = Scripted("a", [*failures, "fine"])
    counter = Decisions()
    table: dict[str, Upstream] = {"a": vendor}
    registry = UpstreamRegistry(lambda: table)
    registry.open()
    subject = Resilience(registry, policy=FAST, max_timeout=30, counter=counter)
    waits: list[tuple[int, BaseException | None]] = []
    real_wait = subject._wait

    def wait(state: RetryCallState) -> float:
        assert state.outcome is not None
        waits.append((state.attempt_number, state.outcome.exception()))
        return real_wait(state)

    subject._wait = wait  # type: ignore[method-assign]
    message, served = await subject.chat(ask(), None, None)
    assert message.content == "fine"
    assert waits == [(1, failures[0]), (2, failures[1])]
    assert counter.decisions == [("a/m1", "retry"), ("a/m1", "retry")]
    assert [a.outcome for a in served.attempts] == ["upstream_error", "upstream_error", "ok"]
    assert counter.snapshot() == {"a/m1 ok": 1, "a/m1 upstream_error": 2}


async def test_a_spent_first_try_raises_its_own_error_after_the_retries() -> None:
    last = error_for_status("a", 500)
    vendor = Scripted("a", [error_for_status("a", 500), error_for_status("a", 500), last])
    with pytest.raises(UpstreamError) as raised:
        await resilience(vendor).chat(ask(), None, None)
    assert raised.value is last
    assert vendor.calls == ["m1"] * 3


async def test_the_target_the_auth_middleware_authorized_is_not_authorized_again() -> None:
    """``CallRecord.authorized`` (the auth middleware's note) covers the request's own target
    for that principal, request object and feature; a fallback target is still checked."""
    request = ask()
    nothing = Principal("u", permissions=UserPermissions(allowed_models=("none",)))
    record = CallRecord("r", authorized=Authorized(nothing, request, "chat"))
    vendor = Scripted("a", [error_for_status("a", 500)])
    subject = resilience(vendor, fallbacks={"a/m1": ["a/m2"]})
    with pytest.raises(UpstreamError):
        await subject.chat(request, nothing, record)
    assert vendor.calls == ["m1"] * 3  # m2 is not allowed: skipped, never called
    # Another feature, another request object (even an equal one) or another principal: the
    # note says nothing about them, and the target is authorized (and refused) here.
    for note in (
        Authorized(nothing, request, "stream"),
        Authorized(nothing, ask(), "chat"),
        Authorized(Principal("u", permissions=nothing.permissions), request, "chat"),
    ):
        vendor.calls.clear()
        with pytest.raises(Forbidden):
            await subject.chat(request, nothing, CallRecord("r", authorized=note))
        assert vendor.calls == []


async def test_the_vendor_gets_the_imposed_max_tokens_and_the_request_stays_as_sent() -> None:
    vendor = Sent("a", [error_for_status("a", 500), "fine"])
    request = ask()
    record = CallRecord("r", max_tokens=4096)
    _, served = await resilience(vendor).chat(request, None, record)
    assert [sent.options.max_tokens for sent in vendor.sent] == [4096, 4096]
    assert served.request.options.max_tokens == 4096
    assert request.options.max_tokens is None
    own = ChatRequest.model_validate({**request.model_dump(), "options": {"max_tokens": 7}})
    vendor.sent.clear()
    await resilience(vendor).chat(own, None, record)
    assert [sent.options.max_tokens for sent in vendor.sent] == [7]
