"""The bearer credential and the client address of a request, read from its ASGI scope.

Shared by ``AuthMiddleware`` and the admin routes' guard, which check credentials of their own.
"""

from __future__ import annotations

from starlette.types import Scope

from robota_proxy.policy.refusals import AuthRefused

__all__ = ["authorization_header", "bearer_credential", "client_address", "parse_bearer"]


def authorization_header(scope: Scope) -> str | None:
    """The first ``Authorization`` header, as sent; without one, an ``x-api-key`` header as
    ``Bearer <key>``: that is how Anthropic clients (Claude Code, older SDKs) send a key, and
    the Anthropic-compatible surface must accept them unchanged."""
    api_key: str | None = None
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            header: str = value.decode("latin-1")
            return header
        if name == b"x-api-key" and api_key is None:
            api_key = value.decode("latin-1")
    return None if api_key is None else f"Bearer {api_key}"


def parse_bearer(header: str | None) -> str:
    """The credential of ``Bearer <credential>``, or ``AuthRefused`` saying what is wrong
    with the header. A credential is visible ASCII without spaces: anything else is a paste
    gone wrong, and saying so beats "unknown key". The refusal never quotes the header (with
    no scheme, the first word may be the key itself)."""
    if header is None:
        raise AuthRefused("missing")
    scheme, _, credential = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthRefused("malformed", None, "not the Bearer scheme")
    credential = credential.strip()
    if not credential:
        raise AuthRefused("malformed", None, "empty credential")
    if not all("!" <= char <= "~" for char in credential):
        raise AuthRefused("malformed", None, "spaces or control characters in the credential")
    return credential


def bearer_credential(scope: Scope) -> str | None:
    """The bearer credential, ``None`` when there is none or the header is malformed."""
    try:
        return parse_bearer(authorization_header(scope))
    except AuthRefused:
        return None


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"
