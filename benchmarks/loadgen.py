"""Closed-loop load generator (aiohttp on uvloop), run as its own process by the harness.

``concurrency`` workers each send one request after another until ``duration_s`` is over;
requests that end during the first ``warmup_s`` are not recorded, and throughput counts the
requests that end inside the measured window. For each recorded request it
keeps the whole latency, and for streams the time to the first token and the gaps between
token chunks (all in milliseconds). It speaks two dialects:

- ``openai``: ``POST /v1/chat/completions`` (the fake upstream itself, LiteLLM's proxy);
- ``robota``: ``POST /ai/chat`` and ``POST /ai/chat/stream`` (robota-proxy).

With ``requests_per_worker`` set, each worker stops after that many requests: with one, and
no warm-up, ``concurrency`` streams are opened at once and held open together. ``ramp_s``
spreads the workers' starts evenly over that many seconds (thousands of connections opened
in the same instant test a listen queue more than holding them).

    python -m benchmarks.loadgen spec.json result.json
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

_OPENAI_TOKEN = re.compile(rb'"content":\s*"[^"]')


@dataclass
class Spec:
    kind: str  # "openai" or "robota"
    base_url: str
    api_key: str
    stream: bool
    concurrency: int
    duration_s: float
    warmup_s: float = 1.0
    model: str = "gpt-4o-mini"
    content: str = "hi"
    timeout_s: float = 30.0
    grace_s: float = 10.0
    expect_tokens: int | None = None
    #: Each worker stops after this many requests (None: until the time is up).
    requests_per_worker: int | None = None
    #: Worker i starts at i / concurrency * ramp_s (0: all at once).
    ramp_s: float = 0.0


@dataclass
class Result:
    latency_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    gap_ms: list[float] = field(default_factory=list)
    ok: int = 0
    ok_in_window: int = 0
    #: Successful requests warm-up included: the server's CPU time is read over the whole
    #: run, so CPU per request divides by this.
    ok_all: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    window_s: float = 0.0
    peak_open_streams: int = 0
    peak_in_flight: int = 0
    wall_s: float = 0.0


def request_parts(spec: Spec) -> tuple[str, bytes, dict[str, str]]:
    messages = [{"role": "user", "content": spec.content}]
    body: dict[str, Any]
    if spec.kind == "robota":
        path = "/ai/chat/stream" if spec.stream else "/ai/chat"
        body = {"provider": "openai", "model": spec.model, "messages": messages}
    elif spec.kind == "openai":
        path = "/v1/chat/completions"
        body = {"model": spec.model, "messages": messages}
        if spec.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
    else:
        raise ValueError(f"unknown kind {spec.kind!r}")
    headers = {
        "Authorization": f"Bearer {spec.api_key}",
        "Content-Type": "application/json",
    }
    if spec.stream:
        headers["Accept"] = "text/event-stream"
    return spec.base_url.rstrip("/") + path, json.dumps(body).encode(), headers


class Load:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.url, self.body, self.headers = request_parts(spec)
        self.result = Result()
        self.errors: Counter[str] = Counter()
        self.open_streams = 0
        self.in_flight = 0

    async def run(self) -> Result:
        spec = self.spec
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None)
        timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
        began = time.perf_counter()
        self.measure_from = began + spec.warmup_s
        self.end = self.measure_from + spec.duration_s
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            step = spec.ramp_s / spec.concurrency
            workers = [
                asyncio.create_task(self._worker(session, i * step))
                for i in range(spec.concurrency)
            ]
            done, pending = await asyncio.wait(
                workers, timeout=spec.ramp_s + spec.warmup_s + spec.duration_s + spec.grace_s
            )
            for task in pending:
                task.cancel()
            if pending:
                self.errors["unfinished at the end"] += len(pending)
                await asyncio.wait(pending, timeout=5)
            for task in done:
                if task.exception() is not None:
                    self.errors[f"worker crashed: {task.exception()!r}"[:120]] += 1
        self.result.errors = dict(self.errors)
        self.result.wall_s = time.perf_counter() - began
        self.result.window_s = spec.duration_s
        if spec.requests_per_worker is not None:  # done when the last request is
            self.result.window_s = self.result.wall_s - spec.warmup_s
            self.result.ok_in_window = self.result.ok
        return self.result

    async def _worker(self, session: aiohttp.ClientSession, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        result = self.result
        sent = 0
        while True:
            started = time.perf_counter()
            if started >= self.end:
                return
            if self.spec.requests_per_worker is not None:
                if sent >= self.spec.requests_per_worker:
                    return
                sent += 1
            self.in_flight += 1
            result.peak_in_flight = max(result.peak_in_flight, self.in_flight)
            ttft: float | None = None
            gaps: list[float] = []
            try:
                error, ttft, gaps = await self._one(session, started)
            except TimeoutError:
                error = "timeout"
            except aiohttp.ClientError as exc:
                error = type(exc).__name__
            finally:
                self.in_flight -= 1
            finished = time.perf_counter()
            if error is None:
                result.ok_all += 1
            # Recorded: every request that ends after the warm-up (a slow proxy may take longer
            # than the warm-up for a single request); throughput counts those ending in time.
            if finished < self.measure_from:
                continue
            if error is None:
                result.ok += 1
                if finished <= self.end:
                    result.ok_in_window += 1
                result.latency_ms.append((finished - started) * 1000)
                if ttft is not None:
                    result.ttft_ms.append(ttft)
                    result.gap_ms.extend(gaps)
            else:
                self.errors[error] += 1
                await asyncio.sleep(0.01)  # a refusing server must not turn this into a spin

    async def _one(
        self, session: aiohttp.ClientSession, started: float
    ) -> tuple[str | None, float | None, list[float]]:
        """One request: (error or None, time to first token in ms, gaps between tokens)."""
        async with session.post(self.url, data=self.body, headers=self.headers) as response:
            if response.status != 200:
                await response.read()
                return f"HTTP {response.status}", None, []
            if not self.spec.stream:
                payload = await response.read()
                return (None if b"tok" in payload else "reply without content"), None, []
            self.open_streams += 1
            self.result.peak_open_streams = max(self.result.peak_open_streams, self.open_streams)
            try:
                return await self._read_stream(response, started)
            finally:
                self.open_streams -= 1

    async def _read_stream(
        self, response: aiohttp.ClientResponse, started: float
    ) -> tuple[str | None, float | None, list[float]]:
        robota = self.spec.kind == "robota"
        first: float | None = None
        last = 0.0
        tokens = 0
        gaps: list[float] = []
        finished = False
        async for line in response.content:
            if robota:
                if not line.startswith(b"event: "):
                    continue
                name = line[7:].strip()
                if name == b"done":
                    finished = True
                    continue
                if name == b"error":
                    return "stream error event", None, []
                if name != b"delta":
                    continue
            elif line.startswith(b"data: "):
                if line.startswith(b"data: [DONE]"):
                    finished = True
                    continue
                if _OPENAI_TOKEN.search(line) is None:
                    continue
            else:
                continue
            now = time.perf_counter()
            tokens += 1
            if first is None:
                first = now
            else:
                gaps.append((now - last) * 1000)
            last = now
        if not finished:
            return "stream ended early", None, []
        if first is None:
            return "stream without tokens", None, []
        expected = self.spec.expect_tokens
        if expected is not None and tokens != expected:
            return f"stream with {tokens} tokens, expected {expected}", None, []
        return None, (first - started) * 1000, gaps


def run(spec: Spec) -> Result:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(Load(spec).run())
    return uvloop.run(Load(spec).run())


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python -m benchmarks.loadgen SPEC.json RESULT.json")
    with open(sys.argv[1], encoding="utf-8") as source:
        spec = Spec(**json.load(source))
    result = run(spec)
    with open(sys.argv[2], "w", encoding="utf-8") as target:
        json.dump(asdict(result), target)


if __name__ == "__main__":
    main()
