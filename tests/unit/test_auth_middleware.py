"""AuthMiddleware alone, in front of someone else's plain Starlette endpoint."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
from limits.aio.storage import MemoryStorage
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.types import Message
from starlette.websockets import WebSocket

from robota_proxy import AuthMiddleware
from robota_proxy.middleware.auth import REFUSAL_MESSAGES, bearer_credential, parse_bearer
from robota_proxy.middleware.paths import CHAT_PATHS
from robota_proxy.policy.authenticators import AuthFailureLimiter
from robota_proxy.policy.principals import Principal, UserPermissions
from robota_proxy.policy.refusals import REFUSAL_REASONS, AuthRefused
from robota_proxy.policy.static_keys import StaticKeyAuthenticator, key_id
from robota_proxy.scope import AUTHORIZED, CHAT_REQUEST, PRINCIPAL, REQUEST_ID


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


MISSING = "no credential: send 'Authorization: Bearer <key>'"
MALFORMED = (
    "malformed Authorization header: expected 'Bearer <key>', one key or token without spaces"
)
UNKNOWN = "unknown or revoked key"


def test_refusals_are_contract_errors() -> None:
    client = TestClient(app_with(["alpha-key"]))
    for headers, message in (
        ({}, MISSING),
        ({"Authorization": "Bearer nope"}, UNKNOWN),
        ({"Authorization": "alpha-key"}, MALFORMED),
    ):
        response = client.get("/whoami", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthenticated"
        assert response.json()["error"]["message"] == message
        assert response.json()["error"]["requestId"].startswith("req_")


def test_malformed_headers_say_so() -> None:
    client = TestClient(app_with(["alpha-key"]))
    for header in (
        "Basic alpha-key",
        "Token alpha-key",
        "Bearer",
        "Bearer    ",
        "Bearer alpha key",
        "Bearer alpha-key extra",
        "alpha-key",
        "",
    ):
        response = client.get("/whoami", headers={"Authorization": header})
        assert response.status_code == 401, header
        assert response.json()["error"]["message"] == MALFORMED, header
    # The scheme is case-insensitive and surrounding spaces are forgiven.
    assert client.get("/whoami", headers={"Authorization": "bearer  alpha-key "}).status_code == 200


def test_parse_bearer_refuses_what_no_key_can_contain() -> None:
    assert parse_bearer("Bearer rk_abc.DEF-~!") == "rk_abc.DEF-~!"
    for header, detail in (
        ("Bearer a\x01b", "spaces or control characters in the credential"),
        ("Bearer caf\xe9", "spaces or control characters in the credential"),
        ("Bearer a\tb", "spaces or control characters in the credential"),
        ("Basic x", "not the Bearer scheme"),
        ("Bearer ", "empty credential"),
    ):
        with pytest.raises(AuthRefused) as refused:
            parse_bearer(header)
        assert (refused.value.reason, refused.value.detail) == ("malformed", detail), header
    with pytest.raises(AuthRefused) as missing:
        parse_bearer(None)
    assert missing.value.reason == "missing"
    # The admin API's helper: None for anything that is not one bearer credential.
    scope = {"type": "http", "headers": [(b"authorization", b"Bearer a b")]}
    assert bearer_credential(scope) is None
    assert bearer_credential({"type": "http", "headers": [(b"authorization", b"Bearer k")]}) == "k"


#: Every client-facing message, written out: the table in README's "Keys and identities".
EXPECTED_MESSAGES = {
    "missing": MISSING,
    "malformed": MALFORMED,
    "malformed_key": (
        "malformed key: a proxy key is rk_<8-character id>_<43-character secret>; "
        "check that it was copied whole"
    ),
    "unknown_key": UNKNOWN,
    "wrong_secret": UNKNOWN,
    "revoked": UNKNOWN,
    "user_revoked": UNKNOWN,
    "expired": "the key has expired: ask for a new one",
    "token_expired": "the token has expired (exp is in the past): get a fresh one",
    "token_malformed": "invalid token: not a decodable JWT",
    "token_alg": "invalid token: its alg is not one this proxy accepts",
    "token_signature": "invalid token: the signature does not verify",
    "token_exp": "invalid token: exp is required and must be a number",
    "token_nbf": "invalid token: not valid yet (nbf is in the future)",
    "token_iat": "invalid token: iat is in the future or not a number",
    "token_aud": "invalid token: aud is missing or not this proxy's audience",
    "token_iss": "invalid token: iss is missing or not the trusted issuer",
    "token_sub": "invalid token: sub (the user) is missing, empty or longer than 200 characters",
    "token_jti": "invalid token: jti must be a string",
    "token_permissions": "invalid token: the permissions claim is not valid",
    "token_user_revoked": "the user's access has been revoked: ask the operator",
    "token_invalid": "invalid token",
}


class RefusesBy:
    """Refuses every credential with the reason the credential names."""

    async def authenticate(self, credential: str) -> Principal | None:
        raise AuthRefused(credential, "id-" + credential)  # type: ignore[arg-type]


def test_each_refusal_reason_has_its_exact_message() -> None:
    assert set(EXPECTED_MESSAGES) == REFUSAL_REASONS == set(REFUSAL_MESSAGES)
    client = TestClient(
        Starlette(
            routes=[Route("/whoami", whoami)],
            middleware=[Middleware(AuthMiddleware, authenticator=RefusesBy())],
        )
    )
    for reason, message in EXPECTED_MESSAGES.items():
        if reason in ("missing", "malformed"):
            continue  # the header's, covered above
        response = client.get("/whoami", headers={"Authorization": f"Bearer {reason}"})
        assert response.status_code == 401
        error = response.json()["error"]
        assert (error["code"], error["message"]) == ("unauthenticated", message), reason


def test_the_log_names_reason_and_public_id_never_the_credential(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "rk_abcd1234_" + "s" * 43

    class Revoked:
        async def authenticate(self, credential: str) -> Principal | None:
            raise AuthRefused("revoked", "abcd1234")

    client = TestClient(
        Starlette(
            routes=[Route("/whoami", whoami)],
            middleware=[Middleware(AuthMiddleware, authenticator=Revoked())],
        ),
        client=("10.1.2.3", 999),
    )
    with caplog.at_level(logging.INFO, logger="robota_proxy.auth"):
        responses = [
            client.get("/whoami", headers={"Authorization": f"Bearer {secret}"}),
            client.get("/whoami", headers={"Authorization": secret}),
            client.get("/whoami"),
        ]
    assert responses[0].json()["error"]["message"] == UNKNOWN
    revoked, malformed, missing = (r.json()["error"]["requestId"] for r in responses)
    lines = [record.getMessage() for record in caplog.records if record.name == "robota_proxy.auth"]
    prefix = "authentication refused: reason="
    assert lines == [
        f"{prefix}revoked id=abcd1234 client=10.1.2.3 path=/whoami request={revoked}",
        f"{prefix}malformed id=- client=10.1.2.3 path=/whoami request={malformed} "
        "detail='not the Bearer scheme'",
        f"{prefix}missing id=- client=10.1.2.3 path=/whoami request={missing}",
    ]
    assert all(secret not in line and "sss" not in line for line in lines)


def test_an_unknown_static_key_is_logged_by_its_fingerprint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = TestClient(app_with(["alpha-key"]))
    with caplog.at_level(logging.INFO, logger="robota_proxy.auth"):
        response = client.get("/whoami", headers={"Authorization": "Bearer old-rotated-key"})
    assert response.json()["error"]["message"] == UNKNOWN
    (line,) = [r.getMessage() for r in caplog.records if r.name == "robota_proxy.auth"]
    assert f"reason=unknown_key id={key_id('old-rotated-key')} " in line
    assert "old-rotated-key" not in line


def test_exempt_paths_and_no_keys() -> None:
    client = TestClient(app_with([]))
    assert client.get("/health").status_code == 200
    assert client.get("/whoami", headers={"Authorization": "Bearer x"}).status_code == 401


# --- authorization of chat bodies and the failed-authentication limit -----------------------


class OneUser:
    def __init__(self, key: str, permissions: UserPermissions) -> None:
        self.key, self.permissions = key, permissions

    async def authenticate(self, credential: str) -> Principal | None:
        if credential == self.key:
            return Principal("alice", "k1", self.permissions)
        return None


async def chat_echo(request: Request) -> JSONResponse:
    body = request.scope[CHAT_REQUEST]  # parsed by the middleware, not read again
    return JSONResponse({"model": body.model})


def chat_app(permissions: UserPermissions, **options: object) -> Starlette:
    return Starlette(
        routes=[
            Route("/ai/chat", chat_echo, methods=["POST"]),
            Route("/ai/chat/stream", chat_echo, methods=["POST"]),
            Route("/whoami", whoami),
        ],
        middleware=[
            Middleware(
                AuthMiddleware,
                authenticator=OneUser("good", permissions),
                chat_paths={"/ai/chat": "chat", "/ai/chat/stream": "stream"},
                max_body_bytes=2000,
                **options,
            )
        ],
    )


BODY = {
    "provider": "openai",
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "x"}],
}
GOOD = {"Authorization": "Bearer good"}


def test_allowed_chat_reaches_the_route_with_the_parsed_body() -> None:
    client = TestClient(chat_app(UserPermissions(allowed_providers=("openai",))))
    response = client.post("/ai/chat", json=BODY, headers=GOOD)
    assert response.status_code == 200 and response.json() == {"model": "gpt-4o-mini"}


def test_forbidden_calls_name_what_was_denied() -> None:
    cases = [
        (UserPermissions(allowed_providers=("anthropic",)), "/ai/chat", BODY, "provider 'openai'"),
        (UserPermissions(allowed_models=("gpt-4o",)), "/ai/chat", BODY, "model 'gpt-4o-mini'"),
        (UserPermissions(allowed_features=("chat",)), "/ai/chat/stream", BODY, "'stream'"),
        (
            UserPermissions(allowed_features=("chat", "stream")),
            "/ai/chat",
            {**BODY, "tools": [{"name": "t", "description": "d", "parameters": {}}]},
            "'tools'",
        ),
    ]
    for permissions, path, body, words in cases:
        response = TestClient(chat_app(permissions)).post(path, json=body, headers=GOOD)
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "forbidden"
        assert words in response.json()["error"]["message"]


def test_bad_bodies_are_contract_errors_from_the_middleware() -> None:
    client = TestClient(chat_app(UserPermissions()))
    bad = client.post("/ai/chat", content=b"{nope", headers=GOOD)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
    big = client.post("/ai/chat", content=b"x" * 5000, headers=GOOD)
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
    # Not a chat path: no body parsing at all.
    assert client.get("/whoami", headers=GOOD).status_code == 200


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> float:
    """Stops the wall clock the failure limiter's moving window reads, so the wait it
    reports (what is left of the one-minute window) is exactly known."""
    now = 1_700_000_000.0
    monkeypatch.setattr(time, "time", lambda: now)
    return now


LIMITED = "too many failed authentications from this address; try again later"


@pytest.mark.usefixtures("frozen_clock")
def test_failed_authentications_are_limited_per_address() -> None:
    limiter = AuthFailureLimiter(MemoryStorage(), per_minute=3)
    client = TestClient(chat_app(UserPermissions(), failure_limiter=limiter))
    for _ in range(3):
        assert client.get("/whoami", headers={"Authorization": "Bearer bad"}).status_code == 401
    blocked = client.get("/whoami", headers=GOOD)  # even the right key: checked before
    assert blocked.status_code == 429
    error = blocked.json()["error"]
    assert (error["code"], error["message"]) == ("rate_limited", LIMITED)
    # The clock stood still: the whole one-minute window is left to wait.
    assert (blocked.headers["Retry-After"], error["retryAfter"]) == ("60", 60.0)
    # Another address is not affected.
    other = TestClient(
        chat_app(UserPermissions(), failure_limiter=limiter), client=("10.0.0.9", 1234)
    )
    assert other.get("/whoami", headers=GOOD).status_code == 200


def test_malformed_headers_count_and_missing_ones_do_not() -> None:
    limiter = AuthFailureLimiter(MemoryStorage(), per_minute=2)
    client = TestClient(chat_app(UserPermissions(), failure_limiter=limiter))
    for _ in range(5):  # no credential: not an attempt at one
        response = client.get("/whoami")
        assert response.json()["error"]["message"] == MISSING
    assert client.get("/whoami", headers=GOOD).status_code == 200
    for _ in range(2):
        response = client.get("/whoami", headers={"Authorization": "Basic good"})
        assert response.json()["error"]["message"] == MALFORMED
    assert client.get("/whoami", headers=GOOD).status_code == 429
    # Blocked or not, a request without a credential is told what is missing.
    assert client.get("/whoami").json()["error"]["message"] == MISSING


def test_an_authenticator_returning_none_is_an_unknown_key() -> None:
    client = TestClient(chat_app(UserPermissions()))
    response = client.get("/whoami", headers={"Authorization": "Bearer bad"})
    assert response.json()["error"]["message"] == UNKNOWN


def test_successes_do_not_count() -> None:
    limiter = AuthFailureLimiter(MemoryStorage(), per_minute=2)
    client = TestClient(chat_app(UserPermissions(), failure_limiter=limiter))
    for _ in range(10):
        assert client.get("/whoami", headers=GOOD).status_code == 200


def test_websocket_scopes_pass_through_with_a_principal() -> None:
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(websocket.scope[PRINCIPAL].user)
        await websocket.close()

    app = Starlette(
        routes=[WebSocketRoute("/ai/ws", ws)],
        middleware=[Middleware(AuthMiddleware, authenticator=OneUser("good", UserPermissions()))],
    )
    with TestClient(app).websocket_connect("/ai/ws", headers=GOOD) as session:
        assert session.receive_text() == "alice"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def ws_app(**options: object) -> Starlette:
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    return Starlette(
        routes=[WebSocketRoute("/ai/ws", ws)],
        middleware=[
            Middleware(AuthMiddleware, authenticator=OneUser("good", UserPermissions()), **options)
        ],
    )


@pytest.mark.usefixtures("frozen_clock")
def test_refused_websockets_get_the_http_error_when_the_server_allows_it() -> None:
    limiter = AuthFailureLimiter(MemoryStorage(), per_minute=1)
    client = TestClient(ws_app(failure_limiter=limiter))
    refusals = []
    for headers in ({"Authorization": "Bearer bad"}, GOOD):
        with (
            pytest.raises(WebSocketDenialResponse) as denied,
            client.websocket_connect("/ai/ws", headers=headers),
        ):
            pass
        refusals.append(denied.value)
    unauthenticated, limited = refusals
    assert unauthenticated.status_code == 401
    error = unauthenticated.json()["error"]
    assert error["code"] == "unauthenticated"
    assert unauthenticated.headers["X-Request-ID"] == error["requestId"]
    assert limited.status_code == 429
    assert (limited.json()["error"]["code"], limited.json()["error"]["message"]) == (
        "rate_limited",
        LIMITED,
    )
    assert limited.headers["Retry-After"] == "60"


@pytest.mark.anyio
async def test_refused_websockets_are_closed_when_the_server_has_no_denial_response() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        raise AssertionError("a refusal reads nothing")

    middleware = AuthMiddleware(ws_app(), OneUser("good", UserPermissions()))
    scope = {"type": "websocket", "path": "/ai/ws", "headers": [], "extensions": {}}
    await middleware(scope, receive, send)
    assert [(m["type"], m["code"]) for m in sent] == [("websocket.close", 4401)]


# --- what the issue found untested --------------------------------------------------------


def test_a_credential_with_spaces_is_malformed_and_the_log_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key pasted with a space in it is told "malformed", never "unknown key", and the log
    names the spaces rather than a wrong scheme."""
    client = TestClient(app_with(["alpha-key"]), client=("10.1.2.3", 999))
    with caplog.at_level(logging.INFO, logger="robota_proxy.auth"):
        response = client.get("/whoami", headers={"Authorization": "Bearer alpha key"})
    assert (response.status_code, response.json()["error"]["message"]) == (401, MALFORMED)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "robota_proxy.auth"]
    request_id = response.json()["error"]["requestId"]
    assert line == (
        "authentication refused: reason=malformed id=- client=10.1.2.3 path=/whoami "
        f"request={request_id} detail='spaces or control characters in the credential'"
    )
    with pytest.raises(AuthRefused) as refused:
        parse_bearer("  Bearer alpha  key ")
    assert (refused.value.reason, refused.value.detail) == (
        "malformed",
        "spaces or control characters in the credential",
    )


class Recorder:
    """The ASGI messages a middleware sends, for scopes no TestClient builds."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.reached = False

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        self.reached = True

    async def send(self, message: Message) -> None:
        self.sent.append(message)


async def no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


@pytest.mark.anyio
async def test_a_request_without_client_address_or_headers_is_logged_as_unknown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ASGI servers may leave out ``client`` (a Unix socket) and even ``headers``: such a
    request is refused as having no credential, and logged with client=unknown."""
    recorder = Recorder()
    middleware = AuthMiddleware(recorder.app, StaticKeyAuthenticator(["alpha-key"]))
    scope = {"type": "http", "method": "GET", "path": "/whoami", "query_string": b""}
    with caplog.at_level(logging.INFO, logger="robota_proxy.auth"):
        await middleware(scope, no_body, recorder.send)
    assert recorder.reached is False
    start, body = recorder.sent
    assert start["status"] == 401
    assert json.loads(body["body"])["error"]["message"] == MISSING
    (line,) = [r.getMessage() for r in caplog.records if r.name == "robota_proxy.auth"]
    assert line == (
        "authentication refused: reason=missing id=- client=unknown path=/whoami "
        f"request={scope[REQUEST_ID]}"
    )


@pytest.mark.anyio
async def test_lifespan_and_other_scopes_pass_through() -> None:
    recorder = Recorder()
    middleware = AuthMiddleware(recorder.app, StaticKeyAuthenticator(["alpha-key"]))
    await middleware({"type": "lifespan"}, no_body, recorder.send)
    assert (recorder.reached, recorder.sent) == (True, [])


def test_x_api_key_is_a_credential_when_there_is_no_authorization_header() -> None:
    """Anthropic clients send ``x-api-key: <key>``; the Authorization header wins when both
    are sent, and of several x-api-key headers the first counts."""
    client = TestClient(app_with(["alpha-key"]))
    whoami_alpha = {"user": key_id("alpha-key"), "keyId": key_id("alpha-key")}
    response = client.get("/whoami", headers={"x-api-key": "alpha-key"})
    assert (response.status_code, response.json()) == (200, whoami_alpha)
    cases: list[tuple[list[tuple[str, str]], int]] = [
        ([("x-api-key", "wrong"), ("Authorization", "Bearer alpha-key")], 200),
        ([("x-api-key", "alpha-key"), ("Authorization", "Bearer wrong")], 401),
        ([("x-api-key", "alpha-key"), ("x-api-key", "wrong")], 200),
        ([("x-api-key", "wrong"), ("x-api-key", "alpha-key")], 401),
    ]
    for headers, status in cases:
        assert client.get("/whoami", headers=headers).status_code == status, headers
    spaced = client.get("/whoami", headers={"x-api-key": "alpha key"})
    assert spaced.json()["error"]["message"] == MALFORMED
    # The admin API's helper reads it the same way.
    assert bearer_credential({"type": "http", "headers": [(b"x-api-key", b"k")]}) == "k"


def test_an_anonymous_principal_is_used_without_asking_for_a_credential() -> None:
    """Authentication turned off on purpose: every request is the configured principal,
    whatever it sends."""
    app = Starlette(
        routes=[Route("/whoami", whoami)],
        middleware=[
            Middleware(
                AuthMiddleware,
                authenticator=StaticKeyAuthenticator([]),
                anonymous=Principal("anonymous", None),
            )
        ],
    )
    client = TestClient(app)
    for headers in ({}, {"Authorization": "Bearer anything"}):
        response = client.get("/whoami", headers=headers)
        assert (response.status_code, response.json()) == (
            200,
            {"user": "anonymous", "keyId": None},
        )


def test_exempt_prefixes_need_no_credential() -> None:
    """The admin API has its own guard: the middleware lets everything below it through."""
    app = Starlette(
        routes=[Route("/admin/keys", lambda r: JSONResponse({"admin": True})), Route("/x", whoami)],
        middleware=[
            Middleware(
                AuthMiddleware,
                authenticator=StaticKeyAuthenticator(["k"]),
                exempt_prefixes=("/admin/",),
            )
        ],
    )
    client = TestClient(app)
    assert client.get("/admin/keys").json() == {"admin": True}
    assert client.get("/x").json()["error"]["message"] == MISSING


async def echo_body(request: Request) -> JSONResponse:
    return JSONResponse({"body": (await request.body()).decode()})


def test_only_posts_to_chat_paths_are_parsed_as_chat_bodies() -> None:
    """Any other POST reaches its route with its body untouched, however un-chat-like."""
    app = Starlette(
        routes=[Route("/upload", echo_body, methods=["POST"])],
        middleware=[
            Middleware(
                AuthMiddleware,
                authenticator=OneUser("good", UserPermissions(allowed_providers=())),
                chat_paths={"/ai/chat": "chat"},
            )
        ],
    )
    response = TestClient(app).post("/upload", content=b"not json", headers=GOOD)
    assert (response.status_code, response.json()) == (200, {"body": "not json"})


def test_a_hosts_own_chat_path_keeps_the_feature_it_was_given() -> None:
    """Only the proxy's compatible surfaces decide the feature from the body; a host's path
    mapped to ``stream`` is a stream call whatever its body says."""
    app = Starlette(
        routes=[Route("/my/stream", chat_echo, methods=["POST"])],
        middleware=[
            Middleware(
                AuthMiddleware,
                authenticator=OneUser("good", UserPermissions(allowed_features=("chat",))),
                chat_paths={"/my/stream": "stream"},
            )
        ],
    )
    response = TestClient(app).post("/my/stream", json=BODY, headers=GOOD)
    assert (response.status_code, response.json()["error"]["message"]) == (
        403,
        "feature 'stream' is not allowed for this key",
    )


def test_an_openai_body_asking_to_stream_is_a_stream_call() -> None:
    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[Route("/v1/chat/completions", ok, methods=["POST"])],
        middleware=[
            Middleware(
                AuthMiddleware,
                authenticator=OneUser("good", UserPermissions(allowed_features=("chat",))),
                chat_paths=CHAT_PATHS,
            )
        ],
    )
    client = TestClient(app)
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    assert client.post("/v1/chat/completions", json=body, headers=GOOD).json() == {"ok": True}
    streamed = client.post("/v1/chat/completions", json={**body, "stream": True}, headers=GOOD)
    assert streamed.status_code == 403
    assert streamed.json()["error"]["message"] == "feature 'stream' is not allowed for this key"


def test_chat_bodies_are_limited_to_4_mib_by_default() -> None:
    app = Starlette(
        routes=[Route("/ai/chat", chat_echo, methods=["POST"])],
        middleware=[
            Middleware(
                AuthMiddleware,
                authenticator=OneUser("good", UserPermissions()),
                chat_paths={"/ai/chat": "chat"},
            )
        ],
    )
    big = TestClient(app).post("/ai/chat", content=b" " * (4 * 1024 * 1024 + 1), headers=GOOD)
    assert (big.status_code, big.json()["error"]["message"]) == (
        413,
        "request body is larger than the limit of 4194304 bytes",
    )


def test_an_authorized_chat_call_is_noted_for_the_upstream_layer() -> None:
    """What the middleware authorized (principal, the parsed request object, the feature) is
    noted under ``AUTHORIZED``, so that ``Resilience`` does not authorize it again; nothing
    is noted for calls it did not authorize."""
    seen: dict[str, Any] = {}

    async def note(request: Request) -> JSONResponse:
        scope = request.scope
        noted = scope.get(AUTHORIZED)
        seen[request.url.path] = noted
        if noted is not None:
            assert noted.principal is scope[PRINCIPAL]
            assert noted.request is scope[CHAT_REQUEST]
        return JSONResponse({"feature": noted.feature if noted is not None else None})

    app = Starlette(
        routes=[
            Route(path, note, methods=["GET", "POST"])
            for path in ("/ai/chat", "/ai/chat/stream", "/v1/chat/completions", "/other")
        ],
        middleware=[
            Middleware(
                AuthMiddleware,
                authenticator=OneUser("good", UserPermissions()),
                chat_paths={**CHAT_PATHS, "/ai/chat": "chat", "/ai/chat/stream": "stream"},
            )
        ],
    )
    client = TestClient(app)
    openai = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    for method, path, body, feature in (
        ("POST", "/ai/chat", BODY, "chat"),
        ("POST", "/ai/chat/stream", BODY, "stream"),
        ("POST", "/v1/chat/completions", {**openai, "stream": True}, "stream"),
        ("POST", "/v1/chat/completions", openai, "chat"),
        ("GET", "/ai/chat", None, None),
        ("POST", "/other", BODY, None),
    ):
        response = client.request(method, path, json=body, headers=GOOD)
        assert response.json() == {"feature": feature}, (method, path)
