"""``/admin/...``: managing keys and users over HTTP, for the operator only.

Guarded by ``ROBOTA_ADMIN_KEY`` (compared in constant time), not by the user authentication:
``AuthMiddleware`` exempts these paths. Without an admin key configured the admin API is off
and says so (403). Failed admin authentications count against the same per-address limit as
user keys. A created key is in the 201 response and nowhere else, ever.

Adding an endpoint: write ``async def handler(self, request)`` decorated with
``@admin_only`` and list it in ``routes()``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from robota_proxy.chat_body import parse_json, read_body
from robota_proxy.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
    RateLimited,
    Unauthenticated,
)
from robota_proxy.policy.authenticators import AuthFailureLimiter
from robota_proxy.policy.keys import expiry_in, parse_expiry
from robota_proxy.policy.principals import UserPermissions, storable
from robota_proxy.storage.key_store import MAX_USER_LENGTH, KeyStore, check_user
from robota_proxy.wire.bearer import bearer_credential, client_address

MAX_ADMIN_BODY_BYTES = 64 * 1024
NO_STORE = {"Cache-Control": "no-store"}


class AdminGuard:
    """The admin-key check, reusable by every admin endpoint."""

    def __init__(self, admin_key: SecretStr | None, failures: AuthFailureLimiter | None) -> None:
        self._digest = (
            hashlib.sha256(admin_key.get_secret_value().encode()).digest()
            if admin_key is not None and admin_key.get_secret_value()
            else None
        )
        self.failures = failures

    async def check(self, request: Request) -> None:
        """Raise the contract error unless the request carries the admin key."""
        if self._digest is None:
            raise Forbidden("the admin API is disabled: set ROBOTA_ADMIN_KEY to enable it")
        client = client_address(request.scope)
        if self.failures is not None:
            wait = await self.failures.blocked_for(client)
            if wait is not None:
                raise RateLimited(
                    "too many failed authentications from this address; try again later",
                    retry_after=wait,
                )
        credential = bearer_credential(request.scope) or ""
        offered = hashlib.sha256(credential.encode()).digest()
        if not hmac.compare_digest(offered, self._digest):
            if self.failures is not None:
                await self.failures.failed(client)
            raise Unauthenticated("the admin API needs 'Authorization: Bearer <admin key>'")


_Routes = TypeVar("_Routes", bound="AdminRoutes")
Handler = Callable[[_Routes, Request], Awaitable[Response]]


def admin_only(handler: Handler[_Routes]) -> Handler[_Routes]:
    """Run ``self.guard.check`` before the endpoint."""

    @functools.wraps(handler)
    async def guarded(self: _Routes, request: Request) -> Response:
        await self.guard.check(request)
        return await handler(self, request)

    return guarded


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, parsed bounded (``chat_body.parse_json``): ``json.loads``
    raised ``RecursionError`` on deep nesting and let lone surrogates through to the database,
    two 500s."""
    body = await read_body(request, MAX_ADMIN_BODY_BYTES)
    data = parse_json(body) if body.strip() else {}
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return data


def _permissions(value: Any) -> UserPermissions:
    if value is not None and not isinstance(value, dict):
        raise InvalidRequest("permissions must be a JSON object")
    return UserPermissions.from_wire(value)


def _expiry(data: dict[str, Any]) -> datetime | None:
    """``expiresAt`` (ISO date) or ``expiresIn`` (``30d``/``12h``/``90m`` or seconds)."""
    expires_at, expires_in = data.get("expiresAt"), data.get("expiresIn")
    if expires_at is not None and expires_in is not None:
        raise InvalidRequest("give expiresAt or expiresIn, not both")
    field = "expiresAt" if expires_at is not None else "expiresIn"
    value = expires_at if expires_at is not None else expires_in
    if value is None:
        return None
    try:
        if isinstance(value, int) and not isinstance(value, bool) and field == "expiresIn":
            return expiry_in(value)
        if isinstance(value, str):
            return parse_expiry(value)
    except ValueError as exc:  # bounded by MAX_EXPIRY: never an OverflowError
        raise InvalidRequest(f"{field}: {exc}") from None
    raise InvalidRequest("expiresAt must be an ISO date; expiresIn like '30d' or seconds")


def _user(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidRequest("user must be a string")
    try:
        user = check_user(value)
    except ValueError as exc:
        raise InvalidRequest(f"user: {exc}") from None
    if not storable(user):
        raise InvalidRequest("user must not contain control characters or lone surrogates")
    return user


def user_filter(value: str | None) -> str | None:
    """A ``user`` query parameter: a name that could be stored, else a 400. A NUL in it
    (``?user=%00``) reached PostgreSQL, which refuses NUL in text, as a 5xx."""
    if value is not None and not storable(value):
        raise InvalidRequest("user must not contain control characters")
    return value


def _known_user(request: Request) -> str:
    """The path's user for a lookup; a name no user can have (``%00``) is a 404 without
    reaching the database, which refuses NUL in text with a 5xx."""
    user: str = request.path_params["user"]
    if len(user) > MAX_USER_LENGTH or not storable(user):
        raise NotFound("no such user")
    return user


def _key_id(request: Request) -> str:
    """The path's key id; one that no key can have (``%00``, a megabyte) is not looked up."""
    key_id: str = request.path_params["key_id"]
    if len(key_id) > 64 or not storable(key_id):
        raise NotFound("no such key")
    return key_id


class AdminRoutes:
    def __init__(self, store: KeyStore, guard: AdminGuard) -> None:
        self.store = store
        self.guard = guard

    def routes(self) -> list[Route]:
        return [
            Route("/admin/keys", self.create_key, methods=["POST"]),
            Route("/admin/keys", self.list_keys, methods=["GET"]),
            Route("/admin/keys/{key_id}", self.show_key, methods=["GET"]),
            Route("/admin/keys/{key_id}", self.revoke_key, methods=["DELETE"]),
            Route("/admin/users/{user}", self.set_user, methods=["PUT"]),
            Route("/admin/users/{user}", self.show_user, methods=["GET"]),
            Route("/admin/users/{user}", self.revoke_user, methods=["DELETE"]),
            Route("/admin/users/{user}/restore", self.restore_user, methods=["POST"]),
        ]

    @admin_only
    async def create_key(self, request: Request) -> Response:
        data = await json_object(request)
        unknown = set(data) - {"user", "permissions", "expiresAt", "expiresIn", "name"}
        if unknown:
            raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        user = _user(data.get("user"))
        permissions = _permissions(data.get("permissions"))
        name = data.get("name")
        if name is not None and (
            not isinstance(name, str) or len(name) > 200 or not storable(name)
        ):
            raise InvalidRequest(
                "name must be a string of at most 200 characters, without control characters"
            )
        key, record = await self.store.create_key(user, permissions, _expiry(data), name)
        return JSONResponse({"key": key, **record.to_wire()}, status_code=201, headers=NO_STORE)

    @admin_only
    async def list_keys(self, request: Request) -> Response:
        user = user_filter(request.query_params.get("user"))
        records = await self.store.list_keys(user)
        return JSONResponse({"keys": [record.to_wire() for record in records]})

    @admin_only
    async def show_key(self, request: Request) -> Response:
        record = await self.store.get_key(_key_id(request))
        if record is None:
            raise NotFound("no such key")
        return JSONResponse(record.to_wire())

    @admin_only
    async def revoke_key(self, request: Request) -> Response:
        record = await self.store.revoke_key(_key_id(request))
        if record is None:
            raise NotFound("no such key")
        return JSONResponse(record.to_wire())

    @admin_only
    async def set_user(self, request: Request) -> Response:
        user = _user(request.path_params["user"])
        data = await json_object(request)
        # {"permissions": {...}} or the permissions object itself.
        permissions = _permissions(data.get("permissions", data))
        record = await self.store.set_user_permissions(user, permissions)
        return JSONResponse(record.to_wire())

    @admin_only
    async def show_user(self, request: Request) -> Response:
        user = _known_user(request)
        record = await self.store.get_user(user)
        if record is None:
            raise NotFound("no such user")
        keys = await self.store.list_keys(user)
        return JSONResponse({**record.to_wire(), "keys": [key.to_wire() for key in keys]})

    @admin_only
    async def revoke_user(self, request: Request) -> Response:
        """Like ``DELETE /admin/keys/{id}``: 200 with the record, so the caller sees the
        revocation time; unknown users are 404 (create a JWT-only user with PUT first)."""
        record = await self.store.revoke_user(_known_user(request))
        if record is None:
            raise NotFound("no such user")
        return JSONResponse(record.to_wire())

    @admin_only
    async def restore_user(self, request: Request) -> Response:
        record = await self.store.restore_user(_known_user(request))
        if record is None:
            raise NotFound("no such user")
        return JSONResponse(record.to_wire())
