"""Robota Remote proxy: a mountable ASGI app that holds the vendor keys."""

from robota_proxy.app import ProxyApp, create_app, mount
from robota_proxy.middleware.auth import AuthMiddleware
from robota_proxy.middleware.cache import CacheMiddleware
from robota_proxy.middleware.ratelimit import RateLimitMiddleware
from robota_proxy.middleware.request_context import RequestContextMiddleware
from robota_proxy.policy.ratelimits import RateLimiter
from robota_proxy.settings import Settings

__all__ = [
    "AuthMiddleware",
    "CacheMiddleware",
    "ProxyApp",
    "RateLimitMiddleware",
    "RateLimiter",
    "RequestContextMiddleware",
    "Settings",
    "create_app",
    "mount",
]
