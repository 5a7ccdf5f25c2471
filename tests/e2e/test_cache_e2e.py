"""The response cache in real proxy processes in front of the fake vendors: hits and misses,
who may read what, streams replayed from the cache, metering of hits, and Redis shared by two
processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from robota_proxy.policy.static_keys import key_id
from robota_proxy.testing import FakeVendors, Reply, ToolCallSpec
from tests.e2e.conftest import (
    USER_KEY,
    ProxyProcess,
    ledger_rows,
    start_proxy,
    stop_proxy,
    vendor_env,
)

pytestmark = [pytest.mark.e2e]

OTHER_KEY = "second-user-key-for-cache-abcdef"


@pytest.fixture(scope="module")
def cached(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Path]]:
    home = tmp_path_factory.mktemp("cached")
    database = home / "robota.db"
    env = {
        **vendor_env(fake_server),
        "ROBOTA_API_KEYS": f"{USER_KEY},{OTHER_KEY}",
        "ROBOTA_DATABASE_URL": f"sqlite:///{database}",
    }
    running = start_proxy(env, home / "proxy.log")
    yield running, database
    stop_proxy(running)


@pytest.fixture(scope="module")
def redis_pair(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    home = tmp_path_factory.mktemp("cached_redis")
    env = {
        **vendor_env(fake_server),
        "ROBOTA_API_KEYS": USER_KEY,
        "ROBOTA_REDIS_URL": redis_url,
        "ROBOTA_DATABASE_URL": f"sqlite:///{home / 'robota.db'}",
    }
    first = start_proxy(env, home / "first.log")
    try:
        second = start_proxy(env, home / "second.log")
    except BaseException:
        stop_proxy(first)
        raise
    yield first, second
    stop_proxy(first)
    stop_proxy(second)


def body(text: str, *, model: str = "gpt-4o-mini", **options: Any) -> dict[str, Any]:
    return {
        "provider": "openai",
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "options": {"temperature": 0, **options},
    }


def post(
    proxy: ProxyProcess, payload: dict[str, Any], key: str = USER_KEY, **headers: str
) -> httpx.Response:
    return httpx.post(
        f"{proxy.url}/ai/chat",
        json=payload,
        headers={"Authorization": f"Bearer {key}", **headers},
        timeout=10,
    )


def stream(
    proxy: ProxyProcess, payload: dict[str, Any], **headers: str
) -> tuple[str, list[tuple[str, Any]]]:
    """The X-Robota-Cache header and the (event, data) pairs of one streamed call, read with
    httpx-sse as the Robota client does (which sends ``Cache-Control: no-store``)."""
    with (
        httpx.Client(timeout=10) as client,
        connect_sse(
            client,
            "POST",
            f"{proxy.url}/ai/chat/stream",
            json=payload,
            headers={"Authorization": f"Bearer {USER_KEY}", **headers},
        ) as source,
    ):
        assert source.response.status_code == 200
        events = [(item.event, item.json()) for item in source.iter_sse()]
        return source.response.headers.get("x-robota-cache", ""), events


def vendor_calls(fake: FakeVendors, marker: str) -> int:
    return sum(1 for request in fake.requests if marker in request.last_text)


def marker() -> str:
    return f"q-{uuid.uuid4().hex[:8]}"


def test_two_identical_deterministic_requests_reach_the_vendor_once(
    cached: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = cached
    text = marker()
    first, second = post(proxy, body(text)), post(proxy, body(text))
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.headers["x-robota-cache"] == "MISS"
    assert second.headers["x-robota-cache"] == "HIT"
    assert vendor_calls(fake, text) == 1
    assert second.json()["content"] == first.json()["content"] == f"Echo: {text}"
    assert second.json()["metadata"]["cached"] is True
    assert first.json()["metadata"].get("cached") in (None, False)
    assert second.json()["metadata"]["requestId"] == second.headers["x-request-id"]
    assert second.json()["usage"]["totalTokens"] == first.json()["usage"]["totalTokens"]
    assert second.json()["usage"]["cost"] == 0
    # Metering: the hit is its own ledger row, marked cached, costing nothing.
    rows = ledger_rows(database, second.headers["x-request-id"])
    assert [(row["cached"], row["cost_pico"]) for row in rows] == [(1, 0)]
    assert rows[0]["provider"] == "openai" and rows[0]["model"] == "gpt-4o-mini"


def test_non_deterministic_requests_are_cached_only_when_asked(
    cached: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, _ = cached
    text = marker()
    warm = body(text, temperature=0.7)
    answers = [post(proxy, warm), post(proxy, warm)]
    assert [a.headers.get("x-robota-cache") for a in answers] == [None, None]
    assert vendor_calls(fake, text) == 2
    opted = body(text, temperature=0.7, cache=True)
    answers = [post(proxy, opted), post(proxy, opted)]
    assert [a.headers["x-robota-cache"] for a in answers] == ["MISS", "HIT"]
    assert vendor_calls(fake, text) == 3


def test_no_cache_skips_the_read_and_no_store_the_write(
    cached: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, _ = cached
    text = marker()
    not_stored = post(proxy, body(text), **{"Cache-Control": "no-store"})
    assert not_stored.headers["x-robota-cache"] == "MISS"
    assert post(proxy, body(text)).headers["x-robota-cache"] == "MISS"  # nothing was stored
    assert post(proxy, body(text)).headers["x-robota-cache"] == "HIT"
    fresh = post(proxy, body(text), **{"Cache-Control": "no-cache"})
    assert fresh.headers["x-robota-cache"] == "MISS"
    assert vendor_calls(fake, text) == 3
    # Streams: SSE clients send Cache-Control themselves, so the proxy's own header says it.
    assert stream(proxy, body(text))[0] == "HIT"
    assert stream(proxy, body(text), **{"X-Robota-Cache-Control": "no-cache"})[0] == "MISS"
    assert vendor_calls(fake, text) == 4


def test_one_user_never_reads_another_users_answer(
    cached: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = cached
    text = marker()
    fake.script(Reply(text="for A only"), match=text, times=1)
    mine = post(proxy, body(text), USER_KEY)
    theirs = post(proxy, body(text), OTHER_KEY)
    assert mine.json()["content"] == "for A only"
    assert theirs.headers["x-robota-cache"] == "MISS"
    assert theirs.json()["content"] == f"Echo: {text}"
    assert vendor_calls(fake, text) == 2
    rows = ledger_rows(database, theirs.headers["x-request-id"])
    assert rows and rows[0]["user_id"] == key_id(OTHER_KEY) and rows[0]["cached"] == 0


def test_a_stream_is_replayed_from_the_cache_with_the_same_events(
    cached: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, _ = cached
    text = marker()
    fake.script(
        Reply(text="one two three", tool_calls=[ToolCallSpec("lookup", {"q": "x"})]), match=text
    )
    payload = body(text, model="gpt-4o")
    payload["tools"] = [{"name": "lookup", "parameters": {"type": "object"}}]
    miss, live = stream(proxy, payload)
    hit, replayed = stream(proxy, payload)
    assert (miss, hit) == ("MISS", "HIT")
    assert vendor_calls(fake, text) == 1
    names = [name for name, _ in live]
    assert names[-2:] == ["usage", "done"] and "delta" in names and "tool_call" in names
    assert [name for name, _ in replayed] == names
    # Same content event for event; only the provenance of the final message differs.
    for (name, was), (_, now) in zip(live[:-2], replayed[:-2], strict=True):
        assert now == was, name
    assert replayed[-2][1]["usage"]["totalTokens"] == live[-2][1]["usage"]["totalTokens"]
    assert replayed[-2][1]["usage"]["cost"] == 0
    done_live, done_hit = live[-1][1], replayed[-1][1]
    assert done_hit["message"]["content"] == done_live["message"]["content"]
    assert done_hit["message"]["toolCalls"] == done_live["message"]["toolCalls"]
    assert done_hit["message"]["metadata"]["cached"] is True
    # The plain route is answered from what the stream stored.
    plain = post(proxy, payload)
    assert plain.headers["x-robota-cache"] == "HIT"
    assert plain.json()["toolCalls"] == done_live["message"]["toolCalls"]
    assert vendor_calls(fake, text) == 1


def test_a_plain_answer_is_replayed_as_a_stream(
    cached: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, _ = cached
    text = marker()
    plain = post(proxy, body(text))
    header, events = stream(proxy, body(text))
    assert header == "HIT" and vendor_calls(fake, text) == 1
    assert [name for name, _ in events] == ["delta", "usage", "done"]
    assert events[0][1]["content"] == plain.json()["content"]


def test_a_vendor_error_is_not_cached(cached: tuple[ProxyProcess, Path], fake: FakeVendors) -> None:
    from robota_proxy.testing import Fault

    proxy, _ = cached
    text = marker()
    fake.script(Fault(status=400, message="nope"), match=text, times=1)
    assert post(proxy, body(text)).status_code == 400
    ok = post(proxy, body(text))
    assert ok.status_code == 200 and ok.headers["x-robota-cache"] == "MISS"
    assert vendor_calls(fake, text) == 2


def test_redis_cache_is_shared_by_two_processes(
    redis_pair: tuple[ProxyProcess, ProxyProcess], fake: FakeVendors
) -> None:
    first, second = redis_pair
    text = marker()
    stored = post(first, body(text))
    served = post(second, body(text))
    assert stored.headers["x-robota-cache"] == "MISS"
    assert served.headers["x-robota-cache"] == "HIT"
    assert served.json()["content"] == stored.json()["content"]
    assert vendor_calls(fake, text) == 1
