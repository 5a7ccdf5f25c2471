"""The servers a benchmark run starts: fake upstream, the floor, robota-proxy, LiteLLM's proxy.

Each runs as a real process in a session (process group) of its own, so that stopping it stops
its uvicorn workers too, and its resident memory and CPU time are read with psutil over the
whole process tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

#: Inherited variables that would change what a proxy does (a developer's own keys or URLs).
_SCRUBBED_PREFIXES = ("ROBOTA_", "OPENAI_", "ANTHROPIC_", "GOOGLE_", "LITELLM_")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raise_open_files_limit() -> int:
    """Lift this process's soft limit of open files to the hard one, for the children it
    starts to inherit: thousands of concurrent streams are a socket each in the load
    generator, two in a proxy (client and upstream side) and one in the fake upstream."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.update(extra)
    return env


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def post_json(
    url: str, body: dict[str, object], key: str, timeout: float = 30.0
) -> tuple[int | None, str]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, ValueError) as exc:
        return None, repr(exc)


@dataclass
class Server:
    """One server process (and its children)."""

    name: str
    command: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    ready_url: str
    process: subprocess.Popen[bytes] | None = None
    notes: list[str] = field(default_factory=list)

    def start(self, ready_timeout: float = 60.0) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode} while starting; "
                    f"last log lines:\n{self.tail()}"
                )
            if http_status(self.ready_url, timeout=1.0) == 200:
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {ready_timeout:.0f}s:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self) -> int:
        total = 0
        for proc in self.tree():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.tree():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


class Sampler:
    """Peak RSS and CPU time of a server's process tree while a load runs."""

    def __init__(self, server: Server | None, interval: float = 0.1) -> None:
        self.server = server
        self.interval = interval
        self.peak_rss = 0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._cpu_start = 0.0

    def __enter__(self) -> Sampler:
        if self.server is not None:
            self._cpu_start = self.server.cpu_seconds()
            self.peak_rss = self.server.rss_bytes()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is None:
            return
        self._stop.set()
        self._thread.join()
        self.cpu_s = self.server.cpu_seconds() - self._cpu_start

    def _run(self) -> None:
        assert self.server is not None
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self.server.rss_bytes())


def fake_upstream(workdir: Path, chunks: int, interval_ms: float) -> Server:
    port = free_port()
    return Server(
        name="fake-upstream",
        command=[
            sys.executable,
            "-m",
            "benchmarks.fake_upstream",
            "--port",
            str(port),
            "--chunks",
            str(chunks),
            "--interval-ms",
            str(interval_ms),
        ],
        env=clean_env({}),
        cwd=Path.cwd(),
        log_path=workdir / "fake-upstream.log",
        ready_url=f"http://127.0.0.1:{port}/health",
    )


def floor_forwarder(workdir: Path, upstream_url: str) -> Server:
    """The floor (``benchmarks.floor_forwarder``): uvicorn and one aiohttp session, no more."""
    port = free_port()
    return Server(
        name="floor",
        command=[
            sys.executable,
            "-m",
            "benchmarks.floor_forwarder",
            "--port",
            str(port),
            "--upstream",
            upstream_url,
        ],
        env=clean_env({}),
        cwd=Path.cwd(),
        log_path=workdir / "floor.log",
        ready_url=f"http://127.0.0.1:{port}/health",
    )


def robota_proxy(
    name: str,
    workdir: Path,
    upstream_url: str,
    extra_env: dict[str, str],
    workers: int = 1,
    checkout: Path | None = None,
) -> Server:
    """``robota-proxy serve``; with ``checkout``, the code of that checkout of this repository
    (first on ``PYTHONPATH``, ahead of the editable install's finder) under the same
    interpreter and dependencies: the baseline measured side by side with the work tree."""
    port = free_port()
    env = {
        "ROBOTA_OPENAI_BASE_URL": upstream_url + "/v1",
        "ROBOTA_OPENAI_API_KEY": "sk-bench",
        "ROBOTA_API_KEYS": "bench-key",
        **extra_env,
    }
    env = {k: v for k, v in env.items() if v != ""}  # "" in a profile unsets a default
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    return Server(
        name=name,
        command=[
            sys.executable,
            "-m",
            "robota_proxy",
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        env=clean_env(env),
        cwd=workdir / name,  # the default SQLite file and any .env live here, not in the repo
        log_path=workdir / f"{name}.log",
        ready_url=f"http://127.0.0.1:{port}/health",
    )


def litellm_proxy(
    workdir: Path, executable: str, upstream_url: str, workers: int, master_key: str
) -> Server:
    port = free_port()
    home = workdir / "litellm"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "config.yaml"
    # LiteLLM's production advice for a proxy without a database: master key, no verbose
    # logging, no spend or error logs, no retries (the fake upstream never fails).
    config.write_text(
        f"""model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {upstream_url}/v1
      api_key: sk-bench
general_settings:
  master_key: {master_key}
  disable_spend_logs: true
  disable_error_logs: true
  disable_adding_master_key_hash_to_db: true
litellm_settings:
  set_verbose: false
  json_logs: false
  request_timeout: 60
  num_retries: 0
  telemetry: false
""",
        encoding="utf-8",
    )
    env = {
        "LITELLM_LOG": "ERROR",
        "LITELLM_MODE": "PRODUCTION",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download of the price list at start
        "DISABLE_ADMIN_UI": "True",
    }
    return Server(
        name="litellm",
        command=[
            executable,
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            str(workers),
            "--telemetry",
            "False",
        ],
        env=clean_env(env),
        cwd=home,
        log_path=workdir / "litellm.log",
        ready_url=f"http://127.0.0.1:{port}/health/liveliness",
    )


def litellm_version(executable: str) -> str:
    python = Path(executable).with_name("python")
    try:
        out = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def base_url(server: Server) -> str:
    return server.ready_url.split("/", 3)[0] + "//" + server.ready_url.split("/", 3)[2]
