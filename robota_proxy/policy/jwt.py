"""JWT bearer tokens from an identity provider the operator trusts (PyJWT does the crypto).

Two configurations, never both: an HMAC shared secret (HS256/384/512) or a PEM public key
(RS*/PS* for RSA, ES* for EC). The accepted algorithms are fixed by that configuration, not by
the token: ``none`` is never accepted, and a token cannot switch an RSA deployment to HMAC
(the classic trick of signing with the public key as an HMAC secret). ``exp`` is required;
``nbf``, ``iss`` and ``aud`` are checked with the configured leeway. ``sub`` is the user.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import jwt
import jwt.types
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from robota_proxy.errors import InvalidRequest
from robota_proxy.policy.principals import Principal, UserPermissions

log = logging.getLogger("robota_proxy.auth")

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = ("ES256", "ES384", "ES512")
_KEY_ID_MAX = 60


class JwtConfigError(ValueError):
    """The JWT settings cannot work; raised at start so the operator sees it at once."""


class PermissionSource(Protocol):
    """Where a token's user gets permissions when the token's claims are not trusted."""

    async def permissions(self, user: str) -> UserPermissions: ...


def verification_key(
    secret: str | None, public_key_file: Path | None, algorithms: Sequence[str] | None
) -> tuple[Any, list[str]]:
    """The key to verify with and the algorithms it may be used with."""
    if secret and public_key_file:
        raise JwtConfigError(
            "set ROBOTA_JWT_SECRET or ROBOTA_JWT_PUBLIC_KEY_FILE, not both: one deployment "
            "verifies one kind of signature"
        )
    key: Any
    allowed: tuple[str, ...]
    if secret:
        key, allowed, default = secret, HMAC_ALGORITHMS, ["HS256"]
    elif public_key_file:
        try:
            key = load_pem_public_key(public_key_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise JwtConfigError(
                f"ROBOTA_JWT_PUBLIC_KEY_FILE {str(public_key_file)!r} is not a readable PEM "
                f"public key ({type(exc).__name__})"
            ) from None
        if isinstance(key, RSAPublicKey):
            allowed, default = RSA_ALGORITHMS, ["RS256"]
        elif isinstance(key, EllipticCurvePublicKey):
            allowed, default = EC_ALGORITHMS, ["ES256"]
        else:
            raise JwtConfigError("the JWT public key must be an RSA or EC key")
    else:
        raise JwtConfigError("no JWT secret or public key configured")
    chosen = list(algorithms) if algorithms else default
    wrong = [name for name in chosen if name not in allowed]
    if wrong:
        raise JwtConfigError(
            f"ROBOTA_JWT_ALGORITHMS {', '.join(wrong)} cannot be used with this key; "
            f"allowed: {', '.join(allowed)}"
        )
    return key, chosen


class JwtAuthenticator:
    def __init__(
        self,
        key: Any,
        algorithms: Sequence[str],
        *,
        permissions: PermissionSource | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_seconds: float = 30.0,
        trust_claims: bool = False,
        claims_namespace: str = "https://robota.dev/permissions",
    ) -> None:
        """``permissions``: the user records; without one (and without trusted claims) a
        valid token's user is unrestricted."""
        if not algorithms or any(a.lower() == "none" for a in algorithms):
            raise JwtConfigError("JWT algorithms must be listed, and 'none' is never allowed")
        self.key = key
        self.algorithms = list(algorithms)
        self.permission_source = permissions
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway_seconds
        self.trust_claims = trust_claims
        self.claims_namespace = claims_namespace
        required = ["exp", "sub"]
        required += ["iss"] if issuer else []
        required += ["aud"] if audience else []
        self._options: jwt.types.Options = {"require": required}

    async def authenticate(self, credential: str) -> Principal | None:
        try:
            claims: dict[str, Any] = jwt.decode(
                credential,
                self.key,
                algorithms=self.algorithms,
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options=self._options,
            )
        except jwt.PyJWTError as exc:
            # The reason only (expired, bad audience...), never the token.
            log.info("JWT refused: %s", type(exc).__name__)
            return None
        user = claims.get("sub")
        if not isinstance(user, str) or not user.strip():
            log.info("JWT refused: sub is not a non-empty string")
            return None
        permissions = await self._permissions(user, claims)
        if permissions is None:
            return None
        ident = claims.get("jti")
        label = ident if isinstance(ident, str) and ident else user
        return Principal(user=user, key_id=f"jwt:{label[:_KEY_ID_MAX]}", permissions=permissions)

    async def _permissions(self, user: str, claims: dict[str, Any]) -> UserPermissions | None:
        if self.trust_claims and self.claims_namespace in claims:
            claim = claims[self.claims_namespace]
            if not isinstance(claim, dict):
                log.info("JWT refused: the permissions claim is not an object")
                return None
            try:
                return UserPermissions.from_wire(claim)
            except InvalidRequest as exc:
                log.info("JWT refused: invalid permissions claim (%s)", exc.message)
                return None
        if self.permission_source is None:
            return UserPermissions()
        return await self.permission_source.permissions(user)
