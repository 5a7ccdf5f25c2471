"""``KeyStore``: users, their permissions and their API keys, in the SQL database.

One code path for SQLite and PostgreSQL (SQLAlchemy Core). The store never holds or returns a
key's secret: ``create_key`` hands the key string back once, and only its hash is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import RowMapping, select, update
from sqlalchemy.exc import IntegrityError

from robota_proxy.policy.key_directory import KeyLookup, KeyRecord, UserRecord
from robota_proxy.policy.keys import generate_key, hash_key
from robota_proxy.policy.principals import MAX_USER_LENGTH, UserPermissions
from robota_proxy.storage.database import Database
from robota_proxy.storage.tables import api_keys, users

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

#: ``KeyLookup``, ``KeyRecord`` and ``UserRecord`` are policy's data types
#: (``robota_proxy.policy.key_directory``), re-exported here where they were first defined.
__all__ = ["MAX_USER_LENGTH", "KeyLookup", "KeyRecord", "KeyStore", "UserRecord", "check_user"]


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands timezone-aware columns back naive; everything we write is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _key_record(row: RowMapping) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        user=row["user_id"],
        name=row["name"],
        permissions=UserPermissions.from_wire(row["permissions"]),
        created_at=_utc(row["created_at"]) or datetime.now(UTC),
        expires_at=_utc(row["expires_at"]),
        revoked_at=_utc(row["revoked_at"]),
        last_used_at=_utc(row["last_used_at"]),
    )


def check_user(user: str) -> str:
    """User names are free-form ids from the operator; only emptiness and length are rules."""
    user = user.strip()
    if not user:
        raise ValueError("the user must be a non-empty string")
    if len(user) > MAX_USER_LENGTH:
        raise ValueError(f"the user must be at most {MAX_USER_LENGTH} characters")
    return user


class KeyStore:
    """The SQL ``KeyDirectory`` (``robota_proxy.policy.key_directory``) and the operator's
    user and key management."""

    def __init__(self, database: Database) -> None:
        self.database = database

    # --- users -------------------------------------------------------------------------------

    async def get_user(self, user: str) -> UserRecord | None:
        async with self.database.engine.connect() as conn:
            row = (
                (await conn.execute(select(users).where(users.c.user_id == user)))
                .mappings()
                .first()
            )
        if row is None:
            return None
        return UserRecord(
            user=row["user_id"],
            permissions=UserPermissions.from_wire(row["permissions"]),
            created_at=_utc(row["created_at"]) or datetime.now(UTC),
            revoked_at=_utc(row["revoked_at"]),
        )

    async def revoke_user(self, user: str) -> UserRecord | None:
        """Revoke the user whole: every key of theirs and every JWT with this ``sub`` is refused
        (each process within ``ROBOTA_KEY_CACHE_SECONDS``). Idempotent: the first revocation
        time is kept. ``None`` if the user has no record: a typo must not look like a done
        revocation (a JWT-only user gets one with ``set_user_permissions`` first). The keys'
        own rows are left alone, so that ``restore_user`` can bring them back."""
        async with self.database.engine.begin() as conn:
            await conn.execute(
                update(users)
                .where(users.c.user_id == user, users.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
        return await self.get_user(user)

    async def restore_user(self, user: str) -> UserRecord | None:
        """Undo ``revoke_user`` (a suspension lifted, or a revocation made by mistake): the
        user's tokens work again, and so do their keys that are not revoked or expired on
        their own; a revoked key stays revoked. ``None`` if the user has no record."""
        async with self.database.engine.begin() as conn:
            await conn.execute(update(users).where(users.c.user_id == user).values(revoked_at=None))
        return await self.get_user(user)

    async def set_user_permissions(self, user: str, permissions: UserPermissions) -> UserRecord:
        """Replace the user's permissions, creating the user if needed."""
        user = check_user(user)
        wire = permissions.to_wire()
        for _attempt in range(3):
            async with self.database.engine.begin() as conn:
                result = await conn.execute(
                    update(users).where(users.c.user_id == user).values(permissions=wire)
                )
                if result.rowcount:
                    break
            if await self._insert_user(user, wire):
                break
        record = await self.get_user(user)
        assert record is not None
        return record

    async def _ensure_user(self, user: str) -> None:
        async with self.database.engine.connect() as conn:
            exists = (
                await conn.execute(select(users.c.user_id).where(users.c.user_id == user))
            ).first()
        if exists is None:
            await self._insert_user(user, {})

    async def _insert_user(self, user: str, wire: dict[str, Any]) -> bool:
        """False when another process created the user first (then the caller updates)."""
        try:
            async with self.database.engine.begin() as conn:
                await conn.execute(
                    users.insert().values(
                        user_id=user, permissions=wire, created_at=datetime.now(UTC)
                    )
                )
        except IntegrityError:
            return False
        return True

    # --- keys --------------------------------------------------------------------------------

    async def create_key(
        self,
        user: str,
        permissions: UserPermissions | None = None,
        expires_at: datetime | None = None,
        name: str | None = None,
    ) -> tuple[str, KeyRecord]:
        """A new key for ``user`` (created if unknown). The key string is returned here and
        nowhere else, ever."""
        user = check_user(user)
        await self._ensure_user(user)
        overlay = (permissions or UserPermissions()).to_wire()
        for _attempt in range(5):
            key_id, key = generate_key()
            try:
                async with self.database.engine.begin() as conn:
                    await conn.execute(
                        api_keys.insert().values(
                            key_id=key_id,
                            user_id=user,
                            secret_hash=hash_key(key),
                            name=name,
                            permissions=overlay,
                            created_at=datetime.now(UTC),
                            expires_at=expires_at,
                        )
                    )
            except IntegrityError:
                continue  # an id collision (36^8 ids): draw again
            record = await self.get_key(key_id)
            assert record is not None
            return key, record
        raise RuntimeError("could not draw an unused key id")

    async def get_key(self, key_id: str) -> KeyRecord | None:
        async with self.database.engine.connect() as conn:
            row = (
                (await conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)))
                .mappings()
                .first()
            )
        return _key_record(row) if row is not None else None

    async def list_keys(self, user: str | None = None) -> list[KeyRecord]:
        query = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.key_id)
        if user is not None:
            query = query.where(api_keys.c.user_id == user)
        async with self.database.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_key_record(row) for row in rows]

    async def revoke_key(self, key_id: str) -> KeyRecord | None:
        """Revoke (idempotent: the first revocation time is kept); ``None`` if unknown."""
        async with self.database.engine.begin() as conn:
            await conn.execute(
                update(api_keys)
                .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
        return await self.get_key(key_id)

    async def lookup(self, key_id: str) -> KeyLookup | None:
        """The key row, its owner's permissions and revoked state, in one round trip (the hot
        path: one primary-key read joined on the users primary key)."""
        query = (
            select(
                api_keys,
                users.c.permissions.label("user_permissions"),
                users.c.revoked_at.label("user_revoked_at"),
            )
            .select_from(api_keys.outerjoin(users, users.c.user_id == api_keys.c.user_id))
            .where(api_keys.c.key_id == key_id)
        )
        async with self.database.engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            return None
        return KeyLookup(
            record=_key_record(row),
            secret_hash=row["secret_hash"],
            user_permissions=UserPermissions.from_wire(row["user_permissions"]),
            user_revoked_at=_utc(row["user_revoked_at"]),
        )

    async def touch(self, used: Mapping[str, datetime]) -> None:
        """Record last-used times, batched; never called per request."""
        if not used:
            return
        async with self.database.engine.begin() as conn:
            await _touch(conn, used)


async def _touch(conn: AsyncConnection, used: Mapping[str, datetime]) -> None:
    for key_id, when in used.items():
        await conn.execute(
            update(api_keys).where(api_keys.c.key_id == key_id).values(last_used_at=when)
        )
