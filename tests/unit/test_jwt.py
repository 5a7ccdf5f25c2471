"""JWT verification: what is accepted, and every way a token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from robota_proxy.app import create_app
from robota_proxy.policy.jwt import (
    JwtAuthenticator,
    JwtConfigError,
    refusal_reason,
    token_label,
    verification_key,
)
from robota_proxy.policy.principals import UserPermissions
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
    assert principal is not None
    assert (principal.user, principal.key_id) == ("alice", "jwt:t-1")
    assert principal.permissions == UserPermissions(rpm=7)


async def test_valid_rs256_and_es256_tokens(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key, algorithms = verification_key(None, pem_file(tmp_path, rsa_key), None)
    assert algorithms == ["RS256"]
    principal = await JwtAuthenticator(key, algorithms).authenticate(
        jwt.encode(claims(), rsa_key, algorithm="RS256")
    )
    assert principal is not None and principal.key_id == "jwt:alice"

    ec_key = ec.generate_private_key(ec.SECP256R1())
    key, algorithms = verification_key(None, pem_file(tmp_path, ec_key), None)
    assert algorithms == ["ES256"]
    token = jwt.encode(claims(), ec_key, algorithm="ES256")
    assert await JwtAuthenticator(key, algorithms).authenticate(token) is not None


def unsigned(payload: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


async def test_refused_tokens_name_the_failed_check() -> None:
    auth = hs(issuer="https://idp.example", audience="robota")
    good = {"iss": "https://idp.example", "aud": "robota"}
    now = int(time.time())
    assert await auth.authenticate(jwt.encode(claims(**good), SECRET, "HS256")) is not None
    refused = {
        "expired": (claims(**good, exp=now - 3600), "token_expired"),
        "not yet valid": (claims(**good, nbf=now + 3600), "token_nbf"),
        "nbf not a number": (claims(**good, nbf="soon"), "token_nbf"),
        "issued in the future": (claims(**good, iat=now + 3600), "token_iat"),
        "wrong audience": (claims(iss=good["iss"], aud="other"), "token_aud"),
        "no audience": (claims(iss=good["iss"]), "token_aud"),
        "wrong issuer": (claims(iss="https://evil", aud="robota"), "token_iss"),
        "no issuer": (claims(aud="robota"), "token_iss"),
        "no exp": ({"sub": "alice", **good}, "token_exp"),
        "exp not a number": (claims(**good, exp="tomorrow"), "token_exp"),
        "no sub": ({"exp": now + 60, **good}, "token_sub"),
        "empty sub": (claims(**good, sub=" "), "token_sub"),
        "sub not a string": (claims(**good, sub=7), "token_sub"),
        "jti not a string": (claims(**good, jti=7), "token_jti"),
    }
    for case, (payload, reason) in refused.items():
        token = jwt.encode(payload, SECRET, "HS256")
        assert (await refusal(auth, token)).reason == reason, case
    unverified = {
        "wrong signature": (jwt.encode(claims(**good), SECRET + "x", "HS256"), "token_signature"),
        "alg none": (unsigned(claims(**good)), "token_alg"),
        "other hmac algorithm": (jwt.encode(claims(**good), SECRET, "HS512"), "token_alg"),
        "garbage": ("a.b.c", "token_malformed"),
    }
    for case, (token, reason) in unverified.items():
        refused_token = await refusal(auth, token)
        assert refused_token.reason == reason, case
        # Before the signature verified, the log is told the claims are the caller's word.
        assert refused_token.detail is not None and "claims unverified" in refused_token.detail


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
        (jwt.InvalidKeyError("bad key"), "token_invalid"),
    ]
    for error, reason in cases:
        assert refusal_reason(error) == reason, error


async def test_leeway_accepts_slightly_expired() -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 5), SECRET, "HS256")
    assert await hs(leeway_seconds=60).authenticate(token) is not None
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
    assert principal is not None
    assert principal.permissions == UserPermissions(
        allowed_providers=("mock",), allowed_features=("chat",), rpm=50
    )
    # Without the claim: the user record.
    plain = await auth.authenticate(jwt.encode(claims(), SECRET, "HS256"))
    assert plain is not None and plain.permissions == UserPermissions(rpm=1)
    for bad in ({"allowedFeatures": ["video"]}, {"nope": 1}, ["chat"], "chat"):
        token = jwt.encode(claims(**{NS: bad}), SECRET, "HS256")
        refused = await refusal(auth, token)
        assert (refused.reason, refused.public_id) == ("token_permissions", "jwt:alice"), bad


async def test_claims_ignored_when_not_trusted() -> None:
    users = Users({"alice": UserPermissions(rpm=1)})
    auth = hs(permissions=users, trust_claims=False, claims_namespace=NS)
    token = jwt.encode(claims(**{NS: {"rpm": 1000}}), SECRET, "HS256")
    principal = await auth.authenticate(token)
    assert principal is not None and principal.permissions == UserPermissions(rpm=1)


def test_configuration_errors(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = pem_file(tmp_path, rsa_key)
    with pytest.raises(JwtConfigError, match="not both"):
        verification_key(SECRET, path, None)
    with pytest.raises(JwtConfigError, match="cannot be used"):
        verification_key(SECRET, None, ["RS256"])
    with pytest.raises(JwtConfigError, match="cannot be used"):
        verification_key(None, path, ["HS256"])
    with pytest.raises(JwtConfigError, match="cannot be used"):
        verification_key(SECRET, None, ["none"])
    with pytest.raises(JwtConfigError, match="PEM"):
        verification_key(None, tmp_path / "missing.pem", None)
    with pytest.raises(JwtConfigError, match="none"):
        JwtAuthenticator(SECRET, ["HS256", "none"])
    assert verification_key(SECRET, None, ["HS384"])[1] == ["HS384"]


def test_a_proxy_with_unusable_jwt_settings_does_not_start(tmp_path: Path) -> None:
    """Refusing to build the app beats a proxy that answers 401 to every token."""
    with pytest.raises(JwtConfigError, match="ROBOTA_JWT_PUBLIC_KEY_FILE"):
        create_app(Settings(jwt_public_key_file=tmp_path / "missing.pem"))
    with pytest.raises(JwtConfigError, match="cannot be used"):
        create_app(Settings(jwt_secret=SECRET, jwt_algorithms=["RS256"]))
    assert create_app(Settings(jwt_secret=SECRET)) is not None
