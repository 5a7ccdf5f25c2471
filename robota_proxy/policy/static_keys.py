"""Bearer keys listed in the settings (``ROBOTA_API_KEYS``).

The simplest credential store: enough for one team behind one proxy. Keys are compared as
SHA-256 digests with ``hmac.compare_digest`` against every configured key, so neither the
comparison nor the number of keys tried leaks timing about which key was close.

A refusal names the offered credential by its fingerprint (``key_id``): after a rotation of
``ROBOTA_API_KEYS`` the operator sees which old key is still in use, with nothing in the log
that would let anyone use it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from robota_proxy.policy.principals import Principal
from robota_proxy.policy.refusals import AuthRefused


def key_id(key: str) -> str:
    """A short public id for a key: safe to log and to show in usage reports."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:12]


class StaticKeyAuthenticator:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [(hashlib.sha256(key.encode()).digest(), key_id(key)) for key in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    async def authenticate(self, credential: str) -> Principal:
        """The key's principal (its fingerprint is the user); ``AuthRefused("unknown_key")``
        otherwise."""
        offered = hashlib.sha256(credential.encode()).digest()
        found: str | None = None
        for digest, ident in self._digests:
            if hmac.compare_digest(digest, offered):
                found = ident
        if found is None:
            raise AuthRefused("unknown_key", key_id(credential), "no configured static key")
        return Principal(user=found, key_id=found)
