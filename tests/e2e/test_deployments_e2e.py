"""Deployments and shared circuit breakers end to end (issue 11, parts 5 and 6).

Two fake vendor servers, A and B, are two OpenAI deployments: A is the provider's own settings
(deployment ``openai``), B is added by ``ROBOTA_DEPLOYMENTS`` (``org-b``, weight 3, and
``org-r``, a deployment of one model with its own rpm limit). Two real proxy processes share
one Redis (this run's prefix): ``weighted`` balances by weight, ``least_busy`` by calls in
flight; both have circuit breakers on, so the breaker test uses them as two processes that
must agree. Every call carries a marker of its own in its prompt, so each fake's recorded
requests tell which deployment a call reached, and the ledger row of the call must name it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from robota_proxy.testing import FakeVendors, Fault, RecordedRequest, Reply
from tests.e2e.conftest import (
    USER_KEY,
    ProxyProcess,
    ledger_rows,
    start_proxy,
    stop_proxy,
    vendor_env,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

KEY_A = "sk-test-deployment-a-0123456789abcdef"
KEY_B = "sk-test-deployment-b-fedcba9876543210"
ADMIN_KEY = "admin-key-for-deployment-tests-0123456789"
#: Served by both ``openai`` (A) and ``org-b`` (B).
MODEL = "gpt-4o-mini"
#: Served by ``openai`` (A) and ``org-r`` (B, rpm 2, weight 1000) only.
RPM_MODEL = "gpt-rpm-e2e"
RPM = 2
#: A target only the breaker test uses; it falls back to ``FALLBACK``.
BREAKER_MODEL = "gpt-breaker-e2e"
BREAKER_TARGET = f"openai/{BREAKER_MODEL}"
FALLBACK = "anthropic/claude-3-5-haiku-latest"
BREAKER_COOLDOWN = 3.0


@dataclass
class Proxy:
    process: ProxyProcess
    database: Path

    @property
    def url(self) -> str:
        return self.process.url


@dataclass
class Answer:
    status: int
    request_id: str
    text: str | None
    model: str | None
    elapsed: float


@pytest.fixture(scope="module")
def fake_a() -> Iterator[FakeVendors]:
    with FakeVendors(api_key=KEY_A) as fake:
        yield fake


@pytest.fixture(scope="module")
def fake_b() -> Iterator[FakeVendors]:
    with FakeVendors(api_key=KEY_B) as fake:
        yield fake


@pytest.fixture(autouse=True)
def _clean_fakes(fake_a: FakeVendors, fake_b: FakeVendors) -> Iterator[None]:
    fake_a.reset()
    fake_b.reset()
    yield
    fake_a.reset()
    fake_b.reset()


def _env(
    fake_a: FakeVendors,
    fake_b: FakeVendors,
    home: Path,
    redis_url: str,
    redis_prefix: str,
    deployments: list[dict[str, Any]],
    **extra: str,
) -> dict[str, str]:
    return {
        # OpenAI (deployment "openai") and the Anthropic fallback on A.
        **vendor_env(fake_a, KEY_A),
        "ROBOTA_DEPLOYMENTS": json.dumps(deployments),
        "ROBOTA_API_KEYS": USER_KEY,
        "ROBOTA_ADMIN_KEY": ADMIN_KEY,
        "ROBOTA_DATABASE_URL": f"sqlite:///{home / 'robota.db'}",
        "ROBOTA_CACHE_ENABLED": "false",
        "ROBOTA_REDIS_URL": redis_url,
        "ROBOTA_REDIS_PREFIX": redis_prefix,
        "ROBOTA_FALLBACKS": json.dumps({BREAKER_TARGET: [FALLBACK]}),
        "ROBOTA_BREAKER_ENABLED": "true",
        "ROBOTA_BREAKER_FAILURES": "3",
        "ROBOTA_BREAKER_COOLDOWN_SECONDS": str(BREAKER_COOLDOWN),
        **extra,
    }


def _org_b(fake_b: FakeVendors) -> dict[str, Any]:
    return {
        "name": "org-b",
        "provider": "openai",
        "api_key": KEY_B,
        "base_url": fake_b.openai_base_url,
        "weight": 3,
        "models": [MODEL, BREAKER_MODEL],
    }


@pytest.fixture(scope="module")
def weighted(
    fake_a: FakeVendors,
    fake_b: FakeVendors,
    redis_url: str,
    redis_prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Proxy]:
    home = tmp_path_factory.mktemp("deployments_weighted")
    org_r = {
        "name": "org-r",
        "provider": "openai",
        "api_key": KEY_B,
        "base_url": fake_b.openai_base_url,
        "weight": 1000,
        "rpm": RPM,
        "models": [RPM_MODEL],
    }
    env = _env(
        fake_a,
        fake_b,
        home,
        redis_url,
        redis_prefix,
        [_org_b(fake_b), org_r],
        ROBOTA_BALANCING="weighted",
        ROBOTA_UPSTREAM_RETRIES="1",
    )
    running = start_proxy(env, home / "proxy.log", startup_timeout=120)
    yield Proxy(running, home / "robota.db")
    stop_proxy(running)


@pytest.fixture(scope="module")
def least_busy(
    fake_a: FakeVendors,
    fake_b: FakeVendors,
    redis_url: str,
    redis_prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Proxy]:
    home = tmp_path_factory.mktemp("deployments_least_busy")
    env = _env(
        fake_a,
        fake_b,
        home,
        redis_url,
        redis_prefix,
        [_org_b(fake_b)],
        ROBOTA_BALANCING="least-busy",
        ROBOTA_UPSTREAM_RETRIES="0",
    )
    running = start_proxy(env, home / "proxy.log", startup_timeout=120)
    yield Proxy(running, home / "robota.db")
    stop_proxy(running)


# --- helpers ----------------------------------------------------------------------------------


def marker(label: str) -> str:
    return f"dep-{label}-{uuid.uuid4().hex[:10]}"


async def chat(client: httpx.AsyncClient, proxy: Proxy, model: str, text: str) -> Answer:
    """One non-streamed call on ``/v1/chat/completions``."""
    started = time.monotonic()
    response = await client.post(
        f"{proxy.url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": text}]},
        headers={"Authorization": f"Bearer {USER_KEY}"},
        timeout=60,
    )
    elapsed = time.monotonic() - started
    body = response.json()
    ok = response.status_code == 200
    return Answer(
        response.status_code,
        response.headers["x-request-id"],
        body["choices"][0]["message"]["content"] if ok else None,
        body.get("model") if ok else None,
        elapsed,
    )


def received(fake: FakeVendors, text: str, model: str | None = None) -> list[RecordedRequest]:
    """The OpenAI requests ``fake`` received whose prompt holds ``text`` (and for ``model``)."""
    return [
        request
        for request in fake.requests
        if request.vendor == "openai"
        and text in request.last_text
        and (model is None or request.model == model)
    ]


def fallback_calls(fake_a: FakeVendors, text: str) -> list[RecordedRequest]:
    return [
        request
        for request in fake_a.requests
        if request.vendor == "anthropic" and text in request.last_text
    ]


def row(proxy: Proxy, request_id: str) -> dict[str, Any]:
    rows = ledger_rows(proxy.database, request_id)
    assert len(rows) == 1, rows
    return rows[0]


async def breaker_states(client: httpx.AsyncClient, proxy: Proxy) -> dict[str, str]:
    answer = await client.get(
        f"{proxy.url}/admin/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert answer.status_code == 200, answer.text
    states: dict[str, str] = answer.json()["circuitBreakers"]
    return states


# --- 1. weighted ------------------------------------------------------------------------------


async def test_weighted_splits_by_weight_and_the_ledger_names_the_deployment(
    weighted: Proxy, fake_a: FakeVendors, fake_b: FakeVendors
) -> None:
    """Weights 1 (``openai``, A) and 3 (``org-b``, B): 40 calls split about 10:30, each call
    reaches exactly one fake (with that deployment's own key), and its ledger row names it."""
    base = marker("weighted")
    texts = [f"{base} call-{n:02d}" for n in range(40)]
    async with httpx.AsyncClient() as client:
        answers = [await chat(client, weighted, f"openai/{MODEL}", text) for text in texts]
    to_b = 0
    for text, answer in zip(texts, answers, strict=True):
        assert answer.status == 200, answer
        assert answer.text == f"Echo: {text}"
        at_a, at_b = received(fake_a, text), received(fake_b, text)
        assert (len(at_a), len(at_b)) in ((1, 0), (0, 1)), (text, at_a, at_b)
        expected = "org-b" if at_b else "openai"
        to_b += bool(at_b)
        for request in at_a:
            assert request.headers["authorization"] == f"Bearer {KEY_A}"
        for request in at_b:
            assert request.headers["authorization"] == f"Bearer {KEY_B}"
        got = row(weighted, answer.request_id)
        assert (got["status"], got["provider"], got["model"], got["deployment"]) == (
            "ok",
            "openai",
            MODEL,
            expected,
        )
    # Expected 30 (binomial, sd 2.7): 20..38 fails an even split (20) or B taking all (40).
    assert 20 <= to_b <= 38, to_b


# --- 3. per-deployment rpm --------------------------------------------------------------------


async def test_a_deployment_gets_no_more_than_its_rpm(
    weighted: Proxy, fake_a: FakeVendors, fake_b: FakeVendors
) -> None:
    """``org-r`` (weight 1000, rpm 2) takes exactly 2 of 6 quick calls; ``openai`` the rest."""
    base = marker("rpm")
    texts = [f"{base} call-{n}" for n in range(6)]
    async with httpx.AsyncClient() as client:
        answers = [await chat(client, weighted, f"openai/{RPM_MODEL}", text) for text in texts]
    assert [answer.status for answer in answers] == [200] * 6
    assert len(received(fake_b, base)) == RPM
    assert len(received(fake_a, base)) == 6 - RPM
    deployments = [row(weighted, answer.request_id)["deployment"] for answer in answers]
    assert sorted(deployments) == ["openai"] * (6 - RPM) + ["org-r"] * RPM
    for text, deployment in zip(texts, deployments, strict=True):
        fake = fake_b if deployment == "org-r" else fake_a
        assert len(received(fake, text)) == 1, (text, deployment)


# --- 2. a 429 cools its deployment down --------------------------------------------------------


async def test_a_429_cools_its_deployment_down_and_the_retry_moves_on_at_once(
    weighted: Proxy, fake_a: FakeVendors, fake_b: FakeVendors
) -> None:
    """B answers 429 with ``Retry-After: 30``: the call that hit it is served by ``openai``
    at once (no 30 s wait, one retry), and B gets nothing more while it cools down."""
    fake_b.script(Fault(status=429, retry_after=30), vendor="openai")
    base = marker("cool")
    answers: list[Answer] = []
    texts: list[str] = []
    hit_at: int | None = None
    async with httpx.AsyncClient() as client:
        # Weighted 1:3, so B is hit within 12 calls but for a chance of 0.25**12.
        for n in range(20):
            text = f"{base} call-{n:02d}"
            texts.append(text)
            answers.append(await chat(client, weighted, f"openai/{MODEL}", text))
            if hit_at is None and received(fake_b, text):
                hit_at = n
            if hit_at is None and n == 11:
                break
            if hit_at is not None and n >= hit_at + 8:
                break
    assert hit_at is not None, "no call reached B in 12"
    assert len(answers) == hit_at + 9
    for text, answer in zip(texts, answers, strict=True):
        assert (answer.status, answer.text) == (200, f"Echo: {text}"), (text, answer)
        assert answer.elapsed < 3.0, (text, answer.elapsed)
        assert len(received(fake_a, text)) == 1, text
        got = row(weighted, answer.request_id)
        assert (got["status"], got["deployment"]) == ("ok", "openai"), (text, got)
    # B saw the one call that hit it, and none of the eight after it.
    assert [request.last_text for request in received(fake_b, base)] == [texts[hit_at]]


# --- 4. least-busy ----------------------------------------------------------------------------

SLOW_WORDS = "one two three four five six seven eight nine ten"


async def _open_slow_stream(
    client: httpx.AsyncClient,
    proxy: Proxy,
    text: str,
    first: anyio.Event,
    result: dict[str, Any],
) -> None:
    """A streamed call on ``/v1``: sets ``first`` once its first text arrived, then reads it
    to the end and leaves the text and request id in ``result``."""
    body = {
        "model": f"openai/{MODEL}",
        "messages": [{"role": "user", "content": text}],
        "stream": True,
    }
    async with client.stream(
        "POST",
        f"{proxy.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {USER_KEY}"},
        timeout=60,
    ) as response:
        result["status"] = response.status_code
        result["request_id"] = response.headers["x-request-id"]
        pieces: list[str] = []
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            for choice in chunk.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    pieces.append(content)
                    first.set()
        result["text"] = "".join(pieces)
    first.set()


async def _quick_calls_while_busy(
    proxy: Proxy, fake_a: FakeVendors, fake_b: FakeVendors, base: str, fault: Fault
) -> None:
    """One slow stream is open; the next four calls must go to the other deployment."""
    slow = f"{base} slow"
    reply = Reply(text=SLOW_WORDS, fault=fault)
    fake_a.script(reply, match=slow, vendor="openai")
    fake_b.script(reply, match=slow, vendor="openai")
    first = anyio.Event()
    result: dict[str, Any] = {}
    async with httpx.AsyncClient() as client, anyio.create_task_group() as group:
        group.start_soon(_open_slow_stream, client, proxy, slow, first, result)
        if fault.first_token_latency:
            # Still waiting for its first token: wait until the vendor has the call.
            for _ in range(500):
                if received(fake_a, slow) or received(fake_b, slow):
                    break
                await anyio.sleep(0.02)
        else:
            with anyio.fail_after(10):
                await first.wait()
        busy_on_b = bool(received(fake_b, slow))
        assert len(received(fake_a, slow)) + len(received(fake_b, slow)) == 1
        quick = [f"{base} quick-{n}" for n in range(4)]
        answers = [await chat(client, proxy, f"openai/{MODEL}", text) for text in quick]
        # Still open (and, for a slow first token, still without text) while they ran.
        assert fake_a.completed_streams + fake_b.completed_streams == 0
        if fault.first_token_latency:
            assert not first.is_set()
    assert result["status"] == 200
    assert result["text"] == SLOW_WORDS
    other, other_name = (fake_a, "openai") if busy_on_b else (fake_b, "org-b")
    for text, answer in zip(quick, answers, strict=True):
        assert (answer.status, answer.text) == (200, f"Echo: {text}")
        assert len(received(other, text)) == 1, (text, "went to the busy deployment")
        assert row(proxy, answer.request_id)["deployment"] == other_name
    busy_name = "org-b" if busy_on_b else "openai"
    assert row(proxy, result["request_id"])["deployment"] == busy_name


async def test_least_busy_skips_a_deployment_waiting_for_its_first_token(
    least_busy: Proxy, fake_a: FakeVendors, fake_b: FakeVendors
) -> None:
    await _quick_calls_while_busy(
        least_busy, fake_a, fake_b, marker("busy-ttft"), Fault(first_token_latency=2.5)
    )


async def test_least_busy_skips_a_deployment_whose_stream_is_open(
    least_busy: Proxy, fake_a: FakeVendors, fake_b: FakeVendors
) -> None:
    """The stream's first token is out and the rest comes slowly (0.25 s a word): it is
    still a call in flight on its deployment."""
    await _quick_calls_while_busy(
        least_busy, fake_a, fake_b, marker("busy-open"), Fault(chunk_latency=0.25)
    )


# --- 5. circuit breakers shared through Redis -------------------------------------------------


async def test_a_breaker_opened_by_one_process_is_open_in_the_other(
    weighted: Proxy, least_busy: Proxy, fake_a: FakeVendors, fake_b: FakeVendors
) -> None:
    """Three failures through ``least_busy`` (no retries) open the target's breaker in Redis;
    ``weighted`` then goes straight to the fallback and reports it open. After the cool-down
    one probe, among six concurrent calls through both processes, reaches the target; once it
    succeeded both processes use the target again."""

    def failing(request: RecordedRequest) -> bool:
        return request.model == BREAKER_MODEL

    for fake in (fake_a, fake_b):
        fake.script(Fault(status=503), match=failing, vendor="openai")
    base = marker("breaker")
    async with httpx.AsyncClient() as client:
        for n in range(3):
            text = f"{base} fail-{n}"
            answer = await chat(client, least_busy, BREAKER_TARGET, text)
            assert (answer.status, answer.text) == (200, f"Echo: {text}"), answer
            tried = received(fake_a, text, BREAKER_MODEL) + received(fake_b, text, BREAKER_MODEL)
            assert len(tried) == 1, text
            assert len(fallback_calls(fake_a, text)) == 1
        opened_by = time.monotonic()
        assert (await breaker_states(client, least_busy))[BREAKER_TARGET] == "open"

        text = f"{base} other-process"
        answer = await chat(client, weighted, BREAKER_TARGET, text)
        assert (answer.status, answer.text) == (200, f"Echo: {text}"), answer
        assert received(fake_a, text) + received(fake_b, text) == []
        assert len(fallback_calls(fake_a, text)) == 1
        got = row(weighted, answer.request_id)
        assert (got["status"], got["provider"], got["model"], got["deployment"]) == (
            "ok",
            "anthropic",
            "claude-3-5-haiku-latest",
            "anthropic",
        )
        assert (await breaker_states(client, weighted))[BREAKER_TARGET] == "open"
        assert time.monotonic() < opened_by + BREAKER_COOLDOWN, "too slow to test the cool-down"

        # The target recovers; its answers take 1 s, so the probe is still out while the
        # other five concurrent calls ask the breaker.
        fake_a.reset()
        fake_b.reset()
        probing = f"{base} probe"
        for fake in (fake_a, fake_b):
            fake.script(Reply(fault=Fault(latency=1.0)), match=probing, vendor="openai")
        await anyio.sleep(max(0.0, opened_by + BREAKER_COOLDOWN - time.monotonic()) + 0.3)
        calls = [(proxy, f"{probing}-{n}") for n in range(3) for proxy in (least_busy, weighted)]
        answers: dict[str, Answer] = {}

        async def one(proxy: Proxy, text: str) -> None:
            answers[text] = await chat(client, proxy, BREAKER_TARGET, text)

        async with anyio.create_task_group() as group:
            for proxy, text in calls:
                group.start_soon(one, proxy, text)
        for _, text in calls:
            assert (answers[text].status, answers[text].text) == (200, f"Echo: {text}")
        probes = received(fake_a, probing, BREAKER_MODEL) + received(fake_b, probing, BREAKER_MODEL)
        assert len(probes) == 1, [request.last_text for request in probes]
        assert len(fallback_calls(fake_a, probing)) == len(calls) - 1

        # Closed: both processes call the target again, and say so.
        for proxy in (least_busy, weighted, least_busy, weighted):
            text = f"{base} again-{uuid.uuid4().hex[:6]}"
            answer = await chat(client, proxy, BREAKER_TARGET, text)
            assert (answer.status, answer.text) == (200, f"Echo: {text}")
            tried = received(fake_a, text, BREAKER_MODEL) + received(fake_b, text, BREAKER_MODEL)
            assert len(tried) == 1, text
            assert fallback_calls(fake_a, text) == []
            got = row(proxy, answer.request_id)
            assert (got["provider"], got["model"]) == ("openai", BREAKER_MODEL)
        assert (await breaker_states(client, least_busy))[BREAKER_TARGET] == "closed"
        assert (await breaker_states(client, weighted))[BREAKER_TARGET] == "closed"
