"""Traces over the wire (README: Operating it, Traces): a real proxy process exporting over
OTLP/HTTP to a local receiver, read back as the collector's protobuf.

A chat, a stream and a retried chat, each sent with a caller ``traceparent``: one SERVER
span per request, child of the caller's span; one CLIENT span per upstream attempt, whose
context the vendor received as its ``traceparent``; the GenAI and ``robota.*`` attributes
with their exact values (scripted token counts, a prices file, an rk_ key made through the
admin API); and no word of the conversation anywhere in what was exported, unless the
operator turns ``ROBOTA_OTEL_CAPTURE_CONTENT`` on.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from robota_proxy.testing import FakeVendors, Fault, Reply
from tests.e2e.auth_support import ADMIN_KEY, admin
from tests.e2e.conftest import ProxyProcess, start_proxy, stop_proxy, vendor_env

pytestmark = pytest.mark.e2e

MARKER = "zebra-quartz-lantern-8841"  # in every prompt: must never reach the exporter
ANSWER = "the heron-velvet-2207 answer"  # every scripted answer: same
MODEL = "gpt-4o-mini"
PROMPT_TOKENS, COMPLETION_TOKENS = 1000, 500
# 1000 x 0.15 + 500 x 0.60 USD per million tokens (the prices file below).
COST = 0.00045


class Receiver:
    """A stand-in OTLP/HTTP collector: records the body of every POST to /v1/traces."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                with receiver._lock:
                    receiver.paths.append(self.path)
                    receiver.bodies.append(raw)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def raw(self) -> bytes:
        with self._lock:
            return b"".join(self.bodies)

    def spans(self) -> list[Span]:
        with self._lock:
            bodies = list(self.bodies)
        found: list[Span] = []
        for body in bodies:
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource in request.resource_spans:
                for scoped in resource.scope_spans:
                    found.extend(scoped.spans)
        return found

    def trace(self, trace_id: str, count: int, timeout: float = 10.0) -> list[Span]:
        """The spans of one trace once ``count`` of them arrived (the batch processor sends
        every 100 ms here), or what is there after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            spans = [s for s in self.spans() if s.trace_id.hex() == trace_id]
            if len(spans) >= count or time.monotonic() > deadline:
                return spans
            time.sleep(0.05)


def value(any_value: AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return tuple(value(item) for item in any_value.array_value.values)
    return getattr(any_value, kind) if kind is not None else None


def attributes(span: Span) -> dict[str, Any]:
    return {item.key: value(item.value) for item in span.attributes}


def caller(n: int) -> tuple[str, str, str]:
    """A caller's trace id, span id and ``traceparent``, distinct per ``n``."""
    trace_id, span_id = f"{n:02x}" * 16, f"{n + 100:02x}" * 8
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def body() -> dict[str, Any]:
    return {
        "provider": "openai",
        "model": MODEL,
        "messages": [{"role": "user", "content": f"please repeat {MARKER}"}],
        "options": {"maxTokens": 64},
    }


def _proxy(fake: FakeVendors, receiver: Receiver, folder: Path, **extra: str) -> ProxyProcess:
    prices = folder / "prices.json"
    prices.write_text(json.dumps({f"openai/{MODEL}": {"input": "0.15", "output": "0.60"}}))
    env = {
        **vendor_env(fake),
        "ROBOTA_DATABASE_URL": f"sqlite:///{folder / 'robota.db'}",
        "ROBOTA_ADMIN_KEY": ADMIN_KEY,
        "ROBOTA_PRICES_FILE": str(prices),
        "ROBOTA_UPSTREAM_RETRIES": "1",
        "ROBOTA_RETRY_BACKOFF_BASE": "0",
        "ROBOTA_OTEL_ENABLED": "true",
        "ROBOTA_OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        **extra,
    }
    return start_proxy(env, folder / "proxy.log")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


@pytest.fixture(scope="module")
def traced(
    fake_server: FakeVendors, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    running = _proxy(fake_server, receiver, tmp_path_factory.mktemp("traced"))
    yield running
    stop_proxy(running)


@pytest.fixture(scope="module")
def rk_key(traced: ProxyProcess) -> dict[str, Any]:
    made = admin("POST", traced.url, "/admin/keys", json={"user": "tracy"})
    assert made.status_code == 201, made.text
    created: dict[str, Any] = made.json()
    return created


def send(proxy: ProxyProcess, key: str, path: str, traceparent: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "traceparent": traceparent}
    with httpx.stream(
        "POST", f"{proxy.url}{path}", json=body(), headers=headers, timeout=20
    ) as answer:
        answer.read()
    return answer


def scripted(fake: FakeVendors) -> None:
    fake.script(
        Reply(text=ANSWER, prompt_tokens=PROMPT_TOKENS, completion_tokens=COMPLETION_TOKENS),
        vendor="openai",
    )


def split(spans: list[Span]) -> tuple[Span, list[Span]]:
    servers = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    clients = [s for s in spans if s.kind == Span.SPAN_KIND_CLIENT]
    assert len(servers) == 1, [s.name for s in spans]
    assert len(servers) + len(clients) == len(spans)
    return servers[0], sorted(clients, key=lambda s: s.start_time_unix_nano)


def expected_server(
    path: str, request_id: str, key: dict[str, Any], streamed: bool, attempts: int
) -> dict[str, Any]:
    return {
        "http.request.method": "POST",
        "http.route": path,
        "http.response.status_code": 200,
        "robota.request_id": request_id,
        "gen_ai.operation.name": "chat",  # a stream too: the conventions' chat, streamed
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": MODEL,
        "gen_ai.response.model": MODEL,
        "gen_ai.usage.input_tokens": PROMPT_TOKENS,
        "gen_ai.usage.output_tokens": COMPLETION_TOKENS,
        "gen_ai.response.finish_reasons": ("stop",),
        "robota.deployment": "openai",
        "robota.cost_usd": COST,
        "robota.cache_hit": False,
        "robota.attempts": attempts,
        "robota.streamed": streamed,
        "robota.status": "ok",
        "robota.user_id": "tracy",
        "robota.key_id": key["id"],
    }


@pytest.mark.parametrize("path", ["/ai/chat", "/ai/chat/stream"])
def test_a_call_is_a_server_span_under_the_callers_trace_with_one_client_span(
    traced: ProxyProcess,
    receiver: Receiver,
    rk_key: dict[str, Any],
    fake: FakeVendors,
    path: str,
) -> None:
    streamed = path.endswith("stream")
    trace_id, span_id, traceparent = caller(1 if not streamed else 2)
    scripted(fake)
    answer = send(traced, rk_key["key"], path, traceparent)
    assert answer.status_code == 200, answer.text
    if streamed:
        assert "event: done" in answer.text
    else:
        assert answer.json()["content"] == ANSWER

    server, clients = split(receiver.trace(trace_id, 2))
    assert len(clients) == 1
    (client,) = clients
    assert server.name == f"POST {path}"
    assert server.parent_span_id.hex() == span_id
    assert client.parent_span_id == server.span_id
    assert attributes(server) == expected_server(
        path, answer.headers["x-request-id"], rk_key, streamed, attempts=1
    )
    expected_client = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": MODEL,
        "gen_ai.request.max_tokens": 64,
        "robota.deployment": "openai",
        "robota.outcome": "ok",
    }
    if not streamed:  # a stream's attempt span ends at its first content, before usage
        expected_client |= {
            "gen_ai.response.model": MODEL,
            "gen_ai.response.finish_reasons": ("stop",),
            "gen_ai.usage.input_tokens": PROMPT_TOKENS,
            "gen_ai.usage.output_tokens": COMPLETION_TOKENS,
        }
    assert attributes(client) == expected_client
    # The vendor was called as the attempt's child, in the caller's trace.
    (sent,) = fake.requests
    assert sent.headers["traceparent"] == f"00-{trace_id}-{client.span_id.hex()}-01"
    raw = receiver.raw()
    assert MARKER.encode() not in raw
    assert ANSWER.encode() not in raw
    assert rk_key["key"].encode() not in raw


def test_a_retried_call_has_one_client_span_per_attempt(
    traced: ProxyProcess, receiver: Receiver, rk_key: dict[str, Any], fake: FakeVendors
) -> None:
    trace_id, span_id, traceparent = caller(3)
    fake.script(Fault(status=503), times=1, vendor="openai")
    scripted(fake)
    answer = send(traced, rk_key["key"], "/ai/chat", traceparent)
    assert answer.status_code == 200, answer.text

    server, clients = split(receiver.trace(trace_id, 3))
    assert server.parent_span_id.hex() == span_id
    assert attributes(server) == expected_server(
        "/ai/chat", answer.headers["x-request-id"], rk_key, streamed=False, attempts=2
    )
    assert [attributes(c)["robota.outcome"] for c in clients] == ["upstream_unavailable", "ok"]
    assert attributes(clients[0])["error.type"] == "upstream_unavailable"
    assert [c.parent_span_id for c in clients] == [server.span_id, server.span_id]
    assert [r.headers["traceparent"] for r in fake.requests] == [
        f"00-{trace_id}-{c.span_id.hex()}-01" for c in clients
    ]
    assert MARKER.encode() not in receiver.raw()


def test_exports_go_to_the_configured_endpoint(receiver: Receiver, traced: ProxyProcess) -> None:
    assert httpx.get(f"{traced.url}/health").status_code == 200
    deadline = time.monotonic() + 10
    while not (health := [s for s in receiver.spans() if s.name == "GET /health"]):
        assert time.monotonic() < deadline, "no span of GET /health exported"
        time.sleep(0.05)
    assert set(receiver.paths) == {"/v1/traces"}
    # /health is no GenAI operation: the span has no gen_ai.* attribute.
    assert not [name for name in attributes(health[0]) if name.startswith("gen_ai.")]


def test_content_is_exported_only_when_the_operator_opts_in(
    fake: FakeVendors, tmp_path: Path
) -> None:
    own = Receiver()
    proxy = _proxy(fake, own, tmp_path, ROBOTA_OTEL_CAPTURE_CONTENT="true")
    try:
        made = admin("POST", proxy.url, "/admin/keys", json={"user": "tracy"}).json()
        trace_id, _, traceparent = caller(4)
        scripted(fake)
        answer = send(proxy, made["key"], "/ai/chat", traceparent)
        assert answer.status_code == 200, answer.text
        server, (client,) = split(own.trace(trace_id, 2))
    finally:
        stop_proxy(proxy)
        own.close()
    prompt = json.dumps([{"role": "user", "content": body()["messages"][0]["content"]}])
    output = json.dumps([{"role": "assistant", "content": ANSWER}])
    for span in (server, client):
        assert attributes(span)["gen_ai.input.messages"] == prompt
        assert attributes(span)["gen_ai.output.messages"] == output
    assert MARKER.encode() in own.raw()
