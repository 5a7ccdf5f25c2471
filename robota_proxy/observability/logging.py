"""Log output: text or JSON (``ROBOTA_LOG_FORMAT``), written by a thread of its own.

``robota-proxy serve`` hands ``log_config`` to uvicorn, which applies it in every worker. Two
things are in it besides the format:

* every handler is a ``QueuedHandler``: the event loop only formats the record and puts it on
  a queue; a ``QueueListener`` thread does the writing. A terminal that scrolls slowly, a full
  pipe to a log shipper or a blocked disk then holds up that thread, never a request. The
  queue is bounded: when the writer falls that far behind, records are dropped and counted
  (the next record that fits says how many), since memory is not an infinite buffer either.
  Formatting stays on the caller's side because the request id and trace id come from the
  caller's context variables.
* in ``json`` mode every line of output, uvicorn's own included, is one JSON object:
  ``time``, ``level``, ``logger``, ``message``, the ``request_id`` and ``trace_id`` of the
  request being served, and the record's own fields (``extra={"robota": {...}}``), which is
  how the access log's one line per request carries its figures as fields.

What goes into a record is the caller's business and is already kept free of secrets and
message content (README: Operating it, Logs); this module adds nothing but ids.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import logging.handlers
import queue
import sys
import threading
from collections.abc import Mapping
from typing import IO, Any

from robota_proxy import scope as keys
from robota_proxy.call_record import CallRecord
from robota_proxy.observability import tracing
from robota_proxy.scope import current_request_id, route_path

#: Records waiting for the writer thread; past it they are dropped and counted.
QUEUE_SIZE = 10_000
#: Seconds ``close`` waits for the writer to take what is queued.
STOP_TIMEOUT = 5.0
#: The keys every JSON line has (a record's own fields never replace them).
_BASE = ("time", "level", "logger", "message")


#: Whether a JSON formatter is in use in this process: only then do the access log's lines
#: carry their fields (a text line would not show them, and building them costs a little).
_wanted = False


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self) -> None:
        global _wanted
        super().__init__()
        _wanted = True

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = current_request_id.get()
        if request_id is not None:
            line["request_id"] = request_id
        trace_id = tracing.current_trace_id()
        if trace_id is not None:
            line["trace_id"] = trace_id
        fields = getattr(record, "robota", None)
        if isinstance(fields, dict):
            line.update((k, v) for k, v in fields.items() if k not in _BASE)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


class _Listener(logging.handlers.QueueListener):
    def enqueue_sentinel(self) -> None:
        """At close the queue may be full: wait a little for room (off the request path:
        at exit or reconfiguration) rather than fail to stop the thread."""
        waiting: queue.Queue[Any] = self.queue  # type: ignore[assignment]
        with contextlib.suppress(queue.Full):
            waiting.put(None, timeout=STOP_TIMEOUT)


class _Writer:
    """One queue and its writer thread per output stream, shared by the handlers writing
    there, so that their lines come out in the order they were logged."""

    def __init__(self, stream: IO[str], capacity: int) -> None:
        self.queue: queue.Queue[logging.LogRecord | None] = queue.Queue(capacity)
        target = logging.StreamHandler(stream)
        # The record arrives formatted (``QueueHandler.prepare``): only the newline is added.
        target.setFormatter(logging.Formatter("%(message)s"))
        self.listener = _Listener(self.queue, target)
        self.listener.start()
        self.users = 0


_writers: dict[int, _Writer] = {}
_writers_lock = threading.Lock()


class QueuedHandler(logging.handlers.QueueHandler):
    """A ``QueueHandler`` whose records a thread writes to ``stream`` (stderr by default)."""

    def __init__(self, stream: IO[str] | None = None, capacity: int = QUEUE_SIZE) -> None:
        stream = stream if stream is not None else sys.stderr
        with _writers_lock:
            writer = _writers.get(id(stream))
            if writer is None:
                writer = _writers[id(stream)] = _Writer(stream, capacity)
            writer.users += 1
        super().__init__(writer.queue)
        self._stream_id = id(stream)
        self._writer: _Writer | None = writer
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        """Never waits: a full queue drops the record; the first one that fits again is
        preceded by a line saying how many were dropped."""
        try:
            if self.dropped:
                self.queue.put_nowait(self.prepare(self._dropped_note(self.dropped)))
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    @staticmethod
    def _dropped_note(dropped: int) -> logging.LogRecord:
        return logging.LogRecord(
            "robota_proxy.logging",
            logging.WARNING,
            __file__,
            0,
            "%d log records were dropped: the log output could not keep up",
            (dropped,),
            None,
        )

    def close(self) -> None:
        """The last handler of a stream writes out what is queued and stops the thread (at
        exit, or when uvicorn applies the configuration again)."""
        with _writers_lock:
            writer, self._writer = self._writer, None
            if writer is not None:
                writer.users -= 1
                if writer.users == 0:
                    del _writers[self._stream_id]
                    writer.listener.stop()
        super().close()


def log_config(level: str, fmt: str = "text") -> dict[str, Any]:
    """uvicorn's logging config with our loggers, every handler queued, and in ``json``
    mode every formatter JSON. Passed to uvicorn rather than applied here because uvicorn
    applies it again inside every worker process it starts."""
    import uvicorn.config  # here, not at the top: ``keys`` and ``usage`` start faster without

    config: dict[str, Any] = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["robota"] = {
        "format": "%(asctime)s %(levelname)s %(name)s: %(message)s",
    }
    if fmt == "json":
        for name in ("default", "access", "robota"):
            config["formatters"][name] = {"()": f"{__name__}.JsonFormatter"}
    config["handlers"]["robota"] = {"formatter": "robota", "stream": "ext://sys.stderr"}
    for handler in config["handlers"].values():
        handler.pop("class", None)
        handler["()"] = f"{__name__}.QueuedHandler"
    config["loggers"]["robota_proxy"] = {
        "handlers": ["robota"],
        "level": level.upper(),
        "propagate": False,
    }
    # Libraries' warnings (httpx, asyncio...) in the same format rather than Python's
    # last-resort plain text.
    config["root"] = {"handlers": ["robota"], "level": "WARNING"}
    return config


def fields_wanted() -> bool:
    """Whether ``request_fields`` would be shown (JSON output is configured)."""
    return _wanted


def request_fields(
    scope: Mapping[str, Any], status: int, seconds: float, ttft: float | None
) -> dict[str, Any]:
    """The access log's fields for one request: ids, who, which surface and target, the
    outcome, times, tokens, cost, cache and attempts. Public ids and figures only: never a
    header, a query string, a key or a word of the conversation."""
    route = route_path(scope)
    fields: dict[str, Any] = {
        "event": "request",
        "request_id": scope.get(keys.REQUEST_ID),
        "trace_id": tracing.current_trace_id(),
        "method": scope.get("method"),
        "path": route,
        "surface": surface(route),
        "status": status,
        "latency_ms": round(seconds * 1000, 1),
        "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
    }
    principal = scope.get(keys.PRINCIPAL)
    fields["user"] = getattr(principal, "user", None)
    fields["key_id"] = getattr(principal, "key_id", None)
    code = scope.get(keys.ERROR_CODE)
    fields["error"] = code if isinstance(code, str) else None
    record = scope.get(keys.CALL)
    if isinstance(record, CallRecord):
        usage = record.usage
        fields.update(
            provider=record.provider,
            model=record.model,
            deployment=record.deployment,
            outcome=record.status,
            streamed=record.streamed,
            input_tokens=None if usage is None else usage.prompt_tokens,
            output_tokens=None if usage is None else usage.completion_tokens,
            total_tokens=None if usage is None else usage.total_tokens,
            cost_usd=None if record.cost is None else float(record.cost),
            cache=record.cache_result or ("hit" if record.cached else None),
            attempts=record.attempts,
        )
    return fields


def surface(route: str) -> str:
    """Which API a path belongs to: ``robota`` (``/ai/*``), ``openai``, ``anthropic``,
    ``admin`` or ``other``."""
    if route.startswith("/ai/"):
        return "robota"
    if route.startswith("/v1/messages"):
        return "anthropic"
    if route.startswith("/v1/"):
        return "openai"
    if route.startswith("/admin/") or route == "/metrics":
        return "admin"
    return "other"
