"""Judge a finished ``mutmut run``: a report per module, and a failure when one slips.

The rules (issue 14), per module listed in ``floors.toml``:

- every mutant is killed by a test, except those listed in ``equivalents/<module>.toml`` with a
  one-line reason (``equivalent: ...`` or ``log wording: ...``); a listed mutant that a test
  now kills is stale and must be removed, so the lists stay honest;
- killed / all is at least the module's floor, and no floor is below 90%.

mutmut keeps its verdicts in ``mutants/<path>.meta`` (JSON, exit code per mutant); its own
table turns an exit code into a status, so a new mutmut status cannot be misread here.

Usage: ``python -m mutation.gate [--report PATH]``; exit status 1 when a rule is broken.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mutmut.stats import status_by_exit_code

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: No module may be allowed to fall below this, whatever its floor says.
MINIMUM_FLOOR = 0.90
#: Statuses in which the tests noticed the mutant.
DETECTED = frozenset({"killed", "timeout", "caught by type check", "segfault"})
#: What a listed mutant's reason must start with.
REASONS = ("equivalent:", "log wording:")


@dataclass
class ModuleResult:
    path: str
    floor: float
    statuses: Counter[str] = field(default_factory=Counter)
    unlisted: list[tuple[str, str]] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
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


def judge(path: str, floor: float, mutants_dir: Path) -> ModuleResult:
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
        result.statuses[status] += 1
        if status in DETECTED:
            if name in listed:
                result.stale.append(f"{name} (now killed)")
        elif name not in listed:
            result.unlisted.append((name, status))
    if result.unlisted:
        result.problems.append(f"{len(result.unlisted)} surviving mutants are not listed")
    if result.stale:
        result.problems.append(f"{len(result.stale)} listed mutants are stale")
    if result.score < floor:
        result.problems.append(f"score {result.score:.1%} is below its floor {floor:.1%}")
    return result


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
    args = parser.parse_args(argv)
    floors = tomllib.loads((HERE / "floors.toml").read_text("utf-8"))["floors"]
    results = [judge(path, float(floor), args.mutants) for path, floor in floors.items()]
    text = report(results)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text, "utf-8")
    sys.stdout.write(text)
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
