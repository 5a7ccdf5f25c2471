"""Key generation, parsing, hashing and expiry parsing; the key store and its authenticator
on a real SQLite file."""

from __future__ import annotations

import asyncio
import socket
import string
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from robota_proxy.errors import UpstreamUnavailable
from robota_proxy.policy.authenticators import (
    CompositeAuthenticator,
    KeyStoreAuthenticator,
    looks_like_jwt,
)
from robota_proxy.policy.keys import (
    SECRET_LENGTH,
    generate_key,
    hash_key,
    looks_like_key,
    parse_expiry,
    parse_key_id,
    verify_key,
)
from robota_proxy.policy.principals import Authenticator, UserPermissions
from robota_proxy.policy.refusals import AuthRefused
from robota_proxy.policy.static_keys import StaticKeyAuthenticator, key_id
from robota_proxy.storage.database import Database
from robota_proxy.storage.key_store import KeyLookup, KeyStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_generated_keys_have_the_documented_shape() -> None:
    key_id, key = generate_key()
    assert key.startswith(f"rk_{key_id}_")
    assert len(key_id) == 8 and set(key_id) <= set(string.ascii_lowercase + string.digits)
    secret = key.split("_", 2)[2]
    assert len(secret) == SECRET_LENGTH  # 43 urlsafe chars = 256 bits
    assert parse_key_id(key) == key_id
    assert looks_like_key(key)


def test_generated_keys_are_unique() -> None:
    keys = {generate_key()[1] for _ in range(500)}
    assert len(keys) == 500


@pytest.mark.parametrize(
    "credential",
    [
        "rk_",
        "rk_abcdefgh",
        "rk_abcdefgh_short",
        "rk_ABCDEFGH_" + "a" * 43,  # ids are lowercase
        "rk_abcdefgh_" + "a" * 44,
        "rk_abcdefgh_" + "a" * 42 + "!",
        "sk-abcdefgh_" + "a" * 43,
    ],
)
def test_malformed_keys_have_no_id(credential: str) -> None:
    assert parse_key_id(credential) is None


def test_hash_and_verify() -> None:
    _, key = generate_key()
    stored = hash_key(key)
    assert len(stored) == 64 and key not in stored
    assert verify_key(key, stored)
    assert not verify_key(key[:-1] + ("A" if key[-1] != "A" else "B"), stored)


def test_expiry_durations_and_dates() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert parse_expiry("30d", now=now) == now + timedelta(days=30)
    assert parse_expiry("12h", now=now) == now + timedelta(hours=12)
    assert parse_expiry("90m", now=now) == now + timedelta(minutes=90)
    assert parse_expiry("2030-02-01", now=now) == datetime(2030, 2, 1, tzinfo=UTC)
    assert parse_expiry("2030-02-01T10:00:00+02:00", now=now) == datetime(2030, 2, 1, 8, tzinfo=UTC)
    for bad in ("soon", "0d", "30x", "2029-12-31", ""):
        with pytest.raises(ValueError):
            parse_expiry(bad, now=now)


def test_jwt_shape() -> None:
    assert looks_like_jwt("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln")
    assert looks_like_jwt("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.")
    assert not looks_like_jwt("dev-key")
    assert not looks_like_jwt("a.b")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[KeyStore]:
    database = Database(f"sqlite:///{tmp_path / 'keys.db'}")
    await database.open()
    yield KeyStore(database)
    await database.aclose()


async def test_store_never_keeps_the_key(store: KeyStore, tmp_path: Path) -> None:
    key, record = await store.create_key("alice", name="laptop")
    assert record.user == "alice" and record.status() == "active"
    assert key not in repr(record) and key not in str(record.to_wire())
    await store.database.aclose()
    assert key.encode() not in (tmp_path / "keys.db").read_bytes()
    assert hash_key(key).encode() in (tmp_path / "keys.db").read_bytes()


async def test_store_lists_shows_and_revokes(store: KeyStore) -> None:
    _, first = await store.create_key("alice")
    _, second = await store.create_key("bob", UserPermissions(rpm=3))
    assert [r.key_id for r in await store.list_keys()] == [first.key_id, second.key_id]
    assert [r.key_id for r in await store.list_keys("bob")] == [second.key_id]
    shown = await store.get_key(second.key_id)
    assert shown is not None and shown.permissions == UserPermissions(rpm=3)
    revoked = await store.revoke_key(first.key_id)
    assert revoked is not None and revoked.status() == "revoked"
    again = await store.revoke_key(first.key_id)
    assert again is not None and again.revoked_at == revoked.revoked_at
    assert await store.revoke_key("missing1") is None
    assert await store.get_key("missing1") is None


async def test_user_permissions_are_replaced(store: KeyStore) -> None:
    assert await store.get_user("carol") is None
    await store.set_user_permissions("carol", UserPermissions(rpm=5, tpm=10))
    record = await store.set_user_permissions("carol", UserPermissions(tpm=20))
    assert record.permissions == UserPermissions(tpm=20)
    with pytest.raises(ValueError):
        await store.set_user_permissions("  ", UserPermissions())


async def test_authenticator_overlays_key_on_user(store: KeyStore) -> None:
    await store.set_user_permissions(
        "alice", UserPermissions(allowed_providers=("openai",), rpm=10, tpm=100)
    )
    key, record = await store.create_key("alice", UserPermissions(rpm=2))
    auth = KeyStoreAuthenticator(store, cache_seconds=0)
    principal = await auth.authenticate(key)
    assert principal is not None
    assert (principal.user, principal.key_id) == ("alice", record.key_id)
    assert principal.permissions == UserPermissions(allowed_providers=("openai",), rpm=2, tpm=100)
    await auth.flush()
    touched = await store.get_key(record.key_id)
    assert touched is not None and touched.last_used_at is not None


async def refusal(auth: Authenticator, credential: str) -> tuple[str, str | None]:
    """The reason and public id of a refusal."""
    with pytest.raises(AuthRefused) as refused:
        await auth.authenticate(credential)
    return refused.value.reason, refused.value.public_id


async def test_authenticator_refuses_wrong_revoked_and_expired(store: KeyStore) -> None:
    auth = KeyStoreAuthenticator(store, cache_seconds=0)
    key, record = await store.create_key("alice")
    wrong_secret = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert await refusal(auth, wrong_secret) == ("wrong_secret", record.key_id)
    assert await refusal(auth, "rk_zzzzzzzz_" + "a" * 43) == ("unknown_key", "zzzzzzzz")
    assert await refusal(auth, "rk_short") == ("malformed_key", None)
    assert await refusal(auth, "not-a-key") == ("malformed_key", None)
    await store.revoke_key(record.key_id)
    assert await refusal(auth, key) == ("revoked", record.key_id)
    # A revoked key with the wrong secret is a wrong secret: its state stays unknown.
    assert await refusal(auth, wrong_secret) == ("wrong_secret", record.key_id)
    expiring, expired = await store.create_key(
        "alice", expires_at=datetime.now(UTC) - timedelta(seconds=1)
    )
    assert await refusal(auth, expiring) == ("expired", expired.key_id)
    assert await refusal(auth, expiring[:-1] + "!") == ("malformed_key", None)


async def test_cached_lookup_until_the_ttl(store: KeyStore) -> None:
    """With a long TTL the cached row answers (no timing involved): proves the cache is
    used; the e2e tests prove the 1 s bound across processes."""
    auth = KeyStoreAuthenticator(store, cache_seconds=60)
    key, record = await store.create_key("alice")
    assert await auth.authenticate(key) is not None
    await store.revoke_key(record.key_id)
    assert await auth.authenticate(key) is not None  # still cached
    fresh = KeyStoreAuthenticator(store, cache_seconds=60)
    assert await refusal(fresh, key) == ("revoked", record.key_id)
    await auth.flush()


async def test_concurrent_misses_share_one_lookup(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests that arrive together while a key is not cached wait for one query."""
    key, _ = await store.create_key("alice")
    queries = 0
    lookup = store.lookup

    async def counted(key_id: str) -> KeyLookup | None:
        nonlocal queries
        queries += 1
        return await lookup(key_id)

    monkeypatch.setattr(store, "lookup", counted)
    auth = KeyStoreAuthenticator(store, cache_seconds=60)
    results = await asyncio.gather(*(auth.authenticate(key) for _ in range(20)))
    assert all(p is not None and p.user == "alice" for p in results)
    assert queries == 1
    await auth.flush()


async def test_last_used_is_written_once_per_interval(store: KeyStore) -> None:
    auth = KeyStoreAuthenticator(store, cache_seconds=0)
    key, record = await store.create_key("alice")
    assert await auth.authenticate(key) is not None
    await auth.flush()
    first = await store.get_key(record.key_id)
    assert first is not None and first.last_used_at is not None
    for _ in range(5):
        assert await auth.authenticate(key) is not None
    await auth.flush()
    later = await store.get_key(record.key_id)
    assert later is not None and later.last_used_at == first.last_used_at


async def test_composite_routes_by_shape(store: KeyStore) -> None:
    key, record = await store.create_key("alice")
    composite = CompositeAuthenticator(
        keys=KeyStoreAuthenticator(store, cache_seconds=0),
        static=StaticKeyAuthenticator(["dev-key", "a.b.c"]),
    )
    found = await composite.authenticate(key)
    assert found is not None and found.user == "alice"
    static = await composite.authenticate("dev-key")
    assert static is not None and static.user.startswith("key_")
    # A static key shaped like a JWT still works when no JWT verifier is configured.
    assert await composite.authenticate("a.b.c") is not None
    # Refused: the static list names the offered credential by its fingerprint.
    assert await refusal(composite, "nope") == ("unknown_key", key_id("nope"))
    # An rk_ key refused by the store keeps the store's finer reason.
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert await refusal(composite, wrong) == ("wrong_secret", record.key_id)
    assert await refusal(CompositeAuthenticator(), "anything") == ("unknown_key", None)
    await composite.keys.flush()  # type: ignore[union-attr]


async def test_composite_keeps_the_jwt_refusal_and_still_tries_static_keys() -> None:
    class Expired:
        async def authenticate(self, credential: str) -> None:
            raise AuthRefused("token_expired", "jwt:t-1")

    composite = CompositeAuthenticator(jwt=Expired(), static=StaticKeyAuthenticator(["x.y.z"]))
    assert await refusal(composite, "a.b.c") == ("token_expired", "jwt:t-1")
    static = await composite.authenticate("x.y.z")  # a static key shaped like a JWT
    assert static.user == key_id("x.y.z")


async def test_unreachable_key_store_is_a_503_not_a_401() -> None:
    """A closed port: the caller is told to retry, and nothing counts as a failed login."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    database = Database(f"postgresql://postgres@127.0.0.1:{port}/nothing")
    try:
        auth = KeyStoreAuthenticator(KeyStore(database), cache_seconds=0)
        with pytest.raises(UpstreamUnavailable):
            await auth.authenticate(generate_key()[1])
    finally:
        await database.aclose()
