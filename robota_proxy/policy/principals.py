"""Who is calling: the identity every later stop (limits, metering, cache scope) keys on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Principal:
    #: The user the call is accounted to.
    user: str
    #: The public, non-secret id of the credential used (never the key itself).
    key_id: str | None = None


class Authenticator(Protocol):
    """Turns a bearer credential into a principal. ``None`` means "not valid"."""

    async def authenticate(self, credential: str) -> Principal | None: ...
