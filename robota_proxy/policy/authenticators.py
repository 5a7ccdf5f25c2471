"""The authenticators behind ``AuthMiddleware`` and how they are combined.

- ``KeyStoreAuthenticator``: ``rk_`` keys from the database, cached for
  ``key_cache_seconds`` so a revoked key is refused within that time on every process, while
  most requests never touch the database.
- ``StoredUsers`` and ``RevokedUserCheck``: a JWT's user (``sub``) read from the users table,
  cached the same way, for permissions and for the user's revocation (checked even when the
  token's permission claims are trusted).
- ``CompositeAuthenticator``: picks by the credential's shape: ``rk_`` -> key store, a JWT ->
  the JWT verifier, anything else -> the static ``ROBOTA_API_KEYS`` list.

Refusals are ``AuthRefused`` with the precise reason (unknown id, wrong secret, revoked,
expired, which token check); the middleware decides how much of it the caller is told.
- ``AuthFailureLimiter``: failed authentications per client address (the ``limits``
  library), so keys cannot be guessed at speed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

from cachetools import TTLCache
from limits import RateLimitItemPerMinute
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter
from sqlalchemy.exc import SQLAlchemyError

from robota_proxy.errors import UpstreamUnavailable
from robota_proxy.policy.key_directory import KeyDirectory, KeyLookup, UserRecord
from robota_proxy.policy.keys import looks_like_key, parse_key_id, verify_key
from robota_proxy.policy.principals import Authenticator, Principal, UserPermissions
from robota_proxy.policy.refusals import AuthRefused
from robota_proxy.policy.static_keys import StaticKeyAuthenticator
from robota_proxy.redis_failure import RedisFailurePolicy
from robota_proxy.settings import Settings

if TYPE_CHECKING:
    from robota_proxy.policy.jwt import JwtAuthenticator

log = logging.getLogger("robota_proxy.auth")

#: Bound on cached lookups (hits and misses): a flood of random ids cannot grow memory.
CACHE_SIZE = 10_000
#: Last-used times are written at most this often per key and process.
TOUCH_INTERVAL_SECONDS = 60.0

_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


@contextmanager
def store_errors() -> Iterator[None]:
    """A database that cannot answer is a 503 the client may retry, never a 500 and never a
    401 (which would count as a failed authentication and tell the caller the key is bad)."""
    try:
        yield
    except (SQLAlchemyError, OSError) as exc:
        log.error("key store unavailable: %s", type(exc).__name__)
        raise UpstreamUnavailable("the key store is unavailable; try again shortly") from None


def looks_like_jwt(credential: str) -> bool:
    return _JWT_SHAPE.match(credential) is not None


class KeyStoreAuthenticator:
    def __init__(self, store: KeyDirectory, *, cache_seconds: float = 1.0) -> None:
        self.store = store
        self.cache_seconds = cache_seconds
        self._cache: TTLCache[str, KeyLookup | None] | None = (
            TTLCache(maxsize=CACHE_SIZE, ttl=cache_seconds) if cache_seconds > 0 else None
        )
        self._touched: TTLCache[str, bool] = TTLCache(
            maxsize=CACHE_SIZE, ttl=TOUCH_INTERVAL_SECONDS
        )
        self._pending: dict[str, datetime] = {}
        self._flushing: asyncio.Task[None] | None = None
        #: Key lookups in flight, by key id.
        self._lookups: dict[str, asyncio.Future[KeyLookup | None]] = {}

    async def authenticate(self, credential: str) -> Principal:
        """The key's principal, or ``AuthRefused``. Revoked and expired are only told apart
        from a wrong secret once the whole key matched: a guesser with an id and no secret
        learns nothing about the key's state."""
        key_id = parse_key_id(credential)
        if key_id is None:
            raise AuthRefused("malformed_key", None, "not rk_<8-char id>_<43-char secret>")
        found = await self._lookup(key_id)
        if found is None:
            raise AuthRefused("unknown_key", key_id)
        if not verify_key(credential, found.secret_hash):
            raise AuthRefused("wrong_secret", key_id)
        record = found.record
        status = record.status()
        if status == "revoked":
            raise AuthRefused("revoked", key_id)
        # Before expiry: a revoked user's keys all read as revoked, whatever their dates.
        if found.user_revoked_at is not None:
            raise AuthRefused("user_revoked", key_id, f"user {record.user!r} is revoked")
        if status == "expired":
            raise AuthRefused("expired", key_id)
        self._note_use(key_id)
        return Principal(
            user=record.user,
            key_id=key_id,
            permissions=found.user_permissions.overlay(record.permissions),
        )

    async def _lookup(self, key_id: str) -> KeyLookup | None:
        """Cached; concurrent misses of one key share one query. Without that, every
        request arriving while the entry is refreshed (each ``cache_seconds``, 50 of them
        at concurrency 50) queued a query of its own behind the ledger writes: the chain's
        p99 latency at c=50 was about a second."""
        if self._cache is not None and key_id in self._cache:
            return self._cache[key_id]
        pending = self._lookups.get(key_id)
        if pending is None:
            pending = asyncio.ensure_future(self._query(key_id))
            self._lookups[key_id] = pending
            pending.add_done_callback(partial(self._lookup_done, key_id))
        # Shielded: one caller going away must not cancel the query the others wait for.
        return await asyncio.shield(pending)

    def _lookup_done(self, key_id: str, done: asyncio.Future[KeyLookup | None]) -> None:
        self._lookups.pop(key_id, None)
        if not done.cancelled():
            done.exception()  # retrieved here too, for when every waiter went away

    async def _query(self, key_id: str) -> KeyLookup | None:
        with store_errors():
            found = await self.store.lookup(key_id)
        if self._cache is not None:
            self._cache[key_id] = found
        return found

    def _note_use(self, key_id: str) -> None:
        """Queue a last-used write when this process has not written one for a minute; the
        write happens in a background task so the request never waits for it."""
        if key_id in self._touched:
            return
        self._touched[key_id] = True
        self._pending[key_id] = datetime.now(UTC)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            try:
                await self.store.touch(batch)
            except Exception as exc:  # last-used is informational: never fail a request
                log.warning("could not record key last-used times: %s", type(exc).__name__)

    async def flush(self) -> None:
        """Wait for queued last-used writes (tests, shutdown)."""
        if self._flushing is not None:
            await self._flushing


class StoredUsers:
    """JWT users' records from the users table, cached like keys: one read per user per
    ``cache_seconds`` answers both their permissions and whether they are revoked, so a
    revoked user's tokens are refused by every process within that time."""

    def __init__(self, store: KeyDirectory, *, cache_seconds: float = 1.0) -> None:
        self.store = store
        #: ``None`` cached too: a user without a record is unrestricted and not revoked.
        self._cache: TTLCache[str, UserRecord | None] | None = (
            TTLCache(maxsize=CACHE_SIZE, ttl=cache_seconds) if cache_seconds > 0 else None
        )

    async def record(self, user: str) -> UserRecord | None:
        if self._cache is not None and user in self._cache:
            return self._cache[user]
        with store_errors():
            found = await self.store.get_user(user)
        if self._cache is not None:
            self._cache[user] = found
        return found

    async def permissions(self, user: str) -> UserPermissions:
        record = await self.record(user)
        return record.permissions if record is not None else UserPermissions()

    async def revoked(self, user: str) -> bool:
        record = await self.record(user)
        return record is not None and record.revoked_at is not None


class RevokedUserCheck:
    """A JWT verifier whose accepted tokens are refused when their user was revoked.

    Apart from ``JwtAuthenticator`` because the check holds whatever the permissions' source:
    with ``ROBOTA_JWT_TRUST_CLAIMS`` the token brings its own permissions, but only the
    operator's users table can say the user was cut off. Run after the signature and claim
    checks, so a forged token never costs a database read."""

    def __init__(self, verifier: JwtAuthenticator, users: StoredUsers) -> None:
        self.verifier = verifier
        self.users = users

    async def authenticate(self, credential: str) -> Principal:
        principal = await self.verifier.authenticate(credential)
        if await self.users.revoked(principal.user):
            from robota_proxy.policy.jwt import token_label  # loaded: the verifier is a JWT one

            raise AuthRefused(
                "token_user_revoked", token_label(credential), f"user {principal.user!r}"
            )
        return principal


class CompositeAuthenticator:
    def __init__(
        self,
        *,
        keys: Authenticator | None = None,
        jwt: Authenticator | None = None,
        static: StaticKeyAuthenticator | None = None,
    ) -> None:
        self.keys = keys
        self.jwt = jwt
        self.static = static if static else None

    async def flush(self) -> None:
        """Wait for the key store's queued last-used writes (before the database closes)."""
        if isinstance(self.keys, KeyStoreAuthenticator):
            await self.keys.flush()

    async def authenticate(self, credential: str) -> Principal:
        """The first authenticator the credential's shape picks; a static key of any shape
        still works. A refusal is the shaped authenticator's (it knows the finer reason: a
        revoked ``rk_`` key, an expired token), else the static list's."""
        refused: AuthRefused | None = None
        shaped: Authenticator | None = None
        if self.keys is not None and looks_like_key(credential):
            shaped = self.keys
        elif self.jwt is not None and looks_like_jwt(credential):
            shaped = self.jwt
        if shaped is not None:
            try:
                found = await shaped.authenticate(credential)
            except AuthRefused as exc:
                refused, found = exc, None
            if found is not None:
                return found
        if self.static is not None:
            # Static keys are operator-chosen strings and may have any shape.
            try:
                return await self.static.authenticate(credential)
            except AuthRefused as exc:
                refused = refused or exc
        raise refused or AuthRefused("unknown_key", None, "no authenticator for this shape")


def build_authenticator(settings: Settings, store: KeyDirectory) -> CompositeAuthenticator:
    """All the credential kinds the settings enable. Raises ``JwtConfigError`` on JWT settings
    that cannot work, so a misconfigured proxy fails at start rather than refusing everyone."""
    jwt: RevokedUserCheck | None = None
    secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
    if secret or settings.jwt_public_key_file:
        # Only when JWT is configured: PyJWT and cryptography are ~80 ms of import.
        from robota_proxy.policy.jwt import JwtAuthenticator, verification_key

        key, algorithms = verification_key(
            secret, settings.jwt_public_key_file, settings.jwt_algorithms
        )
        users = StoredUsers(store, cache_seconds=settings.key_cache_seconds)
        verifier = JwtAuthenticator(
            key,
            algorithms,
            permissions=users,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            leeway_seconds=settings.jwt_leeway_seconds,
            trust_claims=settings.jwt_trust_claims,
            claims_namespace=settings.jwt_claims_namespace,
        )
        jwt = RevokedUserCheck(verifier, users)
    static = StaticKeyAuthenticator(key.get_secret_value() for key in settings.api_keys)
    return CompositeAuthenticator(
        keys=KeyStoreAuthenticator(store, cache_seconds=settings.key_cache_seconds),
        jwt=jwt,
        static=static,
    )


class AuthFailureLimiter:
    """Counts failed authentications per client address in a moving one-minute window."""

    def __init__(
        self,
        storage: Storage,
        per_minute: int,
        *,
        on_storage_failure: RedisFailurePolicy | None = None,
    ) -> None:
        """``on_storage_failure``: what an unreachable shared storage (Redis) means; by
        default the check is skipped (fail open), logged at most once per interval."""
        self.limiter = MovingWindowRateLimiter(storage)
        self.item = RateLimitItemPerMinute(per_minute)
        self.on_storage_failure = on_storage_failure or RedisFailurePolicy()

    async def blocked_for(self, client: str) -> float | None:
        """Seconds until ``client`` may try again, ``None`` when it may try now."""
        try:
            if await self.limiter.test(self.item, "auth_failures", client):
                return None
            stats = await self.limiter.get_window_stats(self.item, "auth_failures", client)
        except Exception as exc:
            self.on_storage_failure.failed("failed-authentication limits", exc)
            return None
        return max(1.0, stats.reset_time - time.time())

    async def failed(self, client: str) -> None:
        try:
            await self.limiter.hit(self.item, "auth_failures", client)
        except Exception as exc:
            self.on_storage_failure.failed("failed-authentication limits", exc)
