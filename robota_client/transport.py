"""HTTP to the proxy: one ``httpx.AsyncClient``, the retry policy, and SSE decoding.

Everything that leaves this module is either a contract type or a ``RemoteError``; no httpx
exception reaches application code.

Retries are for failures that say nothing was done, or that the server asks us to retry:
the proxy could not be reached, a 429 with a short enough ``Retry-After``, or a 502/503/504.
A 500 is never retried (the proxy failed at an unknown point, the vendor may already have
been paid), nor is any other 4xx (sending the same request again gets the same answer). A
stream is retried only until its first event reaches the caller; after that a resend would
repeat text the caller already has.

An error the proxy's upstream layer gave up with is never retried either, whatever its
status: it says so with ``upstreamAttempts`` (``X-Robota-Upstream-Attempts``), the vendor
calls it made, and it has already retried and fallen back as its own policy allows. Retrying
on top would multiply the vendor calls (3 proxy tries x 3 client tries = 9 calls to a vendor
that is down) and resend a request the vendor refused for good (its key rejected: 502). What
remains retried is what did not come from that layer: a 502/503/504 from a load balancer in
front of the proxy, a connection that never reached it, the proxy's own rate limiter's 429.

A stream whose connection drops after the proxy announced it (``X-Robota-Stream-Id``) is
*resumed* instead: ``GET <path>/<stream id>`` with ``Last-Event-ID`` re-attaches to the same
answer (the proxy kept producing it), so the caller gets the rest exactly once, with no
second vendor call. Resumes start at once and back off (the proxy waits only a short grace
for an abandoned stream), and are bounded per break.

A ``restart`` event (the proxy abandoned the answer midway and a fresh one follows in the
same stream) is, for the transport, an event like any other: it carries an ``id:``, a
resume continues after the last id delivered whether that was a restart or a delta, and
the events after it are simply the rest of the same stream. Resume and restart are
independent: a broken connection never causes a restart (the proxy's buffer replays the
events exactly once, a restart among them if it was not yet delivered), and a restart never
reopens the window in which the client may resend the request. Undoing the abandoned
answer is the job of the layer that assembled it (``ChatStream``, ``TextStream``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any, NoReturn, Self, TypeAlias, TypeVar

import anyio
import httpx
from httpx_sse import ServerSentEvent, aconnect_sse
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from robota_client import tracing
from robota_client.closing import AsyncClosing
from robota_client.errors import (
    ProtocolError,
    RateLimitedError,
    RemoteConnectionError,
    RemoteError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    error_from_event,
    error_from_response,
)
from robota_client.messages import (
    EVENT_NAMES,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    RestartEvent,
    ToolCallEvent,
    UsageEvent,
    parse_event,
)

__all__ = ["ChatEvent", "EventStream", "HTTPTransport"]

log = logging.getLogger("robota_client")

#: What a stream hands to the caller; an ``error`` event is raised, never yielded. A
#: ``RestartEvent`` is handed over like the others: what it voids is the caller's to undo.
ChatEvent: TypeAlias = DeltaEvent | ToolCallEvent | UsageEvent | DoneEvent | RestartEvent

Sleep: TypeAlias = Callable[[float], Awaitable[None]]

_T = TypeVar("_T")

#: The header naming a resumable stream (``robota_proxy.streams``).
STREAM_ID_HEADER = "x-robota-stream-id"

# Raised by httpx before the server could have acted on the request, or (for a stream that
# has yielded nothing yet) before the caller saw anything: resending is safe. Timeouts while
# waiting for an answer are absent on purpose: the proxy may be busy with a paid vendor call.
_RETRYABLE_TRANSPORT_ERRORS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)
_RETRYABLE_REMOTE_ERRORS = (
    RateLimitedError,
    UpstreamError,
    UpstreamUnavailableError,
    UpstreamTimeoutError,
)


class HTTPTransport(AsyncClosing):
    """Talks to one proxy. Owns its ``httpx.AsyncClient`` unless one is injected (for tests,
    or to mount the proxy in-process with ``httpx.ASGITransport``); an injected client is
    left open by ``aclose``, since whoever created it decides its lifetime.

    ``sleep`` is injectable so tests can observe back-off without waiting for it.
    """

    def __init__(
        self,
        server_url: str,
        api_key: str | None,
        *,
        timeout: float = 60.0,
        max_retries: int = 2,
        retry_initial_delay: float = 0.25,
        retry_max_delay: float = 8.0,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
        sleep: Sleep | None = None,
        resume_attempts: int = 5,
        resume_initial_delay: float = 0.05,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if retry_initial_delay < 0 or retry_max_delay < 0:
            raise ValueError("retry delays must be >= 0")
        if httpx.URL(server_url).scheme not in ("http", "https"):
            raise ValueError(f"server_url must be an http(s) URL, got {server_url!r}")
        self.server_url = server_url.rstrip("/")
        self.max_retries = max_retries
        self.retry_initial_delay = retry_initial_delay
        self.retry_max_delay = retry_max_delay
        # Sent per request rather than set on the client, so an injected client works too.
        # httpx.Headers masks Authorization in its repr.
        self._headers = httpx.Headers(headers or {})
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._owns_client = http_client is None
        self._client = http_client or httpx.AsyncClient(timeout=httpx.Timeout(timeout))
        self._sleep: Sleep = sleep or anyio.sleep
        # Exponential with additive jitter, so clients that failed together do not all
        # come back together.
        self._backoff = wait_exponential(
            multiplier=retry_initial_delay, max=retry_max_delay
        ) + wait_random(0, retry_initial_delay)
        self.resume_attempts = resume_attempts
        # The first resume goes out at once: the proxy keeps an abandoned stream's vendor
        # call going only for a short grace (ROBOTA_RESUME_GRACE_SECONDS).
        self._resume_backoff = wait_exponential(multiplier=resume_initial_delay, max=2.0)

    def __repr__(self) -> str:
        return f"HTTPTransport(server_url={self.server_url!r})"

    @property
    def _secrets(self) -> tuple[str, ...]:
        # Derived when needed, so the key is held only by the Headers (whose repr masks it)
        # and never by a plain attribute a debugger or vars() would print.
        scheme, _, credential = self._headers.get("authorization", "").partition(" ")
        return (credential,) if scheme.lower() == "bearer" and credential else ()

    def _stream_error(self, event: ErrorEvent, request_id: str | None) -> RemoteError:
        return error_from_event(event, request_id=request_id, redact=self._secrets)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    # --- plain JSON calls -------------------------------------------------------------------

    async def post_json(
        self, path: str, body: Mapping[str, Any]
    ) -> tuple[dict[str, Any], httpx.Headers]:
        """POST ``body`` as JSON; the decoded JSON object answer and the response headers."""
        return await self._json_call("POST", path, body)

    async def get_json(self, path: str) -> tuple[dict[str, Any], httpx.Headers]:
        return await self._json_call("GET", path, None)

    async def get_status(self, path: str) -> int | None:
        """One unretried GET; its status, or ``None`` if the proxy could not be reached.

        For health checks, which must answer quickly and must not raise for "down"."""
        try:
            response = await self._client.get(self._url(path), headers=self._headers)
        except httpx.HTTPError:
            return None
        return response.status_code

    async def _json_call(
        self, method: str, path: str, body: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any], httpx.Headers]:
        return await self._with_retries(method, path, lambda: self._json_once(method, path, body))

    async def _json_once(
        self, method: str, path: str, body: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any], httpx.Headers]:
        headers = self._headers
        traced = tracing.headers()  # the application's current span, as traceparent
        if traced:
            headers = headers.copy()
            headers.update(traced)
        request = self._client.build_request(method, self._url(path), json=body, headers=headers)
        # Streamed so that a failure while reading the body (the server has answered and
        # may have acted) is told apart from one before the answer (safe to resend).
        response = await self._client.send(request, stream=True)
        try:
            content = await self._read_body(response)
        finally:
            await response.aclose()
        request_id = response.headers.get("x-request-id")
        if response.is_error:
            raise error_from_response(
                response.status_code, content, response.headers, redact=self._secrets
            )
        if not response.is_success:
            raise ProtocolError(
                f"unexpected HTTP {response.status_code} from {method} {path}",
                status=response.status_code,
                request_id=request_id,
            )
        try:
            data = json.loads(content)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ProtocolError(
                f"{method} {path} answered HTTP {response.status_code} with a body that is "
                "not a JSON object",
                status=response.status_code,
                request_id=request_id,
            )
        return data, response.headers

    async def _read_body(self, response: httpx.Response) -> bytes:
        try:
            return await response.aread()
        except httpx.TransportError as exc:
            if response.is_error:
                # The status alone is enough to type (and maybe retry) an error answer.
                return b""
            raise RemoteConnectionError(
                f"the connection to the proxy broke while reading its answer "
                f"({type(exc).__name__})",
                request_id=response.headers.get("x-request-id"),
            ) from exc

    # --- streams ----------------------------------------------------------------------------

    def stream(self, path: str, body: Mapping[str, Any]) -> EventStream:
        """A server-sent event stream, opened on first iteration."""
        return EventStream(self, path, body)

    async def _open_stream(
        self, path: str, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> _OpenStream:
        return await self._with_retries(
            "POST", path, lambda: self._open_stream_once(path, body, headers=headers)
        )

    async def _resume_stream(self, path: str, broken: _OpenStream) -> _OpenStream:
        """Re-attach to ``broken``'s stream after its last delivered event."""
        stream_id = broken.stream_id
        assert stream_id is not None
        resume_path = f"{path}/{stream_id}"
        headers = {"Last-Event-ID": broken.last_event_id} if broken.last_event_id else {}
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.resume_attempts),
            wait=self._resume_backoff,
            retry=retry_if_exception(lambda exc: isinstance(exc, httpx.TransportError)),
            sleep=self._sleep,
            before_sleep=lambda state: _log_retry(state, "GET", resume_path),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    opened = await self._open_stream_once(
                        resume_path, None, method="GET", headers=headers, read_first=False
                    )
                    opened.last_event_id = broken.last_event_id
                    opened.request_id = opened.request_id or broken.request_id
                    return opened
        except httpx.TransportError as exc:
            raise RemoteConnectionError(
                f"the connection to the proxy broke mid-stream and resuming stream "
                f"{stream_id} failed after {self.resume_attempts} attempts "
                f"({type(exc).__name__})",
                request_id=broken.request_id,
            ) from exc
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    async def _open_stream_once(
        self,
        path: str,
        body: Mapping[str, Any] | None,
        *,
        method: str = "POST",
        headers: Mapping[str, str] | None = None,
        read_first: bool = True,
    ) -> _OpenStream:
        stack = AsyncExitStack()
        try:
            # A copy: aconnect_sse adds its Accept header to the mapping it is given.
            request_headers = self._headers.copy()
            request_headers.update(headers or {})
            source = await stack.enter_async_context(
                aconnect_sse(
                    self._client,
                    method,
                    self._url(path),
                    json=body,
                    headers=request_headers,
                )
            )
            response = source.response
            request_id = response.headers.get("x-request-id")
            if not response.is_success:
                content = await self._read_body(response)
                if response.is_error:
                    raise error_from_response(
                        response.status_code, content, response.headers, redact=self._secrets
                    )
                raise ProtocolError(
                    f"unexpected HTTP {response.status_code} from {method} {path}",
                    status=response.status_code,
                    request_id=request_id,
                )
            media_type = response.headers.get("content-type", "").partition(";")[0].strip()
            if media_type != "text/event-stream":
                raise ProtocolError(
                    f"{method} {path} answered {media_type or 'no content type'} instead of "
                    "text/event-stream",
                    status=response.status_code,
                    request_id=request_id,
                )
            opened = _OpenStream(stack, source.aiter_sse(), request_id, self._stream_error)
            opened.stream_id = response.headers.get(STREAM_ID_HEADER)
            if not read_first:
                return opened
            # Reading the first event is part of the retried unit: until it is handed over
            # the caller has seen nothing, so a dropped connection can still be resent...
            try:
                opened.first = await opened.next_event()
            except httpx.TransportError:
                if opened.stream_id is None:
                    raise
                # ...unless the proxy named the stream: then resume it, never resend.
                opened.broken = True
            return opened
        except BaseException:
            # Shielded: on cancellation the connection must still be released.
            with anyio.CancelScope(shield=True):
                await stack.aclose()
            raise

    # --- retry policy -----------------------------------------------------------------------

    async def _with_retries(
        self, method: str, path: str, attempt_once: Callable[[], Awaitable[_T]]
    ) -> _T:
        async for attempt in self._retrying(method, path):
            with attempt:
                try:
                    return await attempt_once()
                except httpx.TransportError as exc:
                    if not self._is_retryable(exc) or self._is_last(attempt.retry_state):
                        self._raise_unreachable(exc, method, path, attempt.retry_state)
                    raise
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    def _retrying(self, method: str, path: str) -> AsyncRetrying:
        # A fresh controller per call: tenacity keeps per-call state on the instance.
        return AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(self._is_retryable),
            sleep=self._sleep,
            before_sleep=lambda state: _log_retry(state, method, path),
            reraise=True,
        )

    def _is_retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, _RETRYABLE_TRANSPORT_ERRORS):
            return True
        if not isinstance(exc, _RETRYABLE_REMOTE_ERRORS):
            return False
        if exc.upstream_attempts is not None:
            # The proxy's upstream layer already made its tries (see the module doc).
            return False
        # Waiting less than the server asked for would be a wasted attempt, and waiting
        # longer than retry_max_delay is not ours to decide: the caller gets the error and
        # its retry_after to schedule the retry itself.
        return exc.retry_after is None or exc.retry_after <= self.retry_max_delay

    def _wait(self, state: RetryCallState) -> float:
        delay = min(self._backoff(state), self.retry_max_delay)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RemoteError) and exc.retry_after is not None:
            # The server knows when it will have capacity; never come back sooner.
            delay = max(delay, exc.retry_after)
        return delay

    def _is_last(self, state: RetryCallState) -> bool:
        return state.attempt_number > self.max_retries

    def _raise_unreachable(
        self, exc: httpx.TransportError, method: str, path: str, state: RetryCallState
    ) -> NoReturn:
        attempts = state.attempt_number
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        raise RemoteConnectionError(
            f"could not get an answer from the proxy at {self.server_url} for "
            f"{method} {path}{tries}: {type(exc).__name__}: {exc}"
        ) from exc

    def _url(self, path: str) -> str:
        # Concatenated, not joined: a proxy mounted under a path prefix keeps its prefix.
        return f"{self.server_url}{path}"


class _OpenStream:
    """A connected SSE response and where reading it has got to."""

    def __init__(
        self,
        stack: AsyncExitStack,
        events: AsyncIterator[ServerSentEvent],
        request_id: str | None,
        error_for: Callable[[ErrorEvent, str | None], RemoteError],
    ) -> None:
        self.stack = stack
        self.events = events
        self.request_id = request_id
        self.error_for = error_for
        self.first: ChatEvent | None = None
        #: Set when the proxy announced a resumable stream.
        self.stream_id: str | None = None
        #: The id of the last event handed over, where a resume continues from.
        self.last_event_id: str | None = None
        #: The connection broke before the first event was read.
        self.broken = False

    async def next_event(self) -> ChatEvent:
        """The next contract event; raises for ``error`` events and for a stream that ends
        without ``done`` or ``error``. httpx transport errors pass through untranslated so
        the caller can decide whether a resend is still allowed."""
        async for sse in self.events:
            if sse.id:
                self.last_event_id = sse.id
            if sse.event not in EVENT_NAMES:
                # Keep-alives or event types added after this client was written.
                continue
            try:
                event = parse_event(sse.event, sse.data)
            except ValueError as exc:
                raise ProtocolError(
                    f"unreadable {sse.event!r} event in the stream: {exc}",
                    request_id=self.request_id,
                ) from exc
            if isinstance(event, ErrorEvent):
                raise self.error_for(event, self.request_id)
            return event
        raise ProtocolError(
            "stream ended early (no done or error event)", request_id=self.request_id
        )


class ChatEventIterator(AsyncClosing):
    """What both transports' streams share: an async iterator of ``ChatEvent`` that stops
    after ``done`` and releases its connection (``aclose``) when anything goes wrong,
    cancellation included. Subclasses say how to get the next event and what ``done`` ends."""

    _finished = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ChatEvent:
        if self._finished:
            raise StopAsyncIteration
        try:
            event = await self._next()
        except BaseException:
            # Shielded: on cancellation the connection must still be released.
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise
        if isinstance(event, DoneEvent):
            await self._on_done()
        return event

    async def _next(self) -> ChatEvent:
        raise NotImplementedError

    async def _on_done(self) -> None:
        await self.aclose()


class EventStream(ChatEventIterator):
    """An async iterator of ``ChatEvent`` for one streamed call.

    Connects on first iteration (with retries), stops after ``done``, and raises the typed
    error for an ``error`` event. Use ``async with`` (or ``aclose``) to release the
    connection when abandoning a stream early; a stream read to the end closes itself.
    """

    def __init__(self, transport: HTTPTransport, path: str, body: Mapping[str, Any]) -> None:
        self._transport = transport
        self._path = path
        self._body = body
        self._open: _OpenStream | None = None
        self.request_id: str | None = None
        #: How many times this stream was resumed after a dropped connection.
        self.resumes = 0
        #: The call's client span (``robota_client.tracing``), from opening to the end.
        self._span: Any = None
        self._error: BaseException | None = None

    async def _next(self) -> ChatEvent:
        try:
            event = await self._next_event()
        except BaseException as exc:
            self._error = exc
            raise
        if isinstance(event, DoneEvent) and self._span is not None:
            tracing.answered(self._span, event.message.to_wire())
        return event

    async def _next_event(self) -> ChatEvent:
        if self._open is None:
            self._span = tracing.start(self._body)
            self._open = await self._transport._open_stream(
                self._path, self._body, tracing.headers(self._span) if self._span else None
            )
            self.request_id = self._open.request_id
            if self._open.first is not None:
                return self._open.first
        breaks = 0
        while True:
            if not self._open.broken:
                try:
                    return await self._open.next_event()
                except httpx.TransportError as exc:
                    if self._open.stream_id is None:
                        raise RemoteConnectionError(
                            f"the connection to the proxy broke mid-stream "
                            f"({type(exc).__name__}); not resent because part of the answer "
                            "was already delivered",
                            request_id=self.request_id,
                        ) from exc
            # Bounded: a proxy that accepts resumes but keeps breaking them is given up on.
            breaks += 1
            if breaks > self._transport.resume_attempts:
                raise RemoteConnectionError(
                    f"stream {self._open.stream_id} kept breaking; gave up after {breaks - 1} "
                    "resumes",
                    request_id=self.request_id,
                )
            broken = self._open
            await broken.stack.aclose()
            self._open = await self._transport._resume_stream(self._path, broken)
            self.resumes += 1

    async def aclose(self) -> None:
        self._finished = True
        span, self._span = self._span, None
        tracing.end(span, self._error)
        if self._open is not None:
            await self._open.stack.aclose()


def _log_retry(state: RetryCallState, method: str, path: str) -> None:
    exc = state.outcome.exception() if state.outcome else None
    delay = state.next_action.sleep if state.next_action else 0.0
    reason = exc.code if isinstance(exc, RemoteError) else type(exc).__name__
    log.info(
        "retrying %s %s in %.2fs after %s (attempt %d failed)",
        method,
        path,
        delay,
        reason,
        state.attempt_number,
    )
