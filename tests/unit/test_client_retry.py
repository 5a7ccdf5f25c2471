"""The retry policy: what is retried, how long the client waits, and what it raises at the end.

Back-off is observed through an injected sleep, so no test waits for real.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
import respx

from robota_client import RemoteAIProvider
from robota_client.errors import (
    ForbiddenError,
    InternalError,
    InvalidRequestError,
    ProtocolError,
    QuotaExceededError,
    RateLimitedError,
    RemoteConnectionError,
    UnauthenticatedError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from tests.unit.test_client_support import API_KEY, URL, RecordingSleep

CHAT = f"{URL}/ai/chat"
MESSAGES = [{"role": "user", "content": "hi"}]
ANSWER = {
    "role": "assistant",
    "content": "hello",
    "metadata": {"provider": "openai", "model": "gpt-4o-mini", "requestId": "req-ok"},
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        yield router


def error(status: int, code: str, **extra: object) -> httpx.Response:
    return httpx.Response(
        status,
        json={"error": {"code": code, "message": f"{code} happened", "requestId": "r", **extra}},
    )


def provider(
    sleep: RecordingSleep,
    *,
    max_retries: int = 2,
    retry_initial_delay: float = 0.25,
    retry_max_delay: float = 8.0,
) -> RemoteAIProvider:
    return RemoteAIProvider(
        URL,
        API_KEY,
        "openai",
        "gpt-4o-mini",
        max_retries=max_retries,
        retry_initial_delay=retry_initial_delay,
        retry_max_delay=retry_max_delay,
        sleep=sleep,
    )


@pytest.mark.anyio
async def test_503_is_retried_with_growing_jittered_back_off(mock: respx.MockRouter) -> None:
    route = mock.post(CHAT).mock(
        side_effect=[
            error(503, "upstream_unavailable"),
            error(502, "upstream_error"),
            httpx.Response(200, json=ANSWER),
        ]
    )
    sleep = RecordingSleep()
    async with provider(sleep) as ai:
        answer = await ai.chat(MESSAGES)
    assert answer.content == "hello"
    assert route.call_count == 3
    first, second = sleep.waits
    assert 0.25 <= first <= 0.5  # initial delay plus up to one initial delay of jitter
    assert 0.5 <= second <= 0.75


@pytest.mark.anyio
async def test_back_off_is_capped_by_retry_max_delay(mock: respx.MockRouter) -> None:
    mock.post(CHAT).mock(return_value=error(504, "upstream_timeout"))
    sleep = RecordingSleep()
    ai = provider(sleep, max_retries=5, retry_initial_delay=1.0, retry_max_delay=3.0)
    with pytest.raises(Exception, match="upstream_timeout"):
        await ai.chat(MESSAGES)
    assert len(sleep.waits) == 5
    assert all(wait <= 3.0 for wait in sleep.waits)
    assert sleep.waits[-1] == 3.0


@pytest.mark.anyio
async def test_retry_after_is_honoured(mock: respx.MockRouter) -> None:
    route = mock.post(CHAT).mock(
        side_effect=[
            error(429, "rate_limited", retryAfter=2.5),
            httpx.Response(429, headers={"Retry-After": "4"}, text="slow down"),
            httpx.Response(200, json=ANSWER),
        ]
    )
    sleep = RecordingSleep()
    answer = await provider(sleep).chat(MESSAGES)
    assert answer.content == "hello"
    assert route.call_count == 3
    assert sleep.waits == [2.5, 4.0]


@pytest.mark.anyio
async def test_retry_after_beyond_the_cap_is_raised_not_waited(mock: respx.MockRouter) -> None:
    route = mock.post(CHAT).mock(return_value=error(429, "rate_limited", retryAfter=60))
    sleep = RecordingSleep()
    with pytest.raises(RateLimitedError) as caught:
        await provider(sleep, retry_max_delay=8.0).chat(MESSAGES)
    assert caught.value.retry_after == 60
    assert route.call_count == 1
    assert sleep.waits == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (400, "invalid_request", InvalidRequestError),
        (401, "unauthenticated", UnauthenticatedError),
        (403, "forbidden", ForbiddenError),
        (429, "quota_exceeded", QuotaExceededError),
        (500, "internal_error", InternalError),
    ],
)
async def test_never_retried(
    mock: respx.MockRouter, status: int, code: str, expected: type[Exception]
) -> None:
    route = mock.post(CHAT).mock(return_value=error(status, code))
    sleep = RecordingSleep()
    with pytest.raises(expected) as caught:
        await provider(sleep).chat(MESSAGES)
    assert route.call_count == 1
    assert sleep.waits == []
    assert caught.value.status == status  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_plain_500_without_json_is_not_retried(mock: respx.MockRouter) -> None:
    route = mock.post(CHAT).mock(return_value=httpx.Response(500, text="Internal Server Error"))
    with pytest.raises(InternalError):
        await provider(RecordingSleep()).chat(MESSAGES)
    assert route.call_count == 1


@pytest.mark.anyio
async def test_retryable_errors_that_persist_raise_the_last_one(mock: respx.MockRouter) -> None:
    route = mock.post(CHAT).mock(return_value=error(503, "upstream_unavailable"))
    with pytest.raises(UpstreamUnavailableError):
        await provider(RecordingSleep(), max_retries=3).chat(MESSAGES)
    assert route.call_count == 4


@pytest.mark.anyio
@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("connection refused"),
        httpx.ConnectTimeout("connect timed out"),
        httpx.RemoteProtocolError("server disconnected without sending a response"),
        httpx.ReadError("connection reset"),
    ],
)
async def test_connection_failures_are_retried(mock: respx.MockRouter, failure: Exception) -> None:
    route = mock.post(CHAT).mock(side_effect=[failure, httpx.Response(200, json=ANSWER)])
    answer = await provider(RecordingSleep()).chat(MESSAGES)
    assert answer.content == "hello"
    assert route.call_count == 2


@pytest.mark.anyio
async def test_retries_exhausted_raise_remote_connection_error(mock: respx.MockRouter) -> None:
    route = mock.post(CHAT).mock(side_effect=httpx.ConnectError("connection refused"))
    sleep = RecordingSleep()
    with pytest.raises(RemoteConnectionError) as caught:
        await provider(sleep, max_retries=2).chat(MESSAGES)
    assert route.call_count == 3
    assert len(sleep.waits) == 2
    error = caught.value
    assert (error.code, error.status) == ("connection_error", None)
    assert "after 3 attempts" in str(error)
    assert isinstance(error.__cause__, httpx.ConnectError)


@pytest.mark.anyio
async def test_read_timeout_is_not_retried(mock: respx.MockRouter) -> None:
    # The proxy may be in the middle of a paid vendor call; asking again could pay twice.
    route = mock.post(CHAT).mock(side_effect=httpx.ReadTimeout("timed out"))
    with pytest.raises(RemoteConnectionError):
        await provider(RecordingSleep()).chat(MESSAGES)
    assert route.call_count == 1


@pytest.mark.anyio
async def test_connection_refused_by_a_real_socket() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleep = RecordingSleep()
    async with RemoteAIProvider(
        f"http://127.0.0.1:{port}", API_KEY, "openai", "m", max_retries=1, sleep=sleep
    ) as ai:
        with pytest.raises(RemoteConnectionError) as caught:
            await ai.chat(MESSAGES)
        assert await ai.health() is False
    assert len(sleep.waits) == 1
    assert API_KEY not in str(caught.value)


@pytest.mark.anyio
async def test_non_json_502_from_a_load_balancer(mock: respx.MockRouter) -> None:
    page = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    route = mock.post(CHAT).mock(return_value=httpx.Response(502, html=page))
    with pytest.raises(UpstreamError) as caught:
        await provider(RecordingSleep(), max_retries=1).chat(MESSAGES)
    assert route.call_count == 2  # 502 is retryable whoever said it
    assert caught.value.status == 502
    assert "502 Bad Gateway" in str(caught.value)


@pytest.mark.anyio
async def test_success_status_with_a_non_json_body_is_a_protocol_error(
    mock: respx.MockRouter,
) -> None:
    mock.post(CHAT).mock(
        return_value=httpx.Response(
            200, text="<html>login page</html>", headers={"x-request-id": "x"}
        )
    )
    with pytest.raises(ProtocolError) as caught:
        await provider(RecordingSleep()).chat(MESSAGES)
    assert caught.value.request_id == "x"
    assert caught.value.code == "protocol_error"


@pytest.mark.anyio
async def test_json_that_is_not_an_assistant_message_is_a_protocol_error(
    mock: respx.MockRouter,
) -> None:
    mock.post(CHAT).mock(return_value=httpx.Response(200, json={"role": "user"}))
    with pytest.raises(ProtocolError):
        await provider(RecordingSleep()).chat(MESSAGES)


@pytest.mark.anyio
async def test_server_echoing_the_key_does_not_leak_it(mock: respx.MockRouter) -> None:
    mock.post(CHAT).mock(return_value=error(401, "unauthenticated", message=f"bad key {API_KEY}"))
    with pytest.raises(UnauthenticatedError) as caught:
        await provider(RecordingSleep()).chat(MESSAGES)
    assert API_KEY not in str(caught.value)
    assert API_KEY not in repr(caught.value)


# --- errors the proxy's upstream layer already retried ------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (503, "upstream_unavailable", UpstreamUnavailableError),
        (504, "upstream_timeout", UpstreamTimeoutError),
        (502, "upstream_error", UpstreamError),  # e.g. the vendor refused the proxy's key
        (429, "rate_limited", RateLimitedError),  # the vendor's 429, already waited out
    ],
)
async def test_an_error_the_proxy_already_retried_is_not_retried(
    mock: respx.MockRouter, status: int, code: str, expected: type[Exception]
) -> None:
    route = mock.post(CHAT).mock(
        side_effect=[error(status, code, upstreamAttempts=3), httpx.Response(200, json=ANSWER)]
    )
    sleep = RecordingSleep()
    with pytest.raises(expected) as caught:
        await provider(sleep, max_retries=5).chat(MESSAGES)
    assert route.call_count == 1
    assert sleep.waits == []
    assert caught.value.upstream_attempts == 3  # type: ignore[attr-defined]
    assert "3 vendor calls" in str(caught.value)


@pytest.mark.anyio
async def test_the_attempts_header_alone_is_enough(mock: respx.MockRouter) -> None:
    # What a proxy behind a load balancer that rewrites bodies still gets through.
    route = mock.post(CHAT).mock(
        side_effect=[
            httpx.Response(503, text="down", headers={"X-Robota-Upstream-Attempts": "1"}),
            httpx.Response(200, json=ANSWER),
        ]
    )
    with pytest.raises(UpstreamUnavailableError) as caught:
        await provider(RecordingSleep()).chat(MESSAGES)
    assert route.call_count == 1
    assert caught.value.upstream_attempts == 1


@pytest.mark.anyio
async def test_a_stream_the_proxy_already_retried_is_not_reopened(
    mock: respx.MockRouter,
) -> None:
    route = mock.post(f"{URL}/ai/chat/stream").mock(
        return_value=error(503, "upstream_unavailable", upstreamAttempts=3)
    )
    with pytest.raises(UpstreamUnavailableError):
        async for _ in provider(RecordingSleep()).chat_stream(MESSAGES):
            pytest.fail("no content expected")
    assert route.call_count == 1


@pytest.mark.anyio
@pytest.mark.parametrize("garbled", ["", "three", "-1"])
async def test_an_unreadable_attempts_header_counts_as_absent(
    mock: respx.MockRouter, garbled: str
) -> None:
    route = mock.post(CHAT).mock(
        side_effect=[
            httpx.Response(503, text="down", headers={"X-Robota-Upstream-Attempts": garbled}),
            httpx.Response(200, json=ANSWER),
        ]
    )
    answer = await provider(RecordingSleep()).chat(MESSAGES)
    assert answer.content == "hello"
    assert route.call_count == 2


@pytest.mark.anyio
async def test_the_proxys_own_rate_limit_is_still_waited_out(mock: respx.MockRouter) -> None:
    # No upstreamAttempts: the 429 comes from the proxy's limiter, not from a vendor.
    route = mock.post(CHAT).mock(
        side_effect=[error(429, "rate_limited", retryAfter=1.5), httpx.Response(200, json=ANSWER)]
    )
    sleep = RecordingSleep()
    answer = await provider(sleep).chat(MESSAGES)
    assert answer.content == "hello"
    assert route.call_count == 2
    assert sleep.waits == [1.5]
