"""A pytest plugin for ``nox -s mutation``: each test that fails while a mutant is switched on
is appended to ``failures.jsonl`` in the working directory (``mutants/``), with the mutant and
the first line of the error.

mutmut throws a worker's output away and keeps only its exit status, so without this nobody
can tell which test killed a mutant, and a kill by a flaky test (a listed equivalent reported
killed in one run and not the next) cannot be traced to that test. The gate
(``mutation/gate.py``) reports the line of every listed mutant that was killed.

It is loaded with ``-p mutation.failures`` from ``[tool.mutmut] pytest_add_cli_args``
(``mutation/`` is copied into ``mutants/``, which mutmut puts first on ``sys.path``), and does
nothing outside a mutant's run (``MUTANT_UNDER_TEST`` names no mutant).
"""

from __future__ import annotations

import json
import os

import pytest

FAILURES = "failures.jsonl"


def _first_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = str(crash.message) if crash is not None else str(report.longrepr)
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if not report.failed or "__mutmut_" not in mutant:
        return
    line = json.dumps(
        {"mutant": mutant, "test": report.nodeid, "when": report.when, "error": _first_line(report)}
    )
    # One write per line with O_APPEND: the workers running at once never interleave lines.
    fd = os.open(FAILURES, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
    finally:
        os.close(fd)
