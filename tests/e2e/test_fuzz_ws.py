"""``/ai/ws`` fuzzed frame by frame (hypothesis) on one socket of a real proxy process.

Each example sends a good streamed call (slowed down by the fake vendor so that it is in
flight), then one bad frame of a kind the audit broke the socket with, or worse (garbage
text, binary, JSON nested past the bound, a body over the size limit, fields of the wrong
type, a non-ASCII ``lastEventId``, a lone surrogate), then a ``ping``. The bad frame must get
exactly one ``error`` frame of its own; the good call must still end with ``done``; the
``pong`` must come back; and the proxy must log no traceback. The same socket serves every
example, so one frame that killed it fails every example after it.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from robota_proxy.testing import FakeVendors, Fault, Reply
from tests.e2e.conftest import stop_proxy, vendor_env
from tests.e2e.fuzz_support import REQUEST_TIMEOUT, SCALE, FuzzTarget, start_fuzz_target

pytestmark = [pytest.mark.e2e, pytest.mark.fuzz]

MAX_BODY_BYTES = 64 * 1024
GOOD_WORDS = "one two three four five"
STREAM_ID = "s_" + "0" * 32
KNOWN_TYPES = {"ping", "hello", "stats", "cancel", "request", "resume"}


@dataclass
class Socket:
    target: FuzzTarget
    connection: ClientConnection
    numbers: Iterator[int]


@pytest.fixture(scope="module")
def socket(fake_server: FakeVendors, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Socket]:
    home = tmp_path_factory.mktemp("fuzz_ws")
    env = {
        **vendor_env(fake_server),
        "ROBOTA_DATABASE_URL": f"sqlite:///{home / 'robota.db'}",
        "ROBOTA_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "ROBOTA_WS_MAX_IN_FLIGHT": "8",
    }
    target = start_fuzz_target(env, home / "proxy.log")
    # The good call: a priced model (the key has a budget), slow enough to be in flight
    # while the bad frame arrives.
    fake_server.script(Reply(text=GOOD_WORDS, fault=Fault(chunk_latency=0.01)), match="good")
    url = target.url.replace("http://", "ws://") + "/ai/ws"
    try:
        with connect(url, additional_headers=target.auth("/ai/ws"), max_size=None) as connection:
            yield Socket(target, connection, itertools.count())
    finally:
        stop_proxy(target.proxy)
        fake_server.reset()
    target.log.assert_no_traceback("the fuzzed frames (at shutdown)")


# --- bad frames, each with what its refusal looks like -----------------------------------------

#: ``(frame, id of its refusal or None for an id-less one, code or None for any code)``
Bad = tuple[str | bytes, str | None, str | None]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def _known_frame(text: str) -> bool:
    """Whether ``text`` happens to be a frame the proxy acts on (those are not bad)."""
    try:
        frame = json.loads(text)
    except ValueError:
        return False
    return isinstance(frame, dict) and frame.get("type") in KNOWN_TYPES


garbage = (
    st.text(max_size=300)
    .filter(lambda text: not _known_frame(text))
    .map(lambda text: (text, None, "invalid_request"))
)
binary = st.binary(max_size=2000).map(lambda data: (data, None, "invalid_request"))
deep = st.builds(
    lambda depth, pair: (pair[0] * depth + "1" + pair[1] * depth, None, "invalid_request"),
    st.integers(201, 5000),
    st.sampled_from([("[", "]"), ('{"a":', "}"), ('{"type": "request", "body":', "}")]),
)
lone_surrogate = st.sampled_from(["\\ud800", "\\udfff", "\\ud83d x"]).map(
    lambda escape: (f'{{"type": "request", "id": "{escape}"}}', None, "invalid_request")
)
junk_id = json_values.filter(lambda v: not isinstance(v, str)) | st.just("") | st.just("i" * 129)
wrong_id = st.builds(
    lambda kind, request_id: (
        json.dumps({"type": kind, "id": request_id}),
        None,
        "invalid_request",
    ),
    st.sampled_from(["request", "resume"]),
    junk_id,
)


@st.composite
def with_own_id(draw: st.DrawFn) -> Bad:
    """Frames with a usable id whose refusal carries that id: wrong types in the other
    fields, a body over the size limit, a non-ASCII or malformed ``lastEventId``."""
    request_id = f"bad-{draw(st.integers(0, 10**9))}"
    kind = draw(st.sampled_from(["wrong_body", "huge", "last_event_id", "stream_id"]))
    if kind == "wrong_body":
        body = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        frame = {"type": "request", "id": request_id, "body": body, "stream": draw(json_values)}
        return json.dumps(frame), request_id, "invalid_request"
    if kind == "huge":
        size = draw(st.integers(MAX_BODY_BYTES + 1, 1024 * 1024))
        body = {
            "provider": "mock",
            "model": "mock-1",
            "messages": [{"role": "user", "content": "x" * size}],
        }
        frame = {"type": "request", "id": request_id, "body": body}
        return json.dumps(frame), request_id, "payload_too_large"
    if kind == "last_event_id":
        last = draw(
            st.text(min_size=1, max_size=40).filter(lambda t: not t.isascii())
            | st.sampled_from(["²", f"{STREAM_ID}:²", f"{STREAM_ID}:٣", "1" * 10, "-1"])
            | json_values.filter(lambda v: v not in (None, "") and not isinstance(v, str))
        )
        frame = {"type": "resume", "id": request_id, "streamId": STREAM_ID, "lastEventId": last}
        return json.dumps(frame, ensure_ascii=draw(st.booleans())), request_id, "invalid_request"
    stream_id = draw(json_values.filter(lambda v: not (isinstance(v, str) and v.startswith("s_"))))
    frame = {"type": "resume", "id": request_id, "streamId": stream_id}
    return json.dumps(frame), request_id, "invalid_request"


bad_frames: st.SearchStrategy[Bad] = st.one_of(
    garbage, binary, deep, lone_surrogate, wrong_id, with_own_id()
)


# --- the test ------------------------------------------------------------------------------------


def good_call(request_id: str) -> str:
    body = {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "good call"}],
    }
    return json.dumps({"type": "request", "id": request_id, "body": body})


def exchange(socket: Socket, bad: Bad) -> None:
    frame, bad_id, code = bad
    number = next(socket.numbers)
    good_id = f"good-{number}"
    connection = socket.connection
    connection.send(good_call(good_id))
    connection.send(frame)
    connection.send(json.dumps({"type": "ping"}))
    good: list[dict[str, Any]] = []
    refusals: list[dict[str, Any]] = []
    pongs = 0
    deadline = time.monotonic() + REQUEST_TIMEOUT

    def finished() -> bool:
        good_done = bool(good) and good[-1].get("event") in ("done", "error")
        return good_done and pongs == 1 and len(refusals) >= 1

    while not finished():
        left = deadline - time.monotonic()
        assert left > 0, f"hang: good={good} refusals={refusals} pongs={pongs}"
        received = json.loads(connection.recv(timeout=left))
        if received.get("type") == "pong":
            pongs += 1
        elif received.get("id") == good_id:
            good.append(received)
        else:
            refusals.append(received)
    assert [f["event"] for f in good][-1] == "done", good
    text = "".join(f["data"]["content"] for f in good if f["event"] == "delta")
    assert text.split() == GOOD_WORDS.split()
    assert len(refusals) == 1, refusals
    refusal = refusals[0]
    assert refusal["event"] == "error", refusal
    assert refusal.get("id") == bad_id, refusal
    assert isinstance(refusal["data"]["message"], str) and refusal["data"]["message"]
    if code is not None:
        assert refusal["data"]["code"] == code, refusal
    socket.target.log.assert_no_traceback(f"frame {frame[:200]!r}")


@settings(
    max_examples=60 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(bad=bad_frames)
def test_a_bad_frame_gets_its_own_error_and_the_socket_lives_on(socket: Socket, bad: Bad) -> None:
    exchange(socket, bad)
