"""Every HTTP route fuzzed from the committed OpenAPI document (schemathesis, positive and
negative data) against a real ``robota-proxy serve`` process on PostgreSQL, the stricter of
the two databases (typed integers, no NUL in text, varchar lengths enforced).

The promise under test is the design's "nothing the caller sends can produce a 5xx": each
case fails on a 5xx, on an error that is not the wire's JSON error body, on a request that
does not answer within ``REQUEST_TIMEOUT`` (a hang), or on a traceback in the proxy's log
(an error swallowed into a polite answer is still an error). The user's key has a budget and
a token quota, so calls that reach a vendor run the whole money path.

Bounded for CI by ``max_examples`` per operation and mode; ``ROBOTA_FUZZ_SCALE`` scales it
for a longer local run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case, GenerationMode, Response
from schemathesis.checks import not_a_server_error

from robota_proxy.dialects import dialect_of_path
from robota_proxy.testing import FakeVendors
from tests.e2e.conftest import ROOT, stop_proxy, vendor_env
from tests.e2e.fuzz_support import REQUEST_TIMEOUT, SCALE, FuzzTarget, start_fuzz_target

pytestmark = [pytest.mark.e2e, pytest.mark.fuzz]

#: Examples per operation (each runs positive and negative data): 24 operations (five of them
#: the /v1 surfaces) at ~10 ms a request keep this file near half a minute on an idle machine;
#: a busy 2-core one took about four minutes.
MAX_EXAMPLES = 40 * SCALE

SCHEMA = schemathesis.openapi.from_path(ROOT / "docs" / "openapi.json")
SCHEMA.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=MAX_EXAMPLES,
    # NUL and every other code point: what PostgreSQL and the UTF-8 encoders refuse.
    allow_x00=True,
)


@pytest.fixture(scope="module")
def target(
    fake_server: FakeVendors, postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FuzzTarget]:
    home = tmp_path_factory.mktemp("fuzz_http")
    env = {
        **vendor_env(fake_server),
        "ROBOTA_DATABASE_URL": postgres_url,
        "ROBOTA_MAX_BODY_BYTES": str(64 * 1024),
        "ROBOTA_UPSTREAM_TIMEOUT": "5",
    }
    running = start_fuzz_target(env, home / "proxy.log")
    yield running
    stop_proxy(running.proxy)
    running.log.assert_no_traceback("the fuzzed requests (at shutdown)")


def header(response: Response, name: str) -> str | None:
    values = {key.lower(): value for key, value in response.headers.items()}.get(name)
    return values[0] if values else None


def assert_wire_error(response: Response, path: str) -> None:
    """A refusal is the JSON error of the path's dialect: the contract's ``{"error": {"code",
    "message", "requestId"}}``, its request id the one in ``X-Request-ID``; under ``/v1/``
    OpenAI's ``{"error": {"message", "type", "param", "code"}}``, or for ``/v1/messages*``
    Anthropic's ``{"type": "error", "error": {"type", "message"}}``, as their SDKs read them."""
    if response.status_code < 400:
        return
    content_type = header(response, "content-type") or ""
    assert content_type.startswith("application/json"), (response.status_code, response.text)
    body: Any = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict), response.text[:500]
    assert isinstance(error.get("message"), str), response.text[:500]
    dialect = dialect_of_path(path).name
    if dialect == "anthropic":
        assert body.get("type") == "error" and isinstance(error.get("type"), str), body
        request_id = header(response, "request-id")
        assert request_id is not None and body.get("request_id") == request_id, body
    elif dialect == "openai":
        assert isinstance(error.get("type"), str) and isinstance(error.get("code"), str), body
        assert "param" in error, body
    else:
        assert isinstance(error.get("code"), str)
        assert error.get("requestId") == header(response, "x-request-id")


@SCHEMA.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=False,
)
def test_no_input_gets_a_5xx_a_hang_or_a_traceback(case: Case[Any], target: FuzzTarget) -> None:
    headers = target.auth(case.path)
    response = case.call(base_url=target.url, headers=headers, timeout=REQUEST_TIMEOUT)
    case.validate_response(response, checks=[not_a_server_error])
    assert_wire_error(response, case.path)
    target.log.assert_no_traceback(f"{case.method} {case.formatted_path}")
