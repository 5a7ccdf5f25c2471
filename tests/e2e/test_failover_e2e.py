"""Fail-over end to end (issue 11): each fault of the fake vendors driven through both surfaces,
``/ai/chat`` and ``/ai/chat/stream`` with ``RemoteAIProvider`` and ``/v1/chat/completions``
with the official ``openai`` SDK, against a real proxy process with short phase limits.

Every scenario counts the attempts the fake vendor saw (and when), checks what the caller
received and how long it waited, reads back the call's one ledger row (its tokens and cost the
sum of every attempt, ``estimated`` when an attempt's usage had to be estimated), and ends
with a healthy call on the same surface.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anthropic
import anyio
import httpx
import openai
import pytest

from robota_client import RemoteAIProvider
from robota_client.errors import InvalidRequestError, RemoteError
from robota_client.messages import DeltaEvent, DoneEvent, RestartEvent
from robota_proxy.policy.pricing import prompt_token_bound
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

ADMIN_KEY = "admin-key-for-failover-tests-0123456789"
PRIMARY = "openai/gpt-4o-mini"
FALLBACK = "anthropic/claude-3-5-haiku-latest"
#: A target only the breaker test uses, on a proxy of its own.
FLAPPING = "openai/gpt-flapping-1"
#: Seconds: the headers, first-token and idle limits of every attempt.
LIMIT = 1.0
#: What a scenario's caller may wait beyond one limit: the fallback's answer, the proxy's own
#: work and a busy shared machine.
SLACK = 1.5
#: The answer the fake model gives: ten words, ten completion tokens, streamed word by word.
WORDS = "one two three four five six seven eight nine ten"
#: What the caller has after three content chunks, and the prefill a continuation gets.
FIRST_THREE = "one two three "
#: USD per million tokens, whole numbers so that a cost is exact in picodollars.
PRICES = {
    PRIMARY: {"input": "1", "output": "2"},
    FALLBACK: {"input": "3", "output": "5"},
}
PICO_PER_MILLION = 10**6  # a price per million tokens, in picodollars per token

Surface = Literal["chat", "stream", "text", "sdk", "sdk_stream"]


@dataclass
class Proxy:
    process: ProxyProcess
    database: Path

    @property
    def url(self) -> str:
        return self.process.url


@pytest.fixture(scope="module")
def failover(fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    home = tmp_path_factory.mktemp("failover")
    prices = home / "prices.json"
    prices.write_text(json.dumps(PRICES))
    env = {
        **vendor_env(fake_server),
        "ROBOTA_API_KEYS": USER_KEY,
        "ROBOTA_DATABASE_URL": f"sqlite:///{home / 'robota.db'}",
        "ROBOTA_PRICES_FILE": str(prices),
        "ROBOTA_UPSTREAM_HEADERS_TIMEOUT": str(LIMIT),
        "ROBOTA_UPSTREAM_FIRST_TOKEN_TIMEOUT": str(LIMIT),
        "ROBOTA_UPSTREAM_IDLE_TIMEOUT": str(LIMIT),
        # The default tries and back-off: the spacing asserted is the product's own.
        "ROBOTA_UPSTREAM_RETRIES": "2",
        "ROBOTA_FALLBACKS": json.dumps({PRIMARY: [FALLBACK]}),
        "ROBOTA_CACHE_ENABLED": "false",
    }
    running = start_proxy(env, home / "proxy.log", startup_timeout=120)
    yield Proxy(running, home / "robota.db")
    stop_proxy(running)


@pytest.fixture(scope="module")
def breakers(fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    home = tmp_path_factory.mktemp("failover_breakers")
    env = {
        **vendor_env(fake_server),
        "ROBOTA_API_KEYS": USER_KEY,
        "ROBOTA_ADMIN_KEY": ADMIN_KEY,
        "ROBOTA_DATABASE_URL": f"sqlite:///{home / 'robota.db'}",
        "ROBOTA_UPSTREAM_RETRIES": "2",
        "ROBOTA_FALLBACKS": json.dumps({FLAPPING: [FALLBACK]}),
        "ROBOTA_CACHE_ENABLED": "false",
        "ROBOTA_BREAKER_ENABLED": "true",
        "ROBOTA_BREAKER_FAILURES": "3",
        "ROBOTA_BREAKER_COOLDOWN_SECONDS": str(BREAKER_COOLDOWN),
    }
    running = start_proxy(env, home / "proxy.log", startup_timeout=120)
    yield Proxy(running, home / "robota.db")
    stop_proxy(running)


# --- calling the proxy ----------------------------------------------------------------------


@dataclass
class Outcome:
    """What the caller received."""

    request_id: str
    waited: float
    #: The complete answer (``None`` when the call failed).
    text: str | None = None
    #: ``provider/model`` that answered, as the caller was told.
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: Text deltas in order, as they arrived (streams).
    deltas: list[str] = field(default_factory=list)
    restarts: int = 0
    error: Exception | None = None


def marker() -> str:
    return f"fo-{uuid.uuid4().hex[:10]}"


def split(target: str) -> tuple[str, str]:
    provider, _, model = target.partition("/")
    return provider, model


def messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def ask(proxy: Proxy, surface: Surface, text: str, target: str = PRIMARY) -> Outcome:
    if surface in ("chat", "stream", "text"):
        return await _ask_robota(proxy, surface, text, target)
    return await _ask_sdk(proxy, surface, text, target)


async def _ask_robota(proxy: Proxy, surface: Surface, text: str, target: str) -> Outcome:
    provider, model = split(target)
    started = time.monotonic()
    # A default client (60 s timeout, its own retries), as a user would make it.
    async with RemoteAIProvider(proxy.url, USER_KEY, provider, model) as remote:
        if surface == "chat":
            try:
                message = await remote.chat(messages(text))
            except RemoteError as exc:
                assert exc.request_id is not None
                return Outcome(exc.request_id, time.monotonic() - started, error=exc)
            assert message.metadata.request_id is not None and message.usage is not None
            return Outcome(
                message.metadata.request_id,
                time.monotonic() - started,
                text=message.content,
                model=f"{message.metadata.provider}/{message.metadata.model}",
                prompt_tokens=message.usage.prompt_tokens,
                completion_tokens=message.usage.completion_tokens,
            )
        if surface == "text":
            chunks = remote.chat_stream(messages(text))
            try:
                received = [chunk async for chunk in chunks]
            except RemoteError as exc:
                assert exc.request_id is not None
                return Outcome(exc.request_id, time.monotonic() - started, error=exc)
            stream = chunks.stream
            assert stream.request_id is not None
            usage = stream.message.usage
            assert usage is not None
            return Outcome(
                stream.request_id,
                time.monotonic() - started,
                text="".join(received),
                model=f"{stream.message.metadata.provider}/{stream.message.metadata.model}",
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                deltas=received,
                restarts=stream.restarts,
            )
        typed = remote.stream(messages(text))
        deltas: list[str] = []
        restarts = 0
        try:
            async for event in typed:
                if isinstance(event, DeltaEvent):
                    deltas.append(event.content)
                elif isinstance(event, RestartEvent):
                    restarts += 1
                    deltas.append("<restart>")
                elif isinstance(event, DoneEvent):
                    pass
        except RemoteError as exc:
            assert exc.request_id is not None
            return Outcome(
                exc.request_id,
                time.monotonic() - started,
                deltas=deltas,
                restarts=restarts,
                error=exc,
            )
        assert typed.request_id is not None
        usage = typed.message.usage
        assert usage is not None
        return Outcome(
            typed.request_id,
            time.monotonic() - started,
            text=typed.message.content,
            model=f"{typed.message.metadata.provider}/{typed.message.metadata.model}",
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            deltas=deltas,
            restarts=restarts,
        )


async def _ask_sdk(proxy: Proxy, surface: Surface, text: str, target: str) -> Outcome:
    started = time.monotonic()
    async with openai.AsyncOpenAI(
        base_url=f"{proxy.url}/v1", api_key=USER_KEY, max_retries=0, timeout=60
    ) as client:
        if surface == "sdk":
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=target, messages=[{"role": "user", "content": text}]
                )
            except openai.APIStatusError as exc:
                return Outcome(
                    exc.response.headers["x-request-id"], time.monotonic() - started, error=exc
                )
            completion = raw.parse()
            assert completion.usage is not None
            return Outcome(
                raw.headers["x-request-id"],
                time.monotonic() - started,
                text=completion.choices[0].message.content,
                model=completion.model,
                prompt_tokens=completion.usage.prompt_tokens,
                completion_tokens=completion.usage.completion_tokens,
            )
        try:
            stream = await client.chat.completions.create(
                model=target,
                messages=[{"role": "user", "content": text}],
                stream=True,
                stream_options={"include_usage": True},
            )
        except openai.APIStatusError as exc:
            return Outcome(
                exc.response.headers["x-request-id"], time.monotonic() - started, error=exc
            )
        request_id = stream.response.headers["x-request-id"]
        deltas: list[str] = []
        model = None
        usage = None
        try:
            async for chunk in stream:
                model = chunk.model
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        deltas.append(choice.delta.content)
        except openai.APIError as exc:
            return Outcome(request_id, time.monotonic() - started, deltas=deltas, error=exc)
        assert usage is not None
        return Outcome(
            request_id,
            time.monotonic() - started,
            text="".join(deltas),
            model=model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            deltas=deltas,
        )


# --- what the vendors saw, and the ledger ---------------------------------------------------


def seen(fake: FakeVendors, text: str, target: str) -> list[RecordedRequest]:
    """The requests of one caller's call (its unique text) that reached ``target``."""
    provider, model = split(target)
    return [
        request
        for request in fake.requests
        if text in request.last_text and request.vendor == provider and request.model == model
    ]


def assert_spaced(fake: FakeVendors) -> None:
    """No target was hit more than twice in any 1.5 s by one call (each call has its own
    text, so calls that merely follow each other are not counted together)."""
    arrivals: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for request in fake.requests:
        arrivals[(request.last_text, request.vendor, request.model)].append(request.received_at)
    for key, times in arrivals.items():
        times.sort()
        bursts = [later - first for first, later in zip(times, times[2:], strict=False)]
        assert all(gap >= 1.5 for gap in bursts), (key, times)


def the_row(proxy: Proxy, request_id: str) -> dict[str, Any]:
    """The call's own row: its last vendor call, under the call's request id."""
    rows = ledger_rows(proxy.database, request_id)
    assert len(rows) == 1, rows
    with sqlite3.connect(proxy.database) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM usage_ledger WHERE request_id = ?", (request_id,)
        ).fetchone()
    assert count == 1
    return rows[0]


def attempt_rows(proxy: Proxy, request_id: str) -> list[tuple[Any, ...]]:
    """The rows of the call's earlier vendor calls, in order: ``(request id, status,
    provider/model, prompt tokens, completion tokens, cost, estimated)``. Written in the
    settle's transaction, so they are there once the call's own row is settled."""
    the_row(proxy, request_id)
    with sqlite3.connect(proxy.database) as conn:
        return [
            (row[0], row[1], f"{row[2]}/{row[3]}", *row[4:])
            for row in conn.execute(
                "SELECT request_id, status, provider, model, prompt_tokens, completion_tokens,"
                " cost_pico, estimated FROM usage_ledger WHERE attempt_of = ? ORDER BY id",
                (request_id,),
            )
        ]


def failed(request_id: str, number: int, status: str, target: str) -> tuple[Any, ...]:
    """A failed vendor call's row: where and why, no tokens, no cost."""
    return (f"{request_id}/{number}", status, target, 0, 0, 0, 0)


def broken(request_id: str, status: str, target: str, text: str) -> tuple[Any, ...]:
    """The row of a stream attempt that broke after ``text`` (usage never reported):
    estimated as the prompt's bound and the text's tokens, priced at its own target."""
    bound, guessed = prompt_bound(text), estimated_completion(FIRST_THREE)
    return (f"{request_id}/1", status, target, bound, guessed, cost_pico(target, bound, guessed), 1)


def cost_pico(target: str, prompt: int, completion: int) -> int:
    price = PRICES[target]
    return (prompt * int(price["input"]) + completion * int(price["output"])) * PICO_PER_MILLION


def prompt_bound(text: str) -> int:
    """The proxy's upper bound of a prompt's tokens: what an attempt whose usage the vendor
    never reported is charged for its prompt."""
    provider, model = split(PRIMARY)
    request = RemoteAIProvider("http://unused", None, provider, model).build_request(messages(text))
    return prompt_token_bound(request)


def estimated_completion(chars: str) -> int:
    return math.ceil(len(chars) / 4)


async def assert_healthy(proxy: Proxy, fake: FakeVendors, surface: Surface) -> None:
    """Right after a scenario, a plain call on the same surface is served by the primary."""
    text = marker()
    outcome = await ask(proxy, surface, text)
    assert outcome.error is None, outcome.error
    assert outcome.text == f"Echo: {text}"
    assert len(seen(fake, text, PRIMARY)) == 1
    assert seen(fake, text, FALLBACK) == []
    assert the_row(proxy, outcome.request_id)["status"] == "ok"


def sdk_model(surface: Surface, target: str) -> str:
    """The model the caller is told answered: a passthrough to the name it asked for shows
    the vendor's own name; a fallback shows ``provider/model``."""
    return split(target)[1] if surface.startswith("sdk") and target != FALLBACK else target


# --- a. silent target, b. slow first token, g. context length: the fallback answers --------

ALL: list[Surface] = ["chat", "stream", "sdk", "sdk_stream"]
STREAMS: list[Surface] = ["stream", "text", "sdk_stream"]


@pytest.mark.parametrize(
    ("fault", "surface"),
    [
        *((Fault(latency=30), surface) for surface in ALL),
        *((Fault(first_token_latency=30), surface) for surface in STREAMS),
        *((Fault(status=400, error_kind="context_length"), surface) for surface in ALL),
    ],
    ids=[
        *(f"silent-{surface}" for surface in ALL),
        *(f"slow_first_token-{surface}" for surface in STREAMS),
        *(f"context_length-{surface}" for surface in ALL),
    ],
)
async def test_the_fallback_answers_after_one_attempt_at_the_failing_target(
    failover: Proxy, fake: FakeVendors, fault: Fault, surface: Surface
) -> None:
    text = marker()
    fake.script(fault, match=text, vendor="openai")
    fake.script(Reply(text=WORDS), match=text, vendor="anthropic")
    outcome = await ask(failover, surface, text)

    assert outcome.error is None, outcome.error
    assert outcome.text == WORDS
    assert outcome.restarts == 0
    assert outcome.model == FALLBACK
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (1, 10)
    assert len(seen(fake, text, PRIMARY)) == 1
    assert len(seen(fake, text, FALLBACK)) == 1
    slow = fault.latency or fault.first_token_latency
    if slow:  # one limit at the silent target, then the fallback at once
        assert LIMIT - 0.05 <= outcome.waited < LIMIT + SLACK
    else:  # a refusal: nothing to wait for
        assert outcome.waited < SLACK
    assert_spaced(fake)

    row = the_row(failover, outcome.request_id)
    assert (row["status"], row["provider"], row["model"]) == ("ok", *split(FALLBACK))
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (1, 10, 0)
    assert row["cost_pico"] == cost_pico(FALLBACK, 1, 10)
    # The failed attempt is a row of its own that produced nothing and costs nothing.
    status = "upstream_timeout" if slow else "invalid_request"
    assert attempt_rows(failover, outcome.request_id) == [
        failed(outcome.request_id, 1, status, PRIMARY)
    ]
    await assert_healthy(failover, fake, surface)


# --- c. stall, d. cut: continued on /ai/chat/stream, an in-band error on /v1 -----------------

BREAKS = {
    "stall": Fault(stall_after=3, stall_seconds=30),
    "cut": Fault(drop_after=3),
}


@pytest.mark.parametrize("surface", ["stream", "text"])
async def test_a_stalled_openai_stream_is_continued_on_the_fallback_without_a_seam(
    failover: Proxy, fake: FakeVendors, surface: Surface
) -> None:
    """A target that went quiet is asked last: the fallback (Anthropic) takes the text so
    far as a prefill and writes the rest, so there is no restart and no second wait."""
    text = marker()
    fake.script(Reply(text=WORDS, fault=BREAKS["stall"]), match=text, times=1)
    fake.script(Reply(text=WORDS), match=text)
    outcome = await ask(failover, surface, text)

    assert outcome.error is None, outcome.error
    assert (outcome.text, outcome.restarts) == (WORDS, 0)
    assert "".join(outcome.deltas) == WORDS
    assert len(seen(fake, text, PRIMARY)) == 1
    assert [request.prefill for request in seen(fake, text, FALLBACK)] == [FIRST_THREE.rstrip()]
    assert outcome.waited < LIMIT + SLACK
    bound, guessed = prompt_bound(text), estimated_completion(FIRST_THREE)
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (bound + 4, guessed + 7)
    # One row per vendor call: the stalled one estimated and priced as OpenAI's, the call's
    # own row the continuation's reported usage, priced as Anthropic's.
    row = the_row(failover, outcome.request_id)
    assert (row["status"], row["provider"], row["model"]) == ("ok", *split(FALLBACK))
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (4, 7, 0)
    assert row["cost_pico"] == cost_pico(FALLBACK, 4, 7)
    assert attempt_rows(failover, outcome.request_id) == [
        broken(outcome.request_id, "upstream_timeout", PRIMARY, text)
    ]
    await assert_healthy(failover, fake, surface)


@pytest.mark.parametrize("surface", ["stream", "text"])
@pytest.mark.parametrize("kind", ["cut"])
async def test_a_broken_openai_stream_restarts_and_the_answer_arrives_once(
    failover: Proxy, fake: FakeVendors, kind: str, surface: Surface
) -> None:
    text = marker()
    fake.script(Reply(text=WORDS, fault=BREAKS[kind]), match=text, times=1)
    fake.script(Reply(text=WORDS), match=text)
    outcome = await ask(failover, surface, text)

    assert outcome.error is None, outcome.error
    assert outcome.text == WORDS
    assert outcome.restarts == 1
    if surface == "stream":  # the typed stream shows the seam: a restart, then a fresh answer
        assert "".join(outcome.deltas) == FIRST_THREE + "<restart>" + WORDS
    else:  # chat_stream: the answer once, the repeated start held back
        assert "".join(outcome.deltas) == WORDS
    sent = seen(fake, text, PRIMARY)
    assert [request.prefill for request in sent] == [None, None]
    assert seen(fake, text, FALLBACK) == []
    assert outcome.waited < (LIMIT if kind == "stall" else 0) + SLACK
    assert_spaced(fake)

    # The caller's usage is the sum: the broken attempt estimated from its text, plus the
    # fresh answer's; each is a row of its own.
    prompt = prompt_bound(text) + 1
    completion = estimated_completion(FIRST_THREE) + 10
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (prompt, completion)
    row = the_row(failover, outcome.request_id)
    assert (row["status"], row["provider"], row["model"]) == ("ok", *split(PRIMARY))
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (1, 10, 0)
    assert row["cost_pico"] == cost_pico(PRIMARY, 1, 10)
    assert attempt_rows(failover, outcome.request_id) == [
        broken(outcome.request_id, "upstream_error", PRIMARY, text)
    ]
    await assert_healthy(failover, fake, surface)


@pytest.mark.parametrize("kind", sorted(BREAKS))
async def test_a_broken_anthropic_stream_is_continued_from_a_prefill_without_a_seam(
    failover: Proxy, fake: FakeVendors, kind: str
) -> None:
    text = marker()
    fake.script(Reply(text=WORDS, fault=BREAKS[kind]), match=text, times=1)
    fake.script(Reply(text=WORDS), match=text)
    outcome = await ask(failover, "stream", text, FALLBACK)

    assert outcome.error is None, outcome.error
    assert outcome.restarts == 0
    assert "".join(outcome.deltas) == WORDS
    assert outcome.text == WORDS
    sent = seen(fake, text, FALLBACK)
    assert [request.prefill for request in sent] == [None, FIRST_THREE.rstrip()]
    assert outcome.waited < (LIMIT if kind == "stall" else 0) + SLACK
    assert_spaced(fake)

    # The continuation's prompt is the question and the prefill (1 + 3 words); it writes
    # the other seven words.
    prompt = prompt_bound(text) + 4
    completion = estimated_completion(FIRST_THREE) + 7
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (prompt, completion)
    row = the_row(failover, outcome.request_id)
    assert (row["status"], row["provider"], row["model"]) == ("ok", *split(FALLBACK))
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (4, 7, 0)
    assert row["cost_pico"] == cost_pico(FALLBACK, 4, 7)
    status = "upstream_timeout" if kind == "stall" else "upstream_error"
    assert attempt_rows(failover, outcome.request_id) == [
        broken(outcome.request_id, status, FALLBACK, text)
    ]
    await assert_healthy(failover, fake, "stream")


@pytest.mark.parametrize("kind", sorted(BREAKS))
async def test_a_broken_passthrough_stream_is_continued_on_a_fallback_that_takes_a_prefill(
    failover: Proxy, fake: FakeVendors, kind: str
) -> None:
    """/v1/chat/completions passes the caller's JSON to OpenAI, which takes no prefill; its
    fallback (Anthropic) does, so the answer goes on from there in the same chunk stream:
    the SDK sees one completion, whole, once."""
    text = marker()
    fake.script(Reply(text=WORDS, fault=BREAKS[kind]), match=text, times=1)
    fake.script(Reply(text=WORDS), match=text)
    outcome = await ask(failover, "sdk_stream", text)

    assert outcome.error is None, outcome.error
    assert "".join(outcome.deltas) == WORDS
    assert outcome.model == FALLBACK  # the chunks after the seam name the model that wrote them
    assert len(seen(fake, text, PRIMARY)) == 1
    assert [request.prefill for request in seen(fake, text, FALLBACK)] == [FIRST_THREE.rstrip()]
    assert outcome.waited < (LIMIT if kind == "stall" else 0) + SLACK

    # Two rows: the broken attempt estimated and priced as OpenAI's, the continuation (the
    # question and the prefill in, seven words out) as Anthropic's; the usage chunk the
    # caller got is their sum.
    bound, guessed = prompt_bound(text), estimated_completion(FIRST_THREE)
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (bound + 4, guessed + 7)
    row = the_row(failover, outcome.request_id)
    assert (row["status"], row["provider"], row["model"]) == ("ok", *split(FALLBACK))
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (4, 7, 0)
    assert row["cost_pico"] == cost_pico(FALLBACK, 4, 7)
    status = "upstream_timeout" if kind == "stall" else "upstream_error"
    assert attempt_rows(failover, outcome.request_id) == [
        broken(outcome.request_id, status, PRIMARY, text)
    ]
    await assert_healthy(failover, fake, "sdk_stream")


@pytest.mark.parametrize("kind", sorted(BREAKS))
async def test_a_broken_stream_on_v1_to_a_prefill_target_is_continued_without_a_seam(
    failover: Proxy, fake: FakeVendors, kind: str
) -> None:
    """Issue 11, behaviour 2: a target that takes a prefill continues the answer whatever
    the surface; only a target that takes none ends a /v1 stream with an in-band error."""
    text = marker()
    fake.script(Reply(text=WORDS, fault=BREAKS[kind]), match=text, times=1)
    fake.script(Reply(text=WORDS), match=text)
    outcome = await ask(failover, "sdk_stream", text, FALLBACK)

    assert outcome.error is None, outcome.error
    assert outcome.text == WORDS
    sent = seen(fake, text, FALLBACK)
    assert [request.prefill for request in sent] == [None, FIRST_THREE.rstrip()]
    prompt = prompt_bound(text) + 4
    completion = estimated_completion(FIRST_THREE) + 7
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (prompt, completion)
    row = the_row(failover, outcome.request_id)
    assert (row["status"], row["estimated"]) == ("ok", 0)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (4, 7)
    status = "upstream_timeout" if kind == "stall" else "upstream_error"
    assert attempt_rows(failover, outcome.request_id) == [
        broken(outcome.request_id, status, FALLBACK, text)
    ]
    await assert_healthy(failover, fake, "sdk_stream")


# --- e. a malformed chunk -------------------------------------------------------------------


#: What the caller gets of WORDS when its fourth chunk ("four ") arrives garbled: the chunk is
#: skipped, the stream goes on.
WITHOUT_FOURTH = "one two three five six seven eight nine ten"


@pytest.mark.parametrize("surface", ["stream", "text", "sdk_stream"])
async def test_a_malformed_chunk_is_skipped_and_the_stream_goes_on(
    failover: Proxy, fake: FakeVendors, surface: Surface
) -> None:
    text = marker()
    fake.script(Reply(text=WORDS, fault=Fault(malformed_at=3)), match=text)
    outcome = await ask(failover, surface, text)

    assert outcome.error is None, outcome.error
    assert "".join(outcome.deltas) == WITHOUT_FOURTH
    assert outcome.restarts == 0
    assert len(seen(fake, text, PRIMARY)) == 1
    assert outcome.waited < SLACK
    row = the_row(failover, outcome.request_id)
    # The vendor's usage still arrives (it counts the garbled chunk too): nothing estimated.
    assert (row["status"], row["estimated"]) == ("ok", 0)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (1, 10)
    assert attempt_rows(failover, outcome.request_id) == []
    line = f"request {outcome.request_id}: skipped 1 malformed chunk in a stream from openai"
    assert failover.process.log_once_it_has(line).count(line) == 1
    await assert_healthy(failover, fake, surface)


# --- f. missing terminal marker -------------------------------------------------------------


@pytest.mark.parametrize(
    ("surface", "target"),
    [("stream", PRIMARY), ("text", PRIMARY), ("sdk_stream", PRIMARY), ("stream", FALLBACK)],
)
async def test_a_stream_without_its_terminal_marker_is_finished_at_once(
    failover: Proxy, fake: FakeVendors, surface: Surface, target: str
) -> None:
    text = marker()
    fake.script(Reply(text=WORDS, fault=Fault(no_terminal=True)), match=text)
    outcome = await ask(failover, surface, text, target)

    assert outcome.error is None, outcome.error
    assert outcome.text == WORDS
    assert outcome.restarts == 0
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (1, 10)
    assert len(seen(fake, text, target)) == 1
    assert len(fake.requests) == 1
    assert outcome.waited < LIMIT  # not waited out until the idle limit
    row = the_row(failover, outcome.request_id)
    assert (row["status"], row["provider"], row["model"]) == ("ok", *split(target))
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (1, 10, 0)
    assert row["cost_pico"] == cost_pico(target, 1, 10)
    assert attempt_rows(failover, outcome.request_id) == []
    await assert_healthy(failover, fake, surface)


# --- h. content policy ----------------------------------------------------------------------

SAFETY = "Your request was rejected as a result of our safety system."


@pytest.mark.parametrize("surface", ALL)
async def test_a_content_policy_refusal_is_returned_and_never_routed_around(
    failover: Proxy, fake: FakeVendors, surface: Surface
) -> None:
    text = marker()
    fake.script(Fault(status=400, error_kind="content_policy"), match=text, vendor="openai")
    outcome = await ask(failover, surface, text)

    error = outcome.error
    if surface.startswith("sdk"):
        assert isinstance(error, openai.BadRequestError)
        assert error.status_code == 400
        assert SAFETY in error.message
    else:
        assert isinstance(error, InvalidRequestError)
        assert error.status == 400
        assert SAFETY in error.message
    assert len(seen(fake, text, PRIMARY)) == 1
    assert seen(fake, text, FALLBACK) == []
    assert outcome.waited < SLACK
    row = the_row(failover, outcome.request_id)
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == (
        "invalid_request",
        0,
        0,
    )
    assert row["cost_pico"] == 0
    assert attempt_rows(failover, outcome.request_id) == []
    await assert_healthy(failover, fake, surface)


# --- i. a flapping target behind a circuit breaker --------------------------------------------

BREAKER_COOLDOWN = 6.0
#: How long the target answers 503: longer than the first call's three tries (about 2 s with
#: the default back-off) and the fourteen calls after it, with room for a busy machine (at
#: 4 s, fourteen calls on a loaded 2-core machine once outlasted it).
OUTAGE = 7.0


async def test_a_flapping_target_is_skipped_while_its_breaker_is_open(
    breakers: Proxy, fake: FakeVendors
) -> None:
    """Three failed tries open the breaker; the next fourteen calls go straight to the
    fallback; after the outage and the cool-down the primary serves again."""
    base = marker()
    fake.script(Fault(status=503, active_for=OUTAGE), match=base, vendor="openai")
    outage_until = time.monotonic() + OUTAGE
    surfaces: list[Surface] = ["chat", "sdk"]
    outcomes: list[Outcome] = []
    opened_at = math.inf
    for call in range(15):
        text = f"{base} call-{call:02d}."
        outcome = await ask(breakers, surfaces[call % 2], text, FLAPPING)
        assert outcome.error is None, outcome.error
        assert outcome.text == f"Echo: {text}"
        assert outcome.model == FALLBACK
        outcomes.append(outcome)
        if call == 0:
            assert (await breaker_states(breakers))[FLAPPING] == "open"
            opened_at = time.monotonic()
    assert time.monotonic() < min(outage_until, opened_at + BREAKER_COOLDOWN), (
        "the fifteen calls outlasted the outage or the cool-down"
    )
    assert (await breaker_states(breakers))[FLAPPING] == "open"
    tried = [len(seen(fake, f"{base} call-{call:02d}.", FLAPPING)) for call in range(15)]
    assert tried == [3] + [0] * 14
    assert all(len(seen(fake, f"{base} call-{call:02d}.", FALLBACK)) == 1 for call in range(15))
    # The first call waited out the back-off between its three tries (0.5 + 1 s at least);
    # the others did not wait for the failing target at all.
    assert 1.5 <= outcomes[0].waited < 1.5 + 1.0 + SLACK
    assert max(outcome.waited for outcome in outcomes[1:]) < SLACK
    assert_spaced(fake)
    for outcome in outcomes:
        row = the_row(breakers, outcome.request_id)
        assert (row["status"], row["provider"], row["model"]) == ("ok", *split(FALLBACK))
        assert (row["prompt_tokens"], row["completion_tokens"]) == (2, 3)
    # The first call's three tries are rows of their own; a skipped target is no vendor call.
    first = outcomes[0].request_id
    assert attempt_rows(breakers, first) == [
        failed(first, number, "upstream_unavailable", FLAPPING) for number in (1, 2, 3)
    ]
    assert all(attempt_rows(breakers, outcome.request_id) == [] for outcome in outcomes[1:])

    # Outage over and cool-down spent: the next call probes the target and it serves again.
    ready = max(outage_until, opened_at + BREAKER_COOLDOWN)
    await anyio.sleep(max(0.0, ready - time.monotonic()) + 0.1)
    for surface in surfaces:
        text = f"{base} after-{surface}"
        outcome = await ask(breakers, surface, text, FLAPPING)
        assert outcome.error is None, outcome.error
        assert outcome.text == f"Echo: {text}"
        assert outcome.model == sdk_model(surface, FLAPPING)
        assert len(seen(fake, text, FLAPPING)) == 1
        assert seen(fake, text, FALLBACK) == []
    assert (await breaker_states(breakers))[FLAPPING] == "closed"


async def breaker_states(proxy: Proxy) -> dict[str, str]:
    async with httpx.AsyncClient() as client:
        answer = await client.get(
            f"{proxy.url}/admin/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
    assert answer.status_code == 200, answer.text
    states: dict[str, str] = answer.json()["circuitBreakers"]
    return states


# --- /v1/messages passed through to Anthropic --------------------------------------------------


def anthropic_client(proxy: Proxy) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=proxy.url, api_key=USER_KEY, max_retries=0)


async def test_a_passed_through_anthropic_stream_that_breaks_is_continued_from_a_prefill(
    failover: Proxy, fake: FakeVendors
) -> None:
    """The caller's own JSON goes to Anthropic untouched; when that stream is cut midway,
    the text so far is sent as a prefill and the continuation is written on in the same
    content block: the SDK assembles the whole answer once."""
    text = marker()
    fake.script(Reply(text=WORDS, fault=Fault(drop_after=3)), match=text, times=1)
    fake.script(Reply(text=WORDS), match=text)
    async with (
        anthropic_client(failover) as client,
        client.messages.stream(
            model="claude-3-5-haiku-latest",
            max_tokens=100,
            messages=[{"role": "user", "content": text}],
        ) as stream,
    ):
        pieces = [piece async for piece in stream.text_stream]
        message = await stream.get_final_message()
        request_id = stream.response.headers["request-id"]
    assert "".join(pieces) == WORDS
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == WORDS  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    requests = seen(fake, text, FALLBACK)
    assert [request.prefill for request in requests] == [None, "one two three"]
    row = the_row(failover, request_id)
    # The cut attempt is a row of its own, estimated (prompt bound + its text); the call's
    # row is the continuation's reported usage; the caller's usage is their sum.
    assert (row["status"], row["estimated"], row["deployment"]) == ("ok", 0, "anthropic")
    [cut] = attempt_rows(failover, request_id)
    assert (cut[1], cut[2], cut[6]) == ("upstream_error", FALLBACK, 1)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (
        row["prompt_tokens"] + cut[3],
        row["completion_tokens"] + cut[4],
    )


async def test_a_passed_through_anthropic_stream_without_message_stop_is_finished(
    failover: Proxy, fake: FakeVendors
) -> None:
    text = marker()
    fake.script(Reply(text=WORDS, fault=Fault(no_terminal=True)), match=text)
    async with (
        anthropic_client(failover) as client,
        client.messages.stream(
            model="claude-3-5-haiku-latest",
            max_tokens=100,
            messages=[{"role": "user", "content": text}],
        ) as stream,
    ):
        message = await stream.get_final_message()
    assert message.content[0].text == WORDS  # type: ignore[union-attr]
    assert (message.stop_reason, message.usage.output_tokens) == ("end_turn", 10)
    assert len(seen(fake, text, FALLBACK)) == 1


# --- j. a target configured to take a prefill that refuses it ---------------------------------

#: Configured wrongly on purpose: OpenAI's models take no prefill (the fake's ``reject`` mode).
#: A model per test: a proxy remembers which targets refused a prefill.
MISTAKEN = "openai/gpt-4o-{surface}"


@pytest.fixture(scope="module")
def mistaken(fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    home = tmp_path_factory.mktemp("failover_prefill")
    env = {
        **vendor_env(fake_server),
        "ROBOTA_API_KEYS": USER_KEY,
        "ROBOTA_DATABASE_URL": f"sqlite:///{home / 'robota.db'}",
        "ROBOTA_UPSTREAM_IDLE_TIMEOUT": str(LIMIT),
        "ROBOTA_CACHE_ENABLED": "false",
        "ROBOTA_TARGET_OPTIONS": json.dumps({"openai/*": {"prefill": True}}),
    }
    running = start_proxy(env, home / "proxy.log", startup_timeout=120)
    yield Proxy(running, home / "robota.db")
    stop_proxy(running)


@pytest.mark.parametrize("surface", ["stream", "text", "sdk_stream"])
async def test_a_refused_prefill_is_never_the_callers_error(
    mistaken: Proxy, fake: FakeVendors, surface: Surface
) -> None:
    """The stream is cut after three words; the continuation's prefill is refused (400). On
    the Robota wire the same target answers afresh after a ``restart`` (spaced: its third
    call comes 1.5 s after its first); on /v1 there is no way to take text back, so the
    stream ends in-band with the original failure, not the refusal."""
    fake.set_prefill("openai", "reject")
    text = marker()
    fake.script(Reply(text=WORDS, fault=Fault(drop_after=3)), match=text, times=1)
    fake.script(Reply(text=WORDS), match=text)
    target = MISTAKEN.format(surface=surface)
    outcome = await ask(mistaken, surface, text, target)

    sent = seen(fake, text, target)
    if surface == "sdk_stream":
        assert isinstance(outcome.error, openai.APIError), outcome.error
        assert "malformed or truncated stream" in str(outcome.error)
        assert "prefill" not in str(outcome.error)
        assert "".join(outcome.deltas) == FIRST_THREE
        assert [request.prefill for request in sent] == [None, FIRST_THREE.rstrip()]
        return
    assert outcome.error is None, outcome.error
    assert (outcome.text, outcome.restarts) == (WORDS, 1)
    assert [request.prefill for request in sent] == [None, FIRST_THREE.rstrip(), None]
    assert sent[2].received_at - sent[0].received_at >= 1.5
    assert_spaced(fake)
    # Three vendor calls, three rows: the cut one (estimated), the refusal (nothing), and
    # the fresh answer as the call's own row.
    statuses = [row[1] for row in attempt_rows(mistaken, outcome.request_id)]
    assert statuses == ["upstream_error", "invalid_request"]
    row = the_row(mistaken, outcome.request_id)
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"]) == ("ok", 1, 10)
    line = f"{target} refused an assistant prefill"
    assert mistaken.process.log_once_it_has(line).count(line) == 1
