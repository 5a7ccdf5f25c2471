"""The fenced code blocks of the Markdown documents, and the stand-ins their shell blocks run.

Two halves, both used by ``tests/e2e/test_readme_blocks.py``:

* ``blocks(path)`` reads a Markdown file into its fenced blocks: where each starts, its
  language (the first word of the info string) and whether the author marked it as not meant
  to run, with ``<!-- not-run: reason -->`` on the line right before its opening fence. The
  rules that keep that honest (a marker must have a reason, sit before a block and only before
  a block of a runnable language; a block must name its language) are checked here, so that a
  mistake in the Markdown is an error naming the line rather than a block silently not run.
* Run as a script (``python tests/readme_blocks.py pip|robota-proxy ...``), it is what the
  ``pip``, ``python -m pip`` and ``robota-proxy`` commands of a block become on the harness's
  PATH (see the test module for why and how).

The script half imports only the standard library and runs with no checkout on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

#: Languages whose blocks are run: a block in one of these runs unless marked not-run.
RUNNABLE = frozenset({"python", "bash"})
#: Languages that are data or sample output: never run, no marker needed.
DATA = frozenset({"json", "text", "toml", "yaml", "ini", "http"})

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER = re.compile(r"^\s*<!--\s*not-run\b(?P<rest>.*?)-->\s*$")
_MARKER_START = re.compile(r"<!--\s*not-run\b")

ROOT = Path(__file__).resolve().parents[1]


class MarkdownError(ValueError):
    """A block or marker that breaks the conventions above; the message names the line."""


@dataclass(frozen=True)
class Block:
    path: Path
    #: 1-based line number of the opening fence.
    line: int
    language: str
    source: str
    #: The marker's reason when the block is marked ``not-run``, else ``None``.
    not_run: str | None

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.language in RUNNABLE and self.not_run is None


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of ``path`` in document order; ``MarkdownError`` for a broken
    convention (see the module docstring)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    pending: tuple[int, str] | None = None  # a marker waiting for its fence: (line, reason)
    number = 0
    while number < len(lines):
        text = lines[number]
        number += 1
        marker = _MARKER.match(text)
        if marker is None and _MARKER_START.search(text):
            raise MarkdownError(f"{path.name}:{number}: write a marker on one line, as it is")
        if marker is not None:
            reason = marker.group("rest").strip().removeprefix(":").strip()
            if not marker.group("rest").strip().startswith(":") or not reason:
                raise MarkdownError(
                    f"{path.name}:{number}: a not-run marker says why: <!-- not-run: reason -->"
                )
            pending = (number, reason)
            continue
        fence = _FENCE.match(text)
        if fence is None:
            if pending is not None:
                raise MarkdownError(
                    f"{path.name}:{pending[0]}: a not-run marker must be on the line right "
                    "before a fenced block"
                )
            continue
        start = number
        indent, mark = fence.group("indent"), fence.group("fence")
        language = fence.group("info").strip().split(" ")[0].lower()
        body: list[str] = []
        while number < len(lines):
            closing = lines[number]
            number += 1
            stripped = closing.strip()
            if stripped.startswith(mark[0] * len(mark)) and not stripped.strip(mark[0]):
                break
            body.append(closing[len(indent) :] if closing.startswith(indent) else closing)
        else:
            raise MarkdownError(f"{path.name}:{start}: this fenced block is never closed")
        if not language:
            raise MarkdownError(
                f"{path.name}:{start}: name the block's language (python, bash; json, text "
                "for data) so that the tests know whether to run it"
            )
        if language not in RUNNABLE | DATA:
            raise MarkdownError(
                f"{path.name}:{start}: unknown block language {language!r}; runnable: "
                f"{', '.join(sorted(RUNNABLE))}; data: {', '.join(sorted(DATA))}"
            )
        reason = None
        if pending is not None:
            if language not in RUNNABLE:
                raise MarkdownError(
                    f"{path.name}:{pending[0]}: a {language} block never runs; drop the marker"
                )
            reason = pending[1]
            pending = None
        found.append(Block(path, start, language, "\n".join(body) + "\n", reason))
    if pending is not None:
        raise MarkdownError(f"{path.name}:{pending[0]}: a not-run marker with no block after it")
    return found


# --- the stand-ins on the harness's PATH -----------------------------------------------------
# The harness directory (README_HARNESS_DIR) holds what they share with the test: the extras
# "installed" so far, and the serve request and answer files.

SERVE_REQUEST = "serve-request.json"
SERVE_ANSWER = "serve-answer.json"
INSTALLED = "installed-extras"
#: The stand-in waits this long for the harness to have started the proxy.
SERVE_WAIT_SECONDS = 60.0

_SPEC = re.compile(r"^(?P<name>\.|robota-remote)(?:\[(?P<extras>[a-z0-9_,-]*)\])?$")


def declared_extras() -> dict[str, list[str]]:
    """pyproject's extras, each with the extras of this distribution it pulls in."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    pulls: dict[str, list[str]] = {}
    for extra, requirements in optional.items():
        pulls[extra] = []
        for requirement in requirements:
            own = re.match(r"^robota-remote\[([^\]]+)\]", requirement.replace(" ", ""))
            if own is not None:
                pulls[extra].extend(own.group(1).split(","))
    return pulls


def with_pulled(extras: set[str], pulls: dict[str, list[str]]) -> set[str]:
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra not in seen:
            seen.add(extra)
            todo.extend(pulls.get(extra, []))
    return seen


def fake_pip(args: list[str], harness: Path) -> int:
    """``pip install`` of this project, not run (the test environment already has every
    extra, and CI proves the install itself): the extras named must exist in pyproject, and
    they are written down so that ``robota-proxy`` can refuse to run as a client-only install
    would."""
    if not args or args[0] != "install":
        print(f"readme harness: only `pip install` is expected, not {args}", file=sys.stderr)
        return 2
    pulls = declared_extras()
    specs = [arg for arg in args[1:] if arg not in ("-e", "--editable", "-q", "--quiet", "-U")]
    if not specs:
        print("readme harness: `pip install` of nothing", file=sys.stderr)
        return 2
    installed: set[str] = set()
    for spec in specs:
        match = _SPEC.match(spec)
        if match is None:
            print(
                f"readme harness: `pip install {spec}`: only this project (`.`, "
                "`.[extras]`, `robota-remote[extras]`) is expected",
                file=sys.stderr,
            )
            return 2
        named = {e for e in (match.group("extras") or "").split(",") if e}
        unknown = sorted(named - set(pulls))
        if unknown:
            print(
                f"readme harness: `pip install {spec}`: no extra {', '.join(unknown)} in "
                f"pyproject.toml (it has {', '.join(sorted(pulls))})",
                file=sys.stderr,
            )
            return 1
        installed |= with_pulled(named, pulls)
    with (harness / INSTALLED).open("a", encoding="utf-8") as record:
        record.write("".join(f"{extra}\n" for extra in sorted(installed)) or "\n")
    print(f"readme harness: pip install not run; extras: {sorted(installed) or 'none'}")
    return 0


def fake_robota_proxy(args: list[str], harness: Path) -> int:
    """``robota-proxy``: refused as the real launcher refuses when no ``pip install`` so far
    brought the ``proxy`` extra; ``serve`` asks the harness to start the proxy in the
    background (it would block the block forever); anything else runs for real."""
    record = harness / INSTALLED
    installed = set(record.read_text(encoding="utf-8").split()) if record.exists() else set()
    if "proxy" not in installed:
        print(
            "readme harness: robota-proxy run before any `pip install` brought the [proxy] "
            'extra: a client-only install has no server (pip install "robota-remote[proxy]")',
            file=sys.stderr,
        )
        return 2
    if args[:1] != ["serve"]:
        os.execv(sys.executable, [sys.executable, "-m", "robota_proxy", *args])
    answer = harness / SERVE_ANSWER
    answer.unlink(missing_ok=True)
    request = harness / SERVE_REQUEST
    partial = request.with_suffix(".partial")
    partial.write_text(
        json.dumps({"args": args[1:], "env": dict(os.environ), "cwd": os.getcwd()}),
        encoding="utf-8",
    )
    partial.replace(request)  # the harness never reads half a request
    deadline = time.monotonic() + SERVE_WAIT_SECONDS
    while not answer.exists():
        if time.monotonic() > deadline:
            print("readme harness: the proxy was not started in time", file=sys.stderr)
            return 1
        time.sleep(0.05)
    result = json.loads(answer.read_text(encoding="utf-8"))
    answer.unlink()
    print(result["message"], file=sys.stdout if result["ok"] else sys.stderr)
    return 0 if result["ok"] else 1


def main(argv: list[str]) -> int:
    harness = Path(os.environ["README_HARNESS_DIR"])
    command, args = argv[0], argv[1:]
    if command == "pip":
        return fake_pip(args, harness)
    if command == "robota-proxy":
        return fake_robota_proxy(args, harness)
    print(f"readme harness: unknown stand-in {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
