"""``AuthRefused``: why a credential was refused, in a form the middleware can act on.

An authenticator that knows *why* it refuses raises ``AuthRefused`` instead of returning
``None``; ``AuthMiddleware`` turns the reason into the 401 message an honest caller can act on
and logs the reason with the credential's public id. The reasons are finer than the messages:
an unknown key id, a wrong secret and a revoked key are three reasons for the operator's log but
one message for the caller, so a guesser cannot tell a live key id from a dead one. Only a
caller who holds a complete, correct credential learns more (that it expired, or which token
check failed): by then there is nothing left to guess.

Kept apart from the authenticators so that every one of them, and the middleware, can import it
without importing each other.
"""

from __future__ import annotations

from typing import Literal, get_args

#: Every way a credential is refused. The header reasons come from the middleware itself.
RefusalReason = Literal[
    # the Authorization header
    "missing",  # no Authorization header at all
    "malformed",  # not "Bearer <one credential>": another scheme, empty, spaces, control bytes
    # proxy keys (rk_...), static keys and whatever a host's authenticator knows
    "malformed_key",  # starts with rk_ but is not rk_<8-char id>_<43-char secret>
    "unknown_key",  # no such key id, or no configured key matches
    "wrong_secret",  # the key id exists; the secret does not match it
    "revoked",  # the whole key matches and was revoked
    "expired",  # the whole key matches and its expiry has passed
    "user_revoked",  # the whole key matches and its user was revoked (users revoke)
    # JWTs, one reason per check
    "token_malformed",  # not decodable: bad base64, bad JSON, bad header
    "token_alg",  # alg not among the configured algorithms (none, HS256 to an RSA key...)
    "token_signature",  # the signature does not verify
    "token_exp",  # exp missing or not a number
    "token_expired",  # exp in the past (beyond the leeway)
    "token_nbf",  # nbf in the future, or not a number
    "token_iat",  # iat in the future, or not a number
    "token_aud",  # aud missing or not the configured audience
    "token_iss",  # iss missing or not the configured issuer
    "token_sub",  # sub missing, empty or not a string
    "token_jti",  # jti present but not a string
    "token_permissions",  # the trusted permissions claim is not valid
    "token_user_revoked",  # a valid token whose sub (the user) was revoked
    "token_invalid",  # any other verification failure
]

REFUSAL_REASONS: frozenset[str] = frozenset(get_args(RefusalReason))


class AuthRefused(Exception):
    """A refused credential: ``reason`` for the message and the log, ``public_id`` to name the
    credential in the log (an ``rk_`` key's id, ``jwt:<jti or sub>``, a static key's
    ``key_<hex>``), ``detail`` a non-secret note for the log only.

    Never put the credential, the token or any part of a secret in any of the three."""

    def __init__(
        self, reason: RefusalReason, public_id: str | None = None, detail: str | None = None
    ) -> None:
        super().__init__(reason)
        self.reason: RefusalReason = reason
        self.public_id = public_id
        self.detail = detail

    def __repr__(self) -> str:
        return f"AuthRefused({self.reason!r}, public_id={self.public_id!r})"
