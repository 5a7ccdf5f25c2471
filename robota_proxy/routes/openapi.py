"""``GET /openapi.json``: the OpenAPI 3.1 document of the proxy's HTTP routes.

Public, like ``/health``: it describes the contract and holds no key, user or setting. When
the proxy is mounted (``/llm``), the document's ``servers`` names the mount point, so that a
client generated from it, or a fuzzer, reaches the routes where they are.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

OPENAPI_PATH = "/openapi.json"


async def openapi(request: Request) -> Response:
    # On the first request, not at import: robota_proxy.openapi declares its pydantic models
    # at import (~60 ms), which the app's start need not pay.
    from robota_proxy.openapi import openapi_document

    document = openapi_document()
    root = str(request.scope.get("root_path", "")).rstrip("/")
    if root:
        document["servers"] = [{"url": root}]
    return JSONResponse(document)


ROUTES = [Route(OPENAPI_PATH, openapi, methods=["GET"])]
