"""``AuthMiddleware``: who is calling, and may they make this call, before anything else.

Pure ASGI so it can sit in front of any app, ours or a host's: it reads the bearer credential,
asks an ``Authenticator``, and puts the ``Principal`` in the scope under
``robota_proxy.scope.PRINCIPAL``. Refusals are the contract's JSON 401 and say nothing about
which part of a key was wrong.

Two optional duties, off unless configured:

- ``failure_limiter``: a client address that failed too often is answered 429 before its
  credential is even looked at, so keys cannot be guessed at speed;
- ``chat_paths``: for these paths the chat body is parsed once (kept in the scope for the route)
  and the principal's permissions checked against provider, model and feature, so a forbidden
  call is refused with 403 before any vendor is called.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from robota_proxy import scope as keys
from robota_proxy.chat_body import chat_request
from robota_proxy.errors import ProxyError, RateLimited, Unauthenticated
from robota_proxy.middleware.paths import route_path
from robota_proxy.policy.authenticators import AuthFailureLimiter
from robota_proxy.policy.principals import Authenticator, Feature, Principal
from robota_proxy.responses import refuse

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


def bearer_credential(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            header: str = value.decode("latin-1")
            scheme, _, credential = header.partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                return credential.strip()
            return None
    return None


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        authenticator: Authenticator,
        *,
        anonymous: Principal | None = None,
        exempt_paths: Collection[str] = ("/health",),
        exempt_prefixes: Collection[str] = (),
        failure_limiter: AuthFailureLimiter | None = None,
        chat_paths: Mapping[str, Feature] | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        """``anonymous``: the principal for requests without credentials; leave it ``None``
        unless the operator turned authentication off on purpose. ``exempt_prefixes``: paths
        with their own guard (the admin API). ``chat_paths``: route path -> feature for POST
        bodies to authorize (the proxy's own: ``robota_proxy.middleware.paths.CHAT_PATHS``)."""
        self.app = app
        self.authenticator = authenticator
        self.anonymous = anonymous
        self.exempt_paths = frozenset(exempt_paths)
        self.exempt_prefixes = tuple(exempt_prefixes)
        self.failure_limiter = failure_limiter
        self.chat_paths = dict(chat_paths or {})
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if path in self.exempt_paths or path.startswith(self.exempt_prefixes):
            await self.app(scope, receive, send)
            return
        try:
            principal = await self._principal(scope)
            scope[keys.PRINCIPAL] = principal
            feature = self.chat_paths.get(path)
            if feature is not None and scope["type"] == "http" and scope["method"] == "POST":
                body = await chat_request(Request(scope, receive), self.max_body_bytes)
                principal.permissions.authorize(body, feature)
        except ProxyError as error:
            await refuse(error, scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _principal(self, scope: Scope) -> Principal:
        if self.anonymous is not None:
            return self.anonymous
        credential = bearer_credential(scope)
        if credential is None:
            raise Unauthenticated("a valid 'Authorization: Bearer <key>' header is required")
        client = client_address(scope)
        if self.failure_limiter is not None:
            wait = await self.failure_limiter.blocked_for(client)
            if wait is not None:
                raise RateLimited(
                    "too many failed authentications from this address; try again later",
                    retry_after=wait,
                )
        principal = await self.authenticator.authenticate(credential)
        if principal is None:
            if self.failure_limiter is not None:
                await self.failure_limiter.failed(client)
            raise Unauthenticated("a valid 'Authorization: Bearer <key>' header is required")
        return principal
