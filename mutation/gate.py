"""Judge a finished ``mutmut run``: a report per module, and a failure when one slips.

The rules (issue 14), per module listed in ``floors.toml``:

- every mutant is killed by a test, except those listed in ``equivalents/<module>.toml`` with a
  one-line reason (``equivalent: ...`` or ``log wording: ...``); a listed mutant that a test
  now kills is stale and must be removed, so the lists stay honest;
- killed / all is at least the module's floor, and no floor is below 90%.

A listed mutant that the run counted as killed is run again before it is called stale: its
tests, in a fresh interpreter each time, ``RECHECKS`` times. A test that fails only under the
load of a mutation run (a timing, an order, shared state) would otherwise make a true
equivalent look stale in one run and not the next. Only a mutant killed on every re-run is
stale; one that survives a re-run counts as survived (not killed) in the score, and the report
names it with the test that failed, so the flaky test can be found and fixed. Before trusting a
survival, the same fresh-process command must fail with every mutant switched on at once
(mutmut's ``fail`` mutant), so a re-run that did not load the mutated code cannot excuse a
listing.

mutmut keeps its verdicts in ``mutants/<path>.meta`` (JSON, exit code per mutant); its own
table turns an exit code into a status, so a new mutmut status cannot be misread here.

Usage: ``python -m mutation.gate [--report PATH]``; exit status 1 when a rule is broken.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mutmut.stats import status_by_exit_code

from mutation.failures import FAILURES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: No module may be allowed to fall below this, whatever its floor says.
MINIMUM_FLOOR = 0.90
#: Statuses in which the tests noticed the mutant.
DETECTED = frozenset({"killed", "timeout", "caught by type check", "segfault"})
#: What a listed mutant's reason must start with.
REASONS = ("equivalent:", "log wording:")
#: Fresh-process re-runs of a listed mutant the run counted as killed, before it is stale.
RECHECKS = 2
#: A fresh interpreter imports everything a forked mutmut worker already had: on top of
#: mutmut's own wall-clock limit, (the tests' measured time + timeout_constant) x
#: timeout_multiplier, a re-run is allowed this long before it counts as a timeout.
FRESH_START_SECONDS = 120.0


class RecheckError(Exception):
    """A re-run could not be trusted to have switched the mutant on."""


class Rechecker:
    """Runs one mutant's tests in a fresh interpreter, as mutmut's worker would: in
    ``mutants/`` (the mutated copy of the source), the tests mutmut saw reaching the mutated
    function, fastest first, ``-x``, with ``[tool.mutmut] pytest_add_cli_args``."""

    def __init__(self, mutants_dir: Path) -> None:
        self.mutants_dir = mutants_dir
        stats = json.loads((mutants_dir / "mutmut-stats.json").read_text("utf-8"))
        self.tests_by_function: dict[str, list[str]] = stats["tests_by_mangled_function_name"]
        self.duration_by_test: dict[str, float] = stats["duration_by_test"]
        config = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["mutmut"]
        self.extra_args: list[str] = list(config.get("pytest_add_cli_args", []))
        self.timeout_constant = float(config.get("timeout_constant", 1.0))
        self.timeout_multiplier = float(config.get("timeout_multiplier", 15.0))
        self._loads_mutants: set[tuple[str, ...]] = set()

    def tests(self, name: str) -> list[str]:
        tests = self.tests_by_function.get(name.partition("__mutmut_")[0], [])
        return sorted(tests, key=lambda test: self.duration_by_test.get(test, 0.0))

    def run(self, mutant: str, tests: list[str]) -> str:
        """``survived``, ``killed by <first failing test>`` or ``timeout``."""
        estimate = sum(self.duration_by_test.get(test, 0.0) for test in tests)
        command = [
            sys.executable,
            *("-m", "pytest", "--rootdir=.", "--tb=no", "-rfE", "-x", "-q"),
            *("-p", "no:randomly", "-p", "no:random-order"),
            *tests,
            *self.extra_args,
        ]
        env = {
            **os.environ,
            "MUTANT_UNDER_TEST": mutant,
            "PYTHONPATH": str(self.mutants_dir.resolve()),
        }
        try:
            done = subprocess.run(
                command,
                cwd=self.mutants_dir,
                env=env,
                capture_output=True,
                text=True,
                timeout=FRESH_START_SECONDS
                + (estimate + self.timeout_constant) * self.timeout_multiplier,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return "timeout"
        if done.returncode == 0:
            return "survived"
        failed = [
            line.split(" ", 1)[1].split(" - ", 1)[0]
            for line in done.stdout.splitlines()
            if line.startswith(("FAILED ", "ERROR "))
        ]
        return f"killed by {failed[0] if failed else f'exit status {done.returncode}'}"

    def recheck(self, name: str) -> list[str]:
        """Up to ``RECHECKS`` fresh-process runs of ``name``, stopping at its first survival."""
        tests = self.tests(name)
        if not tests:
            raise RecheckError(f"{name}: mutmut recorded no tests that reach it")
        key = tuple(tests)
        if key not in self._loads_mutants:
            # Every mutant on at once must fail these tests, or a "survived" means nothing.
            if self.run("fail", tests) == "survived":
                raise RecheckError(f"{name}: its tests pass with every mutant switched on")
            self._loads_mutants.add(key)
        outcomes: list[str] = []
        for _ in range(RECHECKS):
            outcomes.append(self.run(name, tests))
            if outcomes[-1] == "survived":
                break
        return outcomes


@dataclass
class ModuleResult:
    path: str
    floor: float
    statuses: Counter[str] = field(default_factory=Counter)
    unlisted: list[tuple[str, str]] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    #: Listed mutants the run counted as killed that survived a fresh-process re-run.
    flaky: list[str] = field(default_factory=list)
    listed: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def detected(self) -> int:
        return sum(n for status, n in self.statuses.items() if status in DETECTED)

    @property
    def score(self) -> float:
        return self.detected / self.total if self.total else 0.0


def equivalents_file(path: str) -> Path:
    return HERE / "equivalents" / f"{Path(path).stem}.toml"


def load_equivalents(path: str) -> dict[str, str]:
    file = equivalents_file(path)
    if not file.exists():
        return {}
    listed = tomllib.loads(file.read_text("utf-8")).get("equivalent", {})
    return {str(name): str(reason) for name, reason in listed.items()}


def judge(
    path: str,
    floor: float,
    mutants_dir: Path,
    rechecker: Rechecker | None = None,
    failures: dict[str, list[str]] | None = None,
) -> ModuleResult:
    result = ModuleResult(path, floor)
    if floor < MINIMUM_FLOOR:
        result.problems.append(f"floor {floor:.2f} is below the minimum {MINIMUM_FLOOR:.2f}")
    meta = mutants_dir / f"{path}.meta"
    if not meta.exists():
        result.problems.append(f"no mutmut results ({meta} is missing): run `mutmut run` first")
        return result
    verdicts: dict[str, int | None] = json.loads(meta.read_text("utf-8"))["exit_code_by_key"]
    listed = load_equivalents(path)
    result.listed = len(listed)
    for name, reason in listed.items():
        if not reason.startswith(REASONS):
            result.problems.append(f"{name}: reason must start with one of {REASONS}")
        if name not in verdicts:
            result.stale.append(f"{name} (no such mutant any more)")
    for name, code in sorted(verdicts.items()):
        status = status_by_exit_code[code]
        if status in DETECTED and name in listed:
            status = _recheck(result, name, status, rechecker, failures or {})
        result.statuses[status] += 1
        if status not in DETECTED and name not in listed:
            result.unlisted.append((name, status))
    if result.unlisted:
        result.problems.append(f"{len(result.unlisted)} surviving mutants are not listed")
    if result.stale:
        result.problems.append(f"{len(result.stale)} listed mutants are stale")
    if result.score < floor:
        result.problems.append(f"score {result.score:.1%} is below its floor {floor:.1%}")
    return result


def load_failures(mutants_dir: Path) -> dict[str, list[str]]:
    """The tests that failed in the run, per mutant (``mutation/failures.py`` writes them)."""
    file = mutants_dir / FAILURES
    failed: dict[str, list[str]] = {}
    if not file.exists():
        return failed
    for line in file.read_text("utf-8").splitlines():
        record = json.loads(line)
        failed.setdefault(record["mutant"], []).append(
            f"{record['test']} ({record['when']}: {record['error']})"
        )
    return failed


def _recheck(
    result: ModuleResult,
    name: str,
    status: str,
    rechecker: Rechecker | None,
    failures: dict[str, list[str]],
) -> str:
    """The verdict on a listed mutant the run counted as ``status`` (a detection)."""
    # pytest-timeout's thread method ends a hung run's process before pytest reports it.
    killer = "; ".join(failures.get(name, [])) or "no failing test recorded (a timeout?)"
    if rechecker is None:
        result.stale.append(f"{name} (now {status} by {killer}; not re-run)")
        return status
    try:
        outcomes = rechecker.recheck(name)
    except RecheckError as error:
        result.problems.append(f"could not re-run a listed mutant: {error}")
        return status
    history = f"run: {status} by {killer}; re-runs: {', '.join(outcomes)}"
    if outcomes[-1] == "survived":
        result.flaky.append(f"{name} ({history})")
        return "survived"
    result.stale.append(f"{name} (now killed; {history})")
    return status


def report(results: list[ModuleResult]) -> str:
    lines = [
        "| module | mutants | killed | score | floor | listed as equivalent | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        verdict = "ok" if not r.problems else "FAIL"
        lines.append(
            f"| {r.path} | {r.total} | {r.detected} | {r.score:.1%} | {r.floor:.0%} "
            f"| {r.listed} | {verdict} |"
        )
    for r in results:
        if not r.flaky:
            continue
        lines += [
            "",
            f"## {r.path}: killed in the run, survived a fresh re-run (a flaky test; "
            "counted as survived)",
            *(f"- {name}" for name in r.flaky),
        ]
    for r in results:
        if not r.problems:
            continue
        lines += ["", f"## {r.path}", *(f"- {problem}" for problem in r.problems)]
        lines += [f"  - survived, not listed: {name} ({status})" for name, status in r.unlisted]
        lines += [f"  - stale: {name}" for name in r.stale]
        lines.append(
            f"  (see a mutant with `mutmut show <name>`; list true equivalents in "
            f"{equivalents_file(r.path).relative_to(ROOT)})"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=ROOT / "mutants")
    parser.add_argument("--report", type=Path, default=ROOT / "mutants" / "report.md")
    parser.add_argument(
        "--no-recheck",
        action="store_true",
        help="call a listed mutant the run counted as killed stale without re-running it",
    )
    args = parser.parse_args(argv)
    floors = tomllib.loads((HERE / "floors.toml").read_text("utf-8"))["floors"]
    stats = args.mutants / "mutmut-stats.json"
    rechecker = None if args.no_recheck or not stats.exists() else Rechecker(args.mutants)
    failures = load_failures(args.mutants)  # before the re-runs add theirs
    results = [
        judge(path, float(floor), args.mutants, rechecker, failures)
        for path, floor in floors.items()
    ]
    text = report(results)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text, "utf-8")
    sys.stdout.write(text)
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
