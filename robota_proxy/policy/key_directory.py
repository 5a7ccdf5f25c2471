"""What policy knows of stored users and keys, and the protocol it reads them through.

The authenticators (``robota_proxy.policy.authenticators``) depend on ``KeyDirectory``, not on
a storage backend: ``robota_proxy.storage.key_store.KeyStore`` implements it (storage imports
policy's data types; policy never imports storage; DESIGN.md, "Dependencies flow one way").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from robota_proxy.policy.principals import UserPermissions

__all__ = ["KeyDirectory", "KeyLookup", "KeyRecord", "UserRecord"]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True, slots=True)
class UserRecord:
    user: str
    permissions: UserPermissions
    created_at: datetime
    #: When the user was revoked: all their keys and tokens are refused while it is set.
    revoked_at: datetime | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "permissions": self.permissions.to_wire(),
            "createdAt": _iso(self.created_at),
            "revokedAt": _iso(self.revoked_at),
        }


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as the store knows it: everything but the secret."""

    key_id: str
    user: str
    name: str | None
    #: This key's overrides of the user's permissions.
    permissions: UserPermissions
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def status(self, now: datetime | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or datetime.now(UTC)):
            return "expired"
        return "active"

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.key_id,
            "user": self.user,
            "name": self.name,
            "permissions": self.permissions.to_wire(),
            "status": self.status(),
            "createdAt": _iso(self.created_at),
            "expiresAt": _iso(self.expires_at),
            "revokedAt": _iso(self.revoked_at),
            "lastUsedAt": _iso(self.last_used_at),
        }


@dataclass(frozen=True, slots=True)
class KeyLookup:
    """What authentication needs about one key id, read in one query."""

    record: KeyRecord
    secret_hash: str
    #: The owner's permissions, before the key's overlay.
    user_permissions: UserPermissions
    #: Set when the owner was revoked: the key is refused whatever its own state.
    user_revoked_at: datetime | None = None


class KeyDirectory(Protocol):
    """Where authentication reads keys and users from (``KeyStore`` in the SQL database)."""

    async def lookup(self, key_id: str) -> KeyLookup | None:
        """The key row, its owner's permissions and revoked state; ``None`` if unknown."""
        ...

    async def get_user(self, user: str) -> UserRecord | None: ...

    async def touch(self, used: Mapping[str, datetime]) -> None:
        """Record last-used times (batched by the caller)."""
        ...
