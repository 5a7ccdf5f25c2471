"""Traces (README: Operating it, Traces), read back from the SDK's in-memory exporter.

The proxy app runs in-process (``httpx.ASGITransport``) against the fake vendors on a real
local port, so that the adapters' own HTTP clients carry the ``traceparent`` to the vendor
exactly as in production.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from robota_proxy.app import create_app
from robota_proxy.observability import tracing
from robota_proxy.policy.static_keys import key_id
from robota_proxy.settings import Settings
from robota_proxy.testing import FakeVendors, Fault

VENDOR_KEY = "sk-vendor-key-for-tracing-0123"
USER_KEY = "user-key-for-tracing-0123456789"
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
SECRET_TEXT = "the launch code is purple-otter-42"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def vendors() -> Iterator[FakeVendors]:
    with FakeVendors(api_key=VENDOR_KEY) as fake:
        yield fake


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.uninstall()


def _settings(tmp_path: Path, vendors: FakeVendors, **extra: Any) -> Settings:
    return Settings(
        api_keys=[USER_KEY],
        database_url=f"sqlite:///{tmp_path / 'robota.db'}",
        openai_api_key=VENDOR_KEY,
        openai_base_url=vendors.openai_base_url,
        upstream_retries=0,
        breaker_enabled=False,
        **extra,
    )


@pytest.fixture
async def proxy(tmp_path: Path, vendors: FakeVendors) -> AsyncIterator[httpx.AsyncClient]:
    vendors.reset()
    app = create_app(_settings(tmp_path, vendors))
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://proxy",
            headers={"Authorization": f"Bearer {USER_KEY}"},
        ) as client:
            yield client


def _chat(model: str = "gpt-4o-mini", **options: Any) -> dict[str, Any]:
    return {
        "provider": "openai",
        "model": model,
        "messages": [{"role": "user", "content": SECRET_TEXT}],
        "options": options,
    }


def _by_kind(exporter: InMemorySpanExporter) -> tuple[ReadableSpan, list[ReadableSpan]]:
    finished = exporter.get_finished_spans()
    servers = [span for span in finished if span.kind is SpanKind.SERVER]
    clients = [span for span in finished if span.kind is SpanKind.CLIENT]
    assert len(servers) == 1
    return servers[0], clients


def _no_content(span: ReadableSpan) -> None:
    for value in (span.attributes or {}).values():
        assert SECRET_TEXT not in str(value)
        assert "You said" not in str(value)


@pytest.mark.anyio
async def test_a_chat_is_a_server_span_under_the_callers_trace_with_one_attempt(
    proxy: httpx.AsyncClient, vendors: FakeVendors, spans: InMemorySpanExporter
) -> None:
    answer = await proxy.post(
        "/ai/chat", json=_chat(maxTokens=64), headers={"traceparent": TRACEPARENT}
    )
    assert answer.status_code == 200
    server, clients = _by_kind(spans)
    assert len(clients) == 1
    (client,) = clients
    # The caller's trace goes on: the server span is its child, the attempt ours.
    assert f"{server.context.trace_id:032x}" == CALLER_TRACE
    assert server.parent is not None and f"{server.parent.span_id:016x}" == CALLER_SPAN
    assert client.context.trace_id == server.context.trace_id
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert server.name == "POST /ai/chat"
    assert client.name == "chat gpt-4o-mini"
    usage = answer.json()["usage"]
    attributes = dict(server.attributes or {})
    cost = attributes.pop("robota.cost_usd")
    assert cost == pytest.approx(usage["cost"])
    assert attributes == {
        "http.request.method": "POST",
        "http.route": "/ai/chat",
        "http.response.status_code": 200,
        "robota.request_id": answer.headers["x-request-id"],
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": usage["promptTokens"],
        "gen_ai.usage.output_tokens": usage["completionTokens"],
        "gen_ai.response.finish_reasons": ("stop",),
        "robota.deployment": "openai",
        "robota.cache_hit": False,
        "robota.attempts": 1,
        "robota.streamed": False,
        "robota.status": "ok",
        # A static key's user and public id are both its ``key_`` id, never the key.
        "robota.user_id": key_id(USER_KEY),
        "robota.key_id": key_id(USER_KEY),
    }
    assert dict(client.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.request.max_tokens": 64,
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": usage["promptTokens"],
        "gen_ai.usage.output_tokens": usage["completionTokens"],
        "robota.deployment": "openai",
        "robota.outcome": "ok",
    }
    _no_content(server)
    _no_content(client)
    # The vendor was called as the attempt's child: W3C traceparent of the client span.
    (sent,) = vendors.requests
    assert sent.headers["traceparent"] == f"00-{CALLER_TRACE}-{client.context.span_id:016x}-01"


@pytest.mark.anyio
async def test_a_retried_call_is_one_client_span_per_attempt(
    tmp_path: Path, vendors: FakeVendors, spans: InMemorySpanExporter
) -> None:
    vendors.reset()
    vendors.script(Fault(status=503), times=1, vendor="openai")
    # No back-off before the retry: the spans are the point, not the wait (0.5 s or more).
    retried = {"upstream_retries": 1, "retry_backoff_base": 0.0}
    app = create_app(_settings(tmp_path, vendors).model_copy(update=retried))
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            answer = await client.post(
                "/ai/chat", json=_chat(), headers={"Authorization": f"Bearer {USER_KEY}"}
            )
    assert answer.status_code == 200
    server, clients = _by_kind(spans)
    assert [span.attributes["robota.outcome"] for span in clients] == [  # type: ignore[index]
        "upstream_unavailable",
        "ok",
    ]
    assert clients[0].status.status_code is StatusCode.ERROR
    assert clients[0].attributes["error.type"] == "upstream_unavailable"  # type: ignore[index]
    assert server.attributes["robota.attempts"] == 2  # type: ignore[index]
    assert [r.headers["traceparent"].split("-")[2] for r in vendors.requests] == [
        f"{span.context.span_id:016x}" for span in clients
    ]


@pytest.mark.anyio
async def test_a_stream_has_its_finish_reason_and_usage_on_the_server_span(
    proxy: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    async with proxy.stream("POST", "/ai/chat/stream", json=_chat()) as answer:
        assert answer.status_code == 200
        body = (await answer.aread()).decode()
    assert "event: done" in body
    server, clients = _by_kind(spans)
    assert len(clients) == 1
    attributes = server.attributes or {}
    assert server.name == "POST /ai/chat/stream"
    assert attributes["gen_ai.operation.name"] == "chat"  # a stream is a chat, streamed
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["robota.streamed"] is True
    assert attributes["gen_ai.usage.output_tokens"] > 0  # type: ignore[operator]
    assert f"{server.context.trace_id:032x}" != CALLER_TRACE  # no caller trace: a new one
    _no_content(server)


@pytest.mark.anyio
async def test_a_refused_call_is_a_server_span_with_its_error_and_no_attempt(
    proxy: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    answer = await proxy.post("/ai/chat", json=_chat(), headers={"Authorization": "Bearer nope"})
    assert answer.status_code == 401
    server, clients = _by_kind(spans)
    assert clients == []
    assert server.attributes["error.type"] == "unauthenticated"  # type: ignore[index]
    assert server.attributes["http.response.status_code"] == 401  # type: ignore[index]
    assert server.attributes["gen_ai.operation.name"] == "chat"  # type: ignore[index]
    assert server.status.status_code is StatusCode.UNSET


@pytest.mark.anyio
async def test_embeddings_are_the_embeddings_operation_and_health_is_no_genai_operation(
    proxy: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    answer = await proxy.post(
        "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "two words"}
    )
    assert answer.status_code == 200, answer.text
    server, clients = _by_kind(spans)
    assert server.name == "POST /v1/embeddings"
    assert server.attributes["gen_ai.operation.name"] == "embeddings"  # type: ignore[index]
    assert [c.attributes["gen_ai.operation.name"] for c in clients] == [  # type: ignore[index]
        "embeddings"
    ]
    assert [c.name for c in clients] == ["embeddings text-embedding-3-small"]
    spans.clear()
    assert (await proxy.get("/health")).status_code == 200
    (health,) = spans.get_finished_spans()
    assert health.kind is SpanKind.SERVER
    assert dict(health.attributes or {}) == {
        "http.request.method": "GET",
        "http.route": "/health",
        "http.response.status_code": 200,
        "robota.request_id": health.attributes["robota.request_id"],  # type: ignore[index]
    }


@pytest.mark.anyio
async def test_content_is_on_the_spans_only_when_the_operator_opts_in(
    tmp_path: Path, vendors: FakeVendors
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider, capture_content=True)
    try:
        vendors.reset()
        app = create_app(_settings(tmp_path, vendors))
        async with app.lifespan():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
                answer = await client.post(
                    "/ai/chat", json=_chat(), headers={"Authorization": f"Bearer {USER_KEY}"}
                )
    finally:
        tracing.uninstall()
    text = answer.json()["content"]
    server, (attempt,) = _by_kind(exporter)
    expected_in = f'[{{"role": "user", "content": "{SECRET_TEXT}"}}]'
    expected_out = f'[{{"role": "assistant", "content": "{text}"}}]'
    assert server.attributes["gen_ai.input.messages"] == expected_in  # type: ignore[index]
    assert server.attributes["gen_ai.output.messages"] == expected_out  # type: ignore[index]
    assert attempt.attributes["gen_ai.input.messages"] == expected_in  # type: ignore[index]
    assert attempt.attributes["gen_ai.output.messages"] == expected_out  # type: ignore[index]


def test_tracing_is_off_by_default_and_imports_nothing_of_opentelemetry() -> None:
    import subprocess
    import sys

    program = (
        "import sys\n"
        "from robota_proxy.app import create_app\n"
        "from robota_proxy.settings import Settings\n"
        "create_app(Settings(database_url='sqlite:///:memory:'))\n"
        "print(sorted(n for n in sys.modules if n.startswith('opentelemetry')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


def test_turning_tracing_on_without_the_extra_names_the_variable() -> None:
    import subprocess
    import sys

    program = (
        "import sys\n"
        "sys.modules['opentelemetry.sdk'] = None  # as if the extra were not installed\n"
        "from robota_proxy.config_errors import ConfigError, load_settings\n"
        "try:\n"
        "    load_settings()\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    env = {"ROBOTA_OTEL_ENABLED": "true", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.stdout == (
        "ROBOTA_OTEL_ENABLED is 'true': needs the [otel] extra: pip install 'robota-remote[otel]'\n"
    ), done.stderr
