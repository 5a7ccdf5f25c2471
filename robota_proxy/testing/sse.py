"""Sending a vendor's SSE stream with stream faults, and telling how each stream ended.

Starlette's ``StreamingResponse`` cannot say whether a stream was cut by the client, and
uvicorn silently ignores writes after a disconnect, so this response watches for
``http.disconnect`` itself while it sends, or waits (``first_token_latency``,
``stall_after``): a wait is cancelled as soon as the client goes away. A deliberate cut
(``drop_after``, ``stall_after``) raises out of the ASGI call: that is the one way to make
uvicorn close the socket without writing the chunked body's terminator, which is what a
vendor dying mid-stream looks like to a client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from robota_proxy.testing.script import Fault
from robota_proxy.testing.state import FakeState

#: What replaces a malformed chunk's data: cut off mid-object, so no JSON parser accepts it.
MALFORMED_DATA = '{"malformed": tru'

Outcome = Literal["completed", "aborted", "dropped"]


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str | None = None
    #: Carries content (text or tool arguments); stream faults count only these.
    content: bool = False


class StreamDropped(Exception):
    """Raised on purpose so that uvicorn aborts the connection mid-body."""


class _QuietDrops(logging.Filter):
    """Hides uvicorn's traceback for a deliberate ``StreamDropped``; anything else still
    shows, so real server bugs are not hidden."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not _is_drop(error)


def _is_drop(error: BaseException | None) -> bool:
    if isinstance(error, StreamDropped):
        return True
    if isinstance(error, BaseExceptionGroup):
        return all(_is_drop(inner) for inner in error.exceptions)
    return False


def quiet_deliberate_drops() -> None:
    """Install the filter on uvicorn's error logger once per process."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(existing, _QuietDrops) for existing in logger.filters):
        logger.addFilter(_QuietDrops())


def frame(event: SSEEvent, newline: str) -> bytes:
    head = f"event: {event.event}{newline}" if event.event else ""
    return f"{head}data: {event.data}{newline}{newline}".encode()


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """The events to send once the stream faults are applied, and how the stream ends."""

    events: list[SSEEvent]
    #: Cut the connection after the events instead of ending the body.
    cut: bool = False
    #: Seconds of silence, connection open, before the cut (``stall_after``).
    stall: float = 0.0
    #: Index of the event that waits ``first_token_latency`` (the first content event, or
    #: ``len(events)``: the end of the body when nothing is content).
    first_content: int = 0


def _cut_at(content_at: list[int], after: int) -> int:
    """Where a stream cut after ``after`` content chunks stops: before the next content
    chunk, or when there is none past the content, before the finish."""
    if after < len(content_at):
        return content_at[after]
    return content_at[-1] + 1 if content_at else 0


def apply_faults(events: list[SSEEvent], fault: Fault | None) -> StreamPlan:
    if fault is None:
        return StreamPlan(events)
    content_at = [index for index, event in enumerate(events) if event.content]
    events = list(events)
    if fault.malformed_at is not None and 0 <= fault.malformed_at < len(content_at):
        index = content_at[fault.malformed_at]
        events[index] = replace(events[index], data=MALFORMED_DATA)
    first_content = content_at[0] if content_at else len(events)
    cuts: list[tuple[int, float]] = []
    if fault.drop_after is not None:
        cuts.append((_cut_at(content_at, fault.drop_after), 0.0))
    if fault.stall_after is not None:
        cuts.append((_cut_at(content_at, fault.stall_after), fault.stall_seconds))
    if not cuts:
        return StreamPlan(events, first_content=first_content)
    # Both given: the earlier cut wins; at the same place the stall, which is the longer.
    cut, stall = min(cuts, key=lambda item: (item[0], -item[1]))
    return StreamPlan(events[:cut], cut=True, stall=stall, first_content=first_content)


class FaultyEventStream(Response):
    """An SSE response that may pause, stall, garble or cut, and reports how it ended."""

    def __init__(
        self,
        events: list[SSEEvent],
        *,
        state: FakeState,
        fault: Fault | None,
        newline: str = "\n",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # Response.__init__ would add a Content-Length for an empty body.
        self.status_code = 200
        self.media_type = "text/event-stream"
        self.background = None
        self.init_headers({"cache-control": "no-cache", **(headers or {})})
        plan = apply_faults(events, fault)
        self._chunks = [frame(event, newline) for event in plan.events]
        self._drop = plan.cut
        self._stall = plan.stall
        self._first_content = plan.first_content
        self._first_wait = fault.first_token_latency if fault else 0.0
        self._pause = fault.chunk_latency if fault else 0.0
        self._state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = await self._send_watching(receive, send)
        if outcome == "completed":
            self._state.stream_completed()
        elif outcome == "aborted":
            self._state.stream_aborted()
        else:
            self._state.stream_dropped()
            raise StreamDropped("fault: connection cut mid-stream")

    async def _send_watching(self, receive: Receive, send: Send) -> Outcome:
        outcome: list[Outcome] = []
        finishing = False

        async with anyio.create_task_group() as group:

            async def produce() -> None:
                nonlocal finishing
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
                for position, chunk in enumerate(self._chunks):
                    if position and self._pause:
                        await anyio.sleep(self._pause)
                    if position == self._first_content and self._first_wait:
                        await anyio.sleep(self._first_wait)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if not self._drop and len(self._chunks) <= self._first_content and self._first_wait:
                    await anyio.sleep(self._first_wait)  # no content reached: hold the end
                if self._drop:
                    # The watcher runs meanwhile, so a client leaving during a stall is
                    # seen (aborted) and this task is cancelled rather than left asleep.
                    await anyio.sleep(self._stall)
                    outcome.append("dropped")
                else:
                    finishing = True
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    outcome.append("completed")
                group.cancel_scope.cancel()

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not outcome:
                    outcome.append("completed" if finishing else "aborted")
                group.cancel_scope.cancel()

            group.start_soon(produce)
            group.start_soon(watch)
        return outcome[0] if outcome else "aborted"
