"""Robota Remote proxy: a mountable ASGI app that holds the vendor keys.

The public names are imported on first use (PEP 562 ``__getattr__``), so that the
``robota-proxy keys ...`` command line, which needs none of them, does not pay for importing
the whole app (the vendor SDKs, Starlette, the middleware) on every call.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from robota_proxy.app import ProxyApp, create_app, mount
    from robota_proxy.middleware.auth import AuthMiddleware
    from robota_proxy.middleware.cache import CacheMiddleware
    from robota_proxy.middleware.metering import MeteringMiddleware
    from robota_proxy.middleware.ratelimit import RateLimitMiddleware
    from robota_proxy.middleware.request_context import RequestContextMiddleware
    from robota_proxy.policy.principals import Authenticator, Principal, UserPermissions
    from robota_proxy.policy.ratelimits import RateLimiter
    from robota_proxy.settings import Settings

#: Public name -> the module that defines it.
_EXPORTS = {
    "AuthMiddleware": "robota_proxy.middleware.auth",
    "Authenticator": "robota_proxy.policy.principals",
    "CacheMiddleware": "robota_proxy.middleware.cache",
    "MeteringMiddleware": "robota_proxy.middleware.metering",
    "Principal": "robota_proxy.policy.principals",
    "ProxyApp": "robota_proxy.app",
    "RateLimitMiddleware": "robota_proxy.middleware.ratelimit",
    "RateLimiter": "robota_proxy.policy.ratelimits",
    "RequestContextMiddleware": "robota_proxy.middleware.request_context",
    "Settings": "robota_proxy.settings",
    "UserPermissions": "robota_proxy.policy.principals",
    "create_app": "robota_proxy.app",
    "mount": "robota_proxy.app",
}

__all__ = [
    "AuthMiddleware",
    "Authenticator",
    "CacheMiddleware",
    "MeteringMiddleware",
    "Principal",
    "ProxyApp",
    "RateLimitMiddleware",
    "RateLimiter",
    "RequestContextMiddleware",
    "Settings",
    "UserPermissions",
    "create_app",
    "mount",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'robota_proxy' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
