"""``RemoteAIProvider``'s client span and ``traceparent`` (README: Operating it, Traces).

The application's tracer provider is OpenTelemetry's global one, which can be set once per
process: this module sets it once, with an in-memory exporter, and clears it between tests.
The proxy runs in-process with its own provider, so a test sees both halves of one trace.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from robota_client import RemoteAIProvider
from robota_client.errors import UnauthenticatedError
from robota_proxy.app import create_app
from robota_proxy.observability import tracing
from robota_proxy.settings import Settings

USER_KEY = "user-key-for-client-tracing-0123"
APPLICATION = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(APPLICATION))
trace.set_tracer_provider(_provider)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def proxy_spans() -> Iterator[InMemorySpanExporter]:
    APPLICATION.clear()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.uninstall()


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(api_keys=[USER_KEY], database_url=f"sqlite:///{tmp_path / 'r.db'}"))
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport) as client:
            yield client


def _provider_for(http: httpx.AsyncClient, key: str = USER_KEY) -> RemoteAIProvider:
    return RemoteAIProvider("http://proxy", key, "mock", "mock-1", http_client=http)


def _only(exporter: InMemorySpanExporter, kind: SpanKind) -> ReadableSpan:
    (span,) = [span for span in exporter.get_finished_spans() if span.kind is kind]
    return span


@pytest.mark.anyio
async def test_a_chat_is_a_client_span_whose_child_is_the_proxys_server_span(
    http: httpx.AsyncClient, proxy_spans: InMemorySpanExporter
) -> None:
    tracer = trace.get_tracer("the application")
    with tracer.start_as_current_span("handle a user request") as outer:
        message = await _provider_for(http).chat(
            [{"role": "user", "content": "hi"}], options={"maxTokens": 16}
        )
    client = _only(APPLICATION, SpanKind.CLIENT)
    server = _only(proxy_spans, SpanKind.SERVER)
    assert client.parent is not None and client.parent.span_id == outer.get_span_context().span_id
    assert server.context.trace_id == outer.get_span_context().trace_id
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert client.name == "chat mock-1"
    assert message.usage is not None
    assert dict(client.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "mock",
        "gen_ai.request.model": "mock-1",
        "gen_ai.request.max_tokens": 16,
        "gen_ai.response.model": "mock-1",
        "gen_ai.response.finish_reasons": ("stop",),
        "robota.request_id": message.metadata.request_id,
        "gen_ai.usage.input_tokens": message.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": message.usage.completion_tokens,
        "robota.cost_usd": message.usage.cost,
    }


@pytest.mark.anyio
async def test_a_stream_is_one_client_span_from_opening_to_done(
    http: httpx.AsyncClient, proxy_spans: InMemorySpanExporter
) -> None:
    events = [
        event async for event in _provider_for(http).stream([{"role": "user", "content": "hi"}])
    ]
    assert type(events[-1]).__name__ == "DoneEvent"
    client = _only(APPLICATION, SpanKind.CLIENT)
    server = _only(proxy_spans, SpanKind.SERVER)
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert client.attributes["gen_ai.response.finish_reasons"] == ("stop",)  # type: ignore[index]
    assert client.status.status_code is StatusCode.UNSET


@pytest.mark.anyio
async def test_a_refused_call_ends_its_span_as_an_error_with_the_wire_code(
    http: httpx.AsyncClient, proxy_spans: InMemorySpanExporter
) -> None:
    with pytest.raises(UnauthenticatedError):
        await _provider_for(http, key="wrong").chat([{"role": "user", "content": "hi"}])
    client = _only(APPLICATION, SpanKind.CLIENT)
    assert client.status.status_code is StatusCode.ERROR
    assert client.attributes["error.type"] == "unauthenticated"  # type: ignore[index]


def test_the_client_works_without_opentelemetry_and_sends_no_traceparent() -> None:
    program = (
        "import asyncio, sys\n"
        "sys.modules['opentelemetry'] = None  # as if it were not installed\n"
        "import httpx\n"
        "from robota_client import RemoteAIProvider, tracing\n"
        "seen = []\n"
        "def answer(request):\n"
        "    seen.append(sorted(request.headers))\n"
        "    return httpx.Response(200, json={'role': 'assistant', 'content': 'ok'})\n"
        "async def main():\n"
        "    http = httpx.AsyncClient(transport=httpx.MockTransport(answer))\n"
        "    remote = RemoteAIProvider('http://proxy', 'k', 'mock', 'mock-1', http_client=http)\n"
        "    reply = await remote.chat([{'role': 'user', 'content': 'x'}])\n"
        "    print(tracing.available(), reply.content)\n"
        "asyncio.run(main())\n"
        "print('traceparent' in seen[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "False ok\nFalse\n"
