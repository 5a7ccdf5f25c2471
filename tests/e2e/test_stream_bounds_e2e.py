"""One stream cannot hold more than ``ROBOTA_STREAM_MAX_BYTES`` of the proxy's memory.

The audit's memory amplification: the ``mock`` provider emits one event per prompt word and
every event is kept for the resume window, so a few multi-megabyte prompts took the proxy past
a gigabyte. A stream past its bound now ends with an ``error`` event, and the proxy goes on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from tests.e2e.conftest import ProxyProcess, start_proxy, stop_proxy

pytestmark = pytest.mark.e2e


@pytest.fixture
def bounded(tmp_path: Path) -> Iterator[ProxyProcess]:
    proxy = start_proxy(
        {"ROBOTA_API_KEYS": "k", "ROBOTA_STREAM_MAX_BYTES": str(64 * 1024)},
        tmp_path / "proxy.log",
    )
    yield proxy
    stop_proxy(proxy)


def _stream(proxy: ProxyProcess, prompt: str) -> list[tuple[str, dict[str, object]]]:
    body = {
        "provider": "mock",
        "model": "mock-1",
        "messages": [{"role": "user", "content": prompt}],
    }
    with (
        httpx.Client(base_url=proxy.url, timeout=30) as client,
        connect_sse(
            client, "POST", "/ai/chat/stream", json=body, headers={"Authorization": "Bearer k"}
        ) as source,
    ):
        return [(event.event, json.loads(event.data)) for event in source.iter_sse()]


def test_a_stream_past_its_byte_bound_ends_with_an_error_event(bounded: ProxyProcess) -> None:
    events = _stream(bounded, " ".join(f"w{n}" for n in range(20_000)))
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "error"
    assert events[-1][1]["code"] == "upstream_error"
    assert "buffer" in str(events[-1][1]["message"])
    assert "done" not in kinds
    # 64 KiB at about 150 bytes an event: a few hundred deltas, not 20,000.
    assert 100 < kinds.count("delta") < 1000
    assert "ROBOTA_STREAM_MAX_BYTES" in bounded.log_once_it_has("ROBOTA_STREAM_MAX_BYTES")
    # The next, small stream is whole.
    small = _stream(bounded, "hello there")
    assert [kind for kind, _ in small][-1] == "done"
