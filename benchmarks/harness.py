"""Run the benchmark: fake upstream directly, through the floor, robota-proxy, LiteLLM's proxy.

    python -m benchmarks.harness --quick                 # smoke run, a few minutes
    python -m benchmarks.harness                         # full run
    python -m benchmarks.harness --litellm PATH/litellm  # add LiteLLM's proxy as a peer
    python -m benchmarks.harness --baseline PATH_OR_REF  # add robota@base from another checkout

Every server is a real process on 127.0.0.1; the load generator is a process of its own. Each
measurement step runs its targets in turn (direct first: it is the baseline every "added"
figure is taken from). Results go to ``benchmarks/results/<date>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks import cold_start, processes, profiling, report
from benchmarks.loadgen import Spec
from benchmarks.processes import Sampler, Server
from benchmarks.stats import merge, summarize

RESULTS = Path(__file__).parent / "results"
LITELLM_MASTER_KEY = "sk-bench-master"
#: Suffixes of system names: ``@base`` runs the baseline checkout's code, ``/v1`` is the same
#: process driven through its OpenAI-compatible surface (``POST /v1/chat/completions``).
BASE, V1 = report.BASE, report.V1

#: The realistic chain (issue 13): an ``rk_`` key looked up in the database, with rpm/tpm limits
#: and a monthly USD budget (so every call reserves its worst case and settles it in the
#: ledger; see ``create_chain_key``), the access log (ROBOTA_LOG_LEVEL's default, info) and
#: Prometheus metrics (ROBOTA_METRICS_ENABLED's default, on). Each profile is extra environment
#: for the proxy; "" unsets one of the defaults (ROBOTA_API_KEYS). Values may use {workdir} (a
#: folder of the profile's own). Override one with --chain-env PROFILE:NAME=VALUE.
CHAIN_PROFILES: dict[str, dict[str, Any]] = {
    "chain-sqlite": {
        "workers": 1,
        "env": {
            "ROBOTA_DATABASE_URL": "sqlite:///{workdir}/chain-sqlite.db",
            "ROBOTA_API_KEYS": "",
        },
    },
    "chain-scaleout": {
        "workers": 2,
        "env": {
            "ROBOTA_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/test",
            "ROBOTA_REDIS_URL": "redis://127.0.0.1:6379/0",
            "ROBOTA_API_KEYS": "",
        },
    },
}

#: Variants of our proxy tried through configuration only (levers that need no code change).
VARIANTS: dict[str, dict[str, Any]] = {
    "robota-quiet": {"workers": 1, "env": {"ROBOTA_LOG_LEVEL": "warning"}},
    "robota-2w": {"workers": 2, "env": {}},
    # The ledger on PostgreSQL (a connection pool) instead of the default SQLite file.
    "robota-pg": {
        "workers": 1,
        "env": {"ROBOTA_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/test"},
    },
    "robota-pool100": {"workers": 1, "env": {"ROBOTA_MAX_CONNECTIONS_PER_VENDOR": "100"}},
    "robota-nocache": {"workers": 1, "env": {"ROBOTA_CACHE_ENABLED": "false"}},
    "robota-lean": {
        "workers": 1,
        "env": {
            "ROBOTA_LOG_LEVEL": "warning",
            "ROBOTA_CACHE_ENABLED": "false",
            "ROBOTA_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/test",
        },
    },
}


@dataclass
class Target:
    name: str
    kind: str  # loadgen dialect: "openai" or "robota"
    base_url: str
    api_key: str
    server: Server | None = None
    available: bool = True
    reason: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Step:
    scenario: str
    label: str
    stream: bool
    concurrency: int
    duration_s: float
    warmup_s: float
    targets: list[str]
    content: str = "hi"
    expect_tokens: int | None = None
    timeout_s: float = 30.0
    requests_per_worker: int | None = None
    ramp_s: float = 0.0


@dataclass
class Durations:
    warmup_s: float
    step_s: float
    many_streams_s: float
    profile_s: float


QUICK = Durations(warmup_s=0.5, step_s=2.0, many_streams_s=30.0, profile_s=4.0)
#: Concurrent streams of scenario 3 (``--streams``): issue 13's 5,000 in a full run; a smoke
#: run opens fewer unless told.
STREAMS_FULL, STREAMS_QUICK = 5000, 1000
FULL = Durations(warmup_s=2.0, step_s=10.0, many_streams_s=30.0, profile_s=12.0)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


# --- the plan ----------------------------------------------------------------------------------


def plan(
    d: Durations,
    available: Collection[str],
    variants: list[str],
    chains: list[str],
    chunks: int,
    streams: int,
    ramp_s: float = 0.0,
) -> list[Step]:
    """Every step and the systems it measures, in turns (direct first: the baseline of every
    "added" figure). Systems not in ``available`` (no --baseline, no --litellm, a chain not
    asked for) are left out of the steps."""
    peer = "litellm"
    one_worker = [c for c in chains if CHAIN_PROFILES[c]["workers"] == 1]
    several = [c for c in chains if c not in one_worker]
    chain1 = [x for c in one_worker for x in (c, c + BASE)]
    mine = ["robota", "robota" + BASE]
    front = ["direct", "floor"]
    steps = [
        # Issue 13's table: direct, the floor, the static key, the realistic chain, LiteLLM.
        Step("1 chat", "c=1", False, 1, d.step_s, d.warmup_s, [*front, *mine, *chain1, peer]),
        Step(
            "1 chat",
            "c=50",
            False,
            50,
            d.step_s,
            d.warmup_s,
            [*front, *mine, *variants, *chain1, peer],
        ),
        Step(
            "1 chat", "c=200", False, 200, d.step_s, d.warmup_s, [*front, "robota", *variants, peer]
        ),
        Step(
            "2 stream",
            "c=1",
            True,
            1,
            d.step_s,
            d.warmup_s,
            [*front, *mine, *one_worker, peer],
            expect_tokens=chunks,
        ),
        Step(
            "2 stream",
            "c=50",
            True,
            50,
            d.step_s,
            d.warmup_s,
            [*front, "robota", *variants[:1], peer],
            expect_tokens=chunks,
        ),
        # N streams opened over ramp_s, one per connection, each lasting about 20 s (20
        # tokens, a second apart, a slow model), so that all of them are open together.
        Step(
            report.many_streams_scenario(streams),
            report.MANY_STREAMS_LABEL.format(n=streams, ramp=f"{ramp_s:g}"),
            True,
            streams,
            max(d.many_streams_s, ramp_s + 10),  # every worker starts inside the window
            0.0,
            [*front, "robota", peer],
            content="hi bench:20x1000",
            expect_tokens=20,
            timeout_s=90.0,
            requests_per_worker=1,
            ramp_s=ramp_s,
        ),
    ]
    if chains:
        steps += [
            Step("4 chain", "chat c=50", False, 50, d.step_s, d.warmup_s, ["direct", *several]),
            Step(
                "4 chain",
                "stream c=50",
                True,
                50,
                d.step_s,
                d.warmup_s,
                ["direct", "floor", *chains],
                expect_tokens=chunks,
            ),
            Step("4 chain", "chat c=200", False, 200, d.step_s, d.warmup_s, ["direct", *chains]),
        ]
    # The OpenAI-compatible surface: the caller's JSON passed through to the OpenAI-wire
    # upstream. LiteLLM's figures for this request are scenario 1's (it is the same request).
    v1 = ["robota" + V1, *[c + suffix for c in one_worker for suffix in (V1, BASE + V1)]]
    steps += [
        Step("5 passthrough", "c=1", False, 1, d.step_s, d.warmup_s, [*front, *v1]),
        Step("5 passthrough", "c=50", False, 50, d.step_s, d.warmup_s, [*front, *v1]),
    ]
    for step in steps:
        step.targets = [name for name in dict.fromkeys(step.targets) if name in available]
    return [step for step in steps if any(name != "direct" for name in step.targets)]


# --- targets -----------------------------------------------------------------------------------


def start_target(target: Target) -> None:
    if target.server is None:
        return
    try:
        target.server.start()
    except RuntimeError as exc:
        target.available = False
        lines = str(exc).splitlines()
        # The first line says what happened, the last exception line why (an ImportError of a
        # baseline whose dependencies this venv lacks, say).
        errors = [line.strip() for line in lines if "Error" in line and ":" in line]
        errors = [line for line in errors if not line.startswith("ERROR:")]
        target.reason = lines[0].removesuffix("; last log lines:") + (
            f" ({errors[-1]})" if errors else ""
        )
        log(f"  {target.name}: NOT AVAILABLE: {exc}")


def preflight(target: Target, chunks: int) -> None:
    """One plain and one streamed request must work before a target is measured."""
    if not target.available:
        return
    messages = [{"role": "user", "content": "hi"}]
    if target.kind == "robota":
        body: dict[str, Any] = {"provider": "openai", "model": "gpt-4o-mini", "messages": messages}
        urls = (target.base_url + "/ai/chat", target.base_url + "/ai/chat/stream")
        streams = (body, body)
    else:
        body = {"model": "gpt-4o-mini", "messages": messages}
        url = target.base_url + "/v1/chat/completions"
        urls = (url, url)
        streams = (body, {**body, "stream": True, "stream_options": {"include_usage": True}})
    for url, payload in zip(urls, streams, strict=True):
        status, text = processes.post_json(url, payload, target.api_key)
        if status != 200 or "tok" not in text:
            target.available = False
            target.reason = f"preflight {url.rsplit('/', 2)[-2:]} -> {status}: {text[:200]}"
            log(f"  {target.name}: NOT AVAILABLE: {target.reason}")
            return


def create_chain_key(name: str, server: Server) -> tuple[str | None, str]:
    """``robota-proxy keys create ... --json`` against the profile's database: limits and a
    budget no benchmark reaches, but that every request is checked and metered against (the
    budget makes each call reserve its worst case before the vendor call and settle it
    after, in the ledger)."""
    command = [
        sys.executable,
        "-m",
        "robota_proxy",
        "keys",
        "create",
        "--user",
        f"bench-{name.replace('@', '-')}-{int(time.time())}",
        "--rpm",
        "1000000",
        "--tpm",
        "10000000000",
        "--monthly-budget-usd",
        "1000000",
        "--json",
        "--create-database",  # the key is made before the proxy's first start
    ]
    server.cwd.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            command,
            env=server.env,
            cwd=server.cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"`robota-proxy keys create` failed: {exc!r}"
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        last = lines[-1] if lines else ""
        return None, f"`robota-proxy keys create` exited {done.returncode}: {last[:200]}"
    try:
        key = json.loads(done.stdout.strip().splitlines()[-1])["key"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None, f"`robota-proxy keys create --json` printed no key: {done.stdout[:200]!r}"
    return str(key), ""


def build_targets(
    args: argparse.Namespace, workdir: Path, upstream: Server, baseline: Path | None
) -> dict[str, Target]:
    upstream_url = processes.base_url(upstream)
    targets = {"direct": Target("direct", "openai", upstream_url, "sk-bench")}
    floor = processes.floor_forwarder(workdir, upstream_url)
    targets["floor"] = Target("floor", "openai", processes.base_url(floor), "sk-bench", floor)

    def ours(name: str, workers: int, env: dict[str, str], checkout: Path | None = None) -> Target:
        server = processes.robota_proxy(name, workdir, upstream_url, env, workers, checkout)
        return Target(name, "robota", processes.base_url(server), "bench-key", server)

    def surface(target: Target) -> Target:
        """The same process (started once) through its OpenAI-compatible surface."""
        return Target(target.name + V1, "openai", target.base_url, target.api_key, target.server)

    checkouts: dict[str, Path | None] = {"": None}
    if baseline is not None:
        checkouts[BASE] = baseline
    for suffix, checkout in checkouts.items():
        targets["robota" + suffix] = ours(
            "robota" + suffix, args.workers, dict(args.proxy_env), checkout
        )
    targets["robota" + V1] = surface(targets["robota"])
    for name in args.variants:
        spec = VARIANTS[name]
        targets[name] = ours(name, spec["workers"], {**args.proxy_env, **spec["env"]})
    for name in args.chains:
        spec = CHAIN_PROFILES[name]
        for suffix, checkout in checkouts.items():
            if suffix and spec["workers"] != 1:
                continue  # the baseline runs the one-worker chains (SQLite, a file of its own)
            folder = workdir / (name + suffix).replace("@", "-")
            env = {k: v.format(workdir=folder) for k, v in spec["env"].items()}
            env.update(args.chain_env.get(name, {}))
            target = ours(name + suffix, spec["workers"], {**args.proxy_env, **env}, checkout)
            assert target.server is not None
            folder.mkdir(parents=True, exist_ok=True)
            key, reason = create_chain_key(name + suffix, target.server)
            if key is None:
                target.available, target.reason = False, reason
            else:
                target.api_key = key
            targets[target.name] = target
            if spec["workers"] == 1:
                targets[target.name + V1] = surface(target)
                targets[target.name + V1].available = target.available
                targets[target.name + V1].reason = target.reason
    if args.litellm:
        server = processes.litellm_proxy(
            workdir, args.litellm, upstream_url, args.litellm_workers, LITELLM_MASTER_KEY
        )
        targets["litellm"] = Target(
            "litellm", "openai", processes.base_url(server), LITELLM_MASTER_KEY, server
        )
    return targets


def prepare_baseline(spec: str, workdir: Path) -> tuple[Path, dict[str, str]]:
    """``--baseline``: a folder holding another checkout of this repository, used as it is;
    or a git revision of this one, exported with ``git archive`` (no worktree, no change to
    the repository) into the work folder. What it is, for the report."""
    root = Path(__file__).resolve().parent.parent
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if not (folder / "robota_proxy" / "__init__.py").is_file():
            raise SystemExit(f"--baseline {spec}: no robota_proxy package in that folder")
        done = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--", "robota_proxy"],
            capture_output=True,
            text=True,
            check=False,
        )
        return folder.resolve(), {
            "path": str(folder.resolve()),
            "commit": done.stdout.strip() or "not a git checkout",
            "proxy_code": "modified in that tree" if dirty.stdout.strip() else "as committed",
        }
    archived = subprocess.run(
        ["git", "-C", str(root), "archive", "--format=tar", spec, "robota_proxy", "robota_client"],
        capture_output=True,
        check=False,
    )
    if archived.returncode != 0:
        message = archived.stderr.decode(errors="replace").strip()
        raise SystemExit(f"--baseline {spec}: neither a folder nor a revision ({message})")
    target = workdir / "baseline-src"
    with tarfile.open(fileobj=io.BytesIO(archived.stdout)) as archive:
        archive.extractall(target, filter="data")
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", spec],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return target, {"path": str(target), "commit": commit, "revision": spec}


# --- running a step ----------------------------------------------------------------------------


def run_load(step: Step, target: Target, workdir: Path) -> dict[str, Any]:
    spec = Spec(
        kind=target.kind,
        base_url=target.base_url,
        api_key=target.api_key,
        stream=step.stream,
        concurrency=step.concurrency,
        duration_s=step.duration_s,
        warmup_s=step.warmup_s,
        content=step.content,
        expect_tokens=step.expect_tokens,
        timeout_s=step.timeout_s,
        requests_per_worker=step.requests_per_worker,
        grace_s=max(10.0, step.timeout_s if step.requests_per_worker else 10.0),
        ramp_s=step.ramp_s,
    )
    spec_path = workdir / "spec.json"
    out_path = workdir / "result.json"
    spec_path.write_text(json.dumps(asdict(spec)), encoding="utf-8")
    out_path.unlink(missing_ok=True)
    limit = step.ramp_s + step.warmup_s + step.duration_s + spec.grace_s + 30
    try:
        subprocess.run(
            [sys.executable, "-m", "benchmarks.loadgen", str(spec_path), str(out_path)],
            timeout=limit,
            check=True,
        )
    except subprocess.TimeoutExpired:
        return _failed_raw(f"load generator killed after {limit:.0f}s")
    except subprocess.CalledProcessError as exc:
        return _failed_raw(f"load generator exited {exc.returncode}")
    raw: dict[str, Any] = json.loads(out_path.read_text(encoding="utf-8"))
    return raw


def _failed_raw(reason: str) -> dict[str, Any]:
    return {
        "latency_ms": [],
        "ttft_ms": [],
        "gap_ms": [],
        "ok": 0,
        "ok_in_window": 0,
        "ok_all": 0,
        "errors": {reason: 1},
        "window_s": 0.0,
        "peak_open_streams": 0,
        "peak_in_flight": 0,
    }


def settle(target: Target, limit_s: float = 30.0) -> None:
    """Wait until the server is idle (below 5% of a core), so that work left over from the
    previous step (streams whose clients went away) does not count against this one."""
    if target.server is None or target.server.process is None or not target.available:
        return
    deadline = time.monotonic() + limit_s
    before = target.server.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = target.server.cpu_seconds()
        if now - before < 0.025:
            return
        before = now
    log(f"    {target.name} still busy after {limit_s:.0f}s; measuring anyway")


def describe(summary: dict[str, Any]) -> str:
    lat = summary["latency_ms"]
    parts = [
        f"{summary['throughput_rps'] or 0:8.1f} req/s",
        f"p50 {lat['p50'] or 0:7.2f} ms",
        f"p99 {lat['p99'] or 0:7.2f} ms",
    ]
    if "ttft_ms" in summary:
        parts.append(f"ttft p99 {summary['ttft_ms']['p99'] or 0:6.2f} ms")
        parts.append(f"gap p99 {summary['gap_ms']['p99'] or 0:6.2f} ms")
    if "peak_rss_mb" in summary:
        parts.append(f"rss {summary['peak_rss_mb']:.0f} MB")
    parts.append(f"errors {summary['errors']}")
    return " | ".join(parts)


def run_steps(
    steps: list[Step], targets: dict[str, Target], rounds: int, workdir: Path
) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[float]]]]:
    """Every step, each target in turn; the raw samples are kept for the plot."""
    results: list[dict[str, Any]] = []
    samples: dict[str, dict[str, list[float]]] = {}
    total = sum(len(s.targets) for s in steps) * rounds
    done = 0
    started = time.monotonic()
    for step in steps:
        raws: dict[str, list[dict[str, Any]]] = {name: [] for name in step.targets}
        resources: dict[str, tuple[int, float]] = {}
        for _ in range(rounds):
            for name in step.targets:
                target = targets.get(name)
                done += 1
                if target is None or not target.available:
                    continue
                eta = (time.monotonic() - started) / max(done - 1, 1) * (total - done + 1)
                log(
                    f"[{done}/{total}, ~{eta / 60:.1f} min left] scenario {step.scenario} "
                    f"{step.label} {'stream' if step.stream else 'chat'} -> {name}"
                )
                for other in targets.values():
                    settle(other)
                psutil.cpu_percent()  # starts the machine-wide measurement
                with Sampler(target.server) as sampler:
                    raw = run_load(step, target, workdir)
                raw["machine_cpu_pct"] = psutil.cpu_percent()
                raw["loadavg_1m"] = round(os.getloadavg()[0], 2)
                raws[name].append(raw)
                peak, cpu = resources.get(name, (0, 0.0))
                resources[name] = (max(peak, sampler.peak_rss), cpu + sampler.cpu_s)
                log("    " + describe(summarize(raw, sampler.peak_rss, None)))
        for name, runs in raws.items():
            target = targets.get(name)
            if not runs or target is None:
                results.append(
                    {
                        "scenario": step.scenario,
                        "label": step.label,
                        "stream": step.stream,
                        "concurrency": step.concurrency,
                        "target": name,
                        "available": False,
                        "reason": target.reason if target else "not configured",
                    }
                )
                continue
            raw = merge(runs)
            raw["machine_cpu_pct"] = max(r.get("machine_cpu_pct", 0.0) for r in runs)
            raw["loadavg_1m"] = max(r.get("loadavg_1m", 0.0) for r in runs)
            peak, cpu = resources[name]
            key = f"{step.scenario} {step.label}|{name}"
            samples[key] = {k: raw[k] for k in ("latency_ms", "ttft_ms", "gap_ms")}
            results.append(
                {
                    "scenario": step.scenario,
                    "label": step.label,
                    "stream": step.stream,
                    "concurrency": step.concurrency,
                    "target": name,
                    "available": True,
                    "duration_s": step.duration_s * rounds,
                    "summary": summarize(raw, peak, cpu if target.server else None),
                }
            )
    return results, samples


# --- main --------------------------------------------------------------------------------------


def parse_env_pairs(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def parse_chain_env(pairs: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for pair in pairs:
        profile, sep, assignment = pair.partition(":")
        if not sep or profile not in CHAIN_PROFILES:
            raise SystemExit(f"expected PROFILE:NAME=VALUE with PROFILE in {list(CHAIN_PROFILES)}")
        out.setdefault(profile, {}).update(parse_env_pairs([assignment]))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.harness", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke run of about four minutes")
    parser.add_argument("--step-seconds", type=float, help="measured seconds per target and step")
    parser.add_argument("--warmup-seconds", type=float, help="unrecorded seconds before each")
    parser.add_argument("--rounds", type=int, default=1, help="repeat each step's turns N times")
    parser.add_argument("--litellm", help="path of LiteLLM's `litellm` executable (a peer)")
    parser.add_argument("--litellm-workers", type=int, default=1)
    parser.add_argument(
        "--baseline",
        metavar="PATH_OR_REF",
        help="also run robota@base (and chain-sqlite@base) from another checkout of this "
        "repository (a folder), or from a git revision exported into the work folder",
    )
    parser.add_argument(
        "--streams",
        type=int,
        help=f"concurrent streams of scenario 3 (default {STREAMS_FULL}, --quick {STREAMS_QUICK})",
    )
    parser.add_argument(
        "--streams-ramp",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="scenario 3 opens its streams evenly over this long (0: all at once; each "
        "stream lasts about 20 s, so all are open together)",
    )
    parser.add_argument(
        "--cold-start-runs", type=int, default=5, help="runs of each cold-start command"
    )
    parser.add_argument("--workers", type=int, default=1, help="workers of our plain proxy")
    parser.add_argument(
        "--proxy-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for every robota-proxy process",
    )
    parser.add_argument(
        "--variants",
        default="robota-quiet,robota-2w",
        help=f"configuration-only variants of our proxy, from {list(VARIANTS)} ('' for none)",
    )
    parser.add_argument(
        "--chains",
        default=",".join(CHAIN_PROFILES),
        help=f"scenario 4 profiles, from {list(CHAIN_PROFILES)} ('' to skip scenario 4)",
    )
    parser.add_argument(
        "--chain-env",
        action="append",
        default=[],
        metavar="PROFILE:NAME=VALUE",
        help="override one variable of a scenario 4 profile",
    )
    parser.add_argument("--chunks", type=int, default=20, help="tokens per upstream reply")
    parser.add_argument("--interval-ms", type=float, default=1.0, help="gap between tokens")
    parser.add_argument(
        "--profile",
        choices=("auto", "on", "off"),
        default="auto",
        help="py-spy our proxy under load (auto: in full runs)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SCENARIO",
        help="run only steps whose scenario starts with this ('1', '2 stream', '6 cold', ...); "
        "repeatable",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--name", help="results file stem (default: date and time)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    durations = QUICK if args.quick else FULL
    if args.step_seconds:
        durations.step_s = args.step_seconds
        durations.many_streams_s = max(args.step_seconds, QUICK.many_streams_s)
        durations.profile_s = args.step_seconds
    if args.warmup_seconds is not None:
        durations.warmup_s = args.warmup_seconds
    args.proxy_env = parse_env_pairs(args.proxy_env)
    args.chain_env = parse_chain_env(args.chain_env)
    args.variants = [v for v in args.variants.split(",") if v]
    args.chains = [c for c in args.chains.split(",") if c]
    for name in args.variants:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {list(VARIANTS)}")
    for name in args.chains:
        if name not in CHAIN_PROFILES:
            raise SystemExit(f"unknown chain profile {name!r}; known: {list(CHAIN_PROFILES)}")
    profile = args.profile == "on" or (args.profile == "auto" and not args.quick)
    streams = args.streams or (STREAMS_QUICK if args.quick else STREAMS_FULL)
    open_files = processes.raise_open_files_limit()
    if open_files < streams * 2 + 1000:
        log(
            f"warning: {open_files} open files allowed; {streams} streams need about "
            f"{streams * 2 + 1000} in a proxy (ulimit -n)"
        )

    now = dt.datetime.now()
    stem = args.name or now.strftime("%Y-%m-%d_%H%M%S") + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="robota-bench-"))
    log(f"work folder (server logs): {workdir}")
    baseline, baseline_info = (
        prepare_baseline(args.baseline, workdir) if args.baseline else (None, {})
    )
    if baseline is not None:
        log(f"baseline: {baseline_info}")

    def selected(scenario: str) -> bool:
        return not args.only or any(scenario.startswith(o) for o in args.only)

    cold: list[dict[str, Any]] = []
    if selected(report.COLD_START):  # first, while no server of ours is running
        log(f"scenario {report.COLD_START}: {args.cold_start_runs} runs of each command")
        cold = cold_start.measure(args.cold_start_runs, baseline)
        for row in cold:
            log("    " + report.describe_cold(row))

    upstream = processes.fake_upstream(workdir, args.chunks, args.interval_ms)
    upstream.start()
    targets: dict[str, Target] = {}
    results: list[dict[str, Any]] = []
    samples: dict[str, dict[str, list[float]]] = {}
    profiles: list[dict[str, Any]] = []
    try:
        targets = build_targets(args, workdir, upstream, baseline)
        steps = plan(
            durations,
            available=list(targets),
            variants=args.variants,
            chains=args.chains,
            chunks=args.chunks,
            streams=streams,
            ramp_s=args.streams_ramp,
        )
        steps = [s for s in steps if selected(s.scenario)]
        measured = {name for step in steps for name in step.targets}
        started: set[int] = set()
        for target in targets.values():
            if target.name not in measured:
                continue
            server = target.server
            if target.available and server is not None and id(server) not in started:
                log(f"starting {target.name}")
                start_target(target)
                started.add(id(server))
                if not target.available:  # its other surfaces too
                    for other in targets.values():
                        if other.server is server:
                            other.available, other.reason = False, target.reason
            preflight(target, args.chunks)
        results, samples = run_steps(steps, targets, args.rounds, workdir)
        robota = targets["robota"]
        running = robota.server is not None and robota.server.process is not None
        if profile and robota.available and running:
            profiles = profiling.profile_proxy(
                robota, durations, workdir, args.out / "profiles" / stem, run_load, Step
            )
    finally:
        for target in targets.values():
            if target.server is not None:
                target.server.stop()
        upstream.stop()

    meta = {
        "date": now.isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "upstream": {"chunks": args.chunks, "interval_ms": args.interval_ms},
        "streams": streams,
        "streams_ramp_s": args.streams_ramp,
        "open_files_limit": open_files,
        "baseline": baseline_info,
        "durations": asdict(durations),
        "rounds": args.rounds,
        "versions": report.versions(args.litellm),
        "git": report.git_state(),
        "targets": {
            name: {
                "kind": t.kind,
                "available": t.available,
                "reason": t.reason,
                "workers": _workers(t),
                "env": _shown_env(t),
            }
            for name, t in targets.items()
            if t.server is None or t.server.process is not None  # started, or direct
        },
        "workdir": str(workdir),
    }
    document = report.build(meta, results, profiles, cold)
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(document, indent=1), encoding="utf-8")
    md_path = args.out / f"{stem}.md"
    md_path.write_text(report.markdown(document), encoding="utf-8")
    png_path = args.out / f"{stem}.png"
    report.plot(samples, png_path)
    log(f"wrote {json_path}, {md_path} and {png_path}")
    print(report.markdown(document))
    return 0


def _workers(target: Target) -> int | None:
    if target.server is None:
        return None
    command = target.server.command
    for flag in ("--workers", "--num_workers"):
        if flag in command:
            return int(command[command.index(flag) + 1])
    return None


def _shown_env(target: Target) -> dict[str, str]:
    if target.server is None:
        return {}
    shown = {}
    for name, value in target.server.env.items():
        baseline_path = name == "PYTHONPATH" and BASE in target.name
        if name.startswith(("ROBOTA_", "LITELLM_")) or baseline_path:
            shown[name] = "***" if "KEY" in name and name != "ROBOTA_API_KEYS" else value
    return shown


if __name__ == "__main__":
    sys.exit(main())
