"""Client spans and the W3C ``traceparent`` header, when OpenTelemetry is installed.

Optional: the client depends on nothing of OpenTelemetry. When ``opentelemetry-api`` is
importable, ``RemoteAIProvider`` opens a CLIENT span per call (``chat {model}``, with the
GenAI semantic conventions) and sends it as ``traceparent`` through the application's
configured propagator, so the proxy's server span, and the vendor call under it, join the
application's trace. Without an SDK configured by the application the API's spans are
no-ops and nothing is sent; without the API at all every function here does nothing.

No message text is ever put on a span: the client does not know whether the application's
tracing backend may hold its users' prompts.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any


@functools.cache
def _api() -> tuple[Any, Any]:
    """OpenTelemetry's ``trace`` and ``propagate``, imported by the first call that needs
    them, never at import: a process that only imports the client (the proxy reads its wire
    contract) pays nothing for them. ``(None, None)`` when the API is not installed."""
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        return None, None
    return trace, propagate


def available() -> bool:
    """Whether OpenTelemetry's API is installed."""
    return _api()[0] is not None


def _attributes(body: Mapping[str, Any]) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": str(body.get("provider")),
        "gen_ai.request.model": str(body.get("model")),
    }
    options = body.get("options") or {}
    if options.get("maxTokens") is not None:
        attributes["gen_ai.request.max_tokens"] = options["maxTokens"]
    if options.get("temperature") is not None:
        attributes["gen_ai.request.temperature"] = options["temperature"]
    return attributes


def start(body: Mapping[str, Any]) -> Any:
    """A CLIENT span for the call whose wire body is ``body``, not made current (a stream
    outlives any one ``await`` of its reader); None without OpenTelemetry."""
    trace, _ = _api()
    if trace is None:
        return None
    tracer = trace.get_tracer("robota_client")
    return tracer.start_span(
        f"chat {body.get('model')}", kind=trace.SpanKind.CLIENT, attributes=_attributes(body)
    )


@contextmanager
def current(body: Mapping[str, Any]) -> Iterator[Any]:
    """``start``'s span, current for the block (a non-streamed call) and ended after it,
    its status set by what the block raised."""
    span = start(body)
    if span is None:
        yield None
        return
    trace, _ = _api()
    error: BaseException | None = None
    try:
        with trace.use_span(span, end_on_exit=False, record_exception=False):
            yield span
    except BaseException as exc:
        error = exc
        raise
    finally:
        end(span, error)


def headers(span: Any = None) -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) for ``span``, or for the current span when
    None: the headers to add to a request to the proxy. Empty without OpenTelemetry or
    outside any recording span."""
    trace, propagate = _api()
    if trace is None:
        return {}
    carrier: dict[str, str] = {}
    context = trace.set_span_in_context(span) if span is not None else None
    propagate.inject(carrier, context=context)
    return carrier


def answered(span: Any, message: Mapping[str, Any]) -> None:
    """What the answer (an assistant message's wire JSON) says about itself."""
    if span is None:
        return
    metadata = message.get("metadata") or {}
    usage = message.get("usage") or {}
    if metadata.get("model"):
        span.set_attribute("gen_ai.response.model", metadata["model"])
    if metadata.get("finishReason"):
        span.set_attribute("gen_ai.response.finish_reasons", [metadata["finishReason"]])
    if metadata.get("requestId"):
        span.set_attribute("robota.request_id", metadata["requestId"])
    for field, name in (
        ("promptTokens", "gen_ai.usage.input_tokens"),
        ("completionTokens", "gen_ai.usage.output_tokens"),
        ("cost", "robota.cost_usd"),
    ):
        if usage.get(field) is not None:
            span.set_attribute(name, usage[field])


def end(span: Any, error: BaseException | None = None) -> None:
    """End ``span``; an error (its wire code when the proxy said one) marks it failed."""
    trace, _ = _api()
    if span is None or trace is None:
        return
    if error is not None:
        code = getattr(error, "code", None) or type(error).__name__
        span.set_attribute("error.type", str(code))
        span.set_status(trace.Status(trace.StatusCode.ERROR))
    span.end()
