"""The drain's two in-process pieces: the server marks the process draining on SIGTERM (so
``/ready`` turns 503 while calls finish), and the app closes its resources in an order where
nothing is closed under something that may still write through it: the database last."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
import uvicorn

from robota_proxy import drain
from robota_proxy.app import Resources
from robota_proxy.serving import DrainingServer


@pytest.fixture(autouse=True)
def _not_draining() -> Iterator[None]:
    drain.reset()
    yield
    drain.reset()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_sigterm_marks_the_process_draining_and_asks_the_server_to_exit() -> None:
    server = DrainingServer(uvicorn.Config("robota_proxy.app:create_app", factory=True))
    assert not drain.is_draining()
    server.handle_exit(signal.SIGTERM, None)
    assert (drain.is_draining(), server.should_exit) == (True, True)


class Closer:
    """Stands for each resource; writes its name in the shared journal when closed."""

    def __init__(self, name: str, journal: list[str]) -> None:
        self.name = name
        self.journal = journal

    async def aclose(self) -> None:
        self.journal.append(self.name)

    def open(self) -> None:
        self.journal.append(f"open {self.name}")

    def names(self) -> list[str]:
        return []


class Database(Closer):
    async def open(self) -> None:  # type: ignore[override]
        self.journal.append("open database")


@pytest.mark.anyio
async def test_resources_close_background_writers_first_and_the_database_last() -> None:
    journal: list[str] = []
    resources = Resources(
        Closer("registry", journal),  # type: ignore[arg-type]
        Database("database", journal),  # type: ignore[arg-type]
        streams=Closer("streams", journal),  # type: ignore[arg-type]
        response_cache=Closer("cache", journal),  # type: ignore[arg-type]
        limits=Closer("limits", journal),  # type: ignore[arg-type]
    )
    resources.drain_before_close(Closer("key last-used times", journal).aclose)
    resources.drain_before_close(Closer("lease reclaimer", journal).aclose)
    await resources.open()
    await resources.close()
    assert journal == [
        "open database",
        "open registry",
        "lease reclaimer",
        "key last-used times",
        "registry",
        "streams",
        "cache",
        "limits",
        "database",
    ]


def test_the_server_freezes_what_start_up_made_out_of_the_collectors_view() -> None:
    """What exists once the app has started (modules, settings, pools) lives as long as the
    process; frozen, a full collection scans only the requests' objects. In a process of its
    own: freezing is process-wide."""
    script = """
import asyncio, gc
import uvicorn
from robota_proxy.serving import DrainingServer

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

async def main():
    server = DrainingServer(uvicorn.Config(app, port=0, log_level="error", lifespan="on"))
    before = gc.get_freeze_count()
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    print(before, gc.get_freeze_count() > 1000)
    server.should_exit = True
    await task

asyncio.run(main())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["0", "True"]
