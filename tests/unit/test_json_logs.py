"""JSON logs (README: Operating it, Logs): the formatter, the queued handler that keeps the
event loop from ever waiting on the log output, the config ``serve`` hands uvicorn, and the
access line's fields for a real request through the app."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from robota_proxy.app import create_app
from robota_proxy.cli import log_config as cli_log_config
from robota_proxy.observability.logging import JsonFormatter, QueuedHandler, log_config
from robota_proxy.policy.static_keys import key_id
from robota_proxy.scope import current_request_id
from robota_proxy.settings import Settings

USER_KEY = "user-key-for-json-logs-0123456789"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _record(message: str, *args: object, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord(
        "robota_proxy.test", logging.WARNING, __file__, 1, message, args, None
    )
    record.created = 1_700_000_000.25
    for name, value in extra.items():
        setattr(record, name, value)
    return record


def test_a_record_is_one_json_object_with_the_request_id_and_its_fields() -> None:
    token = current_request_id.set("req_abc")
    try:
        line = JsonFormatter().format(
            _record("%d tries for %s", 3, "mock/mock-1", robota={"attempts": 3, "level": "x"})
        )
    finally:
        current_request_id.reset(token)
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2023-11-14T22:13:20.250+00:00",
        "level": "warning",
        "logger": "robota_proxy.test",
        "message": "3 tries for mock/mock-1",
        "request_id": "req_abc",
        # a record's own field never replaces one of the four every line has
        "attempts": 3,
    }


def test_an_exception_is_a_field_of_the_same_line() -> None:
    try:
        raise ValueError("broken")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    parsed = json.loads(JsonFormatter().format(record))
    assert parsed["message"] == "failed"
    assert parsed["exception"].splitlines()[-1] == "ValueError: broken"
    assert "request_id" not in parsed


class _Gate(io.StringIO):
    """A stream whose writes wait until the gate opens: a log output that cannot keep up."""

    def __init__(self) -> None:
        super().__init__()
        self.open = threading.Event()

    def write(self, text: str) -> int:
        self.open.wait(10)
        return super().write(text)


def test_a_stuck_output_never_blocks_the_caller_and_what_was_dropped_is_told() -> None:
    stream = _Gate()
    handler = QueuedHandler(stream, capacity=2)
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        # The writer thread takes the first record and waits on the stream; two more fill the
        # queue; the next three are dropped, and emit returned at once every time.
        for n in range(6):
            handler.emit(_record(f"line {n}"))
        assert handler.dropped >= 3
        stream.open.set()
        for _ in range(200):  # the writer catches up
            if handler.queue.empty():  # type: ignore[attr-defined]
                break
            time.sleep(0.01)
        handler.emit(_record("line 6"))
    finally:
        handler.close()
    lines = stream.getvalue().splitlines()
    dropped = 6 - len([line for line in lines if line.startswith("line ") and line != "line 6"])
    assert lines[-2:] == [
        f"{dropped} log records were dropped: the log output could not keep up",
        "line 6",
    ]


def test_the_serve_config_queues_every_handler_and_makes_every_formatter_json() -> None:
    config = log_config("debug", "json")
    assert cli_log_config("debug", "json") == config
    assert {name: f["()"] for name, f in config["formatters"].items()} == {
        "default": "robota_proxy.observability.logging.JsonFormatter",
        "access": "robota_proxy.observability.logging.JsonFormatter",
        "robota": "robota_proxy.observability.logging.JsonFormatter",
    }
    assert {name: h["()"] for name, h in config["handlers"].items()} == {
        "default": "robota_proxy.observability.logging.QueuedHandler",
        "access": "robota_proxy.observability.logging.QueuedHandler",
        "robota": "robota_proxy.observability.logging.QueuedHandler",
    }
    assert config["loggers"]["robota_proxy"]["level"] == "DEBUG"
    assert config["root"] == {"handlers": ["robota"], "level": "WARNING"}
    assert "()" not in log_config("info")["formatters"]["robota"]  # text stays the default


def test_applied_in_a_process_every_line_of_output_is_json() -> None:
    program = (
        "import logging, logging.config, json, sys\n"
        "from robota_proxy.observability.logging import log_config\n"
        "logging.config.dictConfig(log_config('info', 'json'))\n"
        "logging.getLogger('robota_proxy.upstream').info('attempt %d', 1)\n"
        "logging.getLogger('uvicorn.error').info('Started server process [%d]', 7)\n"
        "logging.getLogger('httpx').warning('a library speaks')\n"
        "logging.getLogger('robota_proxy.upstream').debug('not at info')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(line["logger"], line["level"], line["message"]) for line in lines] == [
        ("robota_proxy.upstream", "info", "attempt 1"),
        ("uvicorn.error", "info", "Started server process [7]"),
        ("httpx", "warning", "a library speaks"),
    ]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def access_lines() -> Iterator[list[str]]:
    handler = _Lines()
    logger = logging.getLogger("robota_proxy.access")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.setLevel(previous)
    logger.removeHandler(handler)


@pytest.mark.anyio
async def test_the_access_line_of_a_chat_has_its_figures_as_fields(
    tmp_path: Path, access_lines: list[str]
) -> None:
    settings = Settings(api_keys=[USER_KEY], database_url=f"sqlite:///{tmp_path / 'r.db'}")
    app = create_app(settings)
    body = {
        "provider": "mock",
        "model": "mock-1",
        "messages": [{"role": "user", "content": "hello there"}],
    }
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            auth = {"Authorization": f"Bearer {USER_KEY}"}
            answer = await client.post("/ai/chat", json=body, headers=auth)
            async with client.stream("POST", "/ai/chat/stream", json=body, headers=auth) as sse:
                await sse.aread()
    assert answer.status_code == 200
    assert sse.status_code == 200
    usage = answer.json()["usage"]
    chat, stream = (json.loads(line) for line in access_lines)
    for line in (chat, stream):
        assert line.pop("time")
        assert line.pop("latency_ms") >= 0
        assert line.pop("message").startswith("POST /ai/chat")
    assert stream.pop("ttft_ms") >= 0
    assert stream.pop("request_id").startswith("req_")
    assert chat == {
        "level": "info",
        "logger": "robota_proxy.access",
        "event": "request",
        "request_id": answer.headers["x-request-id"],
        "trace_id": None,
        "method": "POST",
        "path": "/ai/chat",
        "surface": "robota",
        "status": 200,
        "ttft_ms": None,
        "user": key_id(USER_KEY),
        "key_id": key_id(USER_KEY),
        "error": None,
        "provider": "mock",
        "model": "mock-1",
        "deployment": "mock",
        "outcome": "ok",
        "streamed": False,
        "input_tokens": usage["promptTokens"],
        "output_tokens": usage["completionTokens"],
        "total_tokens": usage["totalTokens"],
        "cost_usd": usage["cost"],
        "cache": None,  # not a cacheable call (temperature not 0): never looked up
        "attempts": 1,
    }
    assert {k: stream[k] for k in ("path", "streamed", "attempts", "outcome")} == {
        "path": "/ai/chat/stream",
        "streamed": True,
        "attempts": 1,
        "outcome": "ok",
    }
