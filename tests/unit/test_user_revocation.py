"""Revoking a user whole: the store (revoke, restore, the key lookup's join), the key and JWT
authenticators (refused while revoked, accepted once restored, with and without trusted
claims), the ``users revoke|restore`` commands, and the migration that adds the column to a
database of schema version 2. The e2e tests prove the one-second bound across processes."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from sqlalchemy import event, text

from robota_proxy.cli import main
from robota_proxy.policy.authenticators import (
    KeyStoreAuthenticator,
    RevokedUserCheck,
    StoredUsers,
)
from robota_proxy.policy.jwt import JwtAuthenticator, verification_key
from robota_proxy.policy.principals import Authenticator, UserPermissions
from robota_proxy.policy.refusals import AuthRefused
from robota_proxy.preflight import probe_database
from robota_proxy.storage.database import MIGRATIONS, Database
from robota_proxy.storage.key_store import KeyStore, UserRecord

SECRET = "jwt-test-secret-" + "0123456789abcdef" * 4
NS = "https://robota.dev/permissions"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[KeyStore]:
    database = Database(f"sqlite:///{tmp_path / 'keys.db'}")
    await database.open()
    yield KeyStore(database)
    await database.aclose()


async def refusal(auth: Authenticator, credential: str) -> tuple[str, str | None]:
    with pytest.raises(AuthRefused) as refused:
        await auth.authenticate(credential)
    return refused.value.reason, refused.value.public_id


def token(sub: str = "alice", **extra: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "exp": now + 300, **extra}, SECRET, algorithm="HS256")


def jwt_auth(store: KeyStore, *, trust_claims: bool = False, cache: float = 0) -> RevokedUserCheck:
    """Built as ``build_authenticator`` builds it: one ``StoredUsers`` for both duties."""
    users = StoredUsers(store, cache_seconds=cache)
    key, algorithms = verification_key(SECRET, None, None)
    verifier = JwtAuthenticator(key, algorithms, permissions=users, trust_claims=trust_claims)
    return RevokedUserCheck(verifier, users)


# --- the store ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_revoke_and_restore_a_user(store: KeyStore) -> None:
    await store.set_user_permissions("alice", UserPermissions(rpm=5))
    fresh = await store.get_user("alice")
    assert fresh is not None and fresh.revoked_at is None
    assert fresh.to_wire()["revokedAt"] is None

    revoked = await store.revoke_user("alice")
    assert revoked is not None and revoked.revoked_at is not None
    assert revoked.to_wire()["revokedAt"] == revoked.revoked_at.isoformat()
    assert revoked.revoked_at.tzinfo is not None
    again = await store.revoke_user("alice")  # idempotent: the first time is kept
    assert again is not None and again.revoked_at == revoked.revoked_at
    # Replacing the permissions does not lift the revocation.
    replaced = await store.set_user_permissions("alice", UserPermissions(rpm=7))
    assert replaced.revoked_at == revoked.revoked_at and replaced.permissions.rpm == 7

    restored = await store.restore_user("alice")
    assert restored is not None and restored.revoked_at is None
    assert restored.permissions == UserPermissions(rpm=7)
    assert await store.revoke_user("nobody") is None
    assert await store.restore_user("nobody") is None
    assert await store.get_user("nobody") is None  # neither created it


@pytest.mark.anyio
async def test_the_key_lookup_reads_the_users_state_in_its_one_query(store: KeyStore) -> None:
    """The rk_ hot path stays one statement: the user's permissions and revocation come
    joined to the key row."""
    _, record = await store.create_key("alice")
    await store.revoke_user("alice")
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    engine = store.database.engine.sync_engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        found = await store.lookup(record.key_id)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert found is not None and found.user_revoked_at is not None
    assert len(statements) == 1 and "JOIN users" in statements[0]
    await store.restore_user("alice")
    again = await store.lookup(record.key_id)
    assert again is not None and again.user_revoked_at is None


# --- the key authenticator ------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_key_of_a_revoked_user_is_refused_until_restored(store: KeyStore) -> None:
    auth = KeyStoreAuthenticator(store, cache_seconds=0)
    first, one = await store.create_key("alice")
    second, two = await store.create_key("alice", name="second")
    dead, own = await store.create_key("alice")
    await store.revoke_key(own.key_id)
    past = datetime.now(UTC) - timedelta(seconds=1)
    expired, old = await store.create_key("alice", expires_at=past)
    other, _ = await store.create_key("bob")

    await store.revoke_user("alice")
    assert await refusal(auth, first) == ("user_revoked", one.key_id)
    assert await refusal(auth, second) == ("user_revoked", two.key_id)
    # A revoked user's expired key reads as revoked too; a key revoked on its own keeps its
    # own reason; a wrong secret stays a wrong secret (its state is not told).
    assert await refusal(auth, expired) == ("user_revoked", old.key_id)
    assert await refusal(auth, dead) == ("revoked", own.key_id)
    wrong = first[:-4] + ("AAAA" if not first.endswith("AAAA") else "BBBB")
    assert await refusal(auth, wrong) == ("wrong_secret", one.key_id)
    assert (await auth.authenticate(other)).user == "bob"  # nobody else is touched

    await store.restore_user("alice")
    assert (await auth.authenticate(first)).key_id == one.key_id
    assert (await auth.authenticate(second)).key_id == two.key_id
    assert await refusal(auth, dead) == ("revoked", own.key_id)  # still revoked on its own
    assert await refusal(auth, expired) == ("expired", old.key_id)
    await auth.flush()


@pytest.mark.anyio
async def test_key_cache_holds_a_revocation_back_for_its_ttl_only(store: KeyStore) -> None:
    """No timing: a long TTL keeps answering from the cache, a fresh cache sees the
    revocation (the e2e tests measure the real bound)."""
    key, record = await store.create_key("alice")
    cached = KeyStoreAuthenticator(store, cache_seconds=60)
    assert await cached.authenticate(key) is not None
    await store.revoke_user("alice")
    assert await cached.authenticate(key) is not None
    fresh = KeyStoreAuthenticator(store, cache_seconds=60)
    assert await refusal(fresh, key) == ("user_revoked", record.key_id)
    await cached.flush()


# --- JWT --------------------------------------------------------------------------------------


@pytest.mark.parametrize("trust_claims", [False, True])
@pytest.mark.anyio
async def test_a_revoked_users_tokens_are_refused_until_restored(
    store: KeyStore, trust_claims: bool
) -> None:
    auth = jwt_auth(store, trust_claims=trust_claims)
    claim = {NS: {"allowedProviders": ["mock"]}}
    await store.set_user_permissions("alice", UserPermissions(rpm=3))
    accepted = await auth.authenticate(token(jti="t-1", **claim))
    expected = UserPermissions(allowed_providers=("mock",)) if trust_claims else None
    assert accepted.permissions == (expected or UserPermissions(rpm=3))

    await store.revoke_user("alice")
    assert await refusal(auth, token(jti="t-1", **claim)) == ("token_user_revoked", "jwt:t-1")
    assert await refusal(auth, token()) == ("token_user_revoked", "jwt:alice")
    # Other users' tokens, and users without a record, are not affected.
    assert (await auth.authenticate(token("bob"))).user == "bob"
    # A bad token is refused for being bad, before anyone looks the user up.
    forged = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, "x" * 64, "HS256")
    assert (await refusal(auth, forged))[0] == "token_signature"

    await store.restore_user("alice")
    assert (await auth.authenticate(token(**claim))).user == "alice"


@pytest.mark.anyio
async def test_one_cached_user_read_serves_permissions_and_revocation(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.set_user_permissions("alice", UserPermissions(rpm=3))
    reads = 0
    get_user = store.get_user

    async def counted(user: str) -> UserRecord | None:
        nonlocal reads
        reads += 1
        return await get_user(user)

    monkeypatch.setattr(store, "get_user", counted)
    for trust_claims in (False, True):
        auth = jwt_auth(store, trust_claims=trust_claims, cache=60)
        reads = 0
        for _ in range(3):
            assert (await auth.authenticate(token(**{NS: {"rpm": 1}}))).user == "alice"
        assert reads == 1, trust_claims
        # Cached for the TTL, like keys: a fresh cache sees the revocation.
        await store.revoke_user("alice")
        assert (await auth.authenticate(token())).user == "alice"
        fresh = jwt_auth(store, trust_claims=trust_claims, cache=60)
        assert (await refusal(fresh, token()))[0] == "token_user_revoked"
        await store.restore_user("alice")


# --- the commands -----------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_users_revoke_and_restore_commands(
    _own_database: None, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(probe_database(os.environ["ROBOTA_DATABASE_URL"]))
    for _ in range(2):
        assert run(capsys, "keys", "create", "--user", "alice", "--json")[0] == 0
    code, out, err = run(capsys, "users", "revoke", "alice")
    assert code == 0, err
    assert out.startswith("revoked user alice at 20")
    assert out.endswith(
        ": their 2 key(s) and their tokens are refused by every process within a second\n"
    )
    code, out, _ = run(capsys, "users", "show", "alice", "--json")
    shown = json.loads(out)
    assert shown["revokedAt"] is not None and len(shown["keys"]) == 2
    code, out, _ = run(capsys, "users", "show", "alice")
    assert "status:      revoked\n" in out

    _, keys, _ = run(capsys, "keys", "list", "--user", "alice", "--json")
    first = json.loads(keys)["keys"][0]["id"]
    assert run(capsys, "keys", "revoke", first)[0] == 0
    code, out, err = run(capsys, "users", "restore", "alice")
    assert code == 0, err
    assert out == (
        "restored user alice: their tokens and 1 of their 2 key(s) work again "
        "(revoked and expired keys stay refused)\n"
    )
    code, out, _ = run(capsys, "users", "show", "alice", "--json")
    assert json.loads(out)["revokedAt"] is None

    for command in ("revoke", "restore"):
        code, out, err = run(capsys, "users", command, "nobody")
        assert (code, out) == (1, "")
        assert "no user 'nobody' (a JWT subject without a record: " in err
        assert "'robota-proxy users set nobody' creates it)" in err


# --- the migration ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_version_2_database_gains_user_revocation(empty_database_url: str) -> None:
    """Built as steps 1 and 2 left it (today's tables less ``users.revoked_at``), with a user
    and a key; after the upgrade the user is active, the key works, and revocation works."""
    database = Database(empty_database_url)
    timestamp = "DATETIME" if database.is_sqlite else "TIMESTAMP WITH TIME ZONE"
    try:
        async with database.engine.begin() as conn:
            await conn.execute(
                text(
                    "CREATE TABLE users (user_id VARCHAR(200) PRIMARY KEY, "
                    f"permissions JSON NOT NULL, created_at {timestamp} NOT NULL)"
                )
            )
            await conn.execute(text("CREATE TABLE schema_version (version INTEGER NOT NULL)"))
            await conn.execute(text("INSERT INTO schema_version (version) VALUES (2)"))
            await conn.execute(
                text("INSERT INTO users VALUES ('old', '{\"rpm\": 4}', :at)"),
                {"at": datetime(2029, 1, 1, tzinfo=UTC)},
            )
            # The other tables, as step 1 makes them (users exists, so it is left alone).
            await MIGRATIONS[0](conn)
        await database.open()
        async with database.engine.connect() as conn:
            version = (await conn.execute(text("SELECT version FROM schema_version"))).scalar()
        assert version == len(MIGRATIONS)  # every later step ran on it too
        store = KeyStore(database)
        old = await store.get_user("old")
        assert old is not None and old.revoked_at is None and old.permissions.rpm == 4
        key, record = await store.create_key("old")
        auth = KeyStoreAuthenticator(store, cache_seconds=0)
        assert (await auth.authenticate(key)).user == "old"
        await store.revoke_user("old")
        assert await refusal(auth, key) == ("user_revoked", record.key_id)
        await auth.flush()
        await database.open()  # applying nothing twice: already at the last version
    finally:
        await database.aclose()
