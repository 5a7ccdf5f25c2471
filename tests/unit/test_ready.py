"""``GET /ready``: what a load balancer and what the admin learn, for each check passing and
failing; ``/health`` stays the cheap liveness answer whatever ``/ready`` finds."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from robota_proxy import create_app, drain
from robota_proxy.errors import ProxyError
from robota_proxy.routes.admin import AdminGuard
from robota_proxy.routes.health import ReadinessRoutes, reason_of
from robota_proxy.settings import Settings
from robota_proxy.storage.database import Database
from robota_proxy.upstreams.registry import UpstreamRegistry
from tests.conftest import REDIS_BASE_URL, REDIS_TEST_PREFIX
from tests.unit.test_openapi import check

ADMIN = "admin-key-for-ready-0123456789"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
NOT_ADMIN = {"Authorization": "Bearer not-the-admin-key-at-all"}


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"api_keys": ["user-key-for-ready-0123"], "admin_key": ADMIN}
    return Settings(_env_file=None, **{**values, **overrides})


@pytest.fixture(autouse=True)
def _not_draining() -> Iterator[None]:
    drain.reset()
    yield
    drain.reset()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_ready_when_everything_answers() -> None:
    with TestClient(create_app(settings())) as client:
        answer = client.get("/ready")
        assert (answer.status_code, answer.json()) == (200, {"status": "ready"})
        assert answer.headers["cache-control"] == "no-store"
        check(answer, "/ready", "get")
        assert client.get("/health").json() == {"status": "ok"}


def test_the_admin_sees_every_check() -> None:
    with TestClient(create_app(settings())) as client:
        answer = client.get("/ready", headers=AS_ADMIN)
    body = answer.json()
    assert answer.status_code == 200
    check(answer, "/ready", "get")
    latencies = {name: detail.pop("latencyMs") for name, detail in body["checks"].items()}
    assert body == {
        "status": "ready",
        "checks": {
            "database": {"ok": True},
            "draining": {"ok": True},
            "providers": {"ok": True, "found": "mock"},
        },
    }
    assert all(isinstance(ms, float) and 0 <= ms < 1000 for ms in latencies.values())


def test_redis_is_checked_only_when_configured() -> None:
    url = f"{REDIS_BASE_URL}/0"
    with TestClient(create_app(settings(redis_url=url, redis_prefix=REDIS_TEST_PREFIX))) as client:
        answer = client.get("/ready", headers=AS_ADMIN)
    assert answer.status_code == 200
    assert sorted(answer.json()["checks"]) == ["database", "draining", "providers", "redis"]
    assert answer.json()["checks"]["redis"]["ok"] is True


def test_unreachable_redis_is_named_and_its_password_never_shown() -> None:
    url = f"redis://:redis-password-123@127.0.0.1:{closed_port()}/0"
    with TestClient(create_app(settings(redis_url=url))) as client:
        public = client.get("/ready")
        admin = client.get("/ready", headers=AS_ADMIN)
        health = client.get("/health")
    assert (public.status_code, public.json()) == (
        503,
        {"status": "not_ready", "failed": ["redis"]},
    )
    check(public, "/ready", "get")
    redis_check = admin.json()["checks"]["redis"]
    assert (redis_check["ok"], redis_check["reason"]) == (
        False,
        "ConnectionError (ConnectionRefusedError: Connection refused)",
    )
    assert "redis-password-123" not in admin.text and "127.0.0.1" not in admin.text
    assert health.status_code == 200


def test_no_provider_is_not_ready() -> None:
    with TestClient(create_app(settings(mock_enabled=False))) as client:
        public = client.get("/ready")
        admin = client.get("/ready", headers=AS_ADMIN)
    assert (public.status_code, public.json()) == (
        503,
        {"status": "not_ready", "failed": ["providers"]},
    )
    assert admin.json()["checks"]["providers"]["reason"] == "no provider configured"


def test_draining_is_not_ready() -> None:
    with TestClient(create_app(settings())) as client:
        drain.begin()
        public = client.get("/ready")
        admin = client.get("/ready", headers=AS_ADMIN)
    assert (public.status_code, public.json()) == (
        503,
        {"status": "not_ready", "failed": ["draining"]},
    )
    assert admin.json()["checks"]["draining"]["reason"] == (
        "shutting down: running calls are finishing"
    )


def test_credentials_other_than_the_admin_key_are_refused() -> None:
    with TestClient(create_app(settings())) as client:
        wrong = client.get("/ready", headers=NOT_ADMIN)
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "unauthenticated"
    check(wrong, "/ready", "get")
    with TestClient(create_app(settings(admin_key=None))) as client:
        disabled = client.get("/ready", headers=NOT_ADMIN)
        public = client.get("/ready")
    assert disabled.status_code == 403
    assert public.status_code == 200


# --- the database check, on its own (the app would not start without its database) ----------


def readiness_app(database_url: str, timeout: float) -> Starlette:
    registry = UpstreamRegistry(lambda: {})
    registry.open()
    readiness = ReadinessRoutes(
        Database(database_url),
        registry,
        AdminGuard(settings().admin_key, None),
        redis_url=None,
        timeout=timeout,
    )

    async def proxy_error(request: Any, exc: Exception) -> Any:
        raise exc

    return Starlette(routes=readiness.routes(), exception_handlers={ProxyError: proxy_error})


def test_unreachable_database_is_named_without_its_url() -> None:
    url = f"postgresql://robota:db-password-456@127.0.0.1:{closed_port()}/robota"
    with TestClient(readiness_app(url, timeout=2.0)) as client:
        answer = client.get("/ready", headers=AS_ADMIN)
    assert answer.status_code == 503
    assert answer.json()["failed"] == ["database", "providers"]
    assert answer.json()["checks"]["database"]["reason"] == (
        "ConnectionRefusedError: Connection refused"
    )
    assert "db-password-456" not in answer.text


def test_a_database_that_never_answers_fails_after_the_timeout() -> None:
    """A listening socket nobody accepts on: the TCP handshake completes (the kernel's
    backlog) and the driver then waits for a greeting that never comes."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        url = f"postgresql://robota@127.0.0.1:{port}/robota"
        with TestClient(readiness_app(url, timeout=0.3)) as client:
            answer = client.get("/ready", headers=AS_ADMIN)
    database = answer.json()["checks"]["database"]
    assert (answer.status_code, database["ok"], database["reason"]) == (
        503,
        False,
        "no answer within 0.3 s",
    )
    assert 300 <= database["latencyMs"] < 2000


def test_reason_of_walks_causes_and_never_repeats_a_message() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "Connect call failed ('10.0.0.9', 6379) secret")
        except OSError as exc:
            raise RuntimeError("redis://:secret@10.0.0.9:6379") from exc
    except RuntimeError as outer:
        assert reason_of(outer) == "RuntimeError (ConnectionRefusedError: Connection refused)"
    assert reason_of(ValueError("postgresql://u:secret@h/db")) == "ValueError"
