"""The fail-over faults of the fake vendors (stalls, slow first tokens, missing end markers,
vendor-worded request errors, time-boxed rules, prefill), each read back through the
official SDK where there is one and as raw SSE for Gemini, so the faults are known to look
to the proxy's real clients as the vendors' own failures do."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from httpx_sse import connect_sse

from robota_proxy.testing import FakeVendors, Fault, RecordedRequest, Reply
from robota_proxy.testing.script import Conversation, Rule, make_plan

KEY = "sk-test-vendor-key-0123456789abcdef"
ANTHROPIC_HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
FOUR = "one two three four"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeVendors]:
    with FakeVendors(api_key=KEY) as running:
        yield running


@pytest.fixture
def fake(server: FakeVendors) -> Iterator[FakeVendors]:
    server.reset()
    yield server
    server.reset()


def openai_client(fake: FakeVendors, timeout: float = 10.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.openai_base_url, api_key=KEY, max_retries=0, timeout=timeout)


def anthropic_client(fake: FakeVendors, timeout: float = 10.0) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=fake.anthropic_base_url, api_key=KEY, max_retries=0, timeout=timeout
    )


def gemini_url(fake: FakeVendors, action: str = "generateContent") -> str:
    return f"{fake.google_base_url}/v1beta/models/gemini-2.5-flash:{action}"


def gemini_body(text: str, prefill: str | None = None) -> dict[str, Any]:
    contents = [{"role": "user", "parts": [{"text": text}]}]
    if prefill is not None:
        contents.append({"role": "model", "parts": [{"text": prefill}]})
    return {"contents": contents}


def gemini_chunks(fake: FakeVendors, body: dict[str, Any], timeout: float = 10.0) -> list[Any]:
    """The parsed ``data:`` frames of a streamed Gemini answer."""
    with (
        httpx.Client(timeout=timeout) as client,
        connect_sse(
            client,
            "POST",
            gemini_url(fake, "streamGenerateContent"),
            params={"alt": "sse"},
            headers={"x-goog-api-key": KEY},
            json=body,
        ) as source,
    ):
        assert source.response.status_code == 200
        return [json.loads(event.data) for event in source.iter_sse()]


def gemini_texts(chunks: list[Any]) -> list[str]:
    return [part["text"] for c in chunks for part in c["candidates"][0]["content"]["parts"]]


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


#: ``Any``: each SDK types its messages its own way, and both accept these.
USER: Any = [{"role": "user", "content": "count"}]


# --- stall_after -------------------------------------------------------------------------


def test_stall_goes_silent_then_cuts_an_openai_stream(fake: FakeVendors) -> None:
    fake.script(Reply(text=FOUR, fault=Fault(stall_after=2, stall_seconds=0.5)))
    texts: list[str] = []
    started = time.monotonic()
    with openai_client(fake) as client:
        stream = client.chat.completions.create(model="m", messages=USER, stream=True)
        with pytest.raises(openai.APIConnectionError) as cut:
            for chunk in stream:
                texts.append(chunk.choices[0].delta.content or "")
                if len(texts) == 3:  # the role chunk and two pieces
                    silent_from = time.monotonic()
    # A cut, not a timeout (the SDK's APITimeoutError is a subclass).
    assert type(cut.value) is openai.APIConnectionError
    assert isinstance(cut.value.__cause__, httpx2.RemoteProtocolError)
    assert texts == ["", "one ", "two "]
    # The two pieces come at once; the cut only after the whole stall.
    assert silent_from - started < 0.4
    assert time.monotonic() - started >= 0.5
    wait_for(lambda: fake.dropped_streams == 1)
    assert fake.completed_streams == 0 and fake.aborted_streams == 0


def test_a_read_timeout_during_a_stall_ends_the_anthropic_stream_at_once(
    fake: FakeVendors,
) -> None:
    fake.script(Reply(text=FOUR, fault=Fault(stall_after=1, stall_seconds=60)))
    kinds: list[str] = []
    with anthropic_client(fake, timeout=0.5) as client:
        stream = client.messages.create(model="m", max_tokens=9, messages=USER, stream=True)
        # This SDK lets its transport's (httpx2) timeout out of a stream unwrapped.
        with pytest.raises(httpx2.ReadTimeout):
            for event in stream:
                kinds.append(event.type)
        gave_up = time.monotonic()
    assert kinds == ["message_start", "content_block_start", "content_block_delta"]
    # The stalled server task noticed the client leaving instead of sleeping for a minute.
    wait_for(lambda: fake.aborted_streams == 1)
    assert fake.aborted_at[0] - gave_up < 1.0
    assert fake.dropped_streams == 0


def test_stall_in_gemini_sends_the_first_chunks_then_cuts(fake: FakeVendors) -> None:
    fake.script(Reply(text=FOUR, fault=Fault(stall_after=3, stall_seconds=0.2)))
    received: list[Any] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.Client() as client,
        connect_sse(
            client,
            "POST",
            gemini_url(fake, "streamGenerateContent"),
            params={"alt": "sse"},
            headers={"x-goog-api-key": KEY},
            json=gemini_body("count"),
        ) as source,
    ):
        received.extend(json.loads(event.data) for event in source.iter_sse())
    assert gemini_texts(received) == ["one ", "two ", "three "]
    wait_for(lambda: fake.dropped_streams == 1)


# --- latency is cancellable --------------------------------------------------------------


def test_a_silent_vendor_lets_go_when_the_client_does() -> None:
    with FakeVendors(api_key=KEY) as fake:
        fake.script(Fault(latency=60))
        with (
            openai_client(fake, timeout=0.3) as client,
            pytest.raises(openai.APITimeoutError),
        ):
            client.chat.completions.create(model="m", messages=USER)
        gave_up = time.monotonic()
        wait_for(lambda: len(fake.abandoned_at) == 1)
        assert fake.abandoned_at[0] - gave_up < 1.0
        stopping = time.monotonic()
    # A handler still asleep would hold uvicorn's shutdown for its whole 1 s grace period.
    assert time.monotonic() - stopping < 0.8


# --- first_token_latency -----------------------------------------------------------------


def test_slow_first_token_sends_the_headers_and_role_chunk_at_once(fake: FakeVendors) -> None:
    fake.script(Reply(text="a b", fault=Fault(first_token_latency=1.0)))
    body = {"model": "m", "stream": True, "messages": USER}
    started = time.monotonic()
    with (
        httpx.Client() as client,
        connect_sse(
            client,
            "POST",
            f"{fake.openai_base_url}/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json=body,
        ) as source,
    ):
        assert source.response.status_code == 200
        headers_after = time.monotonic() - started
        arrivals = [(time.monotonic() - started, event.data) for event in source.iter_sse()]
    assert headers_after < 0.5
    role_after, role = arrivals[0]
    assert json.loads(role)["choices"][0]["delta"]["role"] == "assistant"
    assert role_after < 0.5
    first_after, first = arrivals[1]
    assert json.loads(first)["choices"][0]["delta"]["content"] == "a "
    assert first_after >= 1.0
    assert arrivals[-1][1] == "[DONE]"


def test_slow_first_token_after_anthropic_message_start(fake: FakeVendors) -> None:
    fake.script(Reply(text="a b", fault=Fault(first_token_latency=1.0)))
    started = time.monotonic()
    seen: list[tuple[str, float]] = []
    with (
        anthropic_client(fake) as client,
        client.messages.stream(model="m", max_tokens=9, messages=USER) as stream,
    ):
        seen.extend((event.type, time.monotonic() - started) for event in stream)
        final = stream.get_final_message()
    assert seen[0][0] == "message_start" and seen[0][1] < 0.5
    first_text = next(at for kind, at in seen if kind == "content_block_delta")
    assert first_text >= 1.0
    assert final.content[0].type == "text" and final.content[0].text == "a b"


def test_slow_first_token_in_gemini_and_in_a_json_answer(fake: FakeVendors) -> None:
    fake.script(Reply(text="a b", fault=Fault(first_token_latency=0.6)))
    started = time.monotonic()
    with (
        httpx.Client() as client,
        client.stream(
            "POST",
            gemini_url(fake, "streamGenerateContent"),
            params={"alt": "sse"},
            headers={"x-goog-api-key": KEY},
            json=gemini_body("x"),
        ) as response,
    ):
        headers_after = time.monotonic() - started
        body = response.read().decode()
        body_after = time.monotonic() - started
    assert headers_after < 0.4 and body_after >= 0.6
    assert body.count("data: ") == 2
    started = time.monotonic()
    whole = httpx.post(gemini_url(fake), headers={"x-goog-api-key": KEY}, json=gemini_body("x"))
    assert time.monotonic() - started >= 0.6
    assert whole.json()["candidates"][0]["content"]["parts"] == [{"text": "a b"}]


# --- no_terminal -------------------------------------------------------------------------


def test_openai_stream_without_done_still_carries_the_usage(fake: FakeVendors) -> None:
    fake.script(Reply(text="a b", fault=Fault(no_terminal=True)))
    with openai_client(fake) as client:
        chunks = list(
            client.chat.completions.create(
                model="m",
                messages=USER,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert [c.choices[0].delta.content for c in chunks[:3]] == ["", "a ", "b"]
    assert chunks[3].choices[0].finish_reason == "stop"
    assert chunks[4].choices == [] and chunks[4].usage is not None
    assert chunks[4].usage.completion_tokens == 2
    assert len(chunks) == 5
    with (
        httpx.Client() as http,
        http.stream(
            "POST",
            f"{fake.openai_base_url}/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={"model": "m", "stream": True, "messages": USER},
        ) as response,
    ):
        raw = response.read().decode()
    assert "[DONE]" not in raw and raw.endswith("}\n\n")
    wait_for(lambda: fake.completed_streams == 2)
    assert fake.dropped_streams == 0


def test_anthropic_stream_without_message_stop(fake: FakeVendors) -> None:
    fake.script(Reply(text="a b", fault=Fault(no_terminal=True)))
    with anthropic_client(fake) as client:
        events = list(client.messages.create(model="m", max_tokens=9, messages=USER, stream=True))
    # The SDK drops ``ping`` events.
    assert [event.type for event in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
    ]
    last = events[-1]
    assert last.type == "message_delta"
    assert last.delta.stop_reason == "end_turn" and last.usage.output_tokens == 2


def test_gemini_stream_without_its_finishing_chunk(fake: FakeVendors) -> None:
    fake.script(Reply(text=FOUR, fault=Fault(no_terminal=True)))
    chunks = gemini_chunks(fake, gemini_body("x"))
    assert gemini_texts(chunks) == ["one ", "two ", "three ", "four"]
    assert all("finishReason" not in c["candidates"][0] for c in chunks)
    assert all("usageMetadata" not in c for c in chunks)
    wait_for(lambda: fake.completed_streams == 1)


# --- error_kind ---------------------------------------------------------------------------

OPENAI_CONTEXT = {
    "message": "This model's maximum context length is 128000 tokens. However, your messages "
    "resulted in 130000 tokens. Please reduce the length of the messages.",
    "type": "invalid_request_error",
    "param": "messages",
    "code": "context_length_exceeded",
}
OPENAI_POLICY = {
    "message": "Your request was rejected as a result of our safety system.",
    "type": "invalid_request_error",
    "param": None,
    "code": "content_policy_violation",
}


@pytest.mark.parametrize(
    ("kind", "expected"), [("context_length", OPENAI_CONTEXT), ("content_policy", OPENAI_POLICY)]
)
@pytest.mark.parametrize("stream", [False, True])
def test_openai_error_kinds(
    fake: FakeVendors, kind: Any, expected: dict[str, Any], stream: bool
) -> None:
    fake.script(Fault(error_kind=kind))
    with openai_client(fake) as client, pytest.raises(openai.BadRequestError) as failed:
        client.chat.completions.create(model="m", messages=USER, stream=stream)
    assert failed.value.status_code == 400
    # The SDK hands over the object inside "error".
    assert failed.value.body == expected
    assert failed.value.code == expected["code"]


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_prompt_too_long(fake: FakeVendors, stream: bool) -> None:
    fake.script(Fault(error_kind="context_length", status=400))
    with anthropic_client(fake) as client, pytest.raises(anthropic.BadRequestError) as failed:
        client.messages.create(model="m", max_tokens=9, messages=USER, stream=stream)
    body = failed.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"] == {
        "type": "invalid_request_error",
        "message": "prompt is too long: 210000 tokens > 200000 maximum",
    }


def test_anthropic_refusal_is_a_200_with_stop_reason_refusal(fake: FakeVendors) -> None:
    fake.script(Reply(text="never said", fault=Fault(error_kind="content_policy")))
    with anthropic_client(fake) as client:
        message = client.messages.create(model="m", max_tokens=9, messages=USER)
        with client.messages.stream(model="m", max_tokens=9, messages=USER) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_message()
    assert message.stop_reason == "refusal" and message.content == []
    assert message.usage.output_tokens == 0 and message.usage.input_tokens == 1
    assert kinds == ["message_start", "message_delta", "message_stop"]
    assert final.stop_reason == "refusal" and final.content == []


def test_gemini_error_kinds(fake: FakeVendors) -> None:
    fake.script(Fault(error_kind="context_length"), match="long")
    fake.script(Fault(error_kind="content_policy"), match="bad")
    headers = {"x-goog-api-key": KEY}
    too_long = httpx.post(gemini_url(fake), headers=headers, json=gemini_body("long"))
    assert too_long.status_code == 400
    assert too_long.json() == {
        "error": {
            "code": 400,
            "message": "The input token count (1200000) exceeds the maximum number of tokens "
            "allowed (1048576).",
            "status": "INVALID_ARGUMENT",
        }
    }
    blocked = httpx.post(gemini_url(fake), headers=headers, json=gemini_body("bad words"))
    assert blocked.status_code == 200
    payload = blocked.json()
    assert "candidates" not in payload
    assert payload["promptFeedback"]["blockReason"] == "SAFETY"
    assert payload["usageMetadata"] == {"promptTokenCount": 2, "totalTokenCount": 2}
    (chunk,) = gemini_chunks(fake, gemini_body("bad words"))
    assert chunk["promptFeedback"]["blockReason"] == "SAFETY" and "candidates" not in chunk


def test_error_kind_cannot_be_combined_with_another_status() -> None:
    with pytest.raises(ValueError, match="error_kind"):
        Fault(error_kind="context_length", status=503)


# --- active_for (flapping) ---------------------------------------------------------------


def test_a_rule_with_active_for_matches_only_inside_its_window() -> None:
    rule = Rule(Fault(status=503, active_for=2.0), None, None, None, installed_at=100.0)
    request = RecordedRequest(vendor="openai", path="/", headers={}, body={}, stream=False)
    assert rule.matches(request, now=100.0)
    assert rule.matches(request, now=101.999)
    assert not rule.matches(request, now=102.0)
    on_reply = Rule(Reply(fault=Fault(active_for=1.0)), None, None, None, installed_at=0.0)
    assert on_reply.matches(request, now=0.5) and not on_reply.matches(request, now=1.5)


def test_a_vendor_down_for_a_while_comes_back(fake: FakeVendors) -> None:
    fake.script(Fault(status=503, active_for=0.5), vendor="anthropic")
    installed = time.monotonic()
    with anthropic_client(fake) as client:
        with pytest.raises(anthropic.InternalServerError) as down:
            client.messages.create(model="m", max_tokens=9, messages=USER)
        assert down.value.status_code == 503
        time.sleep(max(0.0, installed + 0.6 - time.monotonic()))
        message = client.messages.create(model="m", max_tokens=9, messages=USER)
    assert message.content[0].type == "text" and message.content[0].text == "Echo: count"


# --- prefill -----------------------------------------------------------------------------

PREFILLED: Any = [
    {"role": "user", "content": "what is it?"},
    {"role": "assistant", "content": "It is"},
]


def test_make_plan_continues_only_a_text_that_starts_with_the_prefill() -> None:
    conversation = Conversation("user", "what is it?", 6, prefill="It is")
    assert make_plan(Reply(text="It is 42."), conversation, continue_prefill=True).text == " 42."
    assert make_plan(Reply(text="No."), conversation, continue_prefill=True).text == "No."
    assert make_plan(Reply(text="It is 42."), conversation).text == "It is 42."


def test_anthropic_continues_a_prefill_by_default(fake: FakeVendors) -> None:
    fake.script(Reply(text="It is 42 today."))
    with anthropic_client(fake) as client:
        message = client.messages.create(model="m", max_tokens=9, messages=PREFILLED)
        with client.messages.stream(model="m", max_tokens=9, messages=PREFILLED) as stream:
            pieces = list(stream.text_stream)
    assert message.content[0].type == "text" and message.content[0].text == " 42 today."
    assert message.usage.output_tokens == 2
    assert pieces == [" 42 ", "today."]
    assert [(r.prefill, r.last_role, r.last_text) for r in fake.requests] == [
        ("It is", "user", "what is it?")
    ] * 2


def test_anthropic_without_prefill_support_and_with_trailing_space(fake: FakeVendors) -> None:
    with anthropic_client(fake) as client:
        with pytest.raises(anthropic.BadRequestError) as spaced:
            client.messages.create(
                model="m",
                max_tokens=9,
                messages=[USER[0], {"role": "assistant", "content": "It is "}],
            )
        fake.set_prefill("anthropic", "reject")
        with pytest.raises(anthropic.BadRequestError) as refused:
            client.messages.create(model="m", max_tokens=9, messages=PREFILLED)
    assert isinstance(spaced.value.body, dict)
    assert spaced.value.body["error"]["message"] == (
        "messages: final assistant content cannot end with trailing whitespace"
    )
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["error"] == {
        "type": "invalid_request_error",
        "message": "This model does not support assistant message prefill. "
        "The conversation must end with a user message.",
    }


def test_openai_ignores_a_prefill_unless_told_otherwise(fake: FakeVendors) -> None:
    fake.script(Reply(text="It is 42."))
    with openai_client(fake) as client:
        fresh = client.chat.completions.create(model="m", messages=PREFILLED)
        fake.set_prefill("openai", "continue")
        stream = client.chat.completions.create(model="m", messages=PREFILLED, stream=True)
        continued = "".join(c.choices[0].delta.content or "" for c in stream)
        fake.set_prefill("openai", "reject")
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="m", messages=PREFILLED)
        fake.reset()
        fake.script(Reply(text="It is 42."))
        again = client.chat.completions.create(model="m", messages=PREFILLED)
    assert fresh.choices[0].message.content == "It is 42."
    assert continued == " 42."
    assert refused.value.status_code == 400 and refused.value.param is None
    assert again.choices[0].message.content == "It is 42.", "reset restores 'ignore'"
    assert fake.requests[0].prefill == "It is"


def test_gemini_refuses_a_model_turn_last_unless_set_to_continue(fake: FakeVendors) -> None:
    fake.script(Reply(text="It is 42 now"))
    headers = {"x-goog-api-key": KEY}
    refused = httpx.post(gemini_url(fake), headers=headers, json=gemini_body("q", "It is"))
    assert refused.status_code == 400
    assert refused.json()["error"] == {
        "code": 400,
        "message": "Please ensure that multiturn requests ends with a user role or a function "
        "response.",
        "status": "INVALID_ARGUMENT",
    }
    fake.set_prefill("google", "continue")
    chunks = gemini_chunks(fake, gemini_body("q", "It is"))
    assert gemini_texts(chunks) == [" 42 ", "now"]
    assert [r.prefill for r in fake.requests] == ["It is", "It is"]


def test_prefill_defaults_can_be_given_to_the_constructor() -> None:
    with FakeVendors(api_key=KEY, prefill={"google": "ignore"}) as fake:
        fake.script(Reply(text="It is 42."))
        answer = httpx.post(
            gemini_url(fake), headers={"x-goog-api-key": KEY}, json=gemini_body("q", "It is")
        )
    assert answer.json()["candidates"][0]["content"]["parts"] == [{"text": "It is 42."}]


# --- arrival times -----------------------------------------------------------------------


def test_requests_carry_their_monotonic_arrival_time(fake: FakeVendors) -> None:
    fake.script(Fault(status=503), times=2)
    url = f"{fake.openai_base_url}/chat/completions"
    headers = {"authorization": f"Bearer {KEY}"}
    before = time.monotonic()
    statuses = []
    for pause in (0.0, 0.3, 0.3):
        time.sleep(pause)
        response = httpx.post(url, headers=headers, json={"model": "m", "messages": USER})
        statuses.append(response.status_code)
    after = time.monotonic()
    assert statuses == [503, 503, 200]
    arrivals = [request.received_at for request in fake.requests]
    assert len(arrivals) == 3
    assert before <= arrivals[0] and arrivals[-1] <= after
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap >= 0.3 for gap in gaps)
