"""The e2e suite's log scan (issue 12, item 3): every log line any e2e test kept is read once
at the end of the session, and none may carry a secret the tests configured or minted, or a
message text a test marked as secret.

What counts as a secret (``register``, ``register_env``):

* every secret a proxy is started with: ``ROBOTA_*_API_KEY`` (vendor keys, wrong ones
  included: a proxy holds them as its own), each of ``ROBOTA_API_KEYS``, ``ROBOTA_ADMIN_KEY``,
  ``ROBOTA_JWT_SECRET``, the alert webhook's URL and secret, ``ROBOTA_KEY``, deployments'
  ``api_key`` and the password of a database or Redis URL;
* the suite's shared constants (``conftest.VENDOR_KEY``, ``USER_KEY``, ``auth_support``'s
  admin key and JWT secret) and whatever a test marks (``register``), e.g. a unique message;
* by shape, any whole ``rk_`` key (``rk_<8-char id>_<43-char secret>``) or signed JWT: the
  keys that tests mint (``/admin/keys``, ``robota-proxy keys create``) and the tokens they
  sign are not all registered, and neither belongs in a log line whoever made it.

The wrong strings tests send on purpose to see a 401 (``"nope"``, ``"wrong-key"``...) are
not secrets of anyone's and are not looked for, unless they have a credential's shape.
Values shorter than ``MIN_LENGTH`` are ignored: they would match innocent text.

A finding names the file, the line and what was found ("the admin key"), never the value.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MIN_LENGTH = 10
#: Credentials found by their shape rather than by their value.
SHAPES: dict[str, str] = {
    "an rk_ key": r"rk_[A-Za-z0-9_-]{8}_[A-Za-z0-9_-]{43}",
    "a JWT": r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}",
}
#: Settings whose value is one secret (besides every ``ROBOTA_*_API_KEY``).
SECRET_SETTINGS = (
    "ROBOTA_ADMIN_KEY",
    "ROBOTA_JWT_SECRET",
    "ROBOTA_ALERT_WEBHOOK_URL",
    "ROBOTA_ALERT_WEBHOOK_SECRET",
    "ROBOTA_KEY",
)
URL_SETTINGS = ("ROBOTA_DATABASE_URL", "ROBOTA_REDIS_URL")

#: value -> what it is ("the admin key"): the session's registry.
_registered: dict[str, str] = {}
#: Log files kept for the scan besides the ``*.log`` files under the session's tmp dir.
_kept: list[Path] = []
#: Where earlier output of a reused log file is copied (``start_session``).
_archive: list[Path] = []


def register(label: str, value: str) -> str:
    """Mark ``value`` as something no log line may carry; returns it, so that a test can
    write ``MESSAGE = register("message", "my passport number is ...")``."""
    if len(value) >= MIN_LENGTH:
        _registered.setdefault(value, label)
    return value


def secrets_in_env(env: Mapping[str, str]) -> dict[str, str]:
    """The secrets a proxy started with ``env`` holds, value -> label."""
    found: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith("ROBOTA_") or not value:
            continue
        if name == "ROBOTA_API_KEYS":
            keys = json.loads(value) if value.lstrip().startswith("[") else value.split(",")
            found.update((key.strip(), f"a key of {name}") for key in keys)
        elif name.endswith("_API_KEY") or name in SECRET_SETTINGS:
            found[value] = name
        elif name == "ROBOTA_DEPLOYMENTS":
            found.update((key, f"a deployment's api_key ({name})") for key in _api_keys(value))
        elif name in URL_SETTINGS and (password := urlsplit(value).password):
            found[password] = f"the password in {name}"
    return {value: label for value, label in found.items() if len(value) >= MIN_LENGTH}


def _api_keys(deployments: str) -> list[str]:
    try:
        parsed: Any = json.loads(deployments)
    except ValueError:
        return []
    items = parsed if isinstance(parsed, list) else [parsed]
    return [
        item["api_key"]
        for item in items
        if isinstance(item, dict) and isinstance(item.get("api_key"), str)
    ]


def register_env(env: Mapping[str, str]) -> None:
    for value, label in secrets_in_env(env).items():
        register(label, value)


def start_session(archive: Path) -> None:
    archive.mkdir(parents=True, exist_ok=True)
    _archive[:] = [archive]


def keep(path: Path) -> None:
    """Scan ``path`` at the end of the session, and what it holds now: a proxy restarted on
    the same file truncates it, so earlier output is copied to the session's archive first."""
    if _archive and path.exists() and path.stat().st_size:
        copy = _archive[0] / f"{len(_kept)}-{path.name}"
        copy.write_bytes(path.read_bytes())
        _kept.append(copy)
    _kept.append(path)


def registered() -> dict[str, str]:
    return dict(_registered)


def kept() -> list[Path]:
    return list(_kept)


@dataclass(frozen=True)
class Finding:
    path: Path
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def pattern(secrets: Mapping[str, str]) -> re.Pattern[str]:
    """One alternation for every value and shape: each file is read once, however many
    secrets there are. Longest values first, so that a secret containing another is named."""
    groups = [f"(?P<shape{i}>{shape})" for i, shape in enumerate(SHAPES.values())]
    values = sorted(secrets, key=len, reverse=True)
    if values:
        groups.append("(?P<value>" + "|".join(re.escape(value) for value in values) + ")")
    return re.compile("|".join(groups))


def scan_text(
    text: str, compiled: re.Pattern[str], secrets: Mapping[str, str]
) -> list[tuple[int, str]]:
    """(line number, what) of every hit in ``text``."""
    shape_names = list(SHAPES)
    hits = []
    for match in compiled.finditer(text):
        group = match.lastgroup or ""
        if group == "value":
            what = secrets[match.group()]
        else:
            what = shape_names[int(group.removeprefix("shape"))]
        hits.append((text.count("\n", 0, match.start()) + 1, what))
    return hits


def scan(paths: Iterable[Path], secrets: Mapping[str, str]) -> list[Finding]:
    """Every line of ``paths`` that carries one of ``secrets`` (value -> label) or a
    credential's shape."""
    compiled = pattern(secrets)
    findings = []
    for path in dict.fromkeys(path.resolve() for path in paths):  # each file once
        try:
            text = path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            continue
        findings += [Finding(path, line, what) for line, what in scan_text(text, compiled, secrets)]
    return findings


def report(findings: list[Finding], limit: int = 20) -> str:
    """The failure message: file, line and what, never the value."""
    shown = [f"  {finding}" for finding in findings[:limit]]
    if len(findings) > limit:
        shown.append(f"  ... and {len(findings) - limit} more")
    return f"{len(findings)} log line(s) carry a secret or a marked message:\n" + "\n".join(shown)


def session_logs(root: Path) -> list[Path]:
    """The files to scan: every ``*.log`` under the session's tmp dir (every proxy's output,
    whoever started it) and those ``keep`` was given."""
    return sorted(root.rglob("*.log")) + kept()


class InProcessLog(logging.FileHandler):
    """Records of in-process apps (a host app mounting the proxy, ``create_app()`` under
    ``httpx.ASGITransport``) that reach the root logger, kept in a file for the scan."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
