"""Path helpers that work the same whether the app is standalone or mounted."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from robota_proxy.dialects import CHAT_SURFACES, Feature, scope_feature
from robota_proxy.scope import route_path

__all__ = ["CHAT_PATH", "CHAT_PATHS", "STREAM_PATH", "call_feature", "route_path"]

CHAT_PATH = "/ai/chat"
STREAM_PATH = "/ai/chat/stream"
#: The chat routes (below any mount point) and the feature each one uses. The one table that
#: says which calls are chat calls: ``AuthMiddleware`` authorizes their bodies for the feature,
#: ``MeteringMiddleware`` meters them, ``CacheMiddleware`` may answer them (``"stream"`` as
#: SSE), and ``/ai/ws`` forwards its frames to them. Derived from the dialects' table
#: (``robota_proxy.dialects.CHAT_SURFACES``): a path whose body says whether it streams
#: (``/v1/chat/completions``) is listed as ``"chat"`` here; ``call_feature`` has the truth.
CHAT_PATHS: Mapping[str, Feature] = MappingProxyType(
    {path: surface.feature or "chat" for path, surface in CHAT_SURFACES.items()}
)


def call_feature(scope: Mapping[str, Any]) -> Feature:
    """``chat`` or ``stream`` for the chat call in ``scope``: by its path, or (for a
    dialect whose body decides, once it is parsed) by its body."""
    return scope_feature(scope)
