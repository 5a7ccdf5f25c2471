"""Path helpers that work the same whether the app is standalone or mounted."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def route_path(scope: Mapping[str, Any]) -> str:
    """The path below the mount point: ``/llm/ai/chat`` mounted at ``/llm`` is ``/ai/chat``."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path
