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

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

try:
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - exercised by a test in a fresh interpreter
    _trace = None  # type: ignore[assignment]
    _propagate = None  # type: ignore[assignment]

#: Whether OpenTelemetry's API was found.
AVAILABLE = _trace is not None


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
    if _trace is None:
        return None
    tracer = _trace.get_tracer("robota_client")
    return tracer.start_span(
        f"chat {body.get('model')}", kind=_trace.SpanKind.CLIENT, attributes=_attributes(body)
    )


@contextmanager
def current(body: Mapping[str, Any]) -> Iterator[Any]:
    """``start``'s span, current for the block (a non-streamed call) and ended after it,
    its status set by what the block raised."""
    span = start(body)
    if span is None:
        yield None
        return
    assert _trace is not None
    error: BaseException | None = None
    try:
        with _trace.use_span(span, end_on_exit=False, record_exception=False):
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
    if _propagate is None or _trace is None:
        return {}
    carrier: dict[str, str] = {}
    context = _trace.set_span_in_context(span) if span is not None else None
    _propagate.inject(carrier, context=context)
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
    if span is None or _trace is None:
        return
    if error is not None:
        code = getattr(error, "code", None) or type(error).__name__
        span.set_attribute("error.type", str(code))
        span.set_status(_trace.Status(_trace.StatusCode.ERROR))
    span.end()
