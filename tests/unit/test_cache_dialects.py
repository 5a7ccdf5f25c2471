"""The response cache on ``/v1/chat/completions`` and ``/v1/messages`` alone: the raw key, the
stored entry, what counts as a finished stream, and CacheMiddleware in front of stand-in
routes (Starlette's TestClient; tests/e2e/test_cache_surfaces_e2e.py has the real SDKs)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from robota_client.messages import AssistantMessage, Usage
from robota_proxy import CacheMiddleware
from robota_proxy.call_record import CallRecord, call_record
from robota_proxy.chat_body import chat_request
from robota_proxy.dialects import (
    ANTHROPIC,
    OPENAI,
    OPENAI_EMBEDDINGS,
    ROBOTA,
    ParsedChat,
    parse_for_path,
)
from robota_proxy.middleware.cache import CachedAnswer
from robota_proxy.middleware.cache_raw import (
    RawAnswer,
    cacheable_dialect,
    raw_cache_key,
    stream_complete,
)
from robota_proxy.policy.principals import Principal
from robota_proxy.scope import CALL, PARSED_CHAT, PRINCIPAL

# --- the key ---------------------------------------------------------------------------------


def openai_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0,
        **extra,
    }


def key(body: dict[str, Any], scope: str = "user:a", headers: dict[str, str] | None = None) -> str:
    path = "/v1/messages" if "max_tokens" in body and "system" in body else "/v1/chat/completions"
    parsed = parse_for_path(path, json.dumps(body).encode(), None)
    dialect = ANTHROPIC if path == "/v1/messages" else OPENAI
    return raw_cache_key(scope, dialect, parsed, parsed.request, headers or {})


def test_the_raw_key_ignores_only_the_stream_field_and_top_level_order() -> None:
    base = key(openai_body())
    assert len(base) == 64
    assert key(openai_body(stream=False)) == base
    assert key(dict(reversed(list(openai_body().items())))) == base
    # Inside a message the order sent is kept (cheaper to hash): a reordered one only misses.
    swapped = openai_body(messages=[{"content": "hi", "role": "user"}])
    assert key(swapped) != base


def test_the_raw_key_changes_with_tenant_stream_model_and_passthrough_fields() -> None:
    base = key(openai_body())
    variants = [
        key(openai_body(), scope="user:b"),
        key(openai_body(), scope="shared"),
        key(openai_body(stream=True)),
        key(openai_body(model="openai/gpt-4o-mini")),  # same target, echoed name differs
        key(openai_body(model="gpt-4o")),
        key(openai_body(seed=7)),
        key(openai_body(max_tokens=5)),
        key(openai_body(stream=True, stream_options={"include_usage": True})),
        key(
            openai_body(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "hi"},
                            {"type": "image_url", "image_url": {"url": "data:x"}},
                        ],
                    }
                ]
            )
        ),
    ]
    assert base not in variants and len(set(variants)) == len(variants)


def test_the_anthropic_key_holds_its_headers_and_never_equals_openais() -> None:
    body = {
        "model": "claude-3-5-haiku-latest",
        "system": "be brief",
        "max_tokens": 20,
        "temperature": 0,
        "messages": [{"role": "user", "content": "hi"}],
    }
    base = key(body)
    assert key(body, headers={"anthropic-version": "2023-06-01"}) != base
    assert key(body, headers={"anthropic-beta": "x"}) != key(body, headers={"anthropic-beta": "y"})
    assert key(body, headers={"x-other": "1"}) == base
    parsed = parse_for_path("/v1/messages", json.dumps(body).encode(), None)
    as_openai = raw_cache_key("user:a", OPENAI, parsed, parsed.request, {})
    assert as_openai != base


def test_only_the_two_chat_dialects_are_kept_raw() -> None:
    assert [cacheable_dialect(d) for d in (OPENAI, ANTHROPIC, OPENAI_EMBEDDINGS, ROBOTA)] == [
        True,
        True,
        False,
        False,
    ]


# --- what is stored ----------------------------------------------------------------------------


def test_a_stream_is_complete_only_when_its_last_frame_is_the_dialects_end() -> None:
    chunk = b'data: {"choices":[]}\n\n'
    assert stream_complete(OPENAI, chunk + b"data: [DONE]\n\n")
    assert stream_complete(OPENAI, b"data: [DONE]\n\n")
    assert not stream_complete(OPENAI, chunk)
    assert not stream_complete(OPENAI, chunk + b'data: {"error":{"code":"upstream_error"}}\n\n')
    assert not stream_complete(OPENAI, chunk + b"data: [DONE]\n")  # cut inside the last frame
    stop = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    delta = b'event: message_delta\ndata: {"type":"message_delta"}\n\n'
    assert stream_complete(ANTHROPIC, delta + stop)
    assert not stream_complete(ANTHROPIC, delta)
    assert not stream_complete(ANTHROPIC, delta + stop + b"event: error\ndata: {}\n\n")
    assert not stream_complete(OPENAI, delta + stop)  # another dialect's end
    assert not stream_complete(ROBOTA, b"data: [DONE]\n\n")


def test_a_raw_entry_round_trips_its_bytes_and_drops_the_cost() -> None:
    usage = Usage(
        prompt_tokens=3, completion_tokens=2, total_tokens=5, cached_prompt_tokens=1, cost=0.5
    )
    body = b'{"id":"x",\n"a":"\\u00e9"}\n'
    entry = RawAnswer("application/json", body, "openai", "gpt-4o-mini", usage)
    back = RawAnswer.from_bytes(entry.to_bytes())
    assert back == RawAnswer(
        "application/json",
        body,
        "openai",
        "gpt-4o-mini",
        Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5, cached_prompt_tokens=1),
    )
    none = RawAnswer.from_bytes(RawAnswer("text/event-stream", b"", "m", "m", None).to_bytes())
    assert none == RawAnswer("text/event-stream", b"", "m", "m", None)
    # Entries of the other kind, or another release, are unreadable, not misread.
    assert RawAnswer.from_bytes(CachedAnswer(AssistantMessage(content="x")).to_bytes()) is None
    assert RawAnswer.from_bytes(b'{"v":2,"kind":"raw"}\nbody') is None
    assert RawAnswer.from_bytes(b"no newline") is None
    assert CachedAnswer.from_bytes(entry.to_bytes()) is None


# --- the middleware in front of stand-in routes -------------------------------------------------

calls: list[dict[str, Any]] = []
records: list[CallRecord] = []
USAGE = Usage(prompt_tokens=4, completion_tokens=6, total_tokens=10)
ANSWER = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[]}'


async def completions(http: Request) -> Response:
    """Stands in for the OpenAI route: JSON, or a stream whose end depends on the prompt."""
    body = await chat_request(http, 1 << 20)
    parsed = http.scope[PARSED_CHAT]
    assert isinstance(parsed, ParsedChat) and parsed.raw is not None
    calls.append(parsed.raw)
    record = call_record(http.scope, "req")
    text = body.messages[0].content
    if text == "fail":
        record.status = "upstream_error"
        return Response(b'{"error":{}}', 502, media_type="application/json")
    record.upstream_called = True
    record.settle_usage("openai", "gpt-4o-mini", USAGE)
    if not parsed.streamed:
        return Response(ANSWER, media_type="application/json")

    async def frames() -> Any:
        yield b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
        if text == "cut":
            record.status = "upstream_error"
            yield b'data: {"error":{"code":"upstream_error"}}\n\n'
        else:
            yield b"data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")


async def embeddings(http: Request) -> Response:
    await chat_request(http, 1 << 20)
    calls.append({})
    return Response(b'{"data":[]}', media_type="application/json")


class Principals:
    """Puts the principal named by the X-User header in the scope, as auth would, and a
    call record, as metering would."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            user = dict(scope["headers"]).get(b"x-user", b"a").decode()
            scope[PRINCIPAL] = Principal(user)
            scope[CALL] = CallRecord("req")
            scope[CALL].pricer = lambda *_: Decimal("0.25")
            records.append(scope[CALL])
        await self.app(scope, receive, send)


@pytest.fixture
def client() -> TestClient:
    calls.clear()
    records.clear()
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
        ],
        middleware=[Middleware(Principals), Middleware(CacheMiddleware)],
    )
    return TestClient(app)


def post(client: TestClient, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/v1/chat/completions", json=body, headers=headers)


def test_a_plain_hit_replays_the_same_bytes_and_is_metered_cached_at_cost_0(
    client: TestClient,
) -> None:
    first, second = post(client, openai_body()), post(client, openai_body())
    assert [first.headers["x-robota-cache"], second.headers["x-robota-cache"]] == ["MISS", "HIT"]
    assert first.content == second.content == ANSWER
    assert second.headers["content-type"] == "application/json"
    assert second.headers["content-length"] == str(len(ANSWER))
    assert len(calls) == 1
    miss, hit = records
    assert (miss.cached, miss.cost, miss.usage) == (False, Decimal("0.25"), USAGE)
    assert (hit.cached, hit.cost, hit.usage, hit.upstream_called) == (
        True,
        Decimal(0),
        USAGE,
        False,
    )
    assert (hit.provider, hit.model, hit.streamed) == ("openai", "gpt-4o-mini", False)


def test_a_stream_hit_replays_the_whole_byte_sequence(client: TestClient) -> None:
    streamed = openai_body(stream=True)
    first, second = post(client, streamed), post(client, streamed)
    assert [first.headers["x-robota-cache"], second.headers["x-robota-cache"]] == ["MISS", "HIT"]
    expected = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: [DONE]\n\n'
    assert first.content == second.content == expected
    assert second.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert second.headers["x-accel-buffering"] == "no"
    assert records[-1].streamed and records[-1].cached
    # The plain call is another key: a stream is not answered from JSON or the other way.
    assert post(client, openai_body()).headers["x-robota-cache"] == "MISS"
    assert len(calls) == 2


def test_tenants_directives_errors_and_cut_streams(client: TestClient) -> None:
    post(client, openai_body(), **{"X-User": "a"})
    assert post(client, openai_body(), **{"X-User": "b"}).headers["x-robota-cache"] == "MISS"
    assert len(calls) == 2
    fresh = openai_body(seed=1)
    assert post(client, fresh, **{"Cache-Control": "no-store"}).headers["x-robota-cache"] == "MISS"
    assert post(client, fresh).headers["x-robota-cache"] == "MISS"  # nothing was stored
    assert post(client, fresh, **{"Cache-Control": "no-cache"}).headers["x-robota-cache"] == "MISS"
    assert post(client, fresh).headers["x-robota-cache"] == "HIT"
    assert len(calls) == 5
    failing = openai_body(messages=[{"role": "user", "content": "fail"}])
    cut = openai_body(stream=True, messages=[{"role": "user", "content": "cut"}])
    for _ in range(2):
        assert post(client, failing).status_code == 502
        assert post(client, cut).headers["x-robota-cache"] == "MISS"
    assert len(calls) == 9


def test_what_is_not_cacheable_passes_without_a_header(client: TestClient) -> None:
    for body in (
        openai_body(temperature=0.5),
        {k: v for k, v in openai_body().items() if k != "temperature"},
    ):
        assert "x-robota-cache" not in post(client, body).headers
    embed = {"model": "text-embedding-3-small", "input": "hi"}
    for _ in range(2):
        assert "x-robota-cache" not in client.post("/v1/embeddings", json=embed).headers
    assert len(calls) == 4
