"""A stream's limits and joins, as async generators that wrap a stream of events.

``Resilience`` opens a stream on a target and then hands it through these: the first content
within the target's first-token limit (``first_content``), every later event within the idle
limit and the whole stream within the request's deadline (``until``), the whitespace a
prefill left out taken off a continuation's first text (``after_seam``), the items read while
waiting for the first content put back in front (``leading``), and the deployment released
when the stream ends however it ends (``released_at_end``). Each closes the stream it wraps.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import TypeVar

import anyio

from robota_client.messages import ChatRequest, DeltaEvent, ToolCallEvent
from robota_proxy.errors import UpstreamTimeout
from robota_proxy.upstreams.base import UpstreamEvent
from robota_proxy.upstreams.errors import PhaseTimeout
from robota_proxy.upstreams.target_options import TargetLimits

E = TypeVar("E")


async def until(
    ends_at: float,
    seconds: float,
    idle: float,
    target: str,
    events: AsyncGenerator[E, None],
    seen: Callable[[E], None] | None = None,
) -> AsyncGenerator[E, None]:
    """The rest of a stream, ended by ``UpstreamTimeout`` when the deadline passes, or by a
    ``PhaseTimeout`` when the target goes quiet for longer than the idle limit. ``seen`` is
    told of each event as it arrives (the metrics' gaps between tokens)."""
    async with aclosing(events):
        while True:
            left = ends_at - anyio.current_time()
            with anyio.move_on_after(min(left, idle)) as scope:
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    return
            if scope.cancelled_caught:
                if left <= idle:
                    raise deadline_error(seconds)
                raise PhaseTimeout(f"{target} sent nothing for {idle:g} s: the stream stalled")
            if seen is not None:
                seen(event)
            yield event


async def first_content(
    events: AsyncGenerator[E, None],
    sent: ChatRequest,
    limits: TargetLimits,
    is_content: Callable[[E], bool] | None,
) -> tuple[list[E], AsyncGenerator[E, None]]:
    """The items of a new stream up to its first content (any item when ``is_content`` is
    None), within the target's first-token limit; the stream is closed on any failure."""
    head: list[E] = []
    limit = limits.limits.first_token
    try:
        with anyio.move_on_after(limit) as scope:
            async for item in events:
                head.append(item)
                if is_content is None or is_content(item):
                    break
    except BaseException:
        await events.aclose()
        raise
    if scope.cancelled_caught:
        await events.aclose()
        raise phase_timeout(sent, "first token", limit)
    return head, events


async def after_seam(
    events: AsyncGenerator[UpstreamEvent, None], spaces: int
) -> AsyncGenerator[UpstreamEvent, None]:
    """A continuation without the whitespace the caller already has: a prefill may not end
    in whitespace (Anthropic refuses it), so it was cut off and the model writes it again."""
    async with aclosing(events):
        async for event in events:
            if spaces and isinstance(event, DeltaEvent):
                content = event.content
                stripped = content.lstrip()
                drop = min(spaces, len(content) - len(stripped))
                spaces = 0 if stripped else spaces - drop
                if not content[drop:]:
                    continue
                event = DeltaEvent(content=content[drop:])
            yield event


def is_wire_content(event: object) -> bool:
    return isinstance(event, DeltaEvent | ToolCallEvent)


def gap_timer(
    token_gap: Callable[[float], None], is_content: Callable[[E], bool], first: float
) -> Callable[[E], None]:
    """Tells ``token_gap`` the seconds between consecutive content events, from ``first``
    (the first content's arrival) on; framing and usage events are not tokens."""
    last = first

    def seen(event: E) -> None:
        nonlocal last
        if is_content(event):
            now = time.perf_counter()
            token_gap(now - last)
            last = now

    return seen


def once(action: Callable[[], None]) -> Callable[[], None]:
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            action()

    return run


async def released_at_end(
    events: AsyncGenerator[E, None], release: Callable[[], None]
) -> AsyncGenerator[E, None]:
    try:
        async with aclosing(events):
            async for event in events:
                yield event
    finally:
        release()


async def leading(head: list[E], rest: AsyncGenerator[E, None]) -> AsyncGenerator[E, None]:
    """The items read while waiting for the first content, then the rest of the stream."""
    async with aclosing(rest):
        for item in head:
            yield item
        async for item in rest:
            yield item


def phase_timeout(sent: ChatRequest, phase: str, limit: float) -> PhaseTimeout:
    return PhaseTimeout(
        f"{sent.provider}/{sent.model} sent no {phase} within {limit:g} s",
    )


def deadline_error(seconds: float) -> UpstreamTimeout:
    return UpstreamTimeout(f"the request did not complete within its deadline of {seconds:g} s")
