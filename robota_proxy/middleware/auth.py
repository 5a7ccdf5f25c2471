"""``AuthMiddleware``: who is calling, before anything else looks at the request.

Pure ASGI so it can sit in front of any app, ours or a host's: it reads the bearer credential,
asks an ``Authenticator``, and puts the ``Principal`` in the scope under
``robota_proxy.scope.PRINCIPAL``. Refusals are the contract's JSON 401 and say nothing about
which part of a key was wrong.
"""

from __future__ import annotations

from collections.abc import Collection

from starlette.types import ASGIApp, Receive, Scope, Send

from robota_proxy import scope as keys
from robota_proxy.errors import Unauthenticated
from robota_proxy.middleware.paths import route_path
from robota_proxy.policy.principals import Authenticator, Principal
from robota_proxy.responses import error_response


def bearer_credential(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            header: str = value.decode("latin-1")
            scheme, _, credential = header.partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                return credential.strip()
            return None
    return None


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        authenticator: Authenticator,
        *,
        anonymous: Principal | None = None,
        exempt_paths: Collection[str] = ("/health",),
    ) -> None:
        """``anonymous``: the principal for requests without credentials; leave it ``None``
        unless the operator turned authentication off on purpose."""
        self.app = app
        self.authenticator = authenticator
        self.anonymous = anonymous
        self.exempt_paths = frozenset(exempt_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or route_path(scope) in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        principal = await self._principal(scope)
        if principal is None:
            error = Unauthenticated("a valid 'Authorization: Bearer <key>' header is required")
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4401, "reason": error.message})
                return
            await error_response(error, keys.request_id(scope))(scope, receive, send)
            return
        scope[keys.PRINCIPAL] = principal
        await self.app(scope, receive, send)

    async def _principal(self, scope: Scope) -> Principal | None:
        if self.anonymous is not None:
            return self.anonymous
        credential = bearer_credential(scope)
        if credential is None:
            return None
        return await self.authenticator.authenticate(credential)
