"""``RemoteAIProvider``: a model behind a Robota proxy, used as if it were a local provider.

Input is validated here, before any network call, and bad input raises pydantic's
``ValidationError`` (a ``ValueError``) rather than ``InvalidRequestError``: it is a bug in
the calling code, found without a round trip, and pydantic's message says which field is
wrong. ``InvalidRequestError`` is kept for what the proxy rejects (an unknown model, a
request over its limits), so the two causes stay distinguishable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import date
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlencode

import httpx
from pydantic import ValidationError

from robota_client import tracing
from robota_client.closing import AsyncClosing
from robota_client.errors import ProtocolError, StreamRestarted
from robota_client.messages import (
    AssistantMessage,
    ChatOptions,
    ChatRequest,
    DeltaEvent,
    DoneEvent,
    Me,
    MessageLike,
    RestartEvent,
    StreamAssembler,
    ToolSchema,
    Usage,
    UsageReport,
    WireModel,
    to_universal_list,
)
from robota_client.transport import ChatEvent, EventStream, HTTPTransport, Sleep
from robota_client.ws import WSEventStream, WSTransport

__all__ = ["AIProvider", "ChatStream", "RemoteAIProvider", "TextStream"]

Options = ChatOptions | Mapping[str, Any] | None
_Model = TypeVar("_Model", bound=WireModel)
Tools = Sequence[ToolSchema | Mapping[str, Any]] | None


@runtime_checkable
class AIProvider(Protocol):
    """What a local provider offers; ``RemoteAIProvider`` satisfies it, so code written
    against a local provider runs unchanged against the proxy."""

    name: str

    async def chat(
        self,
        messages: Sequence[MessageLike],
        options: Options = None,
        tools: Tools = None,
    ) -> AssistantMessage: ...

    def chat_stream(
        self,
        messages: Sequence[MessageLike],
        options: Options = None,
        tools: Tools = None,
    ) -> AsyncIterator[str]: ...

    def supports_tools(self) -> bool: ...


class RemoteAIProvider(AsyncClosing):
    """Chat with ``model`` of ``target_provider`` (``openai``, ``anthropic``, ``google``)
    through the proxy at ``server_url``, authenticating with ``api_key`` (a key the proxy
    issued, never a vendor key).

    Failed calls are retried ``max_retries`` times when the failure says nothing was done
    (see ``robota_client.transport``); everything else raises a ``RemoteError`` subclass.
    ``http_client`` is for tests and in-process mounting; the provider does not close a
    client it was given.
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
        sleep: Sleep | None = None,
        transport: Literal["sse", "ws"] = "sse",
    ) -> None:
        """``transport="ws"``: chat calls and streams share one WebSocket to ``/ai/ws``
        (reconnected and resumed when it drops); other calls stay plain HTTP."""
        if transport not in ("sse", "ws"):
            raise ValueError(f"transport must be 'sse' or 'ws', got {transport!r}")
        self.target_provider = target_provider
        self.model = model
        self._ws = WSTransport(server_url, api_key, headers=headers) if transport == "ws" else None
        # The key lives only in the transport's request headers: not an attribute here, so
        # it cannot turn up in a repr, a vars() dump or a debugger's locals view.
        self._transport = HTTPTransport(
            server_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            retry_initial_delay=retry_initial_delay,
            retry_max_delay=retry_max_delay,
            headers=headers,
            http_client=http_client,
            sleep=sleep,
        )

    @property
    def server_url(self) -> str:
        return self._transport.server_url

    def __repr__(self) -> str:
        return (
            f"RemoteAIProvider(server_url={self.server_url!r}, "
            f"target_provider={self.target_provider!r}, model={self.model!r})"
        )

    def supports_tools(self) -> bool:
        # The proxy translates tool calls for every vendor it serves.
        return True

    def build_request(
        self, messages: Sequence[MessageLike], options: Options = None, tools: Tools = None
    ) -> ChatRequest:
        """The validated wire request; raises ``pydantic.ValidationError`` for bad input."""
        payload: dict[str, Any] = {
            "provider": self.target_provider,
            "model": self.model,
            "messages": to_universal_list(messages),
            "tools": list(tools) if tools is not None else None,
        }
        if options is not None:
            payload["options"] = options
        return ChatRequest.model_validate(payload)

    async def chat(
        self, messages: Sequence[MessageLike], options: Options = None, tools: Tools = None
    ) -> AssistantMessage:
        request = self.build_request(messages, options, tools)
        request_id: str | None
        wire = request.to_wire()
        # A client span when OpenTelemetry is installed; HTTP sends it as traceparent.
        with tracing.current(wire) as span:
            if self._ws is not None:
                data, request_id = await self._ws.chat(wire)
            else:
                data, headers = await self._transport.post_json("/ai/chat", wire)
                request_id = headers.get("x-request-id")
            tracing.answered(span, data)
        try:
            message = AssistantMessage.model_validate(data)
        except ValueError as exc:
            raise ProtocolError(
                f"the chat answer is not an assistant message: {exc}", request_id=request_id
            ) from exc
        if message.metadata.request_id is None:
            message.metadata.request_id = request_id
        return message

    def stream(
        self, messages: Sequence[MessageLike], options: Options = None, tools: Tools = None
    ) -> ChatStream:
        """Typed events as they arrive; validates now, connects on first iteration."""
        request = self.build_request(messages, options, tools)
        if self._ws is not None:
            return ChatStream(self._ws.stream(request.to_wire()))
        return ChatStream(self._transport.stream("/ai/chat/stream", request.to_wire()))

    def chat_stream(
        self,
        messages: Sequence[MessageLike],
        options: Options = None,
        tools: Tools = None,
        *,
        raw_restarts: bool = False,
    ) -> TextStream:
        """Text chunks only, the shape local providers stream. Use ``stream`` for tool calls
        and usage.

        The chunks join to one clean answer even when the proxy restarts it midway (see
        ``TextStream``): the fresh answer's text is held back until it has repeated what was
        already yielded, and only the rest is yielded; a fresh answer that says something
        else raises ``StreamRestarted``. ``raw_restarts=True`` yields the fresh answer's
        text as it comes instead (the chunks then hold the abandoned text too).
        """
        return TextStream(self.stream(messages, options, tools), raw_restarts=raw_restarts)

    async def models(self) -> dict[str, list[str] | None]:
        """Models per vendor the proxy serves; ``None`` where it allows any model."""
        data, headers = await self._transport.get_json("/ai/models")
        catalogue = _catalogue(data)
        if catalogue is None:
            raise ProtocolError(
                "GET /ai/models answered JSON without the expected "
                '{"providers": {name: {"models": [...] | null}}} shape',
                request_id=headers.get("x-request-id"),
            )
        return catalogue

    async def usage(self, since: date | None = None, until: date | None = None) -> UsageReport:
        """The caller's own usage between two UTC days, both included (default: this month
        so far): totals, per day and per model, money as exact ``Decimal`` USD."""
        query = {
            name: value.isoformat()
            for name, value in (("from", since), ("to", until))
            if value is not None
        }
        path = "/ai/usage" + (f"?{urlencode(query)}" if query else "")
        return await self._get_model(path, UsageReport)

    async def me(self) -> Me:
        """Who the proxy takes this key for, its permissions, and what is left of each
        limit (monthly tokens and budget, and the rate limits)."""
        return await self._get_model("/ai/me", Me)

    async def _get_model(self, path: str, model: type[_Model]) -> _Model:
        data, headers = await self._transport.get_json(path)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise ProtocolError(
                f"GET {path.partition('?')[0]} answered JSON that is not a {model.__name__}: "
                f"{exc.error_count()} problem(s), first: {exc.errors()[0]['msg']}",
                request_id=headers.get("x-request-id"),
            ) from exc

    async def health(self) -> bool:
        """Whether the proxy answers its health check; never raises for "down"."""
        return await self._transport.get_status("/health") == 200

    async def aclose(self) -> None:
        if self._ws is not None:
            await self._ws.aclose()
        await self._transport.aclose()


def _catalogue(data: Mapping[str, Any]) -> dict[str, list[str] | None] | None:
    providers = data.get("providers")
    if not isinstance(providers, dict):
        return None
    result: dict[str, list[str] | None] = {}
    for name, entry in providers.items():
        models = entry.get("models") if isinstance(entry, dict) else ()
        if models is not None and not (
            isinstance(models, list) and all(isinstance(model, str) for model in models)
        ):
            return None
        result[name] = models
    return result


class ChatStream(AsyncClosing):
    """One streamed chat call: an async iterator of ``DeltaEvent``, ``ToolCallEvent``,
    ``UsageEvent`` and finally ``DoneEvent``.

    After the ``done`` event, ``message`` is the whole answer (tool calls included) and
    ``usage`` its token counts. A failure raises a ``RemoteError``; events already received
    stay received, and ``text`` holds the text they carried.

    A ``RestartEvent`` says the proxy abandoned the answer midway and a fresh one follows
    from its start. It is yielded, so that a caller who displayed the text can clear it,
    and the stream forgets what it had assembled: ``text``, ``usage`` and ``message`` are
    always those of the answer after the last restart. ``restarts`` counts them.
    """

    def __init__(self, events: EventStream | WSEventStream) -> None:
        self._events = events
        self._assembler = StreamAssembler()
        self._done: DoneEvent | None = None
        self._message: AssistantMessage | None = None
        #: Restart events received; each voided the answer assembled before it.
        self.restarts = 0
        #: The last restart's ``reason``; ``None`` while there was none.
        self.restart_reason: str | None = None

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> ChatEvent:
        event = await self._events.__anext__()
        if isinstance(event, DoneEvent):
            self._done = event
            self._message = self._final_message(event)
        else:
            if isinstance(event, RestartEvent):
                self.restarts += 1
                self.restart_reason = event.reason
            # The assembler empties itself on a restart.
            self._assembler.add(event)
        return event

    def _final_message(self, done: DoneEvent) -> AssistantMessage:
        message = done.message
        if message.content is None and not message.tool_calls:
            # A server that sends a bare ``done``: the deltas are the answer.
            message = self._assembler.message(message.metadata)
        if message.usage is None:
            message.usage = self._assembler.usage
        if message.metadata.finish_reason is None:
            message.metadata.finish_reason = done.finish_reason
        if message.metadata.request_id is None:
            message.metadata.request_id = self._events.request_id
        return message

    @property
    def done(self) -> bool:
        return self._message is not None

    @property
    def message(self) -> AssistantMessage:
        """The complete answer; only once the stream has delivered its ``done`` event."""
        if self._message is None:
            raise RuntimeError("the stream has not finished; iterate it to the end first")
        return self._message

    @property
    def usage(self) -> Usage | None:
        if self._message is not None and self._message.usage is not None:
            return self._message.usage
        return self._assembler.usage

    @property
    def text(self) -> str:
        """The text received so far; useful after a stream broke part way."""
        return self._assembler.text

    @property
    def request_id(self) -> str | None:
        return self._events.request_id

    async def final_message(self) -> AssistantMessage:
        """Read the rest of the stream and return the complete answer."""
        async for _ in self:
            pass
        return self.message

    async def aclose(self) -> None:
        await self._events.aclose()


class TextStream(AsyncClosing):
    """The text chunks of a ``ChatStream``. A class rather than an async generator so that
    ``async with`` / ``aclose`` release the connection at once when the caller stops early,
    instead of whenever the garbage collector finalises a generator.

    Restarts. A text stream has no way to say "forget what I gave you", so when the proxy
    restarts the answer (``RestartEvent``) the chunks must still join to one clean answer.
    After a restart the fresh answer's text is held back until it is at least as long as
    the text already yielded. If it begins with that text (a deterministic model, or one
    that happened to answer alike), only the remainder is yielded and the caller never
    notices; if it does not, ``StreamRestarted`` is raised as soon as the two differ (or at
    ``done``, when the fresh answer ends shorter), and the connection is released. Nothing
    of the fresh answer is yielded before it is known to continue the old one, so what the
    caller received is always a prefix of the final answer.

    ``raw_restarts=True`` turns this off: the fresh answer's chunks are yielded as they come
    and the caller sees the abandoned text followed by the new answer (``stream.restarts``
    tells whether that happened).
    """

    def __init__(self, stream: ChatStream, *, raw_restarts: bool = False) -> None:
        self.stream = stream
        self.raw_restarts = raw_restarts
        #: All the text handed to the caller.
        self._delivered = ""
        #: Since a restart: the fresh answer's text not yet yielded (``None`` when caught up).
        self._held: str | None = None

    def __aiter__(self) -> TextStream:
        return self

    async def __anext__(self) -> str:
        while True:
            event = await self.stream.__anext__()
            if isinstance(event, RestartEvent):
                if not self.raw_restarts:
                    self._held = ""
                    await self._check_caught_up(final=False)
                continue
            if isinstance(event, DoneEvent) and self._held is not None:
                await self._check_caught_up(final=True)
                continue
            if not (isinstance(event, DeltaEvent) and event.content):
                continue
            if self._held is None:
                self._delivered += event.content
                return event.content
            self._held += event.content
            rest = await self._check_caught_up(final=False)
            if rest:
                self._delivered += rest
                return rest

    async def _check_caught_up(self, *, final: bool) -> str:
        """Compare the fresh answer's held text with what was yielded. Returns the text to
        yield once the fresh answer has repeated all of it (and stops holding), ``""``
        while it is still a prefix of it; raises ``StreamRestarted`` once they differ."""
        held, yielded = self._held, self._delivered
        assert held is not None
        if len(held) >= len(yielded) and held.startswith(yielded):
            self._held = None
            return held[len(yielded) :]
        if not final and yielded.startswith(held):
            return ""
        await self.stream.aclose()
        reason = self.stream.restart_reason or "no reason given"
        raise StreamRestarted(
            f"the proxy restarted the answer midway ({reason}) and the new answer "
            f"{'is shorter than' if yielded.startswith(held) else 'differs from'} the "
            f"{len(yielded)} characters already streamed, which cannot be taken back; "
            "use stream() to handle restarts, or make the call again",
            reason=reason,
            delivered=yielded,
            request_id=self.stream.request_id,
        )

    async def aclose(self) -> None:
        await self.stream.aclose()
