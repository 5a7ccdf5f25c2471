"""A fault-injecting TCP relay for resume tests: it sits between a client and a proxy on
127.0.0.1 and cuts one connection after a given number of response bytes.

Connection ``n`` goes to ``targets[min(n, len(targets) - 1)]``, so a test can send the first
connection to one proxy process and the reconnection to another (cross-process resume).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from types import TracebackType


class CuttingRelay:
    def __init__(self, targets: Sequence[tuple[str, int]], *, cut_after: int | None) -> None:
        """``cut_after``: response bytes passed on before the first connection is cut (once);
        None never cuts."""
        self.targets = list(targets)
        self.cut_after = cut_after
        self.connections = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aenter__(self) -> CuttingRelay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        host, port = self.targets[min(self.connections, len(self.targets) - 1)]
        self.connections += 1
        cut = self.cut_after if self.cuts == 0 else None
        upstream_r, upstream_w = await asyncio.open_connection(host, port)

        async def requests() -> None:
            while chunk := await client_r.read(65536):
                upstream_w.write(chunk)
                await upstream_w.drain()

        async def responses() -> None:
            passed = 0
            while chunk := await upstream_r.read(65536):
                if cut is not None and passed + len(chunk) >= cut:
                    client_w.write(chunk[: cut - passed])
                    await client_w.drain()
                    self.cuts += 1
                    return
                passed += len(chunk)
                client_w.write(chunk)
                await client_w.drain()

        tasks = [asyncio.create_task(requests()), asyncio.create_task(responses())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for writer in (client_w, upstream_w):
            # An abort, not a FIN: what a dropped connection looks like.
            writer.transport.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
