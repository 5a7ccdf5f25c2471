"""``AuthMiddleware``: who is calling, and may they make this call, before anything else.

Pure ASGI so it can sit in front of any app, ours or a host's: it reads the bearer credential,
asks an ``Authenticator``, and puts the ``Principal`` in the scope under
``robota_proxy.scope.PRINCIPAL``. Refusals are the contract's JSON 401 with a message that tells
an honest caller what to fix (no header, a malformed one, an expired key, which token check
failed) and a guesser nothing: an unknown key id, a wrong secret and a revoked key read the
same. The precise reason and the credential's public id go to the ``robota_proxy.auth`` log,
never the credential.

Two optional duties, off unless configured:

- ``failure_limiter``: a client address that failed too often is answered 429 before its
  credential is even looked at, so keys cannot be guessed at speed;
- ``chat_paths``: for these paths the chat body is parsed once (kept in the scope for the route)
  and the principal's permissions checked against provider, model and feature, so a forbidden
  call is refused with 403 before any vendor is called.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from robota_proxy import scope as keys
from robota_proxy.chat_body import chat_request
from robota_proxy.errors import ProxyError, RateLimited, Unauthenticated
from robota_proxy.policy.authenticators import AuthFailureLimiter
from robota_proxy.policy.principals import Authenticator, Feature, Principal
from robota_proxy.policy.refusals import AuthRefused, RefusalReason
from robota_proxy.responses import refuse
from robota_proxy.wire.bearer import authorization_header, client_address, parse_bearer
from robota_proxy.wire.bearer import bearer_credential as bearer_credential  # re-exported
from robota_proxy.wire.paths import CHAT_PATHS, call_feature, route_path

log = logging.getLogger("robota_proxy.auth")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

_UNKNOWN = "unknown or revoked key"
_TOKEN_ALG = "invalid token: its alg is not one this proxy accepts"
#: The 401 message for each refusal reason (README, "Keys and identities", lists them).
REFUSAL_MESSAGES: Mapping[RefusalReason, str] = {
    "missing": "no credential: send 'Authorization: Bearer <key>'",
    "malformed": (
        "malformed Authorization header: expected 'Bearer <key>', one key or token without spaces"
    ),
    "malformed_key": (
        "malformed key: a proxy key is rk_<8-character id>_<43-character secret>; "
        "check that it was copied whole"
    ),
    # One message for all four, so that a guesser cannot tell a live key id from a dead one.
    "unknown_key": _UNKNOWN,
    "wrong_secret": _UNKNOWN,
    "revoked": _UNKNOWN,
    "user_revoked": _UNKNOWN,
    "expired": "the key has expired: ask for a new one",
    "token_expired": "the token has expired (exp is in the past): get a fresh one",
    "token_malformed": "invalid token: not a decodable JWT",
    "token_alg": _TOKEN_ALG,
    "token_signature": "invalid token: the signature does not verify",
    "token_exp": "invalid token: exp is required and must be a number",
    "token_nbf": "invalid token: not valid yet (nbf is in the future)",
    "token_iat": "invalid token: iat is in the future or not a number",
    "token_aud": "invalid token: aud is missing or not this proxy's audience",
    "token_iss": "invalid token: iss is missing or not the trusted issuer",
    "token_sub": "invalid token: sub (the user) is missing, empty or longer than 200 characters",
    "token_jti": "invalid token: jti must be a string",
    "token_permissions": "invalid token: the permissions claim is not valid",
    # Only a correctly signed token gets this far: there is nothing left to guess.
    "token_user_revoked": "the user's access has been revoked: ask the operator",
    "token_invalid": "invalid token",
}


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
        bodies to authorize (the proxy's own: ``robota_proxy.wire.paths.CHAT_PATHS``)."""
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
                if path in CHAT_PATHS:  # a compatible surface's body says if it streams
                    feature = call_feature(scope)
                principal.permissions.authorize(body, feature)
        except ProxyError as error:
            await refuse(error, scope, receive, send)
            return
        keys.note_authorized(scope, feature)
        await self.app(scope, receive, send)

    async def _principal(self, scope: Scope) -> Principal:
        if self.anonymous is not None:
            return self.anonymous
        header = authorization_header(scope)
        client = client_address(scope)
        if header is None:
            # Not an attempt at a key: not counted as a failure, not blocked.
            raise self._refused(AuthRefused("missing"), scope, client)
        if self.failure_limiter is not None:
            wait = await self.failure_limiter.blocked_for(client)
            if wait is not None:
                raise RateLimited(
                    "too many failed authentications from this address; try again later",
                    retry_after=wait,
                )
        try:
            principal = await self.authenticator.authenticate(parse_bearer(header))
            if principal is None:  # an authenticator that does not say why
                raise AuthRefused("unknown_key")
        except AuthRefused as refusal:
            if self.failure_limiter is not None:
                await self.failure_limiter.failed(client)
            raise self._refused(refusal, scope, client) from None
        return principal

    @staticmethod
    def _refused(refusal: AuthRefused, scope: Scope, client: str) -> Unauthenticated:
        """Log the precise reason, answer the caller's message. The log line carries the
        reason, the credential's public id and a non-secret detail, never the credential."""
        log.info(
            "authentication refused: reason=%s id=%s client=%s path=%s request=%s%s",
            refusal.reason,
            refusal.public_id or "-",
            client,
            route_path(scope),
            keys.request_id(scope),
            f" detail={refusal.detail!r}" if refusal.detail else "",
        )
        return Unauthenticated(REFUSAL_MESSAGES[refusal.reason])
