"""JWT verification: what is accepted, and every way a token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import anyio
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from starlette.applications import Starlette

from robota_proxy.app import create_app
from robota_proxy.policy.jwt import (
    JwtAuthenticator,
    JwtConfigError,
    refusal_reason,
    token_label,
    verification_key,
)
from robota_proxy.policy.principals import Principal, UserPermissions
from robota_proxy.policy.refusals import AuthRefused
from robota_proxy.settings import Settings

pytestmark = pytest.mark.anyio

SECRET = "jwt-test-secret-" + "0123456789abcdef" * 4
NS = "https://robota.dev/permissions"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "exp": now + 300, "iat": now, **extra}


class Users:
    def __init__(self, table: dict[str, UserPermissions]) -> None:
        self.table = table

    async def permissions(self, user: str) -> UserPermissions:
        return self.table.get(user, UserPermissions())


def hs(**options: Any) -> JwtAuthenticator:
    key, algorithms = verification_key(SECRET, None, None)
    return JwtAuthenticator(key, algorithms, **options)


async def refusal(auth: JwtAuthenticator, token: str) -> AuthRefused:
    with pytest.raises(AuthRefused) as refused:
        await auth.authenticate(token)
    return refused.value


def pem_file(tmp_path: Path, private: Any) -> Path:
    path = tmp_path / "public.pem"
    path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


async def test_valid_hs256_token() -> None:
    users = Users({"alice": UserPermissions(rpm=7)})
    principal = await hs(permissions=users).authenticate(
        jwt.encode(claims(jti="t-1"), SECRET, algorithm="HS256")
    )
    assert principal == Principal("alice", "jwt:t-1", UserPermissions(rpm=7))


async def test_valid_rs256_and_es256_tokens(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key, algorithms = verification_key(None, pem_file(tmp_path, rsa_key), None)
    assert algorithms == ["RS256"]
    principal = await JwtAuthenticator(key, algorithms).authenticate(
        jwt.encode(claims(), rsa_key, algorithm="RS256")
    )
    assert principal == Principal("alice", "jwt:alice", UserPermissions())

    ec_key = ec.generate_private_key(ec.SECP256R1())
    key, algorithms = verification_key(None, pem_file(tmp_path, ec_key), None)
    assert algorithms == ["ES256"]
    token = jwt.encode(claims(), ec_key, algorithm="ES256")
    principal = await JwtAuthenticator(key, algorithms).authenticate(token)
    assert principal == Principal("alice", "jwt:alice", UserPermissions())


def unsigned(payload: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


async def test_refused_tokens_name_the_failed_check() -> None:
    auth = hs(issuer="https://idp.example", audience="robota")
    good = {"iss": "https://idp.example", "aud": "robota"}
    now = int(time.time())
    principal = await auth.authenticate(jwt.encode(claims(**good), SECRET, "HS256"))
    assert principal == Principal("alice", "jwt:alice", UserPermissions())
    refused = {
        "expired": (claims(**good, exp=now - 3600), "token_expired"),
        "not yet valid": (claims(**good, nbf=now + 3600), "token_nbf"),
        "nbf not a number": (claims(**good, nbf="soon"), "token_nbf"),
        "issued in the future": (claims(**good, iat=now + 3600), "token_iat"),
        "iat not a number": (claims(**good, iat="now"), "token_iat"),
        "wrong audience": (claims(iss=good["iss"], aud="other"), "token_aud"),
        "no audience": (claims(iss=good["iss"]), "token_aud"),
        "wrong issuer": (claims(iss="https://evil", aud="robota"), "token_iss"),
        "no issuer": (claims(aud="robota"), "token_iss"),
        "no exp": ({"sub": "alice", **good}, "token_exp"),
        "exp not a number": (claims(**good, exp="tomorrow"), "token_exp"),
        "no sub": ({"exp": now + 60, **good}, "token_sub"),
        "empty sub": (claims(**good, sub=" "), "token_sub"),
        "sub not a string": (claims(**good, sub=7), "token_sub"),
        "sub of 201 characters": (claims(**good, sub="u" * 201), "token_sub"),
        "jti not a string": (claims(**good, jti=7), "token_jti"),
    }
    for case, (payload, reason) in refused.items():
        token = jwt.encode(payload, SECRET, "HS256")
        assert (await refusal(auth, token)).reason == reason, case
    unverified = {
        "wrong signature": (
            jwt.encode(claims(**good), SECRET + "x", "HS256"),
            ("token_signature", "InvalidSignatureError"),
        ),
        "alg none": (unsigned(claims(**good)), ("token_alg", "InvalidAlgorithmError")),
        "other hmac algorithm": (
            jwt.encode(claims(**good), SECRET, "HS512"),
            ("token_alg", "InvalidAlgorithmError"),
        ),
        "garbage": ("a.b.c", ("token_malformed", "DecodeError")),
    }
    for case, (token, (reason, error)) in unverified.items():
        refused_token = await refusal(auth, token)
        # Before the signature verified, the log is told the claims are the caller's word.
        assert (refused_token.reason, refused_token.detail) == (
            reason,
            f"{error}; claims unverified",
        ), case


async def test_refusals_name_the_token_by_jti_or_sub_never_the_token() -> None:
    now = int(time.time())
    expired = jwt.encode(claims(jti="t-9", exp=now - 3600), SECRET, "HS256")
    refused = await refusal(hs(), expired)
    assert (refused.reason, refused.public_id) == ("token_expired", "jwt:t-9")
    assert refused.detail == "ExpiredSignatureError"
    forged = jwt.encode(claims(), SECRET + "x", "HS256")
    assert (await refusal(hs(), forged)).public_id == "jwt:alice"
    assert (await refusal(hs(), "a.b.c")).public_id is None
    # Claims are read unverified for the log: nothing in them may forge a log line.
    assert token_label(jwt.encode(claims(sub="al\nice x"), SECRET, "HS256")) == "jwt:al?ice?x"
    assert token_label(jwt.encode(claims(jti="j" * 100), SECRET, "HS256")) == "jwt:" + "j" * 60
    for token in (expired, forged):
        assert token not in repr(refused) and SECRET not in str(refused.detail)


def test_refusal_reason_mapping_of_pyjwt_errors() -> None:
    cases: list[tuple[jwt.PyJWTError, str]] = [
        (jwt.InvalidSignatureError("Signature verification failed"), "token_signature"),
        (jwt.DecodeError("Expiration Time claim (exp) must be an integer."), "token_exp"),
        (jwt.DecodeError("Not Before claim (nbf) must be an integer."), "token_nbf"),
        (jwt.DecodeError("Invalid header padding"), "token_malformed"),
        (jwt.ImmatureSignatureError("The token is not yet valid (iat)"), "token_iat"),
        (jwt.MissingRequiredClaimError("iss"), "token_iss"),
        (jwt.MissingRequiredClaimError("custom"), "token_invalid"),
        (jwt.InvalidIssuedAtError("Issued At claim (iat) must be an integer."), "token_iat"),
        (jwt.ImmatureSignatureError("The token is not yet valid (nbf)"), "token_nbf"),
        (jwt.InvalidAudienceError("Audience doesn't match"), "token_aud"),
        (jwt.InvalidIssuerError("Invalid issuer"), "token_iss"),
        (jwt.ExpiredSignatureError("Signature has expired"), "token_expired"),
        (jwt.InvalidAlgorithmError("The specified alg value is not allowed"), "token_alg"),
        (jwt.InvalidKeyError("bad key"), "token_invalid"),
    ]
    for error, reason in cases:
        assert refusal_reason(error) == reason, error


async def test_leeway_accepts_slightly_expired() -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 5), SECRET, "HS256")
    principal = await hs(leeway_seconds=60).authenticate(token)
    assert principal == Principal("alice", "jwt:alice", UserPermissions())
    assert (await refusal(hs(leeway_seconds=0), token)).reason == "token_expired"


async def test_rsa_deployment_refuses_hmac_signed_with_the_public_key(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = pem_file(tmp_path, rsa_key)
    key, algorithms = verification_key(None, path, None)
    auth = JwtAuthenticator(key, algorithms)
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps(claims()).encode()).rstrip(b"=")
    signing_input = header + b"." + payload
    signature = hmac.new(path.read_bytes(), signing_input, hashlib.sha256).digest()
    forged = (signing_input + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()
    assert (await refusal(auth, forged)).reason == "token_alg"
    assert (await refusal(auth, unsigned(claims()))).reason == "token_alg"


async def test_trusted_claims() -> None:
    users = Users({"alice": UserPermissions(rpm=1)})
    auth = hs(permissions=users, trust_claims=True, claims_namespace=NS)
    wire = {"allowedProviders": ["mock"], "allowedFeatures": ["chat"], "rpm": 50}
    principal = await auth.authenticate(jwt.encode(claims(**{NS: wire}), SECRET, "HS256"))
    assert principal == Principal(
        "alice",
        "jwt:alice",
        UserPermissions(allowed_providers=("mock",), allowed_features=("chat",), rpm=50),
    )
    # Without the claim: the user record.
    plain = await auth.authenticate(jwt.encode(claims(), SECRET, "HS256"))
    assert plain == Principal("alice", "jwt:alice", UserPermissions(rpm=1))
    # The log says what is wrong with the claim, so the operator can fix the identity provider.
    not_an_object = "the permissions claim is not an object"
    for bad, detail in (
        (
            {"allowedFeatures": ["video"]},
            "unknown feature(s) video; known: chat, stream, tools, embeddings",
        ),
        ({"nope": 1}, "unknown permission field 'nope'"),
        (["chat"], not_an_object),
        ("chat", not_an_object),
    ):
        token = jwt.encode(claims(**{NS: bad}), SECRET, "HS256")
        refused = await refusal(auth, token)
        assert (refused.reason, refused.public_id, refused.detail) == (
            "token_permissions",
            "jwt:alice",
            detail,
        ), bad


async def test_trusted_claims_are_read_from_the_documented_claim_by_default() -> None:
    """README: the claim is ``https://robota.dev/permissions`` unless configured otherwise."""
    token = jwt.encode(claims(**{"https://robota.dev/permissions": {"rpm": 5}}), SECRET, "HS256")
    principal = await hs(trust_claims=True).authenticate(token)
    assert principal == Principal("alice", "jwt:alice", UserPermissions(rpm=5))


async def test_claims_ignored_when_not_trusted() -> None:
    users = Users({"alice": UserPermissions(rpm=1)})
    auth = hs(permissions=users, trust_claims=False, claims_namespace=NS)
    token = jwt.encode(claims(**{NS: {"rpm": 1000}}), SECRET, "HS256")
    assert await auth.authenticate(token) == Principal("alice", "jwt:alice", UserPermissions(rpm=1))
    # Not trusting the claims is the default: a token cannot grant itself permissions.
    default = hs(permissions=users)
    assert await default.authenticate(token) == Principal(
        "alice", "jwt:alice", UserPermissions(rpm=1)
    )


def test_configuration_errors(tmp_path: Path) -> None:
    """The operator sees these at start, so each one says exactly what to change."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = pem_file(tmp_path, rsa_key)
    hmac_only = "allowed: HS256, HS384, HS512"
    cases: list[tuple[Any, str]] = [
        (
            lambda: verification_key(SECRET, path, None),
            "set ROBOTA_JWT_SECRET or ROBOTA_JWT_PUBLIC_KEY_FILE, not both: one deployment "
            "verifies one kind of signature",
        ),
        (
            lambda: verification_key(SECRET, None, ["RS256", "ES256"]),
            f"ROBOTA_JWT_ALGORITHMS RS256, ES256 cannot be used with this key; {hmac_only}",
        ),
        (
            lambda: verification_key(None, path, ["HS256"]),
            "ROBOTA_JWT_ALGORITHMS HS256 cannot be used with this key; "
            "allowed: RS256, RS384, RS512, PS256, PS384, PS512",
        ),
        (
            lambda: verification_key(SECRET, None, ["none"]),
            f"ROBOTA_JWT_ALGORITHMS none cannot be used with this key; {hmac_only}",
        ),
        (
            lambda: verification_key(None, tmp_path / "missing.pem", None),
            f"ROBOTA_JWT_PUBLIC_KEY_FILE {str(tmp_path / 'missing.pem')!r} is not a readable "
            "PEM public key (FileNotFoundError)",
        ),
        (lambda: verification_key(None, None, None), "no JWT secret or public key configured"),
        (lambda: verification_key("", None, ["HS256"]), "no JWT secret or public key configured"),
        (
            lambda: JwtAuthenticator(SECRET, ["HS256", "none"]),
            "JWT algorithms must be listed, and 'none' is never allowed",
        ),
        (
            lambda: JwtAuthenticator(SECRET, []),
            "JWT algorithms must be listed, and 'none' is never allowed",
        ),
    ]
    for build, message in cases:
        with pytest.raises(JwtConfigError) as error:
            build()
        assert str(error.value) == message
    assert verification_key(SECRET, None, ["HS384"]) == (SECRET, ["HS384"])
    assert verification_key(SECRET, None, None) == (SECRET, ["HS256"])


def test_a_public_key_file_must_hold_an_rsa_or_ec_public_key(tmp_path: Path) -> None:
    """Ed25519 (EdDSA) is a valid PEM public key PyJWT could use, but this proxy's algorithm
    table has no entry for it: refused at start rather than refusing every token later."""
    ed = pem_file(tmp_path, ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(JwtConfigError) as error:
        verification_key(None, ed, None)
    assert str(error.value) == "the JWT public key must be an RSA or EC key"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    with pytest.raises(JwtConfigError) as error:
        verification_key(None, garbage, None)
    assert str(error.value) == (
        f"ROBOTA_JWT_PUBLIC_KEY_FILE {str(garbage)!r} is not a readable PEM public key (ValueError)"
    )


async def test_a_missing_required_claim_is_named_before_the_clock_checks() -> None:
    """With an issuer and audience configured, iss and aud are required claims: a token
    without them is refused for that, even when it is also expired or not valid yet, so the
    caller fixes the token rather than only the clock."""
    auth = hs(issuer="https://idp.example", audience="robota")
    now = int(time.time())
    expired = claims(aud="robota", exp=now - 3600)
    assert (await refusal(auth, jwt.encode(expired, SECRET, "HS256"))).reason == "token_iss"
    early = claims(iss="https://idp.example", nbf=now + 3600)
    assert (await refusal(auth, jwt.encode(early, SECRET, "HS256"))).reason == "token_aud"


async def test_the_key_id_is_the_jti_or_else_the_sub_cut_to_60_characters() -> None:
    auth = hs()
    cases = [
        (claims(jti="t-1"), "jwt:t-1"),
        (claims(jti=""), "jwt:alice"),  # an empty jti names nothing
        (claims(jti="j" * 100), "jwt:" + "j" * 60),
        (claims(sub="s" * 100), "jwt:" + "s" * 60),
    ]
    for payload, key_id in cases:
        principal = await auth.authenticate(jwt.encode(payload, SECRET, "HS256"))
        assert principal.key_id == key_id, payload


async def test_an_empty_sub_is_refused_and_logged_by_the_jti() -> None:
    token = jwt.encode(claims(sub="  ", jti="t-5"), SECRET, "HS256")
    refused = await refusal(hs(), token)
    assert (refused.reason, refused.public_id, refused.detail) == (
        "token_sub",
        "jwt:t-5",
        "sub is empty",
    )


async def test_a_sub_longer_than_a_user_id_is_refused_and_one_of_200_accepted() -> None:
    """The ledger, the users table and the counters all hold a user id of 200 characters
    whole; a longer sub would be cut in the ledger but not in the counters, splitting one
    caller's spend in two, so it is refused at the edge."""
    refused = await refusal(hs(), jwt.encode(claims(sub="u" * 201, jti="t-6"), SECRET, "HS256"))
    assert (refused.reason, refused.public_id, refused.detail) == (
        "token_sub",
        "jwt:t-6",
        "sub is too long",
    )
    principal = await hs().authenticate(jwt.encode(claims(sub="u" * 200), SECRET, "HS256"))
    assert principal.user == "u" * 200


async def test_the_default_leeway_is_30_seconds() -> None:
    """Clocks drift: a token that expired a few seconds ago is still accepted, one that
    expired 30 seconds ago is not."""
    # exp is whole seconds: start at the top of a second so "30 seconds ago" stays
    # under 31.
    await anyio.sleep(1 - time.time() % 1)
    now = int(time.time())
    auth = hs()
    stale = jwt.encode(claims(exp=now - 30), SECRET, "HS256")
    assert (await refusal(auth, stale)).reason == "token_expired"
    recent = jwt.encode(claims(exp=now - 20), SECRET, "HS256")
    assert await auth.authenticate(recent) == Principal("alice", "jwt:alice", UserPermissions())


def test_a_proxy_with_unusable_jwt_settings_does_not_start(tmp_path: Path) -> None:
    """Refusing to build the app beats a proxy that answers 401 to every token."""
    with pytest.raises(JwtConfigError, match="ROBOTA_JWT_PUBLIC_KEY_FILE"):
        create_app(Settings(jwt_public_key_file=tmp_path / "missing.pem"))
    with pytest.raises(JwtConfigError, match="cannot be used"):
        create_app(Settings(jwt_secret=SECRET, jwt_algorithms=["RS256"]))
    assert isinstance(create_app(Settings(jwt_secret=SECRET)), Starlette)
