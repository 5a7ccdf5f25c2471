"""A vendor's HTTP API spoken directly: one pooled aiohttp session per adapter.

Every peer gateway speaks the vendors' HTTP APIs itself, and so do we (issue 13): the
adapters already build the vendor's JSON and read its answer as dicts, so a vendor SDK on the
request path was only an expensive ``post()`` (1.09 ms of CPU per call against 0.25 ms on
aiohttp) that also had to be imported at start-up. What the SDKs did for us that matters is
here, once for all three vendors:

* **errors by status and body**: an HTTP error becomes the wire error ``status_error`` picks
  from the status, the vendor's message and code, and ``Retry-After`` (the key cut out of
  anything echoed), or the one the adapter's own ``status_error`` function picks where the
  vendor says more in its body (Gemini: a bad key as a 400, the retry delay in a detail);
  a network failure is ``upstream_unavailable`` before the answer started and a broken
  stream after; a timeout is ``upstream_timeout``;
* **event streams**: framed by ``httpx-sse`` (its ``EventSource`` reads any response that has
  ``headers`` and ``aiter_text()``, which ``_SSEText`` gives an aiohttp response), then read
  as JSON objects by ``sse_json.json_events`` (a malformed chunk is skipped, not fatal).

The phase limits (headers, first token, stream idle) are ``Resilience``'s, which cancels the
call; the session only bounds connecting (``connect_timeout``) and each socket read
(``timeout``), so that a call made outside ``Resilience`` (a passthrough in a test) still ends.

aiohttp, not httpx: on this path its connector measured three times cheaper per call, and
httpcore's pool scans every pooled connection on each request.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from httpx_sse import EventSource, SSEError
from yarl import URL

from robota_proxy.errors import ProxyError
from robota_proxy.observability import tracing
from robota_proxy.upstreams._convert import JSONDict, malformed_response_error, status_error
from robota_proxy.upstreams.errors import (
    broken_stream_error,
    timeout_error,
    unavailable_error,
)
from robota_proxy.upstreams.sse_json import json_events

#: Parsed URLs kept per adapter: a Gemini path names the caller's model, so an open-ended
#: adapter must not keep one for every name a caller ever sent.
_MAX_CACHED_URLS = 256

#: What reading a started stream can raise that is the vendor's or the network's doing:
#: aiohttp's errors (a cut connection, a truncated chunk), a socket read that timed out,
#: and an event stream httpx-sse cannot frame (a wrong content type).
_STREAM_ERRORS = (aiohttp.ClientError, TimeoutError, SSEError)

#: An adapter's own mapping of a vendor HTTP error: (status, body parsed as JSON or else the
#: text, response headers) to the wire error.
StatusError = Callable[[int, Any, Mapping[str, str]], ProxyError]


class VendorHTTP:
    """One vendor endpoint (base URL and credentials) behind one aiohttp connection pool.

    The session is opened on the first call, inside the running event loop (aiohttp ties a
    session to the loop that made it; adapters are built before the server's loop runs).
    ``max_connections``: the pool's cap, 0 for none (each connection is a call in flight).
    """

    def __init__(
        self,
        *,
        vendor: str,
        base_url: str,
        headers: Mapping[str, str],
        secrets: Sequence[str],
        timeout: float,
        connect_timeout: float,
        max_connections: int,
        status_error: StatusError | None = None,
    ) -> None:
        self.vendor = vendor
        self._status_error_of = status_error
        self._base = base_url.rstrip("/")
        #: Sent on every call: the credentials, and JSON in both directions.
        self._headers = {
            **headers,
            "content-type": "application/json",
            "accept": "application/json",
        }
        self._stream_headers = {**self._headers, "accept": "text/event-stream"}
        self._secrets = [secret for secret in secrets if secret]
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=timeout
        )
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        #: Parsed URLs by path: yarl parses a string URL on every call otherwise.
        self._urls: dict[str, URL] = {}

    def _open(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300
            )
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                # The vendor's answer is read as bytes and parsed here; no cookies kept
                # between callers.
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=True,
            )
            self._session = session
        return session

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = URL(self._base + path)
            if len(self._urls) < _MAX_CACHED_URLS:
                self._urls[path] = url
        return url

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- calls -----------------------------------------------------------------------------

    async def post_json(
        self,
        path: str,
        body: JSONDict,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> JSONDict:
        """POST ``body`` and return the vendor's JSON object; raises ``ProxyError`` only."""
        try:
            async with self._open().post(
                self._url(path),
                data=_encode(body),
                headers=self._sent_headers(self._headers, headers),
                params=params,
            ) as response:
                raw = await response.read()
                if response.status >= 400:
                    raise self._status_error(response, raw)
        except ProxyError:
            raise
        except TimeoutError:
            raise timeout_error(self.vendor) from None
        except aiohttp.ClientError:
            raise unavailable_error(self.vendor) from None
        try:
            answer = json.loads(raw)
        except ValueError:
            raise malformed_response_error(self.vendor) from None
        if not isinstance(answer, dict):
            raise malformed_response_error(self.vendor)
        return answer

    @asynccontextmanager
    async def post_events(
        self,
        path: str,
        body: JSONDict,
        *,
        done: str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> AsyncIterator[AsyncGenerator[tuple[str, JSONDict], None]]:
        """POST ``body`` and read the answer as an event stream: ``(event name, data object)``
        per event (``done``: the data that ends the stream, OpenAI's ``[DONE]``). Failures
        before the answer started raise as in ``post_json``; once reading, a cut connection,
        a timed-out read or an unframeable stream raise a broken-stream (or timeout) error.
        The response is closed however the reading ends."""
        try:
            response = await self._open().post(
                self._url(path),
                data=_encode(body),
                headers=self._sent_headers(self._stream_headers, headers),
                params=params,
            )
        except TimeoutError:
            raise timeout_error(self.vendor) from None
        except aiohttp.ClientError:
            raise unavailable_error(self.vendor) from None
        try:
            if response.status >= 400:
                try:
                    raw = await response.read()
                except (aiohttp.ClientError, TimeoutError):
                    raw = b""
                raise self._status_error(response, raw)
            source = EventSource(_SSEText(response))  # type: ignore[arg-type]
            events = json_events(source.aiter_sse(), self.vendor, done=done)
            yield self._stream_failures(events)
        finally:
            if response.content.at_eof():
                response.release()  # read to the end: the connection goes back to the pool
            else:
                response.close()  # left midway: closing is what cancels the vendor's work

    async def _stream_failures(
        self, events: AsyncGenerator[tuple[str, JSONDict], None]
    ) -> AsyncGenerator[tuple[str, JSONDict], None]:
        """The events, with the transport's failures mapped to wire errors. A generator of
        its own so that what a consumer throws in (cancellation, ``aclose``) is never taken
        for a vendor failure."""
        try:
            while True:
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise timeout_error(self.vendor) from None
                except _STREAM_ERRORS:
                    raise broken_stream_error(self.vendor) from None
                yield event
        finally:
            await events.aclose()

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _sent_headers(base: dict[str, str], extra: Mapping[str, str] | None) -> Mapping[str, str]:
        """The call's headers: ``extra`` (a passthrough caller's ``anthropic-version``)
        over the defaults, and the trace context when tracing."""
        headers: Mapping[str, str] = {**base, **extra} if extra else base
        return tracing.with_traceparent(headers)

    def _status_error(self, response: aiohttp.ClientResponse, raw: bytes) -> ProxyError:
        body: Any
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", errors="replace")
        if self._status_error_of is not None:
            return self._status_error_of(response.status, body, response.headers)
        return status_error(
            self.vendor, response.status, body=body, headers=response.headers, secrets=self._secrets
        )


def _encode(body: JSONDict) -> bytes:
    """The wire JSON: compact, and UTF-8 as it is (vendors read it; escaping every
    non-ASCII character would only make the request bigger)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class _SSEText:
    """An aiohttp response as httpx-sse's ``EventSource`` reads one: the content type, and
    the body as text in the pieces it arrives in (decoded incrementally, so a character
    split between two network reads is not garbled)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.headers = response.headers
        self._content = response.content

    async def aiter_text(self) -> AsyncIterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        async for chunk in self._content.iter_any():
            text = decoder.decode(chunk)
            if text:
                yield text
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail
