"""Every kind of bad input gets the contract's JSON error with a 4xx status: never a 500,
never a hang. Sent with raw httpx, because the client refuses most of these itself."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import USER_KEY, ProxyProcess

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

AUTH = {"Authorization": f"Bearer {USER_KEY}"}
GOOD: dict[str, Any] = {
    "provider": "mock",
    "model": "mock-1",
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.fixture
async def http(proxy: ProxyProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
        yield client


def assert_error(response: httpx.Response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert error["requestId"] == response.headers["x-request-id"]
    for word in words:
        assert word in error["message"]


def with_(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


CASES: list[tuple[str, Any, int, str, tuple[str, ...]]] = [
    ("malformed json", b'{"provider": "mock", ', 400, "invalid_request", ("not valid JSON",)),
    ("not an object", b"[1, 2]", 400, "invalid_request", ()),
    ("empty body", b"", 400, "invalid_request", ("empty",)),
    ("wrong type", with_(messages="hello"), 400, "invalid_request", ("messages",)),
    (
        "wrong option type",
        with_(options={"temperature": "hot"}),
        400,
        "invalid_request",
        ("temperature",),
    ),
    (
        "unknown role",
        with_(messages=[{"role": "robot", "content": "x"}]),
        400,
        "invalid_request",
        ("role",),
    ),
    (
        "tool message without toolCallId",
        with_(messages=[{"role": "tool", "content": "42"}]),
        400,
        "invalid_request",
        ("toolCallId",),
    ),
    ("empty messages", with_(messages=[]), 400, "invalid_request", ("messages",)),
    (
        "missing model",
        {"provider": "mock", "messages": GOOD["messages"]},
        400,
        "invalid_request",
        ("model",),
    ),
    ("unknown provider", with_(provider="nope"), 404, "not_found", ("nope", "mock")),
    ("unknown model", with_(model="mock-99"), 404, "not_found", ("mock-99", "mock-1")),
    (
        "tool choice naming no tool",
        with_(options={"toolChoice": "ghost"}),
        400,
        "invalid_request",
        ("ghost",),
    ),
]


@pytest.mark.parametrize("path", ["/ai/chat", "/ai/chat/stream"])
@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_bad_chat_body(
    http: httpx.AsyncClient,
    path: str,
    body: Any,
    status: int,
    code: str,
    words: tuple[str, ...],
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await http.post(path, content=content, headers=AUTH)
    assert_error(response, status, code, *words)


async def test_good_body_is_answered(http: httpx.AsyncClient) -> None:
    response = await http.post("/ai/chat", json=GOOD, headers=AUTH)
    assert response.status_code == 200
    assert response.json()["content"] == "You said: hi"


async def test_body_over_the_limit_by_content_length(http: httpx.AsyncClient) -> None:
    big = with_(messages=[{"role": "user", "content": "x" * (65 * 1024)}])
    response = await http.post("/ai/chat", json=big, headers=AUTH)
    assert_error(response, 413, "payload_too_large", str(64 * 1024))


def test_body_over_the_limit_is_refused_while_reading(proxy: ProxyProcess) -> None:
    """A chunked body with no Content-Length: once a little more than the limit has arrived,
    the proxy answers 413 although the body has not ended, so it never holds more than the
    limit in memory whatever the client goes on sending."""
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /ai/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {USER_KEY}\r\n".encode()
            + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 16 * 1024
        for _ in range(6):  # 96 KiB against a 64 KiB limit; the terminating chunk never comes
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        answer = _read_response(sock)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large"
    assert b'"code":"payload_too_large"' in rest


def _read_response(sock: socket.socket) -> bytes:
    """Head and Content-Length body of one response, however TCP splits them."""
    data = b""
    while b"\r\n\r\n" not in data:
        received = sock.recv(65536)
        assert received, f"connection closed after {data!r}"
        data += received
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        received = sock.recv(65536)
        assert received, f"connection closed after {len(body)} of {length} body bytes"
        body += received
    return head + b"\r\n\r\n" + body


async def test_missing_and_wrong_keys(http: httpx.AsyncClient) -> None:
    assert_error(await http.post("/ai/chat", json=GOOD), 401, "unauthenticated")
    wrong = {"Authorization": "Bearer not-a-key"}
    assert_error(await http.post("/ai/chat", json=GOOD, headers=wrong), 401, "unauthenticated")
    basic = {"Authorization": f"Basic {USER_KEY}"}
    assert_error(await http.post("/ai/chat", json=GOOD, headers=basic), 401, "unauthenticated")
    assert_error(await http.get("/ai/models"), 401, "unauthenticated")


async def test_unknown_route_and_method(http: httpx.AsyncClient) -> None:
    assert_error(await http.get("/ai/nothing", headers=AUTH), 404, "not_found")
    response = await http.get("/ai/chat", headers=AUTH)
    assert_error(response, 405, "invalid_request", "GET")


async def test_health_needs_no_key_and_models_lists_providers(http: httpx.AsyncClient) -> None:
    assert (await http.get("/health")).json() == {"status": "ok"}
    models = (await http.get("/ai/models", headers=AUTH)).json()["providers"]
    assert models["mock"] == {"models": ["mock-1"]}
    assert set(models) == {"mock", "openai", "anthropic", "google"}


async def test_caller_request_id_is_kept_when_plain(http: httpx.AsyncClient) -> None:
    response = await http.post("/ai/chat", json=GOOD, headers={**AUTH, "X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert response.json()["metadata"]["requestId"] == "abc-123"
    response = await http.post(
        "/ai/chat", json=GOOD, headers={**AUTH, "X-Request-ID": "bad id\twith spaces"}
    )
    assert response.headers["x-request-id"].startswith("req_")


def test_half_sent_body_does_not_hang_the_proxy(proxy: ProxyProcess) -> None:
    """A client that announces a body and goes away mid-way must not wedge anything."""
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /ai/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {USER_KEY}\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"provider": "mo'
        )
    response = httpx.post(f"{proxy.url}/ai/chat", json=GOOD, headers=AUTH, timeout=5)
    assert response.status_code == 200
