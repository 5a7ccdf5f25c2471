"""Sampling profiles of our proxy under load, with py-spy, summarised by function and package.

py-spy attaches to the running proxy process (no code change, no restart) and writes collapsed
stacks (``frame;frame;... count``), which https://speedscope.app opens as a flame graph. The
summary names where the proxy's CPU time goes: leaf functions (self time), functions with
everything they call (inclusive), and packages.
"""

from __future__ import annotations

import linecache
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
_PACKAGES = (
    "robota_proxy",
    "robota_client",
    "openai",
    "httpx",
    "httpcore",
    "h11",
    "anyio",
    "pydantic_core",
    "pydantic",
    "starlette",
    "uvicorn",
    "httptools",
    "uvloop",
    "logging",
    "asyncio",
    "json",
    "sqlalchemy",
    "aiosqlite",
    "asyncpg",
    "redis",
    "limits",
)


def py_spy() -> str | None:
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    return found


def package_of(file: str) -> str:
    parts = re.split(r"[\\/]", file)
    for part in reversed(parts[:-1]):
        if part in _PACKAGES:
            return part
    if "site-packages" in parts:
        index = parts.index("site-packages")
        if index + 1 < len(parts):
            return parts[index + 1].removesuffix(".py")
    name = parts[-1].removesuffix(".py")
    return name if name in _PACKAGES else f"stdlib/{name}" if "python3" in file else name


#: A leaf frame on one of these source lines is a thread waiting, not working. py-spy cannot
#: always tell (a thread blocked on a queue or lock in C looks busy), e.g. aiosqlite's
#: connection threads parked on ``tx.get()``.
_WAITING = re.compile(r"(\.get\(|\.wait\(|\.acquire\(|\bselect\(|\bsleep\(|\.join\()")


def is_waiting(file: str, line: str | None) -> bool:
    if not line:
        return False
    source = linecache.getline(file, int(line))
    return bool(_WAITING.search(source))


def summarize_collapsed(text: str, top: int = 20) -> dict[str, Any]:
    """Shares of the samples of threads that were working (waiting leaves left out)."""
    waiting = 0
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    package_self: Counter[str] = Counter()
    package_inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if f]
        # py-spy's first frame is the thread ("process 123:..."); keep the Python frames.
        parsed = []
        leaf_file, leaf_line = "", None
        for frame in frames:
            match = _FRAME.match(frame)
            if match is None:
                continue
            file = match["file"]
            leaf_file, leaf_line = file, match["line"]
            parsed.append((f"{match['func']} ({_short(file)})", package_of(file)))
        if not parsed:
            continue
        if is_waiting(leaf_file, leaf_line):
            waiting += count
            total -= count
            continue
        leaf, leaf_pkg = parsed[-1]
        self_time[leaf] += count
        package_self[leaf_pkg] += count
        for name in {name for name, _ in parsed}:
            inclusive[name] += count
        for pkg in {pkg for _, pkg in parsed}:
            package_inclusive[pkg] += count

    def pct(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, round(100 * c / total, 1)) for name, c in counter.most_common(n)]

    return {
        "samples": total,
        "waiting_samples_left_out": waiting,
        "self_pct": pct(self_time, top),
        "inclusive_pct": pct(inclusive, top + 10),
        "package_self_pct": pct(package_self, 15),
        "package_inclusive_pct": pct(package_inclusive, 15),
    }


def _short(file: str) -> str:
    parts = re.split(r"[\\/]", file)
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1 :])
    for root in ("robota_proxy", "robota_client", "benchmarks"):
        if root in parts:
            return "/".join(parts[parts.index(root) :])
    return "/".join(parts[-2:])


def main() -> None:
    """``python -m benchmarks.profiling FILE.collapsed.txt``: summarise a recorded profile."""
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benchmarks.profiling FILE.collapsed.txt")
    summary = summarize_collapsed(Path(sys.argv[1]).read_text(errors="replace"))
    print(f"{summary['samples']} working samples ({summary['waiting_samples_left_out']} waiting)")
    for key in ("package_self_pct", "package_inclusive_pct", "self_pct", "inclusive_pct"):
        print(f"\n{key}:")
        for name, pct in summary[key]:
            print(f"  {pct:5.1f}  {name}")


def profile_proxy(
    target: Any,
    durations: Any,
    workdir: Path,
    out_dir: Path,
    run_load: Callable[[Any, Any, Path], dict[str, Any]],
    step_type: Callable[..., Any],
) -> list[dict[str, Any]]:
    """Record our proxy under a chat load and under a stream load, both at concurrency 50."""
    tool = py_spy()
    if tool is None:
        return [{"error": "py-spy not installed (pip install py-spy, or the bench extra)"}]
    out_dir.mkdir(parents=True, exist_ok=True)
    profiles = []
    for label, stream in (("chat c=50", False), ("stream c=50", True)):
        step = step_type(
            "profile",
            label,
            stream,
            50,
            durations.profile_s,
            1.0,
            [target.name],
        )
        raw_path = out_dir / f"{label.replace(' ', '_').replace('=', '')}.collapsed.txt"
        print(f"profiling our proxy (pid {target.server.pid}) under {label}", flush=True)
        recorder = subprocess.Popen(
            [
                tool,
                "record",
                "--pid",
                str(target.server.pid),
                "--subprocesses",
                "--rate",
                "200",
                "--duration",
                str(int(durations.profile_s + 1)),
                "--format",
                "raw",
                "--output",
                str(raw_path),
                "--nonblocking",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        raw = run_load(step, target, workdir)
        try:
            output, _ = recorder.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            recorder.kill()
            output, _ = recorder.communicate()
        rps = raw["ok_in_window"] / max(raw["window_s"], 1e-9)
        entry: dict[str, Any] = {
            "label": label,
            "throughput_rps_while_profiled": round(rps, 1),
            "file": str(raw_path),
        }
        if recorder.returncode != 0 or not raw_path.exists():
            entry["error"] = f"py-spy exited {recorder.returncode}: {output.strip()[-300:]}"
        else:
            entry.update(summarize_collapsed(raw_path.read_text(errors="replace")))
        profiles.append(entry)
    return profiles


if __name__ == "__main__":
    main()
