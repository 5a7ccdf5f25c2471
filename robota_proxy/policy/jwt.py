"""JWT bearer tokens from an identity provider the operator trusts (PyJWT does the crypto).

Two configurations, never both: an HMAC shared secret (HS256/384/512) or a PEM public key
(RS*/PS* for RSA, ES* for EC). The accepted algorithms are fixed by that configuration, not by
the token: ``none`` is never accepted, and a token cannot switch an RSA deployment to HMAC
(the classic trick of signing with the public key as an HMAC secret). ``exp`` is required;
``nbf``, ``iss`` and ``aud`` are checked with the configured leeway. ``sub`` is the user.

A refused token raises ``AuthRefused`` naming the check that failed, so the caller's 401 says
whether to fix the signature, the clock or the audience. That tells a guesser nothing: the
signature is checked first, and only a token that carries a valid signature gets past it to
the claim checks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import jwt
import jwt.types
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from robota_proxy.errors import InvalidRequest
from robota_proxy.policy.principals import MAX_USER_LENGTH, Principal, UserPermissions
from robota_proxy.policy.refusals import AuthRefused, RefusalReason

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = ("ES256", "ES384", "ES512")
_KEY_ID_MAX = 60
#: What may appear of a refused token's jti/sub in a log line (the claims may be forged).
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9._@:+/=-]")
_CLAIM_REASONS: dict[str, RefusalReason] = {
    "exp": "token_exp",
    "sub": "token_sub",
    "iss": "token_iss",
    "aud": "token_aud",
    "nbf": "token_nbf",
    "iat": "token_iat",
    "jti": "token_jti",
}
#: Refused before the signature was verified: the claims named in the log are the caller's word.
_UNVERIFIED: frozenset[RefusalReason] = frozenset(
    {"token_malformed", "token_alg", "token_signature", "token_invalid"}
)


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

    async def authenticate(self, credential: str) -> Principal:
        """The token's principal, or ``AuthRefused`` naming the failed check."""
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
            reason = refusal_reason(exc)
            # The exception class names the check; nothing of the token goes in.
            detail = type(exc).__name__ + ("; claims unverified" if reason in _UNVERIFIED else "")
            raise AuthRefused(reason, token_label(credential), detail) from None
        user = claims.get("sub")
        if not isinstance(user, str) or not user.strip():
            raise AuthRefused("token_sub", token_label(credential), "sub is empty")
        if len(user) > MAX_USER_LENGTH:
            raise AuthRefused("token_sub", token_label(credential), "sub is too long")
        ident = claims.get("jti")
        label = ident if isinstance(ident, str) and ident else user
        key_id = f"jwt:{label[:_KEY_ID_MAX]}"
        permissions = await self._permissions(user, claims, key_id)
        return Principal(user=user, key_id=key_id, permissions=permissions)

    async def _permissions(self, user: str, claims: dict[str, Any], key_id: str) -> UserPermissions:
        if self.trust_claims and self.claims_namespace in claims:
            claim = claims[self.claims_namespace]
            if not isinstance(claim, dict):
                raise AuthRefused(
                    "token_permissions", _safe(key_id), "the permissions claim is not an object"
                )
            try:
                return UserPermissions.from_wire(claim)
            except InvalidRequest as exc:
                raise AuthRefused("token_permissions", _safe(key_id), exc.message) from None
        if self.permission_source is None:
            return UserPermissions()
        return await self.permission_source.permissions(user)


def refusal_reason(exc: jwt.PyJWTError) -> RefusalReason:
    """Which check a PyJWT error stands for. Subclasses before their bases: an
    ``InvalidSignatureError`` is also a ``DecodeError``."""
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "token_alg"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "token_signature"
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token_expired"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return _CLAIM_REASONS.get(exc.claim, "token_invalid")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token_iat" if "(iat)" in str(exc) else "token_nbf"
    if isinstance(exc, jwt.InvalidIssuedAtError):
        return "token_iat"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "token_aud"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "token_iss"
    # By name: PyJWT 2.10 added these two, and 2.8 is still allowed.
    if type(exc).__name__ == "InvalidSubjectError":
        return "token_sub"
    if type(exc).__name__ == "InvalidJTIError":
        return "token_jti"
    if isinstance(exc, jwt.DecodeError):
        # A claim of the wrong type is a DecodeError raised after the signature verified.
        message = str(exc)
        for claim in ("exp", "nbf"):
            if f"({claim})" in message:
                return _CLAIM_REASONS[claim]
        return "token_malformed"
    return "token_invalid"


def token_label(credential: str) -> str | None:
    """``jwt:<jti or sub>`` of a token, read without verifying it, for the log line of a
    refusal: the operator can tell whose token failed. Never the token itself; characters that
    could forge a log line are replaced."""
    try:
        claims = jwt.decode(credential, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    for name in ("jti", "sub"):
        value = claims.get(name)
        if isinstance(value, str) and value.strip():
            return _safe(f"jwt:{value[:_KEY_ID_MAX]}")
    return None


def _safe(label: str) -> str:
    return _LABEL_UNSAFE.sub("?", label)
