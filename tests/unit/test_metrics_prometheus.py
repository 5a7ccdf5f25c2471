"""``GET /metrics``: the Prometheus counters after a known set of calls (in process, the mock
provider), read back with prometheus-client's own parser; the overhead header on every kind
of answer (the app's, the connection guard's, the metrics bind's); the labels that must not
be there; the metrics switched off."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient, WebSocketDenialResponse

from robota_client.messages import Usage
from robota_proxy import create_app
from robota_proxy import scope as keys
from robota_proxy.call_record import CallRecord
from robota_proxy.http_guard import GuardedHttpToolsProtocol, ServerLimits
from robota_proxy.observability.metrics import (
    OTHER,
    MetricsServer,
    ModelLabels,
    ProxyMetrics,
    parse_address,
)
from robota_proxy.settings import Settings
from robota_proxy.upstreams.resilience import Attempt, Target

ADMIN = "admin-key-for-prometheus-0123456789"
USER = "user-key-for-prometheus-0123456789"
BODY = {"provider": "mock", "model": "mock-1", "messages": [{"role": "user", "content": "hi you"}]}
CACHED = {**BODY, "options": {"temperature": 0}}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition by name and labels (prometheus-client's parser)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return parsed.get((name, frozenset(labels.items())), 0.0)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_key(client: TestClient, user: str, permissions: dict[str, Any]) -> str:
    made = client.post(
        "/admin/keys", json={"user": user, "permissions": permissions}, headers=bearer(ADMIN)
    )
    assert made.status_code == 201, made.text
    key: str = made.json()["key"]
    return key


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"mock-1": {"input": "1", "output": "2"}}))
    return Settings(
        api_keys=[USER],
        admin_key=ADMIN,
        database_url=f"sqlite:///{tmp_path / 'robota.db'}",
        prices_file=prices,
    )


def test_counters_after_known_calls(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        for _ in range(2):
            assert client.post("/ai/chat", json=BODY, headers=bearer(USER)).status_code == 200
        streamed = client.post("/ai/chat/stream", json=BODY, headers=bearer(USER))
        assert streamed.status_code == 200 and "event: done" in streamed.text
        for expected in ("MISS", "HIT"):
            answer = client.post("/ai/chat", json=CACHED, headers=bearer(USER))
            assert answer.headers["X-Robota-Cache"] == expected
        assert client.post("/ai/chat", json=BODY).status_code == 401
        forbidden = new_key(client, "walled", {"allowedModels": ["other-*"]})
        assert client.post("/ai/chat", json=BODY, headers=bearer(forbidden)).status_code == 403
        limited = new_key(client, "slow", {"rpm": 1})
        assert client.post("/ai/chat", json=BODY, headers=bearer(limited)).status_code == 200
        assert client.post("/ai/chat", json=BODY, headers=bearer(limited)).status_code == 429
        quota = new_key(client, "small", {"monthlyTokenLimit": 1})
        assert client.post("/ai/chat", json=BODY, headers=bearer(quota)).status_code == 429
        broke = new_key(client, "broke", {"monthlyBudgetUsd": "0.000001"})
        assert client.post("/ai/chat", json=BODY, headers=bearer(broke)).status_code == 402
        assert client.get("/metrics", headers=bearer(USER)).status_code == 401
        scraped = client.get("/metrics", headers=bearer(ADMIN))
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(scraped.text)
    chat = {"surface": "robota", "route": "/ai/chat", "provider": "mock", "model": "mock-1"}
    # 2 plain + 1 through rpm + 2 cacheable (one served from the cache).
    assert value(got, "robota_requests_total", **chat, status="200") == 5
    stream = {**chat, "route": "/ai/chat/stream"}
    assert value(got, "robota_requests_total", **stream, status="200") == 1
    refused = {"surface": "robota", "route": "/ai/chat", "provider": "", "model": ""}
    assert value(got, "robota_requests_total", **refused, status="401") == 1
    assert value(got, "robota_requests_total", **refused, status="403") == 1
    assert value(got, "robota_requests_total", **refused, status="429") == 2
    assert value(got, "robota_requests_total", **refused, status="402") == 1
    # The chat without a key, and the scrape with a user's key instead of the admin's.
    assert value(got, "robota_refusals_total", reason="unauthenticated") == 2
    for reason in ("forbidden", "rate_limited", "quota_exceeded", "budget_exceeded"):
        assert value(got, "robota_refusals_total", reason=reason) == 1, reason
    assert value(got, "robota_cache_requests_total", result="hit") == 1
    assert value(got, "robota_cache_requests_total", result="miss") == 1
    # Vendor calls: 2 + 1 stream + 1 rpm + 1 cache miss; "hi you" is 2 prompt words, the
    # answer "You said: hi you" 4 words; the cache hit costs no vendor tokens.
    target = {"target": "mock/mock-1"}
    assert value(got, "robota_upstream_attempts_total", **target, outcome="ok") == 5
    mock = {"provider": "mock", "model": "mock-1"}
    assert value(got, "robota_tokens_total", **mock, kind="prompt") == 10
    assert value(got, "robota_tokens_total", **mock, kind="completion") == 20
    # $1 per million prompt tokens, $2 per million completion tokens.
    assert value(got, "robota_cost_usd_total", **mock) == pytest.approx(50e-6)
    assert value(got, "robota_upstream_duration_seconds_count", **mock) == 5
    assert value(got, "robota_time_to_first_token_seconds_count", **mock) == 1
    # 4 words streamed: 3 gaps between them.
    assert value(got, "robota_inter_token_seconds_count", **mock) == 3
    assert value(got, "robota_streams_open") == 0
    assert value(got, "robota_ledger_writes_pending") == 0
    duration = {"surface": "robota", "route": "/ai/chat"}
    assert value(got, "robota_request_duration_seconds_count", **duration) == 10
    assert value(got, "robota_request_duration_seconds_bucket", **duration, le="60.0") == 10
    for secret in (ADMIN, USER, "hi you", "You said"):
        assert secret not in scraped.text


def overhead_of(headers: httpx.Headers | dict[str, str]) -> float:
    """``X-Robota-Overhead-Ms``: milliseconds with two decimals, never negative."""
    overhead = headers["x-robota-overhead-ms"]
    assert re.fullmatch(r"\d+\.\d\d", overhead), overhead
    return float(overhead)


def test_every_answer_says_the_proxy_overhead(settings: Settings) -> None:
    settings.max_body_bytes = 1024
    with TestClient(create_app(settings)) as client:
        answers = [
            client.post("/ai/chat", json=BODY, headers=bearer(USER)),
            client.post("/ai/chat/stream", json=BODY, headers=bearer(USER)),
            client.post("/ai/chat", json=BODY),
            client.get("/health"),
            client.get("/no/such/path"),
        ]
        too_big = {**BODY, "messages": [{"role": "user", "content": "word " * 400}]}
        answers.append(client.post("/ai/chat", json=too_big, headers=bearer(USER)))
        for expected in ("MISS", "HIT"):  # the cache is on by default; temperature 0 is cached
            answers.append(client.post("/ai/chat", json=CACHED, headers=bearer(USER)))
            assert answers[-1].headers["X-Robota-Cache"] == expected
    assert [answer.status_code for answer in answers] == [200, 200, 401, 200, 401, 413, 200, 200]
    for answer in answers:
        assert overhead_of(answer.headers) < 5000


def test_a_websocket_handshakes_answer_says_the_proxy_overhead(settings: Settings) -> None:
    """The ``101`` that opens ``/ai/ws`` and a refused handshake's answer are answers too."""
    with TestClient(create_app(settings)) as client:
        with client.websocket_connect("/ai/ws", headers=bearer(USER)) as opened:
            accepted = dict(opened.extra_headers or [])
        with pytest.raises(WebSocketDenialResponse) as refused, client.websocket_connect("/ai/ws"):
            pass
    assert overhead_of({k.decode(): v.decode() for k, v in accepted.items()}) < 5000
    assert refused.value.status_code == 401
    assert overhead_of(refused.value.headers) < 5000


def test_an_unhandled_exception_is_a_500_with_the_overhead_and_one_log_line(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Starlette answers an exception nothing handled from outside every middleware; ours
    answers it first, so the 500 has the request id and the overhead like every answer."""

    async def broken(request: Request) -> Response:
        raise RuntimeError("a bug")

    app = create_app(settings)
    app.router.routes.append(Route("/broken", broken))
    with caplog.at_level(logging.ERROR), TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/broken", headers=bearer(USER))
        scraped = client.get("/metrics", headers=bearer(ADMIN))
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "internal_error"
    assert answer.headers["X-Request-ID"].startswith("req_")
    assert overhead_of(answer.headers) < 5000
    logged = [r for r in caplog.records if r.getMessage().startswith("unexpected error in")]
    assert [r.getMessage() for r in logged] == [
        f"unexpected error in {answer.headers['X-Request-ID']}"
    ]
    got = samples(scraped.text)
    broken_route = {"surface": "other", "route": "other", "provider": "", "model": ""}
    assert value(got, "robota_requests_total", **broken_route, status="500") == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_the_metrics_address_answers_say_the_overhead_with_the_rendering_in_it() -> None:
    def render() -> bytes:
        time.sleep(0.05)  # the work the answer waits for: 50 ms of the proxy's own time
        return b"robota_up 1\n"

    async def scrape() -> tuple[httpx.Response, httpx.Response]:
        server = MetricsServer(f"127.0.0.1:{free_port()}", render)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                return await client.get("/metrics"), await client.get("/elsewhere")
        finally:
            await server.stop()

    metrics, missing = asyncio.run(scrape())
    assert (metrics.status_code, metrics.text) == (200, "robota_up 1\n")
    assert 50 <= overhead_of(metrics.headers) < 5000
    assert missing.status_code == 404
    assert overhead_of(missing.headers) < 50  # no rendering: nothing to wait for


@contextmanager
def guarded_server(limits: ServerLimits) -> Iterator[int]:
    """The proxy's hardened HTTP protocol (what ``serve`` runs) on a local port, in a thread,
    in front of a trivial app; yields the port. The socket listens before the server starts,
    so a client can connect at once."""

    class Limited(GuardedHttpToolsProtocol):
        pass

    Limited.limits = limits

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    config = uvicorn.Config(app, http=Limited, lifespan="off", log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive()


def exchange(port: int, request: bytes) -> tuple[str, dict[str, str]]:
    """Send ``request`` raw, read until the server closes: the status line and headers."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head = received.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in head[1:])
    return head[0], {name.lower(): field for name, field in fields.items()}


def test_the_connection_guards_refusals_say_the_proxy_overhead() -> None:
    limits = ServerLimits(max_headers=5, max_request_line=256, header_timeout=0.3)
    with guarded_server(limits) as port:
        headers = b"".join(b"X-Filler-%d: x\r\n" % n for n in range(10))
        many = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        long = exchange(port, b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        silent = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        waited = time.monotonic() - started
        fine = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert many[0] == "HTTP/1.1 431 Request Header Fields Too Large"
    assert long[0] == "HTTP/1.1 414 URI Too Long"
    assert silent[0] == "HTTP/1.1 408 Request Timeout"
    for status, fields in (many, long, silent):
        assert overhead_of(fields) < 100, status
    # 300 ms went by waiting for the client: that is not the proxy's time.
    # asyncio may fire its timer up to its clock resolution early.
    assert waited >= 0.29 and overhead_of(silent[1]) < 100
    assert fine[0] == "HTTP/1.1 200 OK"  # the app's answers: RequestContextMiddleware's job


def test_per_user_labels_only_when_turned_on(tmp_path: Path) -> None:
    def scrape(per_user: bool) -> str:
        settings = Settings(
            api_keys=[USER],
            admin_key=ADMIN,
            database_url=f"sqlite:///{tmp_path / f'{per_user}.db'}",
            metrics_per_user=per_user,
        )
        with TestClient(create_app(settings)) as client:
            client.post("/ai/chat", json=BODY, headers=bearer(USER))
            return client.get("/metrics", headers=bearer(ADMIN)).text

    off, on = samples(scrape(False)), samples(scrape(True))
    assert all("user" not in dict(labels) for _, labels in off)
    users = {dict(labels)["user"] for name, labels in on if name == "robota_requests_total"}
    assert len(users) == 1 and users != {""}
    assert USER not in next(iter(users))  # a static key's user is its public id, not the key


def test_metrics_off_means_no_route(settings: Settings) -> None:
    settings.metrics_enabled = False
    with TestClient(create_app(settings)) as client:
        assert client.get("/metrics", headers=bearer(ADMIN)).status_code == 404
        answer = client.post("/ai/chat", json=BODY, headers=bearer(USER))
    assert answer.status_code == 200 and "X-Robota-Overhead-Ms" in answer.headers


def test_attempt_outcomes_retries_and_fallbacks_are_counted() -> None:
    metrics = ProxyMetrics()
    first, second = Target("openai", "a"), Target("anthropic", "b")
    metrics.attempts.add(Attempt(first, "upstream_unavailable", 12))
    metrics.attempts.decided(first, "retry")
    metrics.attempts.add(Attempt(first, "upstream_unavailable", 3))
    metrics.attempts.decided(first, "fallback")
    metrics.attempts.add(Attempt(second, "circuit_open", 0))
    got = samples(metrics.exposition().decode())
    attempts = "robota_upstream_attempts_total"
    assert value(got, attempts, target="openai/a", outcome="upstream_unavailable") == 2
    assert value(got, attempts, target="openai/a", outcome="retry") == 1
    assert value(got, attempts, target="openai/a", outcome="fallback") == 1
    assert value(got, attempts, target="anthropic/b", outcome="circuit_open") == 1
    # Only vendor calls have a duration: 12 ms and 3 ms, both at or under 25 ms.
    duration = {"provider": "openai", "model": "a"}
    assert value(got, "robota_upstream_duration_seconds_count", **duration) == 2
    assert value(got, "robota_upstream_duration_seconds_sum", **duration) == pytest.approx(0.015)
    assert value(got, "robota_upstream_duration_seconds_bucket", **duration, le="0.001") == 0
    assert value(got, "robota_upstream_duration_seconds_bucket", **duration, le="0.005") == 1
    assert value(got, "robota_upstream_duration_seconds_bucket", **duration, le="0.025") == 2
    assert (
        value(got, "robota_upstream_duration_seconds_count", provider="anthropic", model="b") == 0
    )


PRICES = {"openai": Decimal("0.000001"), "anthropic": Decimal("0.000003")}  # USD per token


def priced_stream(request_id: str) -> CallRecord:
    """A stream's call record as the metering sets it up: priced per provider, an unreported
    attempt estimated as 100 prompt tokens and a token per 4 characters."""
    record = CallRecord(
        request_id=request_id,
        streamed=True,
        pricer=lambda provider, model, usage: PRICES[provider] * usage.total_tokens,
    )
    record.estimator = lambda chars: Usage(
        prompt_tokens=100, completion_tokens=chars // 4, total_tokens=100 + chars // 4
    )
    record.upstream_called = True
    return record


def failed_over_stream() -> CallRecord:
    """A stream whose first try failed, whose second broke after 80 characters (estimated:
    100 prompt tokens, 20 completion tokens) and was continued on another provider, which
    answered 130 + 40 tokens: what ``Resilience`` leaves on the call record."""
    record = priced_stream("req_1")
    record.begin_attempt("openai")
    record.attempt_failed("openai", "m", "openai", "upstream_unavailable")
    record.begin_attempt("openai")
    record.provider, record.model = "openai", "m"
    record.streamed_chars = 80
    record.end_attempt("upstream_error")
    record.begin_attempt("anthropic")
    record.provider, record.model = "anthropic", "c"
    usage = Usage(prompt_tokens=130, completion_tokens=40, total_tokens=170, reasoning_tokens=7)
    record.settle_usage("anthropic", "c", usage)
    return record


def test_a_failed_over_calls_tokens_and_cost_are_each_attempts_own() -> None:
    record = failed_over_stream()
    # The call's totals: what the caller was billed, and what the counters must add up to.
    assert record.usage is not None and record.cost is not None
    assert (record.usage.prompt_tokens, record.usage.completion_tokens) == (230, 60)
    assert record.cost == Decimal("0.000120") + Decimal("0.000510")
    metrics = ProxyMetrics()
    scope: dict[str, Any] = {"type": "http", "path": "/ai/chat/stream", keys.CALL: record}
    metrics.request_done(scope, 200, 1.5)
    got = samples(metrics.exposition().decode())
    openai, anthropic = (
        {"provider": "openai", "model": "m"},
        {"provider": "anthropic", "model": "c"},
    )
    tokens = "robota_tokens_total"
    assert value(got, tokens, **openai, kind="prompt") == 100
    assert value(got, tokens, **openai, kind="completion") == 20
    assert value(got, tokens, **anthropic, kind="prompt") == 130
    assert value(got, tokens, **anthropic, kind="completion") == 40
    assert value(got, tokens, **anthropic, kind="reasoning") == 7
    assert value(got, tokens, **openai, kind="reasoning") == 0
    assert value(got, "robota_cost_usd_total", **openai) == pytest.approx(120e-6, rel=1e-9)
    assert value(got, "robota_cost_usd_total", **anthropic) == pytest.approx(510e-6, rel=1e-9)
    # Nothing else was counted: the sums are the call's totals.
    token_samples = {labels: n for (name, labels), n in got.items() if name == tokens}
    assert sum(token_samples.values()) == 230 + 60 + 7
    assert len(token_samples) == 5
    # The request itself is the final provider's.
    assert (
        value(got, "robota_requests_total", surface=OTHER, route=OTHER, status="200", **anthropic)
        == 1
    )


def test_a_continuation_that_failed_leaves_the_broken_attempts_tokens_where_they_were_used() -> (
    None
):
    """Every attempt ended (the continuation failed to start): the final provider's share is
    nothing, the broken attempt's tokens stay under its own provider."""
    record = priced_stream("req_2")
    record.begin_attempt("openai")
    record.provider, record.model = "openai", "m"
    record.streamed_chars = 40
    record.end_attempt("upstream_error")
    record.begin_attempt("anthropic")
    record.attempt_failed("anthropic", "c", "anthropic", "upstream_unavailable")
    record.provider, record.model, record.status = "anthropic", "c", "upstream_unavailable"
    metrics = ProxyMetrics()
    metrics.request_done({"type": "http", "path": "/ai/chat/stream", keys.CALL: record}, 502, 1.0)
    got = samples(metrics.exposition().decode())
    tokens = {
        (dict(labels)["provider"], dict(labels)["kind"]): n
        for (name, labels), n in got.items()
        if name == "robota_tokens_total"
    }
    assert tokens == {("openai", "prompt"): 100, ("openai", "completion"): 10}
    costs = {
        dict(labels)["provider"]: n
        for (name, labels), n in got.items()
        if name == "robota_cost_usd_total"
    }
    assert costs == {"openai": pytest.approx(110e-6, rel=1e-9)}


def test_ledger_redis_and_database_errors() -> None:
    metrics = ProxyMetrics()
    metrics.ledger_write(1)
    metrics.ledger_write(1)
    metrics.ledger_write(-1)
    metrics.ledger_failed(True)
    metrics.ledger_failed(False)
    metrics.redis_failed("rate limits")
    metrics.redis_failed("rate limits")
    metrics.database_failed()
    got = samples(metrics.exposition().decode())
    assert value(got, "robota_ledger_writes_pending") == 1
    assert value(got, "robota_ledger_write_failures_total") == 2
    assert value(got, "robota_database_errors_total") == 2
    assert value(got, "robota_redis_errors_total", part="rate limits") == 2


def test_model_labels_are_bounded() -> None:
    labels = ModelLabels(2)
    assert labels.of("openai", "a") == ("openai", "a")
    assert labels.of("openai", "b") == ("openai", "b")
    assert labels.of("openai", "c") == ("openai", "other")
    assert labels.of("openai", "a") == ("openai", "a")


def test_two_apps_in_one_process_count_apart(settings: Settings) -> None:
    """Our own registry: a second app (or a host's default registry) neither clashes nor
    mixes its numbers in."""
    first, second = create_app(settings), create_app(settings)
    with TestClient(first) as client:
        client.post("/ai/chat", json=BODY, headers=bearer(USER))
    assert first.metrics is not None and second.metrics is not None
    got = samples(second.metrics.exposition().decode())
    assert all(name != "robota_requests_total" for name, _ in got)


def test_metrics_address_parsing() -> None:
    assert parse_address("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_address(":9100") == ("127.0.0.1", 9100)
    assert parse_address("[::1]:9100") == ("::1", 9100)
    with pytest.raises(ValueError):
        parse_address("localhost")
