"""``GET /admin/metrics``: attempt counts for the operator, behind the admin key."""

from __future__ import annotations

from starlette.testclient import TestClient

from robota_proxy import create_app
from robota_proxy.settings import Settings

ADMIN = "admin-key-for-metrics-0123456789"
USER = "user-key-for-metrics-0123456789"
BODY = {"provider": "mock", "model": "mock-1", "messages": [{"role": "user", "content": "hi"}]}


def test_attempts_are_counted_and_only_the_admin_sees_them() -> None:
    settings = Settings(api_keys=[USER], admin_key=ADMIN, cache_enabled=False)
    with TestClient(create_app(settings)) as client:
        for _ in range(3):
            answer = client.post("/ai/chat", json=BODY, headers={"Authorization": f"Bearer {USER}"})
            assert answer.status_code == 200
        refused = client.get("/admin/metrics", headers={"Authorization": f"Bearer {USER}"})
        assert refused.status_code == 401
        metrics = client.get("/admin/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    assert metrics.status_code == 200
    assert metrics.json() == {
        "upstreamAttempts": [{"target": "mock/mock-1", "outcome": "ok", "count": 3}],
        "circuitBreakers": {"mock/mock-1": "closed"},
    }
    assert ADMIN not in metrics.text and USER not in metrics.text
