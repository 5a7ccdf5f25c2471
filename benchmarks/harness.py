"""Run the benchmark: fake upstream directly, through robota-proxy, and through LiteLLM's proxy.

    python -m benchmarks.harness --quick                 # ~1 minute smoke run
    python -m benchmarks.harness                         # full run, ~15 minutes
    python -m benchmarks.harness --litellm PATH/litellm  # add LiteLLM's proxy as a peer

Every server is a real process on 127.0.0.1; the load generator is a process of its own. Each
measurement step runs its targets in turn (direct first: it is the baseline every "added"
figure is taken from). Results go to ``benchmarks/results/<date>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks import processes, profiling, report
from benchmarks.loadgen import Spec
from benchmarks.processes import Sampler, Server
from benchmarks.stats import merge, summarize

RESULTS = Path(__file__).parent / "results"
MANY_STREAMS_LABEL = report.MANY_STREAMS.removeprefix("3 1000 streams ")
LITELLM_MASTER_KEY = "sk-bench-master"

#: The realistic chain: key auth against the database, rate limit, metering. Each profile is
#: extra environment for the proxy; "" unsets one of the defaults (ROBOTA_API_KEYS). Values
#: may use {workdir}. Override one with --chain-env PROFILE:NAME=VALUE.
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


@dataclass
class Durations:
    warmup_s: float
    step_s: float
    many_streams_s: float
    profile_s: float


QUICK = Durations(warmup_s=0.5, step_s=2.0, many_streams_s=30.0, profile_s=4.0)
FULL = Durations(warmup_s=2.0, step_s=10.0, many_streams_s=30.0, profile_s=12.0)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


# --- the plan ----------------------------------------------------------------------------------


def plan(
    d: Durations, peers: bool, variants: list[str], chains: list[str], chunks: int
) -> list[Step]:
    peer = ["litellm"] if peers else []
    base = ["direct", "robota"]
    steps = [
        Step("1 chat", "c=1", False, 1, d.step_s, d.warmup_s, [*base, *peer]),
        Step("1 chat", "c=50", False, 50, d.step_s, d.warmup_s, [*base, *variants, *peer]),
        Step("1 chat", "c=200", False, 200, d.step_s, d.warmup_s, [*base, *variants, *peer]),
        Step(
            "2 stream",
            "c=1",
            True,
            1,
            d.step_s,
            d.warmup_s,
            [*base, *peer],
            expect_tokens=chunks,
        ),
        Step(
            "2 stream",
            "c=50",
            True,
            50,
            d.step_s,
            d.warmup_s,
            [*base, *variants[:1], *peer],
            expect_tokens=chunks,
        ),
        # 1000 streams opened at once, one per connection, each lasting about 20 s (20 tokens,
        # a second apart, a slow model), so that all of them are open together.
        Step(
            "3 1000 streams",
            MANY_STREAMS_LABEL,
            True,
            report.MANY_STREAMS_COUNT,
            d.many_streams_s,
            0.0,
            [*base, *peer],
            content="hi bench:20x1000",
            expect_tokens=20,
            timeout_s=90.0,
            requests_per_worker=1,
        ),
    ]
    if chains:
        steps += [
            Step("4 chain", "chat c=50", False, 50, d.step_s, d.warmup_s, [*base, *chains]),
            Step(
                "4 chain",
                "stream c=50",
                True,
                50,
                d.step_s,
                d.warmup_s,
                [*base, *chains],
                expect_tokens=chunks,
            ),
            Step("4 chain", "chat c=200", False, 200, d.step_s, d.warmup_s, [*base, *chains]),
        ]
    return steps


# --- targets -----------------------------------------------------------------------------------


def start_target(target: Target) -> None:
    if target.server is None:
        return
    try:
        target.server.start()
    except RuntimeError as exc:
        target.available = False
        target.reason = str(exc).splitlines()[0]
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
    """``robota-proxy keys create ... --json`` against the profile's database."""
    command = [
        sys.executable,
        "-m",
        "robota_proxy",
        "keys",
        "create",
        "--user",
        f"bench-{name}-{int(time.time())}",
        "--rpm",
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


def build_targets(args: argparse.Namespace, workdir: Path, upstream: Server) -> dict[str, Target]:
    upstream_url = processes.base_url(upstream)
    targets = {"direct": Target("direct", "openai", upstream_url, "sk-bench")}

    def ours(name: str, workers: int, env: dict[str, str]) -> Target:
        server = processes.robota_proxy(name, workdir, upstream_url, env, workers)
        return Target(name, "robota", processes.base_url(server), "bench-key", server)

    targets["robota"] = ours("robota", args.workers, dict(args.proxy_env))
    for name in args.variants:
        spec = VARIANTS[name]
        targets[name] = ours(name, spec["workers"], {**args.proxy_env, **spec["env"]})
    for name in args.chains:
        spec = CHAIN_PROFILES[name]
        env = {k: v.format(workdir=workdir) for k, v in spec["env"].items()}
        env.update(args.chain_env.get(name, {}))
        target = ours(name, spec["workers"], {**args.proxy_env, **env})
        assert target.server is not None
        key, reason = create_chain_key(name, target.server)
        if key is None:
            target.available, target.reason = False, reason
        else:
            target.api_key = key
        targets[name] = target
    if args.litellm:
        server = processes.litellm_proxy(
            workdir, args.litellm, upstream_url, args.litellm_workers, LITELLM_MASTER_KEY
        )
        targets["litellm"] = Target(
            "litellm", "openai", processes.base_url(server), LITELLM_MASTER_KEY, server
        )
    return targets


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
    )
    spec_path = workdir / "spec.json"
    out_path = workdir / "result.json"
    spec_path.write_text(json.dumps(asdict(spec)), encoding="utf-8")
    out_path.unlink(missing_ok=True)
    limit = step.warmup_s + step.duration_s + spec.grace_s + 30
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
        "errors": {reason: 1},
        "window_s": 0.0,
        "peak_open_streams": 0,
        "peak_in_flight": 0,
    }


def settle(target: Target, limit_s: float = 30.0) -> None:
    """Wait until the server is idle (below 5% of a core), so that work left over from the
    previous step (streams whose clients went away) does not count against this one."""
    if target.server is None or not target.available:
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
        help="run only steps whose scenario starts with this ('1', '2 stream', ...); repeatable",
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

    now = dt.datetime.now()
    stem = args.name or now.strftime("%Y-%m-%d_%H%M%S") + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="robota-bench-"))
    log(f"work folder (server logs): {workdir}")

    upstream = processes.fake_upstream(workdir, args.chunks, args.interval_ms)
    upstream.start()
    targets: dict[str, Target] = {}
    try:
        targets = build_targets(args, workdir, upstream)
        for target in targets.values():
            if target.available and target.server is not None:
                log(f"starting {target.name}")
                start_target(target)
            preflight(target, args.chunks)
        steps = plan(
            durations,
            peers="litellm" in targets,
            variants=args.variants,
            chains=args.chains,
            chunks=args.chunks,
        )
        if args.only:
            steps = [s for s in steps if any(s.scenario.startswith(o) for o in args.only)]
        results, samples = run_steps(steps, targets, args.rounds, workdir)
        profiles: list[dict[str, Any]] = []
        robota = targets["robota"]
        if profile and robota.available and robota.server is not None:
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
        },
        "workdir": str(workdir),
    }
    document = report.build(meta, results, profiles)
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
        if name.startswith(("ROBOTA_", "LITELLM_")):
            shown[name] = "***" if "KEY" in name and name != "ROBOTA_API_KEYS" else value
    return shown


if __name__ == "__main__":
    sys.exit(main())
