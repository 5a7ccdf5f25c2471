"""The seven fail-over measurements of issue 11, taken against a real proxy process.

    python -m benchmarks.failover                      # BEFORE (82d967c) then AFTER (HEAD)
    python -m benchmarks.failover --after-tree .       # AFTER = this checkout as it is
    python -m benchmarks.failover --sides after        # one side; the table reuses the other's
                                                       # JSON from benchmarks/results if present
    python -m benchmarks.failover --only 4,5           # some scenarios only

Set-up, identical on both sides: the fake vendors of the *current* checkout
(``robota_proxy.testing.FakeVendors``) run in this process on 127.0.0.1; the proxy under test
runs as ``python -m robota_proxy serve`` in a subprocess, a fresh one (and a fresh SQLite
database) for every scenario and caller, so that no state (a circuit breaker above all) leaks
from one measurement into the next. BEFORE imports the proxy from a worktree of the commit
before the fail-over work (``--before-commit``, ``--before-tree``), AFTER from a worktree of
HEAD (``--after-commit``, ``--after-tree``), both created with ``git worktree add`` when
missing, both commits resolved when the run starts; ``cwd`` and ``PYTHONPATH`` point at the
tree, so uncommitted work in this checkout is not measured unless ``--after-tree .``. The
proxy gets an OpenAI primary with an Anthropic fallback, 2 retries, a 30 s upstream timeout,
no cache; AFTER runs with the new defaults otherwise (headers 25 s, first token 15 s, stream
idle 10 s, circuit breakers on).

Callers: the official ``openai`` SDK against ``/v1/chat/completions`` (streaming where the
scenario is a stream) with ``max_retries=0`` and a 180 s timeout, so the figures are the
proxy's own and not the SDK's retries; and ``robota_client.RemoteAIProvider`` with its default
settings (a 60 s read timeout, its own retries) against ``/ai/chat`` or, via ``chat_stream()``,
``/ai/chat/stream``: what a default client sees. Every answer the fake plans is the same 60
words (one content chunk each, 20 ms apart); "complete" means exactly that text, once.

Attempts per target are the requests the fake vendors recorded for the caller's marker, with
their arrival time from the moment the caller sent its request.

Scaled from the issue: #7's outage lasts 20 s instead of a minute, with its 15 requests spread
over those 20 s; then one request a second (at most 45 s) finds when the primary is used again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai

from robota_client import RemoteAIProvider
from robota_client.errors import RemoteError
from robota_proxy.testing import FakeVendors, Fault, RecordedRequest, Reply

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEFORE_COMMIT = "82d967c"
VENDOR_KEY = "sk-test-vendor-key-0123456789abcdef"
USER_KEY = "failover-bench-user-key-0123456789"
PRIMARY = "openai/gpt-4o-mini"
FALLBACK = "anthropic/claude-3-5-haiku-latest"
#: 60 words: 60 content chunks in every vendor's stream.
WORDS = 60
TEXT = " ".join(f"w{i:02d}" for i in range(1, WORDS + 1))
CHUNK_SECONDS = 0.02
SDK_TIMEOUT = 180.0
#: #7, scaled: the primary answers 503 for this long; the 15 requests are spread over it.
OUTAGE_SECONDS = 20.0
OUTAGE_REQUESTS = 15
RECOVERY_WINDOW = 45.0
#: After a caller returns, how long the proxy may still be calling vendors for it.
SETTLE_SECONDS = 1.0

PROXY_ENV = {
    "ROBOTA_API_KEYS": USER_KEY,
    "ROBOTA_UPSTREAM_RETRIES": "2",
    "ROBOTA_UPSTREAM_TIMEOUT": "30",
    "ROBOTA_FALLBACKS": json.dumps({PRIMARY: [FALLBACK]}),
    "ROBOTA_CACHE_ENABLED": "false",
    "ROBOTA_LOG_LEVEL": "info",
}


# --- the proxy under test -------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    name: str
    #: The tree whose ``robota_proxy`` the proxy process imports.
    tree: Path
    commit: str


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def proxy_env(side: Side, fake: FakeVendors, home: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ROBOTA_", "OPENAI_", "ANTHROPIC_", "GOOGLE_"))
    }
    env.update(PROXY_ENV)
    env.update(
        {
            "PYTHONPATH": str(side.tree),
            "ROBOTA_DATABASE_URL": f"sqlite:///{home / 'robota.db'}",
            "ROBOTA_OPENAI_API_KEY": VENDOR_KEY,
            "ROBOTA_OPENAI_BASE_URL": fake.openai_base_url,
            "ROBOTA_ANTHROPIC_API_KEY": VENDOR_KEY,
            "ROBOTA_ANTHROPIC_BASE_URL": fake.anthropic_base_url,
            "ROBOTA_GOOGLE_API_KEY": VENDOR_KEY,
            "ROBOTA_GOOGLE_BASE_URL": fake.google_base_url,
        }
    )
    return env


def probe_side(side: Side, fake: FakeVendors) -> dict[str, Any]:
    """Which ``robota_proxy`` a proxy process of ``side`` imports, and whether it has the
    fail-over settings (present only after the change)."""
    with tempfile.TemporaryDirectory(prefix="failover-probe-") as home:
        code = (
            "import json, robota_proxy\n"
            "from robota_proxy.settings import Settings\n"
            "s = Settings()\n"
            "print(json.dumps({'module': robota_proxy.__file__,"
            " 'upstream_timeout': s.upstream_timeout,"
            " 'headers_timeout': getattr(s, 'upstream_headers_timeout', None),"
            " 'first_token_timeout': getattr(s, 'upstream_first_token_timeout', None),"
            " 'idle_timeout': getattr(s, 'upstream_idle_timeout', None),"
            " 'breaker_enabled': getattr(s, 'breaker_enabled', None)}))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=proxy_env(side, fake, Path(home)),
            cwd=side.tree,
            capture_output=True,
            text=True,
            check=True,
        )
    probed: dict[str, Any] = json.loads(out.stdout)
    return probed


@contextmanager
def running_proxy(side: Side, fake: FakeVendors, logs: Path, label: str) -> Iterator[str]:
    home = Path(tempfile.mkdtemp(prefix=f"failover-{side.name}-"))
    port = free_port()
    log_path = logs / f"{side.name}-{label}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "robota_proxy", "serve", "--port", str(port)],
            env=proxy_env(side, fake, home),
            cwd=side.tree,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"proxy exited early:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=0.5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"proxy did not start:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(home, ignore_errors=True)


# --- callers --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one caller saw."""

    waited: float = 0.0
    first_token: float | None = None
    text: str = ""
    #: The model the answer said it came from (SDK ``model``, ``metadata.model``).
    shown_model: str | None = None
    error: str | None = None


def prompt(marker: str) -> str:
    return f"[{marker}] write the sixty words"


def short(text: str, limit: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        code = body.get("code") or body.get("type") or ""
        return short(f"HTTP {exc.status_code} {code}: {body.get('message', exc.message)}")
    if isinstance(exc, openai.APITimeoutError):
        return "client timeout (APITimeoutError)"
    if isinstance(exc, RemoteError):
        cause = f" (from {type(exc.__cause__).__name__})" if exc.__cause__ else ""
        status = f" {exc.status}" if exc.status is not None else ""
        # The message without the proxy's address, which changes every run.
        message = re.sub(r" at http://127\.0\.0\.1:\d+", "", exc.message)
        return short(f"{type(exc).__name__} {exc.code}{status}{cause}: {message}")
    return short(f"{type(exc).__name__}: {exc}")


def sdk_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=USER_KEY, max_retries=0, timeout=SDK_TIMEOUT)


def sdk_chat(url: str, marker: str) -> Outcome:
    outcome = Outcome()
    started = time.monotonic()
    with sdk_client(url) as client:
        try:
            answer = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": prompt(marker)}]
            )
            outcome.text = answer.choices[0].message.content or ""
            outcome.shown_model = answer.model
        except Exception as exc:
            outcome.error = describe_error(exc)
    outcome.waited = time.monotonic() - started
    return outcome


def sdk_stream(url: str, marker: str) -> Outcome:
    outcome = Outcome()
    started = time.monotonic()
    with sdk_client(url) as client:
        try:
            chunks = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": prompt(marker)}],
                stream=True,
            )
            with chunks:
                for chunk in chunks:
                    outcome.shown_model = chunk.model or outcome.shown_model
                    for choice in chunk.choices:
                        if choice.delta.content:
                            if outcome.first_token is None:
                                outcome.first_token = time.monotonic() - started
                            outcome.text += choice.delta.content
        except Exception as exc:
            outcome.error = describe_error(exc)
    outcome.waited = time.monotonic() - started
    return outcome


def remote_provider(url: str) -> RemoteAIProvider:
    # Default settings on purpose: what a default client sees (60 s timeout, its retries).
    return RemoteAIProvider(url, USER_KEY, "openai", "gpt-4o-mini")


async def _remote_chat(url: str, marker: str, outcome: Outcome) -> None:
    async with remote_provider(url) as ai:
        message = await ai.chat([{"role": "user", "content": prompt(marker)}])
        outcome.text = message.content or ""
        outcome.shown_model = message.metadata.model


async def _remote_stream(url: str, marker: str, outcome: Outcome, started: float) -> None:
    async with remote_provider(url) as ai:
        async for piece in ai.chat_stream([{"role": "user", "content": prompt(marker)}]):
            if piece and outcome.first_token is None:
                outcome.first_token = time.monotonic() - started
            outcome.text += piece


def remote_chat(url: str, marker: str) -> Outcome:
    outcome = Outcome()
    started = time.monotonic()
    try:
        asyncio.run(_remote_chat(url, marker, outcome))
    except Exception as exc:
        outcome.error = describe_error(exc)
    outcome.waited = time.monotonic() - started
    return outcome


def remote_stream(url: str, marker: str) -> Outcome:
    outcome = Outcome()
    started = time.monotonic()
    try:
        asyncio.run(_remote_stream(url, marker, outcome, started))
    except Exception as exc:
        outcome.error = describe_error(exc)
    outcome.waited = time.monotonic() - started
    return outcome


Caller = Callable[[str, str], Outcome]
CALLERS: dict[str, tuple[str, Caller]] = {
    "sdk": ("OpenAI SDK, /v1/chat/completions", sdk_chat),
    "sdk-stream": ("OpenAI SDK stream, /v1/chat/completions", sdk_stream),
    "remote": ("RemoteAIProvider (defaults) .chat(), /ai/chat", remote_chat),
    "remote-stream": ("RemoteAIProvider (defaults) .chat_stream(), /ai/chat/stream", remote_stream),
}


# --- what the vendors saw -------------------------------------------------------------------


def target_of(request: RecordedRequest) -> str:
    return f"{request.vendor}/{request.model}"


def attempts_of(requests: list[RecordedRequest], marker: str, since: float) -> list[dict[str, Any]]:
    return [
        {
            "target": target_of(request),
            "at": round(request.received_at - since, 2),
            "prefill_chars": len(request.prefill or ""),
        }
        for request in requests
        if marker in request.last_text
    ]


def attempts_text(attempts: list[dict[str, Any]]) -> str:
    """``openai x3 (0.0/30.5/61.0 s), anthropic x1 (91.6 s)``; ``+p`` marks a prefilled call."""
    order: list[str] = []
    times: dict[str, list[str]] = {}
    for attempt in attempts:
        vendor = str(attempt["target"]).split("/")[0]
        if vendor not in times:
            order.append(vendor)
            times[vendor] = []
        times[vendor].append(f"{attempt['at']:.1f}" + ("+p" if attempt["prefill_chars"] else ""))
    if not order:
        return "none"
    return ", ".join(f"{v} x{len(times[v])} ({'/'.join(times[v])} s)" for v in order)


def received_text(outcome: Outcome, answered_by: str | None) -> str:
    words = outcome.text.split()
    by = f" from {answered_by}" if answered_by else ""
    shown = f' (says model "{outcome.shown_model}")' if outcome.shown_model else ""
    if outcome.error is None and outcome.text == TEXT:
        return f"complete answer, {len(words)}/{WORDS} words{by}{shown}"
    if outcome.error is None:
        missing = [word for word in TEXT.split() if word not in words]
        if words == [word for word in TEXT.split() if word not in missing]:
            # In order and once, only some words short: e.g. a skipped malformed chunk's.
            return (
                f"whole stream, no error, {len(words)}/{WORDS} words "
                f"(missing {', '.join(missing)}){by}{shown}"
            )
        return (
            f"no error but not the answer once: {len(words)} words{by}: {short(outcome.text, 60)}"
        )
    if outcome.text:
        return f"partial {len(words)}/{WORDS} words + error: {outcome.error}"
    return f"error: {outcome.error}"


@dataclass
class Measurement:
    scenario: str
    title: str
    caller: str
    waited: str
    attempts: str
    received: str
    details: dict[str, Any] = field(default_factory=dict)


def stream_reply(fault: Fault) -> Reply:
    return Reply(text=TEXT, fault=fault)


#: What every healthy call answers (the fallback's, and the primary's once it is back).
FALLBACK_REPLY = stream_reply(Fault(chunk_latency=CHUNK_SECONDS))


# --- scenarios ------------------------------------------------------------------------------

#: (number, title, callers, the fault on the primary only (the fallback answers cleanly)).
SCENARIOS: list[tuple[str, str, list[str], Reply | Fault]] = [
    (
        "1",
        "silent target (accepts, never answers)",
        ["sdk", "remote"],
        Reply(text=TEXT, fault=Fault(latency=150.0)),
    ),
    (
        "2",
        "first token after 20 s",
        ["sdk-stream", "remote-stream"],
        stream_reply(Fault(first_token_latency=20.0, chunk_latency=CHUNK_SECONDS)),
    ),
    (
        "3",
        "stream stalls after 20 of 60 tokens",
        ["sdk-stream", "remote-stream"],
        # Silent for 45 s, longer than the 30 s upstream timeout: the proxy's limit cuts it.
        stream_reply(Fault(stall_after=20, stall_seconds=45.0, chunk_latency=CHUNK_SECONDS)),
    ),
    (
        "4",
        "stream cut after 40 of 60 tokens",
        ["sdk-stream", "remote-stream"],
        stream_reply(Fault(drop_after=40, chunk_latency=CHUNK_SECONDS)),
    ),
    (
        "5",
        "one malformed chunk (30 of 60)",
        ["sdk-stream", "remote-stream"],
        stream_reply(Fault(malformed_at=30, chunk_latency=CHUNK_SECONDS)),
    ),
    (
        "6",
        "400 context_length_exceeded on the primary",
        ["sdk", "remote"],
        Fault(error_kind="context_length"),
    ),
]


def measure_one(
    side: Side,
    fake: FakeVendors,
    logs: Path,
    number: str,
    title: str,
    caller: str,
    primary_reply: Reply | Fault,
) -> Measurement:
    marker = f"s{number}-{uuid.uuid4().hex[:8]}"
    label, call = CALLERS[caller]
    with running_proxy(side, fake, logs, f"{number}-{caller}") as url:
        fake.reset()
        # The primary misbehaves on every attempt; the fallback answers the same 60 words
        # (a continued request matches too: its last text is the user turn it answers).
        fake.script(primary_reply, match=marker, vendor="openai")
        fake.script(FALLBACK_REPLY, match=marker)
        started = time.monotonic()
        outcome = call(url, marker)
        time.sleep(SETTLE_SECONDS)
        attempts = attempts_of(fake.requests, marker, started)
    answered_by = attempts[-1]["target"] if attempts and outcome.text else None
    waited = f"{outcome.waited:.1f} s"
    if outcome.first_token is not None:
        waited += f" (first token {outcome.first_token:.1f} s)"
    measurement = Measurement(
        scenario=number,
        title=title,
        caller=label,
        waited=waited,
        attempts=attempts_text(attempts),
        received=received_text(outcome, answered_by),
        details={"outcome": asdict(outcome), "attempts": attempts},
    )
    log_text = (logs / f"{side.name}-{number}-{caller}.log").read_text(errors="replace")
    measurement.details["log_mentions_malformed"] = sum(
        1 for line in log_text.splitlines() if "malformed" in line.lower()
    )
    return measurement


def measure_outage(side: Side, fake: FakeVendors, logs: Path) -> Measurement:
    """#7: the primary answers 503 for ``OUTAGE_SECONDS``; ``OUTAGE_REQUESTS`` requests are
    sent evenly over it (each on its own thread, so a slow one does not delay the next); then
    one request a second until one is answered by the primary again."""
    prefix = f"s7-{uuid.uuid4().hex[:8]}"
    with running_proxy(side, fake, logs, "7-sdk") as url:
        fake.reset()
        fake.script(Fault(status=503, active_for=OUTAGE_SECONDS), match=prefix, vendor="openai")
        fake.script(FALLBACK_REPLY, match=prefix)
        t0 = time.monotonic()

        def one(index: int) -> Outcome:
            delay = t0 + index * OUTAGE_SECONDS / OUTAGE_REQUESTS - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            return sdk_chat(url, f"{prefix}-{index:02d}-")

        with ThreadPoolExecutor(max_workers=OUTAGE_REQUESTS) as pool:
            outcomes = list(pool.map(one, range(OUTAGE_REQUESTS)))
        # Recovery: when is the primary used again once it is back?
        delay = t0 + OUTAGE_SECONDS - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        recovered_at: float | None = None
        recovery_requests = 0
        while time.monotonic() - t0 < OUTAGE_SECONDS + RECOVERY_WINDOW:
            marker = f"{prefix}-r{recovery_requests:02d}-"
            sent = time.monotonic()
            outcome = sdk_chat(url, marker)
            recovery_requests += 1
            mine = attempts_of(fake.requests, marker, t0)
            if outcome.error is None and mine and mine[-1]["target"] == PRIMARY:
                recovered_at = sent - t0 - OUTAGE_SECONDS
                break
            time.sleep(max(0.0, 1.0 - (time.monotonic() - sent)))
        time.sleep(SETTLE_SECONDS)
        requests = fake.requests
    during = [
        a for i in range(OUTAGE_REQUESTS) for a in attempts_of(requests, f"{prefix}-{i:02d}-", t0)
    ]
    per_target = Counter(str(a["target"]).split("/")[0] for a in during)
    first_tried = Counter(
        str(attempts_of(requests, f"{prefix}-{i:02d}-", t0)[0]["target"]).split("/")[0]
        for i in range(OUTAGE_REQUESTS)
        if attempts_of(requests, f"{prefix}-{i:02d}-", t0)
    )
    complete = sum(1 for o in outcomes if o.error is None and o.text == TEXT)
    errors = Counter(o.error for o in outcomes if o.error is not None)
    waits = [o.waited for o in outcomes]
    attempts = (
        f"{OUTAGE_REQUESTS} requests: "
        + ", ".join(f"{v} x{n}" for v, n in per_target.items())
        + f"; primary tried first by {first_tried.get('openai', 0)}/{OUTAGE_REQUESTS}"
    )
    if recovered_at is not None:
        attempts += f"; primary answers again {recovered_at:.1f} s after it is back"
    else:
        attempts += f"; primary not used again within {RECOVERY_WINDOW:.0f} s"
    received = f"{complete}/{OUTAGE_REQUESTS} complete answers"
    if errors:
        received += "; " + "; ".join(f"{n}x {e}" for e, n in errors.items())
    return Measurement(
        scenario="7",
        title=f"primary down {OUTAGE_SECONDS:.0f} s (503), {OUTAGE_REQUESTS} requests over it",
        caller=CALLERS["sdk"][0],
        waited=f"mean {sum(waits) / len(waits):.1f} s, max {max(waits):.1f} s per request",
        attempts=attempts,
        received=received,
        details={
            "outcomes": [asdict(o) for o in outcomes],
            "attempts": during,
            "recovered_after": recovered_at,
            "recovery_requests": recovery_requests,
        },
    )


def run_side(side: Side, only: set[str], logs: Path) -> dict[str, Any]:
    measurements: list[Measurement] = []
    with FakeVendors(api_key=VENDOR_KEY) as fake:
        probed = probe_side(side, fake)
        print(f"[{side.name}] proxy imports {probed['module']} ({side.commit}): {probed}")
        for number, title, callers, reply in SCENARIOS:
            if number not in only:
                continue
            for caller in callers:
                began = time.monotonic()
                m = measure_one(side, fake, logs, number, title, caller, reply)
                measurements.append(m)
                print(
                    f"[{side.name}] #{number} {caller}: {m.waited} | {m.attempts} | {m.received}"
                    f"  [{time.monotonic() - began:.0f} s]",
                    flush=True,
                )
        if "7" in only:
            began = time.monotonic()
            m = measure_outage(side, fake, logs)
            measurements.append(m)
            print(
                f"[{side.name}] #7: {m.waited} | {m.attempts} | {m.received}"
                f"  [{time.monotonic() - began:.0f} s]",
                flush=True,
            )
    return {
        "side": side.name,
        "commit": side.commit,
        "tree": str(side.tree),
        "proxy": probed,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "measurements": [asdict(m) for m in measurements],
    }


# --- report ---------------------------------------------------------------------------------


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def report(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    def rows(side: dict[str, Any] | None) -> dict[tuple[str, str], dict[str, Any]]:
        if side is None:
            return {}
        return {(m["scenario"], m["caller"]): m for m in side["measurements"]}

    old, new = rows(before), rows(after)
    keys = sorted(set(old) | set(new), key=lambda k: (int(k[0]), k[1]))
    lines = [
        "# Fail-over measurements (issue 11)",
        "",
        f"BEFORE: {before['commit'] if before else 'not run'}"
        + (f", measured {before['measured_at']}" if before else "")
        + f"; AFTER: {after['commit'] if after else 'not run'}"
        + (f", measured {after['measured_at']}" if after else ""),
        "",
        "Proxy: OpenAI primary `openai/gpt-4o-mini`, fallback "
        "`anthropic/claude-3-5-haiku-latest`, `ROBOTA_UPSTREAM_RETRIES=2`, "
        "`ROBOTA_UPSTREAM_TIMEOUT=30`, cache off, SQLite, a fresh proxy per row. AFTER runs "
        "with the new defaults (headers 25 s, first token 15 s, stream idle 10 s, circuit "
        "breakers on). Fake vendors of the current checkout; 60-word answers, 20 ms a word. "
        "OpenAI SDK: `max_retries=0`, 180 s timeout. RemoteAIProvider: default settings "
        "(60 s read timeout). Attempts: calls the fake vendors received, with their arrival "
        "time after the caller sent its request (`+p`: sent with a prefill). "
        f"#7 is scaled: a {OUTAGE_SECONDS:.0f} s outage (not a minute), {OUTAGE_REQUESTS} "
        "requests spread over it.",
        "",
        "| scenario | before: waited | before: attempts | before: received "
        "| after: waited | after: attempts | after: received |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        first = old.get(key) or new[key]
        name = f"{first['scenario']}. {first['title']} — {first['caller']}"
        cells = [name]
        for side in (old, new):
            m = side.get(key)
            cells += [m["waited"], m["attempts"], m["received"]] if m else ["—", "—", "—"]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def git(*args: str, cwd: Path = ROOT) -> str:
    out = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def checkout(path: Path, commit: str) -> Path:
    """A worktree of ``commit`` at ``path`` (created, or moved there when it is a clean
    worktree of another commit); ``path`` being this checkout means the checkout as it is."""
    if path.resolve() == ROOT:
        return ROOT
    wanted = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    if not (path / "robota_proxy").is_dir():
        git("worktree", "add", "--detach", str(path), wanted)
    elif git("rev-parse", "HEAD", cwd=path) != wanted:
        if git("status", "--porcelain", "--untracked-files=no", cwd=path):
            raise SystemExit(f"{path} has uncommitted changes; not moving it to {commit}")
        git("checkout", "--quiet", "--detach", wanted, cwd=path)
    return path.resolve()


def tree_commit(path: Path) -> str:
    described = short(git("log", "-1", "--format=%h %s", cwd=path), 90)
    if git("status", "--porcelain", "--untracked-files=no", cwd=path):
        described += " (+ uncommitted changes)"
    return described


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sides", default="before,after", help="before, after or both")
    parser.add_argument("--only", default="1,2,3,4,5,6,7", help="scenario numbers")
    parser.add_argument("--before-tree", type=Path, default=Path("/tmp/before"))
    parser.add_argument("--before-commit", default=BEFORE_COMMIT)
    parser.add_argument(
        "--after-tree",
        type=Path,
        default=Path("/tmp/failover-after"),
        help="a worktree of --after-commit; this checkout's own path measures it as it is",
    )
    parser.add_argument("--after-commit", default="HEAD")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results are written")
    parser.add_argument("--logs", type=Path, default=None, help="keep proxy logs here")
    args = parser.parse_args(argv)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="failover-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any] | None] = {"before": None, "after": None}
    chosen: list[Side] = []
    for name in sides:  # both trees resolved first: HEAD may move while BEFORE runs
        if name == "before":
            tree = checkout(args.before_tree, args.before_commit)
        elif name == "after":
            tree = checkout(args.after_tree, args.after_commit)
        else:
            parser.error(f"unknown side {name!r}")
        chosen.append(Side(name, tree, tree_commit(tree)))
    fakes = f"{tree_commit(ROOT)} ({ROOT})"
    for side in chosen:
        began = time.monotonic()
        data = run_side(side, only, logs)
        data["fakes"] = fakes
        data["wall_seconds"] = round(time.monotonic() - began, 1)
        results[side.name] = data
        (args.out / f"failover-{side.name}.json").write_text(json.dumps(data, indent=2) + "\n")
        print(f"[{side.name}] done in {data['wall_seconds']:.0f} s", flush=True)
    for name in ("before", "after"):
        saved = args.out / f"failover-{name}.json"
        if results[name] is None and saved.exists():
            results[name] = json.loads(saved.read_text())
    table = report(results["before"], results["after"])
    (args.out / "failover.md").write_text(table)
    print()
    print(table)
    if args.logs is None:
        shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
