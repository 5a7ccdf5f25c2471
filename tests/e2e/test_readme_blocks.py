"""Every code block of README.md and examples/*.md that is meant to run is run, in document
order, the way a reader runs it: so the documents cannot drift from the code again.

Conventions (the Markdown side is parsed by ``tests/readme_blocks.py``):

* A ``python`` or ``bash`` block runs unless the line right before its fence is
  ``<!-- not-run: reason -->`` (the install-and-test command that CI runs, a setup that needs
  hosts the tests do not have...). Any other language is data or sample output (``json``,
  ``text``...) and never runs; a block with no language, or an unknown one, is an error. So
  a new block either runs here or says why not.
* Each document gets a fresh working directory (standing for the checkout the documents are
  read in: ``examples/`` is linked into it), a free port and a shell whose state carries
  from block to block, as a reader's terminal does: what a bash block ``export``s, the next
  one sees. Bash blocks run with ``set -euo pipefail`` (a failing command fails the test;
  write ``curl -fsS`` so that an HTTP error is one) and must not print a Python warning or
  traceback on stderr. Python blocks of one document share one namespace and one event loop;
  top-level ``await``/``async with``/``async for`` work, as under ``python -m asyncio``.
* The documents use the proxy's default address: ``http://127.0.0.1:8787`` (and
  ``http://proxy-host:8787`` in examples/standalone.md) is replaced by the harness proxy's
  address, and the vendor key placeholder ``sk-...`` by the fake vendors' key.
* The environment is the one the documents assume a reader has: ``ROBOTA_DATABASE_URL`` the
  working directory's ``robota.db`` (shared by the proxy and the CLI commands),
  ``ROBOTA_ADMIN_KEY`` set (the admin section says ``Bearer $ROBOTA_ADMIN_KEY``),
  ``ROBOTA_SERVER_URL`` the proxy; the vendors' base URLs point at the fake vendors (so a
  block that sets a vendor key talks to them). No other ``ROBOTA_*`` variable leaks in.
* Three commands are stand-ins on the shell's PATH (``tests/readme_blocks.py``):
  ``pip install`` / ``python -m pip install`` are not run (this environment has every extra;
  CI proves the installs) but the extras they name must exist in pyproject.toml, and are
  remembered; ``robota-proxy`` then refuses to run, as the real launcher does, unless an
  earlier install brought the ``[proxy]`` extra; and ``robota-proxy serve`` (which would
  block forever) is started by the harness in the background, with the environment of its
  line and its flags except ``--host`` (always 127.0.0.1) and ``--port`` (the harness port).
  A later ``serve`` replaces the running proxy, as a reader restarting it would.
* Some blocks are checked beyond "ran cleanly" (``CHECKS``): their output, or the app they
  define. A check whose block is gone fails, so checks cannot silently stop checking.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import inspect
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import httpx
import pytest

from robota_proxy.testing import FakeVendors
from tests.e2e.conftest import ROOT, VENDOR_KEY, free_port
from tests.readme_blocks import (
    INSTALLED,
    SERVE_ANSWER,
    SERVE_REQUEST,
    Block,
    MarkdownError,
    blocks,
)

pytestmark = pytest.mark.e2e

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "examples").glob("*.md"))]
ADMIN_KEY = "readme-admin-key-0123456789abcdef"
#: A bash block (or a Python block's awaited part) that takes longer has hung.
BLOCK_TIMEOUT = 120.0
_DEFAULT_ADDRESS = re.compile(r"http://(?:127\.0\.0\.1|localhost|proxy-host):8787\b")
_STAND_INS = {
    "pip": 'exec "{python}" "{script}" pip "$@"',
    "robota-proxy": 'exec "{python}" "{script}" robota-proxy "$@"',
    "python": (
        'if [ "${{1:-}}" = "-m" ] && [ "${{2:-}}" = "pip" ]; then\n'
        '  shift 2; exec "{python}" "{script}" pip "$@"\n'
        "fi\n"
        'exec "{python}" "$@"'
    ),
}


class Harness:
    """One document's run: its working directory, shell state, Python namespace, proxy."""

    def __init__(self, workdir: Path, fake: FakeVendors) -> None:
        self.workdir = workdir
        self.dir = workdir / ".harness"
        self.dir.mkdir()
        (workdir / "examples").symlink_to(ROOT / "examples")  # the documents run in a checkout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proxy: subprocess.Popen[bytes] | None = None
        self.proxy_logs: list[Path] = []
        self.namespace: dict[str, Any] = {"__name__": "__readme__"}
        self.loop = asyncio.new_event_loop()
        shims = self.dir / "bin"
        shims.mkdir()
        for name, body in _STAND_INS.items():
            script = body.format(python=sys.executable, script=ROOT / "tests" / "readme_blocks.py")
            (shims / name).write_text(f"#!/bin/bash\n{script}\n")
            (shims / name).chmod(0o755)
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("ROBOTA_")
            and key not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY")
        }
        self.env.update(
            {
                "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}",
                "README_HARNESS_DIR": str(self.dir),
                "ROBOTA_DATABASE_URL": f"sqlite:///{workdir / 'robota.db'}",
                "ROBOTA_ADMIN_KEY": ADMIN_KEY,
                "ROBOTA_SERVER_URL": self.url,
                "ROBOTA_OPENAI_BASE_URL": fake.openai_base_url,
                "ROBOTA_ANTHROPIC_BASE_URL": fake.anthropic_base_url,
                "ROBOTA_GOOGLE_BASE_URL": fake.google_base_url,
            }
        )
        self.shell_state = self.dir / "exports.sh"
        self.shell_state.write_text("")

    def substitute(self, source: str) -> str:
        return _DEFAULT_ADDRESS.sub(self.url, source).replace("sk-...", VENDOR_KEY)

    def run(self, block: Block, monkeypatch: pytest.MonkeyPatch) -> str:
        """The block's standard output; fails the test if it does not run cleanly."""
        if block.language == "bash":
            return self.run_bash(block)
        return self.run_python(block, monkeypatch)

    # --- bash ---------------------------------------------------------------------------------

    def run_bash(self, block: Block) -> str:
        state = shlex.quote(str(self.shell_state))
        script = self.dir / f"block-{block.line}.sh"
        script.write_text(
            f"set -euo pipefail\nsource {state}\n{self.substitute(block.source)}\n"
            f"export -p > {state}\n"
        )
        out, err = self.dir / f"block-{block.line}.out", self.dir / f"block-{block.line}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            shell = subprocess.Popen(
                ["bash", str(script)],
                cwd=self.workdir,
                env=self.env,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,  # its own group, so a hung block is killed whole
            )
            deadline = time.monotonic() + BLOCK_TIMEOUT
            while shell.poll() is None:
                self.answer_serve_request()
                if time.monotonic() > deadline:
                    os.killpg(shell.pid, signal.SIGKILL)
                    shell.wait()
                    pytest.fail(f"{block.where}: still running after {BLOCK_TIMEOUT} s")
                time.sleep(0.05)
        stdout_text, stderr_text = out.read_text(), err.read_text()
        report = f"{block.where} (exit {shell.returncode})\n{stdout_text}\n{stderr_text}"
        assert shell.returncode == 0, report
        assert "Traceback" not in stderr_text and "Warning" not in stderr_text, report
        return stdout_text

    def answer_serve_request(self) -> None:
        request_file = self.dir / SERVE_REQUEST
        if not request_file.exists():
            return
        request = json.loads(request_file.read_text())
        request_file.unlink()
        ok, message = self.serve(request["args"], request["env"], Path(request["cwd"]))
        answer = {"ok": ok, "message": message}
        partial = self.dir / "answer.partial"
        partial.write_text(json.dumps(answer))
        partial.replace(self.dir / SERVE_ANSWER)

    def serve(self, args: list[str], env: dict[str, str], cwd: Path) -> tuple[bool, str]:
        parser = argparse.ArgumentParser(prog="robota-proxy serve", exit_on_error=False)
        parser.add_argument("--host")
        parser.add_argument("--port", type=int)
        parser.add_argument("--workers", type=int, default=1)
        try:
            flags = parser.parse_args(args)
        except (argparse.ArgumentError, SystemExit):
            return False, f"readme harness: unexpected serve flags {args}"
        self.stop_proxy()
        log = self.dir / f"proxy-{len(self.proxy_logs) + 1}.log"
        self.proxy_logs.append(log)
        command = [sys.executable, "-m", "robota_proxy", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--workers", str(flags.workers)]
        with log.open("wb") as output:
            self.proxy = subprocess.Popen(
                command, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proxy.poll() is not None:
                return False, f"readme harness: the proxy exited:\n{log.read_text()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=0.5).status_code == 200:
                    return True, f"readme harness: proxy serving on {self.url}"
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        return False, f"readme harness: the proxy did not start:\n{log.read_text()}"

    def stop_proxy(self) -> None:
        if self.proxy is None:
            return
        proxy, self.proxy = self.proxy, None
        proxy.terminate()
        try:
            proxy.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()

    # --- python -------------------------------------------------------------------------------

    def run_python(self, block: Block, monkeypatch: pytest.MonkeyPatch) -> str:
        for key in [key for key in os.environ if key not in self.env]:
            monkeypatch.delenv(key)
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(self.workdir)
        code = compile(
            self.substitute(block.source),
            block.where,
            "exec",
            flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
            dont_inherit=True,
        )
        output = io.StringIO()
        with redirect_stdout(output), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = eval(code, self.namespace)  # exec, but hands back the top-level coroutine
            if inspect.iscoroutine(result):
                self.loop.run_until_complete(asyncio.wait_for(result, BLOCK_TIMEOUT))
        loud = [
            f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
            for w in caught
            if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning)
        ]
        assert not loud, f"{block.where} warned:\n" + "\n".join(loud)
        return output.getvalue()

    def close(self) -> None:
        self.stop_proxy()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def proxy_log(self) -> str:
        return "".join(f"--- {log.name}\n{log.read_text()}" for log in self.proxy_logs)


# --- what some blocks must do beyond running cleanly ------------------------------------------

Check = Callable[[Harness, str], None]


def quickstart_output(harness: Harness, out: str) -> None:
    assert out.splitlines() == [
        "chat:   You said: Hello from the quickstart",
        "stream: You said: Stream this answer",
        'tool:   get_weather {"city": "Paris"}',
    ]


def client_output(harness: Harness, out: str) -> None:
    assert out.splitlines() == [
        "You said: Hello 4",
        "You said: Tell me a story",
        "tool call get_weather",
        "tokens: 11",  # 6 prompt words, 5 per tool call
        "finished: tool_calls",
        "call_mock_1 get_weather {'city': 'Paris'}",
    ]


def keys_output(harness: Harness, out: str) -> None:
    lines = out.splitlines()
    assert lines[0].startswith("user:") and lines[0].endswith(" alice")
    (key,) = [line for line in lines if line.startswith("rk_")]
    key_id = key.split("_")[1]
    listed = [line.split() for line in lines if line.startswith(f"{key_id} ")]
    assert len(listed) == 1 and listed[0][1:3] == ["alice", "active"]
    assert listed[0][-1] == "laptop"
    (shown,) = [json.loads(line) for line in lines if line.startswith("{")]
    assert (shown["id"], shown["user"], shown["status"]) == (key_id, "alice", "active")
    assert any(line.startswith(f"revoked {key_id} ") for line in lines)
    assert lines[-1].startswith("keys:") and lines[-1].endswith(f"{key_id} (revoked)")


def admin_output(harness: Harness, out: str) -> None:
    created, revoked = (json.loads(line) for line in out.splitlines())
    assert created["user"] == "bob" and created["key"].startswith(f"rk_{created['id']}_")
    assert created["permissions"] == {"allowedProviders": ["mock"]}
    assert revoked["id"] == created["id"] and revoked["status"] == "revoked"


def jwt_output(harness: Harness, out: str) -> None:
    """carol's token is accepted by the proxy restarted with the secret, for ``mock``."""
    answer = json.loads(out)
    assert answer["content"] == "You said: Hi"
    assert answer["metadata"]["provider"] == "mock"


def toolkit_app(harness: Harness, out: str) -> None:
    """The snippet's app, called in-process: the authenticator's principal reaches the
    endpoint, the rate limit reads its permissions, a bad credential is 401."""
    app = harness.namespace["app"]

    async def call() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://host") as http:
            good = await http.get("/reports", headers={"Authorization": "Bearer alice-token"})
            assert good.status_code == 200 and good.json() == {"for": "alice"}
            assert good.headers["X-RateLimit-Limit"] == "60"
            assert good.headers["X-RateLimit-Remaining"] == "59"
            bad = await http.get("/reports", headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthenticated"

    harness.loop.run_until_complete(call())
    harness.loop.run_until_complete(harness.namespace["limits"].aclose())


def mounted_app(harness: Harness, out: str) -> None:
    from starlette.testclient import TestClient

    with TestClient(harness.namespace["app"]) as client:
        assert client.get("/llm/health").json() == {"status": "ok"}
        refused = client.post("/llm/ai/chat", json={})
        assert refused.status_code == 401


def openai_sdk_output(harness: Harness, out: str) -> None:
    lines = out.splitlines()
    assert lines[0] == "You said: Hello"
    assert lines[1] == "You said: Tell me a story"
    assert lines[2].startswith("tokens: ") and int(lines[2].removeprefix("tokens: ")) > 0
    assert lines[3] == "['mock/mock-1']"


def standalone_output(harness: Harness, out: str) -> None:
    assert out == "Echo: Hello\n"


#: Per document: a piece of text that names one block, and what that block must do.
CHECKS: dict[str, list[tuple[str, Check]]] = {
    "README.md": [
        ("python examples/quickstart.py", quickstart_output),
        ("async with RemoteAIProvider(", client_output),
        ("ai = OpenAI(base_url=", openai_sdk_output),
        ("robota-proxy users set alice", keys_output),
        ("/admin/keys", admin_output),
        ("jwt.encode(", jwt_output),
        ("class MyAuthenticator", toolkit_app),
        ('mount(app, "/llm", create_app())', mounted_app),
    ],
    "standalone.md": [("SyncRemoteAIProvider(", standalone_output)],
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_the_blocks_of_a_document_run_in_order(
    document: Path, fake: FakeVendors, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = blocks(document)
    checks = CHECKS.get(document.name, [])
    for needle, _ in checks:
        named = [block for block in found if needle in block.source]
        assert len(named) == 1, f"{document.name}: {len(named)} blocks contain {needle!r}"
        assert named[0].runs, f"{named[0].where} is checked, so it must run"
    harness = Harness(tmp_path, fake)
    ran = 0
    try:
        for block in found:
            if not block.runs:
                continue
            out = harness.run(block, monkeypatch)
            ran += 1
            for needle, check in checks:
                if needle in block.source:
                    try:
                        check(harness, out)
                    except AssertionError as failure:
                        raise AssertionError(
                            f"{block.where}: {failure}\noutput:\n{out}\n{harness.proxy_log()}"
                        ) from failure
    finally:
        harness.close()
    assert ran > 0


def test_the_documents_follow_the_block_conventions() -> None:
    """Without starting anything: every document parses under the conventions (``blocks``
    raises on a broken one), runs at least one block, and a block left out says why in
    words, not with a token reason."""
    for document in DOCUMENTS:
        found = blocks(document)
        assert any(block.runs for block in found), document.name
        for block in found:
            if block.not_run is not None:
                assert len(block.not_run.split()) >= 4, f"{block.where}: {block.not_run!r}"


# --- the extractor on its own -----------------------------------------------------------------


def parse(tmp_path: Path, markdown: str) -> list[Block]:
    path = tmp_path / "doc.md"
    path.write_text(markdown)
    return blocks(path)


def test_blocks_languages_markers_and_indented_fences(tmp_path: Path) -> None:
    found = parse(
        tmp_path,
        "# T\n\n```python\nprint(1)\n```\n\n<!-- not-run: needs a GPU -->\n```bash\nrun\n```\n"
        '```json\n{"a": 1}\n```\n\n- item:\n\n  ```bash\n  echo indented\n  ```\n'
        "````text\n```\n````\n",
    )
    assert [(b.line, b.language, b.source, b.not_run, b.runs) for b in found] == [
        (3, "python", "print(1)\n", None, True),
        (8, "bash", "run\n", "needs a GPU", False),
        (11, "json", '{"a": 1}\n', None, False),
        (17, "bash", "echo indented\n", None, True),
        (20, "text", "```\n", None, False),
    ]


@pytest.mark.parametrize(
    ("markdown", "error"),
    [
        ("```\nx\n```\n", "doc.md:1: name the block's language"),
        ("```rust\nx\n```\n", "doc.md:1: unknown block language 'rust'"),
        ("<!-- not-run -->\n```bash\nx\n```\n", "doc.md:1: a not-run marker says why"),
        ("<!-- not-run: -->\n```bash\nx\n```\n", "doc.md:1: a not-run marker says why"),
        ("<!-- not-run: r -->\n\n```bash\nx\n```\n", "doc.md:1: a not-run marker must be on"),
        ("<!-- not-run: r -->\n```json\n{}\n```\n", "doc.md:1: a json block never runs"),
        ("text\n<!-- not-run: r -->\n", "doc.md:2: a not-run marker with no block after it"),
        ("<!-- not-run: r\n-->\n```bash\nx\n```\n", "doc.md:1: write a marker on one line"),
        ("```bash\nx\n", "doc.md:1: this fenced block is never closed"),
    ],
)
def test_broken_conventions_are_errors_naming_the_line(
    tmp_path: Path, markdown: str, error: str
) -> None:
    with pytest.raises(MarkdownError) as raised:
        parse(tmp_path, markdown)
    assert str(raised.value).startswith(error)


def test_pip_stand_in_checks_the_extras_against_pyproject(tmp_path: Path) -> None:
    """The install stand-in must be able to fail: an extra pyproject lacks is an error, and
    robota-proxy refuses until an install brought the [proxy] extra."""
    script = ROOT / "tests" / "readme_blocks.py"
    env = {**os.environ, "README_HARNESS_DIR": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), *args], env=env, capture_output=True, text=True
        )

    refused = run("robota-proxy", "keys", "list")
    assert refused.returncode == 2 and "[proxy]" in refused.stderr
    missing = run("pip", "install", "-e", ".[proxy,nosuch]")
    assert missing.returncode == 1 and "no extra nosuch" in missing.stderr
    assert run("pip", "install", "requests").returncode == 2
    client_only = run("pip", "install", "-e", ".")
    assert client_only.returncode == 0
    assert run("robota-proxy", "keys", "list").returncode == 2
    examples = run("pip", "install", "-e", ".[examples]")  # pulls [proxy] in
    assert examples.returncode == 0 and "'proxy'" in examples.stdout
    assert (tmp_path / INSTALLED).read_text().split() == ["examples", "proxy"]
