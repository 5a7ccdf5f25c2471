"""AuthMiddleware alone, in front of someone else's plain Starlette endpoint."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from robota_proxy import AuthMiddleware
from robota_proxy.policy.static_keys import StaticKeyAuthenticator, key_id
from robota_proxy.scope import PRINCIPAL


async def whoami(request: Request) -> JSONResponse:
    principal = request.scope[PRINCIPAL]
    return JSONResponse({"user": principal.user, "keyId": principal.key_id})


def app_with(keys: list[str]) -> Starlette:
    return Starlette(
        routes=[Route("/whoami", whoami), Route("/health", lambda r: JSONResponse({}))],
        middleware=[Middleware(AuthMiddleware, authenticator=StaticKeyAuthenticator(keys))],
    )


def test_valid_key_reaches_the_endpoint_with_a_principal() -> None:
    client = TestClient(app_with(["alpha-key", "beta-key"]))
    response = client.get("/whoami", headers={"Authorization": "Bearer beta-key"})
    assert response.status_code == 200
    assert response.json() == {"user": key_id("beta-key"), "keyId": key_id("beta-key")}
    assert "beta-key" not in response.text


def test_refusals_are_contract_errors() -> None:
    client = TestClient(app_with(["alpha-key"]))
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "alpha-key"}):
        response = client.get("/whoami", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthenticated"
        assert response.json()["error"]["requestId"].startswith("req_")


def test_exempt_paths_and_no_keys() -> None:
    client = TestClient(app_with([]))
    assert client.get("/health").status_code == 200
    assert client.get("/whoami", headers={"Authorization": "Bearer x"}).status_code == 401
