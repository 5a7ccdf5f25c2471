"""Retries, fallback chains, phase limits, mid-stream continuation and the per-request
deadline around upstream calls.

A non-streamed call is retried as a whole, a stream until its first content. A stream that
breaks after content went out is continued (``_continued``): from a target that takes a
prefill the answer goes on where it broke, otherwise it starts again after a ``restart``
event (on the Robota wire only). The stream limits themselves are ``stream_phases``.

Each attempt has limits by phase (``target_options``): a non-streamed answer must come within
the headers limit, a stream's first text or tool-call piece within the first-token limit, and
each later event within the idle limit. A target that misses the headers or first-token limit
is not tried again (``PhaseTimeout``): the next target of the chain is tried at once, so that a
silent target costs one limit, not three, and a fall-back chain finishes inside a client's
default timeout. A prompt too long for a target's context window (``ContextWindowExceeded``)
also moves on without a retry. Retries of the same target are spaced by at least the back-off
base (a vendor's ``Retry-After`` is a lower bound, capped), so no target is hit in a burst.

For each target, in order, the request is first authorized (the principal's allowed providers
and models apply to fallback targets too: a target it may not use is skipped) and resolved
(a target this proxy does not serve is skipped); then the call is tried, and a retryable
failure (vendor 429 whose ``Retry-After`` is within the cap, vendor 5xx, timeout, unreachable)
is tried again with tenacity's exponential back-off. When a target's tries are spent on an
upstream-side failure the next target is tried; a failure that is the caller's own
(``InvalidRequest``) would fail on every target and is passed on at once.

The deadline (``options.timeout`` clamped to the server's maximum, or that maximum) covers all
of it, back-off sleeps included, and for streams the whole stream too; passing it is
``UpstreamTimeout`` (504), or an ``upstream_timeout`` error event once a stream has started.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import weakref
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeAlias, TypeVar

import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_exponential_jitter

from robota_client.messages import (
    AssistantMessage,
    ChatRequest,
    DeltaEvent,
    RestartEvent,
    ToolCallEvent,
    UniversalMessage,
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
from robota_proxy.observability import tracing
from robota_proxy.policy.principals import Feature, Principal
from robota_proxy.upstreams import stream_phases as phases
from robota_proxy.upstreams.base import Upstream, UpstreamEvent
from robota_proxy.upstreams.breakers import Breakers
from robota_proxy.upstreams.deployments import Deployment
from robota_proxy.upstreams.errors import (
    ContentRefused,
    ContextWindowExceeded,
    PhaseTimeout,
    VendorServerError,
)
from robota_proxy.upstreams.registry import UpstreamRegistry
from robota_proxy.upstreams.target_options import TargetLimits, TargetTable

log = logging.getLogger("robota_proxy.upstream")

T = TypeVar("T")
E = TypeVar("E")

#: Failures worth another try of the same target.
_RETRYABLE = (RateLimited, UpstreamUnavailable, UpstreamTimeout, VendorServerError)
#: Failures on the upstream's side, after which the next target of a chain is tried. A vendor
#: 404 counts: the next target is another model. ``InvalidRequest`` does not.
_FALLS_BACK = (
    RateLimited,
    UpstreamError,
    UpstreamUnavailable,
    UpstreamTimeout,
    NotFound,
    ContextWindowExceeded,
)
#: No target is called more than twice in any this many seconds by one request (measured at
#: the vendor: the margin covers the way there).
_SPACING = 1.5 + 0.1


@dataclass(frozen=True, slots=True)
class Target:
    provider: str
    model: str

    @classmethod
    def parse(cls, text: str) -> Target:
        """``provider/model``; the model part may itself contain slashes."""
        provider, _, model = text.partition("/")
        if not provider or not model:
            raise ValueError(f"a fallback target must be 'provider/model', not {text!r}")
        return cls(provider, model)

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    #: Extra tries per target after the first.
    retries: int = 2
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    #: The longest vendor ``Retry-After`` honoured; a longer one is passed on (or falls back)
    #: rather than held in a sleeping request.
    retry_after_max: float = 10.0


@dataclass(frozen=True, slots=True)
class Attempt:
    target: Target
    #: ``ok``, a wire error code, ``timeout`` (the deadline passed), ``cancelled``,
    #: ``skipped`` (not allowed for the principal or not served here) or ``circuit_open``
    #: (its circuit breaker is open: not called).
    outcome: str
    ms: int
    #: ``time.perf_counter()`` when the vendor call started (0: no call was made).
    started: float = 0.0


@dataclass(slots=True)
class Served:
    """Which target answered, the request as sent to it, and what was tried on the way."""

    target: Target
    request: ChatRequest
    attempts: list[Attempt] = field(default_factory=list)
    #: ``anyio.current_time()`` at which the request's deadline passes (streams).
    ends_at: float = math.inf
    #: The deployment of ``target`` that answered.
    deployment: Deployment | None = None

    @property
    def vendor_calls(self) -> int:
        return _vendor_calls(self.attempts)


#: What a continued stream yields: the adapters' events, and ``restart`` when an answer that
#: broke midway could not be continued and starts again.
StreamItem: TypeAlias = UpstreamEvent | RestartEvent


@dataclass(slots=True)
class OpenedStream:
    served: Served
    first: UpstreamEvent | None
    events: AsyncGenerator[StreamItem, None]


class AttemptCounter:
    """Upstream attempts by ``provider/model`` and outcome: the proxy's attempt metrics,
    served by ``GET /admin/metrics`` (``robota_proxy.routes.metrics``).

    The hooks below it (``decided``, ``first_token``, ``token_gap``) do nothing here: the
    Prometheus counter (``robota_proxy.observability.metrics``) overrides them, and
    ``times_tokens`` False spares a stream the clock reads when nobody listens."""

    #: Whether ``first_token`` and ``token_gap`` are wanted (a clock read per stream event).
    times_tokens = False

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def add(self, attempt: Attempt) -> None:
        self.counts[(str(attempt.target), attempt.outcome)] += 1

    def decided(self, target: Target, what: str) -> None:
        """After a failed attempt on ``target``: ``retry`` (tried again) or ``fallback``
        (the chain moves on to its next target)."""

    def first_token(self, target: Target, seconds: float) -> None:
        """A stream's first content came from ``target``, ``seconds`` after the request."""

    def token_gap(self, target: Target, seconds: float) -> None:
        """Two content events of a stream from ``target`` were ``seconds`` apart."""

    def snapshot(self) -> dict[str, int]:
        return {f"{target} {outcome}": n for (target, outcome), n in sorted(self.counts.items())}


class Resilience:
    """Runs one chat call against its target chain; one per app."""

    def __init__(
        self,
        registry: UpstreamRegistry,
        *,
        policy: RetryPolicy | None = None,
        fallbacks: Mapping[str, Sequence[str]] | None = None,
        max_timeout: float = 300.0,
        counter: AttemptCounter | None = None,
        targets: TargetTable | None = None,
        breakers: Breakers | None = None,
        refusals_fall_back: bool = False,
    ) -> None:
        self.registry = registry
        #: ``ROBOTA_FALLBACK_ON_REFUSAL``: a vendor's content refusal moves on to the next
        #: target of the chain (by default it is the answer).
        self._moves_on = (*_FALLS_BACK, ContentRefused) if refusals_fall_back else _FALLS_BACK
        self.breakers = breakers
        self.target_table = targets if targets is not None else TargetTable()
        self.policy = policy if policy is not None else RetryPolicy()
        self.fallbacks = {
            name: [Target.parse(text) for text in chain]
            for name, chain in (fallbacks or {}).items()
        }
        self.max_timeout = max_timeout
        self.counter = counter if counter is not None else AttemptCounter()
        #: Targets that refused a prefill they were configured to take (this process).
        self._refuses_prefill: set[Target] = set()
        self._backoff = wait_exponential_jitter(
            multiplier=self.policy.backoff_base,
            max=self.policy.backoff_max,
            jitter=self.policy.backoff_base,
        )

    # --- what to try ------------------------------------------------------------------------

    def targets(self, request: ChatRequest) -> list[Target]:
        """A chain keyed ``provider/model`` follows the requested pair; a chain keyed by a
        bare name is an alias, used whatever provider the request names, and replaces it."""
        requested = Target(request.provider, request.model)
        concrete = self.fallbacks.get(str(requested))
        if concrete is not None:
            return [requested, *(t for t in concrete if t != requested)]
        alias = self.fallbacks.get(request.model)
        if alias is not None:
            return list(alias)
        return [requested]

    def deadline(self, request: ChatRequest) -> float:
        """Seconds for the whole call: the request's own, clamped to the server maximum."""
        wanted = request.options.timeout
        return self.max_timeout if wanted is None else min(wanted, self.max_timeout)

    # --- calls ------------------------------------------------------------------------------

    async def chat(
        self, request: ChatRequest, principal: Principal | None, record: CallRecord | None
    ) -> tuple[AssistantMessage, Served]:
        async def call(upstream: Upstream, sent: ChatRequest) -> AssistantMessage:
            return await upstream.chat(sent)

        return await self.run(request, principal, "chat", record, call)

    async def run(
        self,
        request: ChatRequest,
        principal: Principal | None,
        feature: Feature,
        record: CallRecord | None,
        call: Callable[[Upstream, ChatRequest], Awaitable[T]],
    ) -> tuple[T, Served]:
        """``chat`` for any one-shot call: ``call(upstream, request as sent to the target)``
        run against the target chain with the same retries, fallbacks and deadline. A
        compatible surface uses it to pass its caller's own JSON to a target of its vendor."""
        seconds = self.deadline(request)
        attempts: list[Attempt] = []
        started = time.perf_counter()

        async def answered(upstream: Upstream, sent: ChatRequest, limits: TargetLimits) -> T:
            limit = limits.limits.headers
            with anyio.move_on_after(limit) as scope:
                return await call(upstream, sent)
            assert scope.cancelled_caught
            raise phases.phase_timeout(sent, "answer", limit)

        try:
            with anyio.fail_after(seconds):
                return await self._run(request, principal, feature, record, answered, attempts)
        except TimeoutError:
            raise _counted(phases.deadline_error(seconds), attempts) from None
        finally:
            if record is not None:  # for X-Robota-Overhead-Ms: the vendors' share
                record.vendor_seconds += time.perf_counter() - started

    async def open_stream(
        self, request: ChatRequest, principal: Principal | None, record: CallRecord | None
    ) -> OpenedStream:
        """The first event of the first target that produced one, and the rest of its
        stream bounded by what is left of the deadline. A stream that breaks after it
        started is continued (``_continued``)."""
        first, events, served = await self.open_events(
            request, principal, record, lambda upstream, sent: upstream.stream(sent)
        )
        continued = self.continued(principal, record, served, first, events, restart=True)
        return OpenedStream(served, None, continued)

    def continued(
        self,
        principal: Principal | None,
        record: CallRecord | None,
        served: Served,
        first: UpstreamEvent | None,
        events: AsyncGenerator[UpstreamEvent, None],
        *,
        restart: bool,
    ) -> AsyncGenerator[StreamItem, None]:
        """``first`` and the rest of an opened stream, continued when it breaks midway (see
        ``_continued``). ``restart``: whether the caller's wire can say ``restart`` (the
        Robota wire can; a vendor-compatible one cannot, so there only a target that takes
        a prefill continues the answer, and otherwise the original failure is raised)."""
        label = _label(record, served.request)
        head: list[UpstreamEvent] = [] if first is None else [first]
        continued = self._continued(
            principal, record, served, phases.leading(head, events), label, restart
        )
        return tracing.watch_stream(continued)

    async def open_events(
        self,
        request: ChatRequest,
        principal: Principal | None,
        record: CallRecord | None,
        start: Callable[[Upstream, ChatRequest], AsyncGenerator[E, None]],
        is_content: Callable[[E], bool] | None = None,
    ) -> tuple[E | None, AsyncGenerator[E, None], Served]:
        """``open_stream`` for any stream of items ``start(upstream, sent)`` produces (a
        compatible surface's passthrough of vendor events): retried and fallen back until its
        first content item (``is_content``; any item when not given: a vendor's framing such
        as Anthropic's ``message_start`` comes with the headers and says nothing about the
        answer), bounded by the deadline to its end and by the idle limit between items."""
        seconds = self.deadline(request)
        ends_at = anyio.current_time() + seconds
        started = time.perf_counter()

        async def call(
            upstream: Upstream, sent: ChatRequest, limits: TargetLimits
        ) -> tuple[list[E], AsyncGenerator[E, None], float]:
            head, events = await phases.first_content(
                start(upstream, sent), sent, limits, is_content
            )
            return head, events, limits.limits.idle

        attempts: list[Attempt] = []
        try:
            with anyio.fail_after(seconds):
                (head, events, idle), served = await self._run(
                    request, principal, "stream", record, call, attempts, holds=True
                )
        except TimeoutError:
            raise _counted(phases.deadline_error(seconds), attempts) from None
        finally:
            if record is not None:  # for X-Robota-Overhead-Ms: the vendors' share
                record.vendor_seconds += time.perf_counter() - started
        served.ends_at = ends_at
        timer: Callable[[E], None] | None = None
        if self.counter.times_tokens and head:
            now = time.perf_counter()
            since = record.started if record is not None else started
            self.counter.first_token(served.target, now - since)
            timer = phases.gap_timer(
                functools.partial(self.counter.token_gap, served.target),
                is_content or phases.is_wire_content,
                now,
            )
        rest = phases.until(ends_at, seconds, idle, str(served.target), events, timer)
        if len(head) > 1:
            rest = phases.leading(head[1:], rest)
        if served.deployment is not None:
            rest = self._in_flight(served.deployment, rest)
        return (head[0] if head else None), rest, served

    # --- mid-stream continuation --------------------------------------------------------------

    async def _continued(
        self,
        principal: Principal | None,
        record: CallRecord | None,
        served: Served,
        events: AsyncGenerator[UpstreamEvent, None],
        label: str,
        restart: bool,
    ) -> AsyncGenerator[StreamItem, None]:
        """The stream, continued when it breaks after content went out (a cut, a stall past
        the idle limit, a vendor error event): the same target first, then the rest of the
        chain. A target that accepts a prefill gets the text produced so far as the start of
        its answer and streams only the continuation, so the caller never sees the seam; on
        one that does not (or after tool calls, which cannot be prefilled) the answer starts
        again after a ``restart`` event. Each ended attempt's usage is kept on the call
        record (``CallRecord.end_attempt``), so the caller is billed every attempt once."""
        target, current = served.target, events
        text: list[str] = []
        tools = False
        #: Each target continues a stream at most once: a second break there means it is
        #: not a passing fault.
        continued_on: set[Target] = set()
        while True:
            try:
                async with aclosing(current):
                    async for event in current:
                        if isinstance(event, DeltaEvent):
                            text.append(event.content)
                        elif isinstance(event, ToolCallEvent):
                            tools = True
                        yield event
                return
            except ProxyError as broken:
                if served.ends_at - anyio.current_time() <= 0 or not (text or tools):
                    raise
                await self._broke(record, target, broken, sum(map(len, text)), label)
                resumed = await self._resume(
                    principal,
                    record,
                    served,
                    target,
                    "".join(text),
                    tools,
                    continued_on,
                    label,
                    restart,
                    stalled=isinstance(broken, PhaseTimeout),
                )
                if resumed is None:
                    raise
                target, current, prefilled = resumed
                continued_on.add(target)
                if not prefilled:
                    text.clear()
                    tools = False
                    yield RestartEvent(reason=f"{broken.code}: {broken.message}")

    async def continuation(
        self,
        principal: Principal | None,
        record: CallRecord | None,
        served: Served,
        broken: ProxyError,
        text: str,
    ) -> AsyncGenerator[UpstreamEvent, None] | None:
        """For a passed-through stream that broke after ``text`` (a compatible surface
        forwarding its vendor's own events): the rest of the answer as events, from a
        target that takes a prefill; ``None`` when there is none or no time is left."""
        if served.ends_at - anyio.current_time() <= 0 or not text:
            return None
        label = _label(record, served.request)
        await self._broke(record, served.target, broken, len(text), label)
        stalled = isinstance(broken, PhaseTimeout)
        resumed = await self._resume(
            principal,
            record,
            served,
            served.target,
            text,
            False,
            set(),
            label,
            False,
            stalled=stalled,
        )
        return None if resumed is None else resumed[1]

    async def _broke(
        self,
        record: CallRecord | None,
        target: Target,
        broken: ProxyError,
        chars: int,
        label: str,
    ) -> None:
        """A stream broke midway and will be continued: logged, counted against the
        target's breaker, and the attempt's usage kept on the call record."""
        log.warning(
            "stream %s broke after %d characters from %s (%s): continuing",
            label,
            chars,
            target,
            broken.code,
        )
        await self._report(target, broken)
        if record is not None:
            record.end_attempt(broken.code)

    async def _resume(
        self,
        principal: Principal | None,
        record: CallRecord | None,
        served: Served,
        broken: Target,
        text: str,
        tools: bool,
        exclude: set[Target],
        label: str,
        restart: bool,
        *,
        stalled: bool = False,
    ) -> tuple[Target, AsyncGenerator[UpstreamEvent, None], bool] | None:
        """The next attempt that started streaming: its target, its events, and whether it
        continues from a prefill (else it is a fresh answer). ``None`` when none did. The
        broken target is asked first when its connection was cut (the fault is most often on
        the way, not in the model), last when it ``stalled`` past its idle limit (like one
        that missed its first-token limit, it would likely keep the caller waiting again)."""
        chain = self.targets(served.request)
        after = chain[chain.index(broken) + 1 :] if broken in chain else []
        prefill = text.rstrip()
        for target in [*after, broken] if stalled else [broken, *after]:
            if target in exclude:
                continue
            left = served.ends_at - anyio.current_time()
            if left <= 0:
                return None
            sent = served.request.model_copy(
                update={"provider": target.provider, "model": target.model}
            )
            try:
                if principal is not None:
                    principal.permissions.authorize(sent, "stream")
                self.registry.resolve(sent)
            except (Forbidden, NotFound) as exc:
                self._note(served.attempts, Attempt(target, "skipped", 0), label, exc.code)
                continue
            if not await self._allowed(target):
                self._note(served.attempts, Attempt(target, "circuit_open", 0), label)
                continue
            limits = self.target_table.get(target.provider, target.model)
            prefills = (
                bool(prefill)
                and not tools
                and limits.prefill
                and target not in self._refuses_prefill
            )
            # A target that refuses the prefill it was configured to take is not the caller's
            # error: where the wire allows a restart, it answers afresh instead.
            for continues in (True, False) if prefills and restart else (prefills,):
                if not (continues or restart):
                    break
                wait = self._spacing_wait(target, served.attempts)
                if wait >= served.ends_at - anyio.current_time():
                    break
                if wait > 0:
                    await anyio.sleep(wait)
                attempted = sent
                if continues:
                    answer = UniversalMessage(role="assistant", content=prefill)
                    attempted = sent.model_copy(update={"messages": [*sent.messages, answer]})
                started, outcome = time.perf_counter(), "cancelled"
                balancer, deployment = self.registry.balancer, None
                try:
                    with anyio.fail_after(served.ends_at - anyio.current_time()):
                        deployment = await self.registry.pick(attempted)
                        balancer.started(deployment)
                        if record is not None:
                            record.begin_attempt(deployment.name)
                        with tracing.upstream_attempt(attempted, deployment.name):
                            head, events = await phases.first_content(
                                deployment.upstream.stream(attempted), attempted, limits, None
                            )
                    outcome = "ok"
                    balancer.first_token(deployment, time.perf_counter() - started)
                except ProxyError as exc:
                    outcome = exc.code
                    if continues and _refuses_prefill(exc):
                        self._refused_prefill(target, label)
                        continue
                    await self._report(target, exc)
                    break
                except TimeoutError:
                    outcome = "timeout"
                    return None
                finally:
                    if deployment is not None and outcome != "ok":
                        balancer.finished(deployment)
                        if record is not None:
                            record.attempt_failed(
                                target.provider, target.model, deployment.name, _status(outcome)
                            )
                    ms = round((time.perf_counter() - started) * 1000)
                    self._note(
                        served.attempts,
                        Attempt(target, outcome, ms, started),
                        label,
                        "continuation",
                    )
                await self._report(target, None)
                if record is not None:
                    record.provider, record.model = target.provider, target.model
                    record.deployment = deployment.name
                seconds = self.deadline(served.request)
                rest: AsyncGenerator[UpstreamEvent, None] = phases.leading(
                    head,
                    phases.until(served.ends_at, seconds, limits.limits.idle, str(target), events),
                )
                if continues:
                    rest = phases.after_seam(rest, len(text) - len(prefill))
                return target, self._in_flight(deployment, rest), continues
        return None

    async def _run(
        self,
        request: ChatRequest,
        principal: Principal | None,
        feature: Feature,
        record: CallRecord | None,
        call: Callable[[Upstream, ChatRequest, TargetLimits], Awaitable[T]],
        attempts: list[Attempt],
        holds: bool = False,
    ) -> tuple[T, Served]:
        """``attempts`` is the caller's, so that a deadline that cuts this short can still
        say how many vendor calls were made."""
        label = _label(record, request)
        refused: ProxyError | None = None
        failed: ProxyError | None = None
        circuit: ProxyError | None = None
        targets = self.targets(request)
        base = _bounded(request, record)
        # The auth middleware authorized the request's own target for this principal and
        # feature already (``CallRecord.authorized``): only the other targets of a chain are.
        own = (
            Target(request.provider, request.model)
            if record is not None
            and record.authorized is not None
            and record.authorized.covers(principal, request, feature)
            else None
        )
        for index, target in enumerate(targets):
            sent = base.model_copy(update={"provider": target.provider, "model": target.model})
            try:
                if principal is not None and target != own:
                    principal.permissions.authorize(sent, feature)
                self.registry.resolve(sent)
            except (Forbidden, NotFound) as exc:
                self._note(attempts, Attempt(target, "skipped", 0), label, exc.code)
                refused = refused or exc
                continue
            if not await self._allowed(target):
                self._note(attempts, Attempt(target, "circuit_open", 0), label)
                circuit = circuit or _circuit_open(target)
                continue
            if record is not None:
                record.provider, record.model = target.provider, target.model
                record.upstream_called = True
            try:
                result, deployment = await self._retrying(
                    target, sent, attempts, record, label, call, holds
                )
            except self._moves_on as exc:
                failed = exc
                if index + 1 < len(targets):
                    self.counter.decided(target, "fallback")
                continue
            return result, Served(target, sent, attempts, deployment=deployment)
        # Every target failed or was skipped: the last vendor failure says most; with none,
        # the first refusal (for a plain request: exactly what resolving it alone raised).
        error = failed or circuit or refused
        if error is None:  # an alias whose chain is empty
            error = NotFound(f"model {request.model!r} has no fallback target configured")
        raise _counted(error, attempts)

    async def _retrying(
        self,
        target: Target,
        sent: ChatRequest,
        attempts: list[Attempt],
        record: CallRecord | None,
        label: str,
        call: Callable[[Upstream, ChatRequest, TargetLimits], Awaitable[T]],
        holds: bool,
    ) -> tuple[T, Deployment]:
        """Tries of one target, each on the deployment the balancer picks for it. ``holds``:
        the call goes on after ``call`` returned (a stream), so a success leaves the
        deployment counted in flight for the caller to release."""
        limits = self.target_table.get(target.provider, target.model)
        balancer = self.registry.balancer

        async def attempt() -> tuple[T, Deployment]:
            started = time.perf_counter()
            outcome = "cancelled"
            deployment = await self.registry.pick(sent)
            if record is not None:
                record.begin_attempt(deployment.name)
            balancer.started(deployment)
            try:
                with tracing.upstream_attempt(sent, deployment.name) as span:
                    result = await call(deployment.upstream, sent, limits)
                    tracing.attempt_result(span, result)
                outcome = "ok"
                balancer.first_token(deployment, time.perf_counter() - started)
            except ProxyError as exc:
                outcome = exc.code
                if isinstance(exc, RateLimited) and self._other_deployments(target):
                    # The retry goes to another deployment at once, not after the wait.
                    balancer.cool_down(deployment, exc.retry_after)
                    _MOVED_ON.add(exc)
                await self._report(target, exc)
                raise
            except TimeoutError:
                outcome = "timeout"
                raise
            finally:
                if outcome != "ok" or not holds:
                    balancer.finished(deployment)
                if outcome != "ok" and record is not None:
                    record.attempt_failed(
                        target.provider, target.model, deployment.name, _status(outcome)
                    )
                ms = round((time.perf_counter() - started) * 1000)
                self._note(attempts, Attempt(target, outcome, ms, started), label)
            await self._report(target, None)
            return result, deployment

        # The first try runs bare: most calls succeed at once, and tenacity's machinery is
        # built only after a failure it would retry (what it would have done with any other
        # outcome of this try is done here: return it, or raise it as it is).
        try:
            return await attempt()
        except BaseException as exc:
            if self.policy.retries < 1 or not self._retryable(exc):
                raise
            first: BaseException | None = exc
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.policy.retries + 1),
            wait=self._wait,
            retry=retry_if_exception(self._retryable),
            before_sleep=lambda _: self.counter.decided(target, "retry"),
            reraise=True,
        )
        async for try_ in retrying:
            with try_:
                if first is not None:
                    # Tenacity's first attempt is the failed try, replayed: the same wait
                    # (back-off or Retry-After), the same ``retry`` decision, and the same
                    # attempt numbers for the tries after it as if tenacity had run it.
                    failed, first = first, None
                    raise failed
                return await attempt()
        raise AssertionError("tenacity ended without a result or an error")  # pragma: no cover

    def _in_flight(
        self, deployment: Deployment, events: AsyncGenerator[E, None]
    ) -> AsyncGenerator[E, None]:
        """A stream that counts as in flight on its deployment until it ends: when it is
        closed, or, if it is dropped without ever being read, when it is collected."""
        release = phases.once(functools.partial(self.registry.balancer.finished, deployment))
        held = phases.released_at_end(events, release)
        weakref.finalize(held, release)
        return held

    def _other_deployments(self, target: Target) -> bool:
        return len(self.registry.deployments(target.provider)) > 1

    def _spacing_wait(self, target: Target, attempts: Sequence[Attempt]) -> float:
        """Seconds to wait before calling ``target`` again so that no target is called more
        than twice in any ``_SPACING`` seconds by one request (a continuation right after
        a retry, or a restart right after a refused prefill, would be a third call)."""
        starts = sorted(one.started for one in attempts if one.target == target and one.started)
        return starts[-2] + _SPACING - time.perf_counter() if len(starts) >= 2 else 0.0

    def _refused_prefill(self, target: Target, label: str) -> None:
        """Remembered for this process: the target's next continuations restart instead."""
        if target not in self._refuses_prefill:
            self._refuses_prefill.add(target)
            log.warning(
                "%s refused an assistant prefill (request %s): it is continued without one "
                'from now on; set "prefill": false for it in ROBOTA_TARGET_OPTIONS',
                target,
                label,
            )

    async def _allowed(self, target: Target) -> bool:
        return self.breakers is None or await self.breakers.allow(str(target))

    async def _report(self, target: Target, error: ProxyError | None) -> None:
        """A target's answer to its circuit breaker: a success, or a failure of its own."""
        if self.breakers is None:
            return
        if error is None:
            await self.breakers.success(str(target))
        elif isinstance(error, _BREAKS):
            await self.breakers.failure(str(target))

    def _retryable(self, exc: BaseException) -> bool:
        if exc in _MOVED_ON:  # another deployment is ready: its Retry-After is not ours
            return True
        if not isinstance(exc, _RETRYABLE) or isinstance(exc, PhaseTimeout):
            return False
        return exc.retry_after is None or exc.retry_after <= self.policy.retry_after_max

    def _wait(self, state: RetryCallState) -> float:
        """Tenacity's exponential back-off with jitter, or the vendor's ``Retry-After`` when
        it asks for longer (within the cap, see ``_retryable``). Never less than the back-off:
        a ``Retry-After: 0`` must not turn the retries into a burst."""
        backoff = float(self._backoff(state))
        error = state.outcome.exception() if state.outcome is not None else None
        waits = isinstance(error, ProxyError) and error not in _MOVED_ON
        if waits and isinstance(error, ProxyError) and error.retry_after is not None:
            return max(backoff, min(error.retry_after, self.policy.retry_after_max))
        return backoff

    def _note(self, attempts: list[Attempt], attempt: Attempt, label: str, why: str = "") -> None:
        attempts.append(attempt)
        self.counter.add(attempt)
        # Provider, model, outcome and time only: never a key, never vendor text.
        log.info(
            "upstream attempt %d for %s: %s %s in %d ms%s",
            len(attempts),
            label,
            attempt.target,
            attempt.outcome,
            attempt.ms,
            f" ({why})" if why else "",
        )


def _bounded(request: ChatRequest, record: CallRecord | None) -> ChatRequest:
    """``request`` as sent to the vendors: with the ``maxTokens`` a layer imposed on a request
    that set none (the metering's reservation, ``CallRecord.max_tokens``). The parsed request
    itself stays as the caller sent it: the cache keys on it, and it is shared read-only."""
    imposed = record.max_tokens if record is not None else None
    if imposed is None or request.options.max_tokens is not None:
        return request
    options = request.options.model_copy(update={"max_tokens": imposed})
    return request.model_copy(update={"options": options})


def _refuses_prefill(error: ProxyError) -> bool:
    """A 400 to a continuation that only added the assistant prefill to a request the target
    took before: the prefill is what it refused (a context overflow is not)."""
    return isinstance(error, InvalidRequest) and not isinstance(error, ContextWindowExceeded)


def _status(outcome: str) -> str:
    """An attempt's outcome as a ledger status: a wire error code, or how it was stopped (the
    call's deadline, or its caller gone)."""
    return "upstream_timeout" if outcome == "timeout" else outcome


def _label(record: CallRecord | None, request: ChatRequest) -> str:
    """What the log lines name: the request and what the caller asked for."""
    return f"{record.request_id if record else '-'} {request.provider}/{request.model}"


def _counted(error: ProxyError, attempts: Sequence[Attempt]) -> ProxyError:
    """``error`` marked as the upstream layer's final word: the vendor calls made for the
    request (all targets), which the caller sees as ``upstreamAttempts`` and takes as "do not
    retry": this layer's retries are the only ones, so a caller's retry policy cannot
    multiply them (3 proxy tries x 3 client tries was 9 calls to a vendor that is down)."""
    error.upstream_attempts = _vendor_calls(attempts)
    return error


def _vendor_calls(attempts: Sequence[Attempt]) -> int:
    return sum(1 for attempt in attempts if attempt.outcome not in _NOT_CALLED)


#: Vendor 429s whose deployment was cooled down: the next try goes to another deployment
#: without waiting for this one's ``Retry-After``.
_MOVED_ON: weakref.WeakSet[BaseException] = weakref.WeakSet()
#: Outcomes of targets that were not called.
_NOT_CALLED = frozenset({"skipped", "circuit_open"})
#: Failures that count against a target's circuit breaker: the target's own (down, slow,
#: broken). A rejected request, a vendor's rate limit or a cancelled call say nothing about it.
_BREAKS = (UpstreamUnavailable, UpstreamTimeout, UpstreamError)


def _circuit_open(target: Target) -> UpstreamUnavailable:
    return UpstreamUnavailable(
        f"{target} is failing and was not called (its circuit breaker is open)"
    )
