"""JWT bearer tokens through real proxy processes: HS256 with a shared secret (permissions
from the users table), RS256 with a PEM public key file (permissions from a trusted claim);
every malformed or unfit token refused with 401 naming the failed check, and the proxy's log
naming the reason and the token's jti, never the token."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from robota_proxy.testing import FakeVendors
from tests.e2e.auth_support import JWT_SECRET, chat, chat_body, cli
from tests.e2e.conftest import ProxyProcess, start_proxy, stop_proxy, vendor_env

pytestmark = pytest.mark.e2e

ISSUER = "https://idp.example.test"
AUDIENCE = "robota-tests"
NAMESPACE = "https://robota.dev/permissions"


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "ivy", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300, **extra}


def hs256(**extra: Any) -> str:
    return jwt.encode(claims(**extra), JWT_SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def hs_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('jwt-hs') / 'robota.db'}"


def _env(fake: FakeVendors, database_url: str, **extra: str) -> dict[str, str]:
    return {
        **vendor_env(fake),
        "ROBOTA_DATABASE_URL": database_url,
        "ROBOTA_JWT_ISSUER": ISSUER,
        "ROBOTA_JWT_AUDIENCE": AUDIENCE,
        "ROBOTA_JWT_LEEWAY_SECONDS": "5",
        "ROBOTA_AUTH_FAILURES_PER_MINUTE": "1000",
        **extra,
    }


@pytest.fixture(scope="module")
def hs_proxy(
    fake_server: FakeVendors, hs_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    env = _env(fake_server, hs_database, ROBOTA_JWT_SECRET=JWT_SECRET)
    running = start_proxy(env, tmp_path_factory.mktemp("hs") / "proxy.log")
    yield running
    stop_proxy(running)


@pytest.fixture(scope="module")
def rs_proxy(
    fake_server: FakeVendors, rsa_key: rsa.RSAPrivateKey, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    folder = tmp_path_factory.mktemp("rs")
    pem = folder / "public.pem"
    pem.write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    env = _env(
        fake_server,
        f"sqlite:///{folder / 'robota.db'}",
        ROBOTA_JWT_PUBLIC_KEY_FILE=str(pem),
        ROBOTA_JWT_TRUST_CLAIMS="true",
    )
    running = start_proxy(env, folder / "proxy.log")
    yield running
    stop_proxy(running)


def unsigned(payload: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


def test_valid_hs256_token_is_accepted(hs_proxy: ProxyProcess) -> None:
    response = chat(hs_proxy.url, hs256())
    assert response.status_code == 200, response.text


def test_refused_tokens_say_which_check_failed(
    hs_proxy: ProxyProcess, rsa_key: rsa.RSAPrivateKey
) -> None:
    now = int(time.time())
    no_exp = {k: v for k, v in claims(jti="e2e-no-exp").items() if k != "exp"}
    refused = {
        "e2e-expired": (
            hs256(jti="e2e-expired", exp=now - 120),
            "token_expired",
            "the token has expired (exp is in the past): get a fresh one",
        ),
        "e2e-nbf": (
            hs256(jti="e2e-nbf", nbf=now + 120),
            "token_nbf",
            "invalid token: not valid yet (nbf is in the future)",
        ),
        "e2e-aud": (
            hs256(jti="e2e-aud", aud="someone-else"),
            "token_aud",
            "invalid token: aud is missing or not this proxy's audience",
        ),
        "e2e-iss": (
            hs256(jti="e2e-iss", iss="https://evil.example"),
            "token_iss",
            "invalid token: iss is missing or not the trusted issuer",
        ),
        "e2e-signature": (
            jwt.encode(claims(jti="e2e-signature"), JWT_SECRET + "-other", algorithm="HS256"),
            "token_signature",
            "invalid token: the signature does not verify",
        ),
        "e2e-none": (
            unsigned(claims(jti="e2e-none")),
            "token_alg",
            "invalid token: its alg is not one this proxy accepts",
        ),
        "e2e-rs256": (
            jwt.encode(claims(jti="e2e-rs256"), rsa_key, algorithm="RS256"),
            "token_alg",
            "invalid token: its alg is not one this proxy accepts",
        ),
        "e2e-no-exp": (
            jwt.encode(no_exp, JWT_SECRET, algorithm="HS256"),
            "token_exp",
            "invalid token: exp is required and must be a number",
        ),
    }
    for jti, (token, reason, message) in refused.items():
        response = chat(hs_proxy.url, token)
        assert response.status_code == 401, jti
        assert response.json()["error"]["code"] == "unauthenticated"
        assert response.json()["error"]["message"] == message, jti
        assert token not in response.text
        request_id = response.json()["error"]["requestId"]
        line = f"authentication refused: reason={reason} id=jwt:{jti} client=127.0.0.1 "
        log = hs_proxy.log_once_it_has(line)
        (logged,) = [entry for entry in log.splitlines() if line in entry]
        assert f"path=/ai/chat request={request_id}" in logged
    log = hs_proxy.log()
    assert JWT_SECRET not in log
    for token, _, _ in refused.values():
        assert token not in log
        signature = token.rsplit(".", 1)[1]
        assert signature == "" or signature not in log  # not even the signature part


def test_hs256_user_permissions_come_from_the_users_table(
    hs_proxy: ProxyProcess, hs_database: str, fake: FakeVendors
) -> None:
    done = cli(hs_database, "users", "set", "judy", "--providers", "mock")
    assert done.returncode == 0, done.stderr
    token = hs256(sub="judy", **{NAMESPACE: {"allowedProviders": ["openai"]}})  # not trusted
    assert chat(hs_proxy.url, token).status_code == 200
    denied = chat(hs_proxy.url, token, chat_body("openai", "gpt-4o-mini"))
    assert denied.status_code == 403
    assert "provider 'openai'" in denied.json()["error"]["message"]
    assert fake.requests == []


def test_valid_rs256_token_is_accepted(rs_proxy: ProxyProcess, rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert chat(rs_proxy.url, token).status_code == 200
    # The HMAC secret of another deployment means nothing here.
    for token in (hs256(), unsigned(claims())):
        refused = chat(rs_proxy.url, token)
        assert refused.status_code == 401
        assert refused.json()["error"]["message"] == (
            "invalid token: its alg is not one this proxy accepts"
        )


def test_trusted_claims_set_the_permissions(
    rs_proxy: ProxyProcess, rsa_key: rsa.RSAPrivateKey, fake: FakeVendors
) -> None:
    wire = {
        "allowedProviders": ["openai"],
        "allowedModels": ["gpt-4o*"],
        "allowedFeatures": ["chat"],
    }
    token = jwt.encode(claims(**{NAMESPACE: wire}), rsa_key, algorithm="RS256")
    allowed = chat(rs_proxy.url, token, chat_body("openai", "gpt-4o-mini"))
    assert allowed.status_code == 200, allowed.text
    for body, path, words in [
        (chat_body(), "/ai/chat", "provider 'mock'"),
        (chat_body("openai", "o3-mini"), "/ai/chat", "model 'o3-mini'"),
        (chat_body("openai", "gpt-4o-mini"), "/ai/chat/stream", "feature 'stream'"),
    ]:
        response = httpx.post(
            f"{rs_proxy.url}{path}", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 403, response.text
        assert words in response.json()["error"]["message"]
    assert [request.model for request in fake.requests] == ["gpt-4o-mini"]
    bad_claim = jwt.encode(
        claims(**{NAMESPACE: {"allowedFeatures": ["teleport"]}}), rsa_key, algorithm="RS256"
    )
    refused = chat(rs_proxy.url, bad_claim)
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == (
        "invalid token: the permissions claim is not valid"
    )
    assert "reason=token_permissions id=jwt:ivy " in rs_proxy.log_once_it_has(
        "reason=token_permissions"
    )
