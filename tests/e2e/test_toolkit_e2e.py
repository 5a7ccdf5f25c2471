"""The middleware toolkit in someone else's app: only ``AuthMiddleware`` and
``RateLimitMiddleware`` from ``robota_proxy``, in front of a plain Starlette endpoint that knows
nothing of the proxy, served by uvicorn on 127.0.0.1 and called over a real socket.

The two middleware meet only through the documented scope key ``robota_proxy.scope.PRINCIPAL``:
auth puts the principal there, the rate limit reads its ``.user`` and ``.permissions``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from robota_proxy import AuthMiddleware, RateLimiter, RateLimitMiddleware
from robota_proxy.policy.principals import Principal, UserPermissions
from robota_proxy.policy.static_keys import StaticKeyAuthenticator
from robota_proxy.scope import PRINCIPAL
from robota_proxy.storage.limits_storage import LimitsStorage
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.e2e

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef"


class ThreePerMinute:
    """The host's own authenticator: its keys, each user allowed 3 requests a minute."""

    def __init__(self, keys: list[str]) -> None:
        self.inner = StaticKeyAuthenticator(keys)

    async def authenticate(self, credential: str) -> Principal | None:
        principal = await self.inner.authenticate(credential)
        if principal is None:
            return None
        return replace(principal, permissions=UserPermissions(rpm=3))


async def reports(request: Request) -> JSONResponse:
    """Someone else's endpoint: it only reads who is calling."""
    return JSONResponse({"reports": [], "for": request.scope[PRINCIPAL].user})


def host_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/reports", reports),
            Route("/health", lambda request: JSONResponse({"status": "ok"})),
        ],
        middleware=[
            Middleware(AuthMiddleware, authenticator=ThreePerMinute([ALICE, BOB])),
            Middleware(RateLimitMiddleware, limiter=RateLimiter(LimitsStorage(None).storage)),
        ],
    )


@pytest.fixture
def served() -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(host_app(), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def inside_one_minute(margin: float = 5.0) -> None:
    """Memory storage aligns its windows to the clock minute, and right after a boundary the
    sliding counter's rounding lets one more request through; start the count well inside a
    minute so that an exact limit is tested deterministically."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.1)


def test_auth_and_rate_limit_alone_in_front_of_someone_elses_endpoint(served: str) -> None:
    inside_one_minute()
    alice = {"Authorization": f"Bearer {ALICE}"}
    with httpx.Client(base_url=served, timeout=5) as http:
        for remaining in ("2", "1", "0"):
            response = http.get("/reports", headers=alice)
            assert response.status_code == 200
            assert response.json()["for"].startswith("key_")
            assert response.headers["X-RateLimit-Limit"] == "3"
            assert response.headers["X-RateLimit-Remaining"] == remaining
        refused = http.get("/reports", headers=alice)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "rate_limited" and "rpm" in error["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.headers["X-RateLimit-Limit"] == "3"
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        assert 1 <= int(refused.headers["X-RateLimit-Reset"]) <= 60
        assert ALICE not in refused.text

        # Another user is unaffected; unauthenticated callers never reach the limiter.
        bob = http.get("/reports", headers={"Authorization": f"Bearer {BOB}"})
        assert bob.status_code == 200 and bob.headers["X-RateLimit-Remaining"] == "2"
        assert http.get("/reports").status_code == 401
        # The host's exempt health check is neither authenticated nor counted.
        assert http.get("/health").status_code == 200
        assert http.get("/reports", headers=alice).status_code == 429
