"""Find a latency stall: c=1 requests through a real proxy, with the proxy's side watched.

    python -m benchmarks.stall                                  # static key, /ai/chat, 10 s
    python -m benchmarks.stall --config "" --config ROBOTA_METRICS_ENABLED=false --rounds 2
    python -m benchmarks.stall --chain --strace --checkout /path/to/other/clone
    python -m benchmarks.stall --strace --rounds 3 --config "" \
        --config STALL_PROBE_SQLITE_PRAGMA=wal_autocheckpoint=0    # no checkpoint in a commit

Each configuration (``--config NAME=VALUE[,NAME=VALUE...]``, ``""`` for the defaults) gets a
fresh proxy (``robota-proxy serve``, one worker, in front of the fake upstream), run in turns
for ``--rounds``. The load is one request after another for ``--seconds``; every request's
start (wall clock) and latency are kept. The proxy runs with ``benchmarks/stall_probe`` on its
``PYTHONPATH`` (see there: collections over 5 ms, the main thread busy for over 15 ms on end
with the CPU it used, the GIL held or the process descheduled), and with ``--strace`` under
``strace -f --seccomp-bpf`` for the waits outside Python: ``fdatasync`` (SQLite's WAL
checkpoints) and ``clock_nanosleep`` (SQLite's busy handler backing off when another
connection holds the write lock). Each request slower than ``--slow`` ms is listed with the
events that overlap it, which tells a stall of the proxy (its main thread working, a
collection, a wait on the database) from the machine's noise (the proxy descheduled: little
main-thread CPU over the gap).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from benchmarks import processes
from benchmarks.harness import CHAIN_PROFILES, create_chain_key

PROBE = Path(__file__).parent / "stall_probe"
_STRACE_LINE = re.compile(
    r"^(?P<tid>\d+)\s+(?P<h>\d+):(?P<m>\d+):(?P<s>[\d.]+) "
    r"(?P<call>\w+)\((?P<args>.*)<(?P<took>[\d.]+)>$"
)


@dataclass
class Run:
    config: str
    requests: list[tuple[float, float]] = field(default_factory=list)  # (wall start, ms)
    events: list[tuple[float, float, str]] = field(default_factory=list)  # (wall, ms, text)
    error: str = ""


async def _load(url: str, body: bytes, key: str, seconds: float) -> list[tuple[float, float]]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    done: list[tuple[float, float]] = []
    async with aiohttp.ClientSession() as session:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            wall, began = time.time(), time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
            done.append((wall, (time.perf_counter() - began) * 1000))
    return done


def _probe_events(folder: Path, since: float, until: float) -> list[tuple[float, float, str]]:
    events = []
    for path in folder.glob("probe.*"):
        for line in path.read_text(errors="replace").splitlines():
            wall, kind, took, rest = [*line.split(" ", 3), "", "", ""][:4]
            if since <= float(wall) <= until:
                events.append((float(wall), float(took.removesuffix("ms")), f"{kind} {rest}"))
    return events


def _strace_events(path: Path, since: float, until: float) -> list[tuple[float, float, str]]:
    """strace prints wall times of day (UTC here); the syscall's start and its duration."""
    if not path.exists():
        return []
    midnight = since - since % 86400
    events = []
    for line in path.read_text(errors="replace").splitlines():
        match = _STRACE_LINE.match(line)
        if match is None:
            continue
        wall = midnight + int(match["h"]) * 3600 + int(match["m"]) * 60 + float(match["s"])
        if since <= wall <= until:
            took = float(match["took"]) * 1000
            events.append((wall, took, f"{match['call']} (thread {match['tid']})"))
    return events


def measure(args: argparse.Namespace, config: str, workdir: Path, upstream_url: str) -> Run:
    run = Run(config)
    folder = Path(tempfile.mkdtemp(prefix="proxy-", dir=workdir))
    env = dict(pair.split("=", 1) for pair in config.split(",") if pair)
    if args.chain:
        profile = {
            k: v.format(workdir=folder) for k, v in CHAIN_PROFILES["chain-sqlite"]["env"].items()
        }
        env = {**profile, **env}
    paths = [str(args.checkout)] if args.checkout else []
    if not args.no_probe:
        env["STALL_PROBE_OUT"] = str(folder / "probe")
    if not args.no_probe or any(name.startswith("STALL_PROBE_") for name in env):
        paths.append(str(PROBE))
    if paths:
        env["PYTHONPATH"] = ":".join(paths)
    server = processes.robota_proxy("robota", folder, upstream_url, env, 1)
    trace = folder / "strace.txt"
    if args.strace:
        calls = "trace=fdatasync,fsync,clock_nanosleep"
        server.command = [
            "strace",
            "-f",
            "--seccomp-bpf",
            "-T",
            "-tt",
            "-e",
            calls,
            "-o",
            str(trace),
            *server.command,
        ]
    key = "bench-key"
    if args.chain:
        found, reason = create_chain_key("stall", server)
        if found is None:
            run.error = reason
            return run
        key = found
    messages = [{"role": "user", "content": "hi"}]
    if args.surface == "v1":
        url_path, payload = "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": messages}
    else:
        url_path = "/ai/chat"
        payload = {"provider": "openai", "model": "gpt-4o-mini", "messages": messages}
    server.start()
    since = time.time()
    try:
        url = processes.base_url(server) + url_path
        run.requests = asyncio.run(_load(url, json.dumps(payload).encode(), key, args.seconds))
    except (RuntimeError, aiohttp.ClientError) as exc:
        run.error = repr(exc)
    finally:
        until = time.time()
        server.stop()
    probe = _probe_events(folder, 0, until)
    mine = {f"(thread {text.split()[-1]})" for _, _, text in probe if text.startswith("probe ")}
    traced = [e for e in _strace_events(trace, since, until) if e[2].split(" ", 1)[1] not in mine]
    run.events = sorted(
        [e for e in probe if e[0] >= since and not e[2].startswith("probe ")] + traced
    )
    return run


def report(run: Run, slow_ms: float, show: int) -> None:
    title = run.config or "(defaults)"
    if run.error or not run.requests:
        print(f"== {title}: failed: {run.error}")
        return
    latencies = sorted(ms for _, ms in run.requests)
    n = len(latencies)
    p99 = latencies[min(n - 1, int(n * 0.99))]
    print(
        f"== {title}: {n} requests, p50 {statistics.median(latencies):.2f} ms, p99 {p99:.2f} ms, "
        f"max {latencies[-1]:.1f} ms, {sum(ms > slow_ms for ms in latencies)} over {slow_ms} ms"
    )
    kinds: Counter[str] = Counter()
    for _, took, text in run.events:
        kind = text.split(" ", 1)[0]
        kinds[kind] += 1
        if kind in ("busy", "gap"):
            cpu = float(text.split("main_cpu ", 1)[1].split("ms", 1)[0])
            kinds[f"{kind} with main-thread CPU >= half"] += cpu >= took / 2
    longest = max((took for _, took, text in run.events if text.startswith("fdatasync")), default=0)
    print(f"   proxy-side events: {dict(kinds)}; longest fdatasync {longest:.1f} ms")
    # Attribution that noise does not fake: how slow are the requests an event overlapped,
    # against all requests? (A machine's noise slows requests whatever overlapped them.)
    for kind in sorted({text.split(" ", 1)[0] for _, _, text in run.events}):
        hit = [
            ms
            for wall, ms in run.requests
            if any(
                text.startswith(kind) and wall <= at + took / 1000 and at <= wall + ms / 1000
                for at, took, text in run.events
            )
        ]
        if hit:
            print(
                f"   requests overlapping {kind}: {len(hit)} ({100 * len(hit) / n:.1f}%), "
                f"median {statistics.median(hit):.2f} ms, max {max(hit):.1f} ms"
            )
    slow = [(wall, ms) for wall, ms in run.requests if ms > slow_ms]
    for wall, ms in slow[:show]:
        print(f"   request at +{wall - run.requests[0][0]:.3f} s: {ms:.1f} ms")
        for at, took, text in run.events:
            if wall - 0.002 <= at + took / 1000 and at <= wall + ms / 1000:
                print(f"      {took:6.1f} ms {text[:300]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.stall", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--config", action="append", metavar="NAME=VALUE[,...]", help="repeatable; '' = defaults"
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--chain", action="store_true", help="an rk_ key with limits and a budget (chain-sqlite)"
    )
    parser.add_argument("--surface", choices=("ai", "v1"), default="ai")
    parser.add_argument("--checkout", type=Path, help="run another checkout's code (PYTHONPATH)")
    parser.add_argument("--no-probe", action="store_true", help="without the stall probe")
    parser.add_argument("--strace", action="store_true", help="fdatasync and busy-handler sleeps")
    parser.add_argument("--slow", type=float, default=20.0, help="list requests slower than this")
    parser.add_argument("--show", type=int, default=15, help="slow requests listed per run")
    args = parser.parse_args(argv)
    if args.strace and shutil.which("strace") is None:
        parser.error("--strace needs strace on PATH")
    configs = args.config or [""]
    workdir = Path(tempfile.mkdtemp(prefix="robota-stall-"))
    upstream = processes.fake_upstream(workdir, 20, 1.0)
    upstream.start()
    try:
        for _ in range(args.rounds):
            for config in configs:
                report(
                    measure(args, config, workdir, processes.base_url(upstream)),
                    args.slow,
                    args.show,
                )
    finally:
        upstream.stop()
    print(f"(servers' logs and probe files: {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
