"""Path helpers that work the same whether the app is standalone or mounted."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from robota_proxy.policy.principals import Feature

CHAT_PATH = "/ai/chat"
STREAM_PATH = "/ai/chat/stream"
#: The chat routes (below any mount point) and the feature each one uses. The one table that
#: says which calls are chat calls: ``AuthMiddleware`` authorizes their bodies for the feature,
#: ``MeteringMiddleware`` meters them, ``CacheMiddleware`` may answer them (``"stream"`` as
#: SSE), and ``/ai/ws`` forwards its frames to them.
CHAT_PATHS: Mapping[str, Feature] = MappingProxyType({CHAT_PATH: "chat", STREAM_PATH: "stream"})


def route_path(scope: Mapping[str, Any]) -> str:
    """The path below the mount point: ``/llm/ai/chat`` mounted at ``/llm`` is ``/ai/chat``."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path
