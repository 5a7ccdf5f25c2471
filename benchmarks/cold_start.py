"""Cold start: how long a fresh interpreter takes to be useful, best and median of N runs.

Two commands, the ones issue 13 sets targets for:

- ``robota-proxy --help``: the console script installed beside ``sys.executable`` (the same
  virtualenv as everything else measured; never a pyenv shim, which adds its own start-up);
- ``python -c "import robota_proxy.app"``: what ``serve`` and every test that builds the app
  pay before the first request.

Each command runs once unrecorded first (bytecode caches written, files in the page cache),
then ``runs`` times; wall time from ``Popen`` to exit. With a baseline checkout the same
commands run with it first on ``PYTHONPATH``, in turns with the work tree's.

    python -m benchmarks.cold_start [--runs 5] [--baseline PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.processes import clean_env

#: Targets of issue 13, in seconds (compared with the median).
TARGETS_S = {"robota-proxy --help": 0.25, "import robota_proxy.app": 0.5}


def commands() -> dict[str, list[str]]:
    script = Path(sys.executable).parent / "robota-proxy"
    return {
        "robota-proxy --help": [str(script), "--help"],
        "import robota_proxy.app": [sys.executable, "-c", "import robota_proxy.app"],
    }


def _once(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    """Wall seconds of one run, and the error when it failed ("" when it did not)."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return 0.0, repr(exc)[:200]
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        return elapsed, f"exit {done.returncode}: {lines[-1][:200] if lines else ''}"
    return elapsed, ""


def measure(runs: int = 5, baseline: Path | None = None) -> list[dict[str, Any]]:
    """One row per system and command: ``runs`` wall times, best and median, or an error."""
    systems: dict[str, dict[str, str]] = {"robota": clean_env({})}
    if baseline is not None:
        systems["robota@base"] = clean_env({"PYTHONPATH": str(baseline)})
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="robota-cold-") as folder:
        cwd = Path(folder)  # no .env, no robota.db: nothing but the import is measured
        for name, command in commands().items():
            times: dict[str, list[float]] = {system: [] for system in systems}
            errors: dict[str, str] = {}
            for system, env in systems.items():
                _, error = _once(command, env, cwd)  # warm-up: caches, not measured
                if error:
                    errors[system] = error
            for _ in range(runs):
                for system, env in systems.items():  # in turns: the same noise for both
                    if system in errors:
                        continue
                    elapsed, error = _once(command, env, cwd)
                    if error:
                        errors[system] = error
                    else:
                        times[system].append(elapsed)
            for system in systems:
                row: dict[str, Any] = {"system": system, "command": name}
                if system in errors:
                    row["error"] = errors[system]
                else:
                    values = times[system]
                    row["runs_s"] = [round(v, 4) for v in values]
                    row["best_s"] = round(min(values), 4)
                    row["median_s"] = round(statistics.median(values), 4)
                    row["target_s"] = TARGETS_S[name]
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cold_start")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another checkout of this repository")
    args = parser.parse_args(argv)
    for row in measure(args.runs, args.baseline):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
