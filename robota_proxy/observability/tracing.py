"""OpenTelemetry traces (the ``[otel]`` extra; README: Operating it, Traces).

Off by default, and then nothing of OpenTelemetry is imported: every hook below is one test of
a module global. ``ROBOTA_OTEL_ENABLED=true`` makes ``configure`` build a tracer provider of
our own (service ``robota-proxy``) that exports over OTLP/HTTP in a background thread
(``BatchSpanProcessor``), to ``ROBOTA_OTEL_EXPORTER_OTLP_ENDPOINT`` or wherever the standard
``OTEL_EXPORTER_OTLP_*`` variables say. Our own provider rather than the global one, so that
a host app that mounts the proxy keeps whatever it set up for itself.

What is traced:

* one SERVER span per HTTP request (``RequestContextMiddleware``), child of the caller's W3C
  ``traceparent`` when it sent one, ended when the answer (a stream too) is over, with the
  GenAI semantic conventions read from the call record at the end (what was asked, who
  answered, tokens, finish reasons) and our own ``robota.*`` attributes; a request to a
  model (``dialects.CHAT_SURFACES``' paths) has its ``gen_ai.operation.name`` from the start
  (``chat`` for chats and streams on every surface, ``embeddings`` for ``/v1/embeddings``),
  other requests (``/health``, the admin API) have none: they are no GenAI operation;
* one CLIENT span per upstream attempt (``Resilience``): each retry, fallback and mid-stream
  continuation is a span of its own, and the vendor gets that span as its ``traceparent``
  (``vendor_http`` sends every request with ``with_traceparent``'s headers).

No prompt or completion text is put on a span unless ``ROBOTA_OTEL_CAPTURE_CONTENT=true``:
prompts are the users' data, and a tracing backend is rarely guarded like the ledger.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

from robota_proxy import scope as keys
from robota_proxy.call_record import CallRecord
from robota_proxy.dialects import CHAT_SURFACES

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from robota_client.messages import ChatRequest
    from robota_proxy.settings import Settings

E = TypeVar("E")

SERVICE_NAME = "robota-proxy"
#: Our names for the vendors where the GenAI conventions have another one.
_PROVIDER_NAMES = {"google": "gcp.gemini"}


class _Tracing:
    """The tracer and what the spans may carry; one per process once ``configure`` ran."""

    def __init__(self, tracer: Tracer, capture_content: bool) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.tracer = tracer
        self.capture_content = capture_content
        self.propagator = TraceContextTextMapPropagator()


_tracing: _Tracing | None = None
#: The server span of the request being served, for the attempts' spans and the stream's
#: finish reasons (set by ``RequestSpan``, inherited by the tasks a request starts).
_request: ContextVar[RequestSpan | None] = ContextVar("robota_request_span", default=None)


def configure(settings: Settings) -> bool:
    """Turn tracing on when ``ROBOTA_OTEL_ENABLED`` says so (once per process: a second app
    in the same process shares the first one's provider); whether it is on."""
    if not settings.otel_enabled:
        return _tracing is not None
    if _tracing is None:
        install(_exporting_provider(settings), capture_content=settings.otel_capture_content)
    return True


def install(provider: TracerProvider, *, capture_content: bool = False) -> None:
    """Trace into ``provider`` (tests pass one with an in-memory exporter)."""
    global _tracing
    _tracing = _Tracing(provider.get_tracer("robota_proxy"), capture_content)


def uninstall() -> None:
    """Back to no tracing (tests)."""
    global _tracing
    _tracing = None


def enabled() -> bool:
    return _tracing is not None


def _exporting_provider(settings: Settings) -> TracerProvider:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:  # pragma: no cover - settings.py checks this at startup
        raise RuntimeError(
            "ROBOTA_OTEL_ENABLED=true needs the [otel] extra: pip install 'robota-remote[otel]'"
        ) from exc
    base = settings.otel_exporter_otlp_endpoint
    exporter = OTLPSpanExporter(endpoint=f"{base.rstrip('/')}/v1/traces" if base else None)
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


# --- the server span --------------------------------------------------------------------------


class RequestSpan:
    """The SERVER span of one HTTP request, current from ``start`` to ``end``."""

    __slots__ = ("_attached", "_token", "finish_reasons", "operation", "output", "span")

    def __init__(self, span: Span, operation: str) -> None:
        self.span = span
        self.operation = operation
        self.finish_reasons: list[str] = []
        self.output: list[str] | None = None
        self._token: Any = None
        self._attached: Any = None

    def end(self, scope: Mapping[str, Any], status: int) -> None:
        """The request is over: what the call record says goes on the span, which ends."""
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        try:
            span = self.span
            span.set_attribute("http.response.status_code", status)
            record = scope.get(keys.CALL)
            if isinstance(record, CallRecord):
                _record_attributes(span, record)
            principal = scope.get(keys.PRINCIPAL)
            user = getattr(principal, "user", None)
            if user is not None:
                span.set_attribute("robota.user_id", user)
            key_id = getattr(principal, "key_id", None)
            if key_id is not None:
                span.set_attribute("robota.key_id", key_id)
            request = scope.get(keys.CHAT_REQUEST)
            model = getattr(request, "model", None)
            if model is not None:
                span.set_attribute("gen_ai.request.model", model)
                if self.capture_content:
                    span.set_attribute("gen_ai.input.messages", _messages(request))
            if self.finish_reasons:
                span.set_attribute("gen_ai.response.finish_reasons", self.finish_reasons)
            if self.output is not None:
                span.set_attribute("gen_ai.output.messages", _output("".join(self.output)))
            code = scope.get(keys.ERROR_CODE)
            if isinstance(code, str):
                span.set_attribute("error.type", code)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
        finally:
            _request.reset(self._token)
            context.detach(self._attached)
            self.span.end()

    @property
    def capture_content(self) -> bool:
        return _tracing is not None and _tracing.capture_content


def start_request(scope: Mapping[str, Any]) -> RequestSpan | None:
    """The request's SERVER span, current until ``RequestSpan.end``; None when not tracing."""
    tracing = _tracing
    if tracing is None:
        return None
    from opentelemetry import context, trace

    method, route = str(scope.get("method", "")), keys.route_path(scope)

    carrier = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in scope.get("headers", ())
        if name in (b"traceparent", b"tracestate")
    }
    parent: Context | None = tracing.propagator.extract(carrier) if carrier else None
    attributes = {
        "http.request.method": method,
        "http.route": route,
        "robota.request_id": str(scope.get(keys.REQUEST_ID, "")),
    }
    operation = "chat"  # the attempts' spans' when no surface says (a host's own route)
    surface = CHAT_SURFACES.get(route)
    if surface is not None:
        operation = "embeddings" if surface.feature == "embeddings" else "chat"
        attributes["gen_ai.operation.name"] = operation
    span = tracing.tracer.start_span(
        f"{method} {route}", context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
    )
    handle = RequestSpan(span, operation)
    if tracing.capture_content:
        handle.output = []
    handle._attached = context.attach(trace.set_span_in_context(span, parent))
    handle._token = _request.set(handle)
    return handle


def _record_attributes(span: Span, record: CallRecord) -> None:
    if record.provider is not None:
        span.set_attribute("gen_ai.provider.name", provider_name(record.provider))
    if record.model is not None:
        span.set_attribute("gen_ai.response.model", record.model)
    if record.deployment is not None:
        span.set_attribute("robota.deployment", record.deployment)
    usage = record.usage
    if usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
    if record.cost is not None:
        span.set_attribute("robota.cost_usd", float(record.cost))
    span.set_attribute("robota.cache_hit", record.cached)
    span.set_attribute("robota.attempts", record.attempts)
    span.set_attribute("robota.streamed", record.streamed)
    span.set_attribute("robota.status", record.status)


def provider_name(provider: str) -> str:
    """``gen_ai.provider.name``: the conventions' name for the vendor, ours otherwise."""
    return _PROVIDER_NAMES.get(provider, provider)


# --- the upstream attempts ------------------------------------------------------------------


@contextmanager
def upstream_attempt(sent: ChatRequest, deployment: str | None) -> Iterator[Span | None]:
    """A CLIENT span around one vendor call, current while it runs, so that the adapter's
    HTTP request carries it as ``traceparent``. Its outcome is the wire error code of what
    it raised (``timeout``, ``cancelled``), ``ok`` otherwise; ``attempt_result`` adds what
    the answer said. Yields None (and costs one test) when not tracing."""
    tracing = _tracing
    if tracing is None:
        yield None
        return
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    request = _request.get()
    operation = request.operation if request is not None else "chat"
    model = sent.model
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider_name(sent.provider),
        "gen_ai.request.model": model,
    }
    if deployment is not None:
        attributes["robota.deployment"] = deployment
    options = sent.options
    if options.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = options.max_tokens
    if options.temperature is not None:
        attributes["gen_ai.request.temperature"] = options.temperature
    if tracing.capture_content:
        attributes["gen_ai.input.messages"] = _messages(sent)
    with tracing.tracer.start_as_current_span(
        f"{operation} {model}",
        kind=trace.SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        outcome = "cancelled"
        try:
            yield span
            outcome = "ok"
        except TimeoutError:
            outcome = "timeout"
            raise
        except Exception as exc:
            outcome = str(getattr(exc, "code", None) or type(exc).__name__)
            raise
        finally:
            span.set_attribute("robota.outcome", outcome)
            if outcome != "ok":
                span.set_attribute("error.type", outcome)
                span.set_status(Status(StatusCode.ERROR))


def attempt_result(span: Span | None, result: object) -> None:
    """What a non-streamed answer says about itself (an ``AssistantMessage``; a passthrough's
    ``(body, usage)``), on the attempt's span. Nothing when ``span`` is None."""
    if span is None:
        return
    from robota_client.messages import AssistantMessage, Usage

    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Usage):
        _usage(span, result[1])
        return
    if not isinstance(result, AssistantMessage):
        return
    metadata = result.metadata
    if metadata is not None:
        if metadata.model:
            span.set_attribute("gen_ai.response.model", metadata.model)
        if metadata.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [metadata.finish_reason])
            request = _request.get()
            if request is not None:
                request.finish_reasons.append(metadata.finish_reason)
    if result.usage is not None:
        _usage(span, result.usage)
    if _tracing is not None and _tracing.capture_content:
        span.set_attribute("gen_ai.output.messages", _output(result.content or ""))
        request = _request.get()
        if request is not None and request.output is not None:
            request.output.append(result.content or "")


def _usage(span: Span, usage: Any) -> None:
    span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)


def watch_stream(events: AsyncGenerator[E, None]) -> AsyncGenerator[E, None]:
    """``events`` as they are, telling the request's span the stream's finish reasons (and,
    when content is captured, its text). ``events`` itself when not tracing."""
    request = _request.get()
    if request is None:
        return events
    return _watched(events, request)


async def _watched(
    events: AsyncGenerator[E, None], request: RequestSpan
) -> AsyncGenerator[E, None]:
    from contextlib import aclosing

    from robota_client.messages import DeltaEvent
    from robota_proxy.upstreams.base import FinishEvent

    async with aclosing(events):
        async for event in events:
            if isinstance(event, FinishEvent):
                request.finish_reasons.append(event.finish_reason)
            elif isinstance(event, DeltaEvent) and request.output is not None:
                request.output.append(event.content)
            yield event


# --- propagation ------------------------------------------------------------------------------


def with_traceparent(headers: Mapping[str, str]) -> Mapping[str, str]:
    """An adapter's request headers with the current span (the attempt's) as the vendor's
    ``traceparent``; ``headers`` itself, uncopied, when not tracing (the hot path)."""
    tracing = _tracing
    if tracing is None:
        return headers
    carrier = dict(headers)
    tracing.propagator.inject(carrier)
    return carrier


def current_trace_id() -> str | None:
    """The trace id of the request being served, in hex (the JSON logs' ``trace_id``)."""
    request = _request.get()
    if request is None:
        return None
    context = request.span.get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


def _messages(request: Any) -> str:
    return json.dumps(
        [{"role": m.role, "content": m.content} for m in request.messages], ensure_ascii=False
    )


def _output(text: str) -> str:
    return json.dumps([{"role": "assistant", "content": text}], ensure_ascii=False)
