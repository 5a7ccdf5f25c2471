"""Resumable streams over real sockets: a TCP relay cuts the connection mid-answer and the
client resumes by itself. The caller sees the whole text exactly once, the vendor saw one
call, and the ledger has one row; with Redis the resume lands on another proxy process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from robota_client import RemoteAIProvider
from robota_proxy.testing import FakeVendors, Fault, Reply
from tests.e2e.conftest import ProxyProcess, ledger_rows, start_proxy, stop_proxy, vendor_env
from tests.e2e.relay import CuttingRelay

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

OWNER_KEY = "resume-owner-key-0123456789abcdef"
OTHER_KEY = "resume-other-key-0123456789abcdef"
WORDS = " ".join(f"w{i}" for i in range(300))


def proxy_env(fake: FakeVendors, database: Path, **extra: str) -> dict[str, str]:
    return {
        **vendor_env(fake),
        "ROBOTA_API_KEYS": f"{OWNER_KEY},{OTHER_KEY}",
        "ROBOTA_DATABASE_URL": f"sqlite:///{database}",
        # Generous, so a loaded test machine reconnects within it; the default grace and
        # the cancellation after it are measured in test_cancellation_e2e.py.
        "ROBOTA_RESUME_GRACE_SECONDS": "3",
        **extra,
    }


@pytest.fixture(scope="module")
def memory_proxy(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Path]]:
    home = tmp_path_factory.mktemp("resume-memory")
    database = home / "robota.db"
    running = start_proxy(proxy_env(fake_server, database), home / "proxy.log")
    yield running, database
    stop_proxy(running)


@pytest.fixture(scope="module")
def redis_proxies(
    fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[tuple[ProxyProcess, ProxyProcess, Path]]:
    home = tmp_path_factory.mktemp("resume-redis")
    database = home / "robota.db"
    env = proxy_env(fake_server, database, ROBOTA_REDIS_URL=redis_url)
    first = start_proxy(env, home / "a.log")
    try:
        second = start_proxy(env, home / "b.log")
    except BaseException:
        stop_proxy(first)
        raise
    yield first, second, database
    stop_proxy(second)
    stop_proxy(first)


def address(proxy: ProxyProcess) -> tuple[str, int]:
    url = httpx.URL(proxy.url)
    assert url.port is not None
    return "127.0.0.1", url.port


def vendor_calls(fake: FakeVendors, marker: str) -> int:
    return sum(1 for request in fake.requests if marker in request.last_text)


async def stream_through(relay: CuttingRelay, marker: str) -> tuple[str, int, str | None]:
    """The text the caller saw, how many resumes it took, and the request id."""
    async with RemoteAIProvider(relay.url, OWNER_KEY, "openai", "gpt-4o-mini") as ai:
        stream = ai.stream([{"role": "user", "content": marker}])
        seen = [event.content async for event in stream if hasattr(event, "content")]
        return "".join(seen), stream._events.resumes, stream.request_id  # type: ignore[union-attr]


async def test_a_cut_stream_is_resumed_exactly_once(
    memory_proxy: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, database = memory_proxy
    fake.script(Reply(text=WORDS, fault=Fault(chunk_latency=0.004)), match="resume memory")
    async with CuttingRelay([address(proxy)], cut_after=3000) as relay:
        text, resumes, request_id = await stream_through(relay, "resume memory")
    assert relay.cuts == 1 and relay.connections == 2
    assert resumes == 1
    assert text == WORDS, "the caller must see the whole text exactly once"
    assert vendor_calls(fake, "resume memory") == 1
    assert fake.completed_streams == 1 and fake.aborted_streams == 0
    assert request_id is not None
    rows = ledger_rows(database, request_id)
    assert len(rows) == 1
    assert rows[0]["status"] == "ok" and rows[0]["completion_tokens"] == 300
    calls = vendor_calls(fake, "resume memory")
    once = text == WORDS
    print(f"\n[resume memory] text once: {once}, vendor calls: {calls}, ledger rows: {len(rows)}")


async def test_cross_process_resume_through_redis(
    redis_proxies: tuple[ProxyProcess, ProxyProcess, Path], fake: FakeVendors
) -> None:
    first, second, database = redis_proxies
    fake.script(Reply(text=WORDS, fault=Fault(chunk_latency=0.004)), match="resume redis")
    # The first connection goes to process A, the resumed one to process B.
    async with CuttingRelay([address(first), address(second)], cut_after=3000) as relay:
        text, resumes, request_id = await stream_through(relay, "resume redis")
    assert relay.cuts == 1 and relay.connections == 2
    assert resumes == 1
    assert text == WORDS
    calls = vendor_calls(fake, "resume redis")
    assert calls == 1
    assert fake.completed_streams == 1
    assert request_id is not None
    rows = ledger_rows(database, request_id)
    assert len(rows) == 1
    assert "GET /ai/chat/stream/s_" in second.log_once_it_has("GET /ai/chat/stream/s_")
    assert "GET /ai/chat/stream/s_" not in first.log()
    print(
        f"\n[resume redis, resumed on the other process] text once: {text == WORDS}, "
        f"vendor calls: {calls}, ledger rows: {len(rows)}"
    )


def test_only_the_owner_can_resume(
    memory_proxy: tuple[ProxyProcess, Path], fake: FakeVendors
) -> None:
    proxy, _ = memory_proxy
    fake.script(Reply(text="one two three four"), match="whose stream")
    body = {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "whose stream"}],
    }
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        answer = http.post(
            "/ai/chat/stream", json=body, headers={"Authorization": f"Bearer {OWNER_KEY}"}
        )
        stream_id = answer.headers["x-robota-stream-id"]
        ids = [line[4:] for line in answer.text.splitlines() if line.startswith("id: ")]
        assert ids[0] == f"{stream_id}:1" and len(ids) >= 4
        path = f"/ai/chat/stream/{stream_id}"
        stranger = http.get(
            path, headers={"Authorization": f"Bearer {OTHER_KEY}", "Last-Event-ID": ids[1]}
        )
        assert stranger.status_code == 404
        assert stranger.json()["error"]["code"] == "not_found"
        owner = http.get(
            path, headers={"Authorization": f"Bearer {OWNER_KEY}", "Last-Event-ID": ids[1]}
        )
        assert owner.status_code == 200
        resumed = [line[4:] for line in owner.text.splitlines() if line.startswith("id: ")]
        assert resumed == ids[2:], "a resume starts right after Last-Event-ID"
        foreign = http.get(
            path,
            headers={"Authorization": f"Bearer {OWNER_KEY}", "Last-Event-ID": "s_x:1"},
        )
        assert foreign.status_code == 400
    assert vendor_calls(fake, "whose stream") == 1
