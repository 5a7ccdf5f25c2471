"""The stall probe, loaded into a proxy by ``benchmarks.stall`` through ``PYTHONPATH`` (Python
imports ``sitecustomize`` at start-up): no change to the code under test.

With ``STALL_PROBE_OUT`` set it writes one line per event, with its wall time, to
``$STALL_PROBE_OUT.<pid>``:

- ``gc``: a garbage collection that took over 5 ms (``gc.callbacks``);
- ``busy``: the main thread out of the event loop's idle wait for over 15 ms on end, with the
  CPU time the main thread used meanwhile (``/proc/self/task/<tid>/schedstat``) and its most
  sampled stacks: CPU close to the duration is work in the proxy; little CPU is the process
  waiting for a core (other work on the machine);
- ``gap``: the probe's own 1 ms wake-ups over 15 ms apart, with the main thread's CPU time over
  the gap: CPU close to the gap is the GIL held by the main thread in one piece (a C call, a
  collection); little CPU is the process not running at all.

Sampling the main thread's stack every millisecond costs the proxy some CPU; the figures it
prints are for finding a stall, not for the benchmark.

Two knobs for experiments no ``ROBOTA_*`` setting offers, each on its own (without
``STALL_PROBE_OUT`` too): ``STALL_PROBE_SQLITE_PRAGMA="wal_autocheckpoint=0"`` runs that
PRAGMA on every new SQLite connection (no WAL checkpoint inside a commit: the ledger's
``fdatasync`` calls leave the request path), ``STALL_PROBE_SWITCH_INTERVAL=0.0005`` sets
``sys.setswitchinterval`` (how long a thread waits for the GIL before asking for it).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections import Counter
from types import FrameType
from typing import Any, TextIO

_IDLE_FUNCTIONS = ("run", "run_until_complete", "run_forever")


def _stack(frame: FrameType | None, depth: int = 8) -> str:
    parts: list[str] = []
    while frame is not None and len(parts) < depth:
        code = frame.f_code
        parts.append(f"{code.co_name}({os.path.basename(code.co_filename)}:{frame.f_lineno})")
        frame = frame.f_back
    return " <- ".join(parts)


def _idle(frame: FrameType | None) -> bool:
    """The main thread waits in the event loop (uvloop's wait is C, below asyncio's run)."""
    if frame is None:
        return True
    code = frame.f_code
    return code.co_name in _IDLE_FUNCTIONS and "asyncio" in code.co_filename


def _install(out: TextIO) -> None:
    started = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = (time.perf_counter() - started[0]) * 1000
        if took > 5:
            out.write(
                f"{time.time():.4f} gc {took:.1f}ms gen{info['generation']} "
                f"collected={info['collected']}\n"
            )

    gc.callbacks.append(on_gc)

    def watch() -> None:
        # Its own thread id first: its 1 ms sleeps are not the proxy's (benchmarks.stall).
        out.write(f"{time.time():.4f} probe 0ms thread {threading.get_native_id()}\n")
        main = threading.main_thread()
        with open(f"/proc/self/task/{main.native_id}/schedstat", encoding="ascii") as stat:

            def cpu_ms() -> float:
                stat.seek(0)
                return int(stat.read().split()[0]) / 1e6

            last, last_cpu = time.perf_counter(), cpu_ms()
            run_start: float | None = None
            run_cpu = 0.0
            stacks: Counter[str] = Counter()
            while True:
                time.sleep(0.001)
                now, cpu = time.perf_counter(), cpu_ms()
                frame = sys._current_frames().get(main.ident or 0)
                gap = (now - last) * 1000
                if gap > 15:
                    out.write(
                        f"{time.time():.4f} gap {gap:.1f}ms main_cpu {cpu - last_cpu:.1f}ms "
                        f"at {_stack(frame)}\n"
                    )
                last, last_cpu = now, cpu
                if not _idle(frame):
                    if run_start is None:
                        run_start, run_cpu, stacks = now, cpu, Counter()
                    stacks[_stack(frame)] += 1
                elif run_start is not None:
                    took = (now - run_start) * 1000
                    if took > 15:
                        top = " || ".join(f"{n}x {s}" for s, n in stacks.most_common(3))
                        out.write(
                            f"{time.time():.4f} busy {took:.1f}ms main_cpu {cpu - run_cpu:.1f}ms "
                            f"{top}\n"
                        )
                    run_start = None

    threading.Thread(target=watch, daemon=True, name="stall-probe").start()


def _knobs() -> None:
    interval = os.environ.get("STALL_PROBE_SWITCH_INTERVAL")
    if interval:
        sys.setswitchinterval(float(interval))
    pragma = os.environ.get("STALL_PROBE_SQLITE_PRAGMA")
    if pragma:
        import sqlite3

        connect = sqlite3.connect

        def connect_with_pragma(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            connection: sqlite3.Connection = connect(*args, **kwargs)
            connection.execute(f"PRAGMA {pragma}")
            return connection

        sqlite3.connect = connect_with_pragma  # type: ignore[assignment]


_knobs()
_OUT = os.environ.get("STALL_PROBE_OUT")
if _OUT:
    _install(open(f"{_OUT}.{os.getpid()}", "a", buffering=1, encoding="utf-8"))  # noqa: SIM115
