"""The proxy inside an existing Starlette app, under /llm, the Starlette way: a ``Mount``
route, with the host's lifespan entering the proxy's so its resources open and close with
the host.

    ROBOTA_API_KEYS=dev-key uvicorn examples.starlette_mount:app --port 8000
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from robota_proxy import create_app

proxy = create_app()


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "from the host app"})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # ... the host's own start-up ...
    async with proxy.lifespan(app):
        yield
    # ... the host's own shutdown ...


app = Starlette(routes=[Route("/hello", hello), Mount("/llm", app=proxy)], lifespan=lifespan)
