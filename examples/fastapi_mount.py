"""The proxy inside an existing FastAPI service, under /llm.

    ROBOTA_API_KEYS=dev-key uvicorn examples.fastapi_mount:app --port 8000

Your own routes stay as they are; the proxy answers under /llm (POST /llm/ai/chat ...), and
``RemoteAIProvider("http://127.0.0.1:8000/llm", ...)`` talks to it. ``mount`` also ties the
proxy's connection pools to the service's lifespan (FastAPI does not run a mounted app's
lifespan by itself).
"""

from __future__ import annotations

from fastapi import FastAPI

from robota_proxy import create_app, mount

app = FastAPI(title="An existing service")


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "from the host app"}


mount(app, "/llm", create_app())
