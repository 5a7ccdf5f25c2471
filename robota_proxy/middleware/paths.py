"""Moved to ``robota_proxy.wire.paths`` (routes share them too); re-exported here for code
that imported them from the middleware package."""

from __future__ import annotations

from robota_proxy.wire.paths import CHAT_PATH, CHAT_PATHS, STREAM_PATH, call_feature, route_path

__all__ = ["CHAT_PATH", "CHAT_PATHS", "STREAM_PATH", "call_feature", "route_path"]
