"""SIGTERM drains: one of two workers behind a shared port is terminated in the middle of a
load of chats and streams, and nobody who was being served notices.

``robota-proxy serve --workers 2`` on a SQLite file, vendors faked on 127.0.0.1 (chats take
0.4 s, streams 24 chunks 0.08 s apart, about 2 s), eight client threads sending for 20 s.
Five seconds in, one worker gets SIGTERM. Then:

* every request the proxy accepted was answered in full (0 failed): a 200 with the expected
  text, a stream ending with its ``done`` event;
* every accepted request has exactly one settled ledger row (0 lost, 0 extra, none left
  ``in_flight``), matched by the ``X-Request-ID`` each request carries;
* the terminated worker finished calls it had started before the signal (its ledger rows say
  so), exited with status 0, and the supervisor started a replacement; the other worker
  served all along.

What "accepted" means. The draining worker closes its copy of the listening socket (the
other worker goes on accepting from the shared one, so no new connection is refused) and the
keep-alive connections it holds that are idle. A client that sent a request on such a
connection at the moment the worker closed it gets "server disconnected" before any answer:
the worker never read that request. Those are counted apart (``unanswered``), proven unread
by the ledger (no row bears their id: metering writes a row before any vendor call), and
retried, as any HTTP client retries a request on a keep-alive connection the server closed;
they are not failures. A request that got an answer, or left a ledger row, is accepted.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from robota_proxy.testing import FakeVendors, Fault, Reply
from tests.e2e.conftest import USER_KEY, free_port, vendor_env

pytestmark = pytest.mark.e2e

LOAD_SECONDS = 20.0
SIGTERM_AFTER = 5.0
THREADS = 8
STREAM_WORDS = [f"w{i}" for i in range(24)]
CHAT_TEXT = "a chat answer that took a while"
AUTH = {"Authorization": f"Bearer {USER_KEY}"}


def body(text: str) -> dict[str, object]:
    return {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
    }


@dataclass
class Served:
    """A proxy run by the real CLI with two workers, in its own process group."""

    url: str
    log_path: Path
    database: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> set[int]:
        """The supervisor's live worker processes (``multiprocessing`` spawned children)."""
        found = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            parent, state = int(fields[1]), fields[0]
            if (
                parent == self.process.pid
                and state != "Z"
                and b"spawn_main" in cmdline
                and b"resource_tracker" not in cmdline
            ):
                found.add(int(entry.name))
        return found


@pytest.fixture
def served(fake: FakeVendors, tmp_path: Path) -> Iterator[Served]:
    fake.script(Reply(text=" ".join(STREAM_WORDS), fault=Fault(chunk_latency=0.08)), match="s-")
    fake.script(Reply(text=CHAT_TEXT, fault=Fault(latency=0.4)), match="c-")
    database = tmp_path / "drain.db"
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ROBOTA_") and not key.endswith("_API_KEY")
    }
    env.update(vendor_env(fake))
    env.update(
        {
            "ROBOTA_API_KEYS": USER_KEY,
            "ROBOTA_DATABASE_URL": f"sqlite:///{database}",
            "ROBOTA_DRAIN_SECONDS": "15",
            "ROBOTA_UPSTREAM_RETRIES": "0",
            "ROBOTA_CACHE_ENABLED": "false",
            "ROBOTA_LOG_LEVEL": "info",
        }
    )
    log_path = tmp_path / "proxy.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "robota_proxy", "serve", "--workers", "2", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Served(f"http://127.0.0.1:{port}", log_path, database, process)
    try:
        deadline = time.monotonic() + 60
        while running.log().count("Application startup complete.") < 2:
            assert process.poll() is None, running.log()
            assert time.monotonic() < deadline, running.log()
            time.sleep(0.1)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@dataclass
class Outcomes:
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: request id -> "ok" or what went wrong with an accepted request.
    answered: dict[str, str] = field(default_factory=dict)
    #: ids of requests that got no answer at all (see the module's docstring).
    unanswered: list[str] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)

    def record(self, request_id: str, verdict: str | None, kind: str) -> None:
        with self.lock:
            if verdict is None:
                self.unanswered.append(request_id)
            else:
                self.answered[request_id] = verdict
                self.kinds[kind] += 1


def one_request(client: httpx.Client, request_id: str, stream: bool) -> str | None:
    """``ok``, what was wrong with the answer, or None when no answer began at all."""
    headers = {**AUTH, "X-Request-ID": request_id}
    try:
        if not stream:
            answer = client.post("/ai/chat", json=body(f"c-{request_id}"), headers=headers)
            if answer.status_code != 200:
                return f"status {answer.status_code}: {answer.text[:200]}"
            content = answer.json()["content"]
            return "ok" if content == CHAT_TEXT else f"content {content!r}"
        with client.stream(
            "POST", "/ai/chat/stream", json=body(f"s-{request_id}"), headers=headers
        ) as answer:
            if answer.status_code != 200:
                return f"status {answer.status_code}"
            try:
                events = [
                    line.removeprefix("event: ")
                    for line in answer.iter_lines()
                    if line.startswith("event: ")
                ]
            except httpx.TransportError as exc:
                return f"stream cut: {type(exc).__name__}"
        deltas = events.count("delta")
        if events[-1:] != ["done"] or deltas != len(STREAM_WORDS) or "error" in events:
            return f"events {Counter(events)}"
        return "ok"
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
        return None


def load(url: str, outcomes: Outcomes, until: float, thread: int) -> None:
    number = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.monotonic() < until:
            number += 1
            stream = number % 2 == 0
            request_id = f"drain-{thread}-{number}"
            verdict = one_request(client, request_id, stream)
            outcomes.record(request_id, verdict, "stream" if stream else "chat")
            if verdict is None:  # unread: retried at once, under a new id
                number += 1
                retry_id = f"drain-{thread}-{number}-retry"
                retry = one_request(client, retry_id, stream)
                outcomes.record(retry_id, retry, "stream" if stream else "chat")


def settled_rows(database: Path) -> list[sqlite3.Row]:
    with sqlite3.connect(database) as conn:
        conn.row_factory = sqlite3.Row
        return list(
            conn.execute(
                "SELECT correlation_id, status, lease_owner, created_at, latency_ms "
                "FROM usage_ledger ORDER BY id"
            )
        )


def wait_for_worker_exit(served: Served, pid: int, timeout: float) -> str:
    needle = f"worker [{pid}] exited with status"
    deadline = time.monotonic() + timeout
    while needle not in served.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    return served.log()


def test_sigterm_to_one_of_two_workers_loses_nothing(served: Served) -> None:
    workers = served.workers()
    assert len(workers) == 2, served.log()
    victim = min(workers)
    outcomes = Outcomes()
    started = time.monotonic()
    until = started + LOAD_SECONDS
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(load, served.url, outcomes, until, n) for n in range(THREADS)]
        time.sleep(SIGTERM_AFTER)
        signalled_at = datetime.now(UTC)
        os.kill(victim, signal.SIGTERM)
        for future in futures:
            future.result()
    log = wait_for_worker_exit(served, victim, timeout=20)

    # 0 failed among the accepted; the unanswered were never read (no ledger row).
    failed = {rid: verdict for rid, verdict in outcomes.answered.items() if verdict != "ok"}
    assert failed == {}, log
    deadline = time.monotonic() + 10
    rows = settled_rows(served.database)
    while any(row["status"] == "in_flight" for row in rows):
        assert time.monotonic() < deadline, "rows left in flight"
        time.sleep(0.1)
        rows = settled_rows(served.database)
    per_request = Counter(row["correlation_id"] for row in rows)
    assert {row["status"] for row in rows} == {"ok"}
    assert set(per_request.values()) == {1}
    assert set(per_request) == set(outcomes.answered)
    assert not set(outcomes.unanswered) & set(per_request)

    # The terminated worker finished calls it had begun before the signal, exited 0, and
    # was replaced; the proxy served throughout and still does.
    drained = [
        row
        for row in rows
        if f":{victim}:" in row["lease_owner"]
        and (begun := datetime.fromisoformat(row["created_at"]).replace(tzinfo=UTC))
        < signalled_at
        < begun + timedelta(milliseconds=row["latency_ms"])
    ]
    assert drained, "the terminated worker had nothing in flight at the signal"
    assert f"worker [{victim}] exited with status 0; a replacement was started" in log
    assert "timeout graceful shutdown exceeded" not in log
    deadline = time.monotonic() + 10
    while len(now := served.workers()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(now) == 2 and len(now - workers) == 1 and victim not in now
    after = httpx.post(f"{served.url}/ai/chat", json=body("c-after"), headers=AUTH, timeout=10)
    assert (after.status_code, after.json()["content"]) == (200, CHAT_TEXT)
    print(
        f"\ndrain: sent {len(outcomes.answered) + len(outcomes.unanswered)}, accepted "
        f"{len(outcomes.answered)} ({dict(outcomes.kinds)}), failed {len(failed)}, unanswered "
        f"and retried {len(outcomes.unanswered)}, ledger rows {len(rows)}, finished by the "
        f"draining worker after its SIGTERM {len(drained)}, worker exit status 0"
    )

    # The supervisor's own SIGTERM drains both workers and exits 0.
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=30) == 0
