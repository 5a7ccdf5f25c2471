"""A blocking facade over ``RemoteAIProvider`` for scripts and notebooks.

Each ``SyncRemoteAIProvider`` runs an event loop in a thread of its own (an anyio blocking
portal) and hands every call to it. ``asyncio.run`` per call would fail inside Jupyter,
where a loop is already running in the calling thread, and would throw away the connection
pool after every call. Call ``close()`` (or use ``with``) to stop the thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import date
from types import TracebackType
from typing import Generic, Protocol, TypeVar

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal

from robota_client.messages import AssistantMessage, Me, MessageLike, Usage, UsageReport
from robota_client.provider import ChatStream, Options, RemoteAIProvider, Tools
from robota_client.transport import ChatEvent

__all__ = ["SyncChatStream", "SyncRemoteAIProvider", "SyncTextStream"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class _AsyncSource(Protocol[T_co]):
    def __anext__(self) -> Awaitable[T_co]: ...

    def aclose(self) -> Awaitable[None]: ...


class _Exhausted:
    """Marks the end of an async iterator. ``StopAsyncIteration`` is not carried across the
    portal: an exception that ends iteration should not travel through a future."""


_EXHAUSTED = _Exhausted()


async def _next_or_exhausted(source: _AsyncSource[T]) -> T | _Exhausted:
    # A function rather than a method: the portal task then holds the async source only,
    # so the wrapper's last reference (and its __del__) always goes away in the caller's
    # thread, where calling into the portal is allowed.
    try:
        return await source.__anext__()
    except StopAsyncIteration:
        return _EXHAUSTED


class _BlockingIterator(Generic[T]):
    def __init__(self, portal: BlockingPortal, source: _AsyncSource[T]) -> None:
        self._portal = portal
        self._source = source
        self._closed = False

    def __iter__(self) -> _BlockingIterator[T]:
        return self

    def __next__(self) -> T:
        if self._closed:
            raise StopIteration
        try:
            item = self._portal.call(_next_or_exhausted, self._source)
        except BaseException:
            # The async stream closes itself when it fails; nothing left to release.
            self._closed = True
            raise
        if isinstance(item, _Exhausted):
            self._closed = True
            raise StopIteration
        return item

    def close(self) -> None:
        """Release the connection of a stream abandoned before its end; idempotent."""
        if not self._closed:
            self._closed = True
            self._portal.call(self._source.aclose)

    def __del__(self) -> None:
        # ``for chunk in ai.chat_stream(...): break`` drops the stream without closing it;
        # release its connection now rather than when the provider closes. CPython runs
        # this as the loop ends, in the caller's thread.
        if not self._closed:
            with contextlib.suppress(Exception):  # the portal may already be stopped
                self.close()

    def __enter__(self) -> _BlockingIterator[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncTextStream(_BlockingIterator[str]):
    """Text chunks, blocking."""

    def __enter__(self) -> SyncTextStream:
        return self


class SyncChatStream(_BlockingIterator[ChatEvent]):
    """Typed events, blocking; ``message`` and ``usage`` as on ``ChatStream``."""

    def __init__(self, portal: BlockingPortal, stream: ChatStream) -> None:
        super().__init__(portal, stream)
        self._stream = stream

    def __enter__(self) -> SyncChatStream:
        return self

    @property
    def message(self) -> AssistantMessage:
        return self._stream.message

    @property
    def usage(self) -> Usage | None:
        return self._stream.usage

    @property
    def text(self) -> str:
        return self._stream.text

    @property
    def restarts(self) -> int:
        """Restart events seen; ``text`` and ``message`` hold only the last answer."""
        return self._stream.restarts

    @property
    def restart_reason(self) -> str | None:
        return self._stream.restart_reason

    @property
    def request_id(self) -> str | None:
        return self._stream.request_id

    def final_message(self) -> AssistantMessage:
        """Read the rest of the stream and return the complete answer."""
        self._closed = True  # finished or failed, the async stream closes itself
        return self._portal.call(self._stream.final_message)


class SyncRemoteAIProvider:
    """``RemoteAIProvider`` with blocking methods; same constructor, same errors.

    An injected ``http_client`` must be an ``httpx.AsyncClient``: it is used from the
    portal's event loop, which is also what lets tests mount an ASGI app in-process.
    """

    name = "remote"

    def __init__(
        self,
        server_url: str,
        api_key: str | None,
        target_provider: str,
        model: str,
        *,
        timeout: float = 60.0,
        max_retries: int = 2,
        retry_initial_delay: float = 0.25,
        retry_max_delay: float = 8.0,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._provider = RemoteAIProvider(
            server_url,
            api_key,
            target_provider,
            model,
            timeout=timeout,
            max_retries=max_retries,
            retry_initial_delay=retry_initial_delay,
            retry_max_delay=retry_max_delay,
            headers=headers,
            http_client=http_client,
        )
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = start_blocking_portal()
        self._portal = self._portal_cm.__enter__()

    @property
    def target_provider(self) -> str:
        return self._provider.target_provider

    @property
    def model(self) -> str:
        return self._provider.model

    @property
    def server_url(self) -> str:
        return self._provider.server_url

    def __repr__(self) -> str:
        return (
            f"SyncRemoteAIProvider(server_url={self.server_url!r}, "
            f"target_provider={self.target_provider!r}, model={self.model!r})"
        )

    def supports_tools(self) -> bool:
        return self._provider.supports_tools()

    def chat(
        self, messages: Sequence[MessageLike], options: Options = None, tools: Tools = None
    ) -> AssistantMessage:
        return self._live_portal().call(self._provider.chat, messages, options, tools)

    def stream(
        self, messages: Sequence[MessageLike], options: Options = None, tools: Tools = None
    ) -> SyncChatStream:
        return SyncChatStream(self._live_portal(), self._provider.stream(messages, options, tools))

    def chat_stream(
        self,
        messages: Sequence[MessageLike],
        options: Options = None,
        tools: Tools = None,
        *,
        raw_restarts: bool = False,
    ) -> SyncTextStream:
        """Text chunks joining to one clean answer, restarts included (see ``TextStream``:
        a restarted answer that does not repeat the text already yielded raises
        ``StreamRestarted``, unless ``raw_restarts``)."""
        return SyncTextStream(
            self._live_portal(),
            self._provider.chat_stream(messages, options, tools, raw_restarts=raw_restarts),
        )

    def models(self) -> dict[str, list[str] | None]:
        return self._live_portal().call(self._provider.models)

    def health(self) -> bool:
        return self._live_portal().call(self._provider.health)

    def usage(self, since: date | None = None, until: date | None = None) -> UsageReport:
        return self._live_portal().call(self._provider.usage, since, until)

    def me(self) -> Me:
        return self._live_portal().call(self._provider.me)

    def close(self) -> None:
        """Close the connection pool and stop the portal thread; idempotent."""
        if self._portal_cm is None:
            return
        portal_cm, self._portal_cm = self._portal_cm, None
        try:
            self._portal.call(self._provider.aclose)
        finally:
            portal_cm.__exit__(None, None, None)

    def __enter__(self) -> SyncRemoteAIProvider:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _live_portal(self) -> BlockingPortal:
        if self._portal_cm is None:
            raise RuntimeError("this SyncRemoteAIProvider is closed")
        return self._portal
