"""``GET /metrics``: the Prometheus counters after a known set of calls (in process, the mock
provider), read back with prometheus-client's own parser; the overhead header; the labels
that must not be there; the metrics switched off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from robota_proxy import create_app
from robota_proxy.observability.metrics import ModelLabels, ProxyMetrics, parse_address
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


def test_every_answer_says_the_proxy_overhead(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        answers = [
            client.post("/ai/chat", json=BODY, headers=bearer(USER)),
            client.post("/ai/chat/stream", json=BODY, headers=bearer(USER)),
            client.post("/ai/chat", json=BODY),
            client.get("/health"),
            client.get("/no/such/path"),
        ]
    for answer in answers:
        overhead = answer.headers["X-Robota-Overhead-Ms"]
        assert float(overhead) >= 0 and overhead == f"{float(overhead):.2f}"


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
