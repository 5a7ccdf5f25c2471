"""Issuing, parsing and hashing the proxy's own API keys (``rk_<id>_<secret>``).

A key is ``rk_`` + an 8-character public id + ``_`` + 43 URL-safe characters (256 random
bits). The prefix lets secret scanners and humans recognise a leaked key; the id lets the
proxy find the key's row (and lets logs and usage reports name the key) without the secret.
Only the SHA-256 of the whole key is stored: with 256 random bits there is nothing to
brute-force, so a slow password hash would only cost latency on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from datetime import UTC, datetime, timedelta

PREFIX = "rk_"
ID_LENGTH = 8
SECRET_BYTES = 32  # 256 bits
SECRET_LENGTH = 43  # len(token_urlsafe(32))
_ID_ALPHABET = string.ascii_lowercase + string.digits
_KEY_SHAPE = re.compile(
    rf"^{PREFIX}(?P<id>[a-z0-9]{{{ID_LENGTH}}})_(?P<secret>[A-Za-z0-9_-]{{{SECRET_LENGTH}}})$"
)


def new_key_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LENGTH))


def generate_key(key_id: str | None = None) -> tuple[str, str]:
    """A fresh ``(key_id, key)``; the key is shown once and never stored."""
    ident = key_id or new_key_id()
    return ident, f"{PREFIX}{ident}_{secrets.token_urlsafe(SECRET_BYTES)}"


def looks_like_key(credential: str) -> bool:
    return credential.startswith(PREFIX)


def parse_key_id(credential: str) -> str | None:
    """The public id of a well-formed key, ``None`` for anything else."""
    match = _KEY_SHAPE.match(credential)
    return match.group("id") if match else None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def verify_key(key: str, stored_hash: str) -> bool:
    """Constant-time: the comparison says nothing about how much of the hash matched."""
    return hmac.compare_digest(hash_key(key).encode(), stored_hash.encode())


_DURATION = re.compile(r"^\s*([0-9]+)\s*([dhm])\s*$")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}
#: The furthest a key may expire: 100 years is "never" for any operator, and a bound well
#: inside what ``datetime`` and both databases hold (year 9999) keeps every later date
#: computation (a zone conversion, a margin added) from overflowing into a 500.
MAX_EXPIRY = timedelta(days=36525)


def _too_far(value: object) -> ValueError:
    shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:36]}...'"
    return ValueError(f"expiry {shown} is more than 100 years ahead: too far in the future")


def expiry_in(seconds: int, *, now: datetime | None = None) -> datetime:
    """``seconds`` from now, refused with ``ValueError`` past ``MAX_EXPIRY``."""
    now = now or datetime.now(UTC)
    if seconds <= 0:
        raise ValueError(f"expiry {seconds!r} must be a positive number of seconds")
    if seconds > MAX_EXPIRY.total_seconds():
        raise _too_far(seconds)
    return now + timedelta(seconds=seconds)


def parse_expiry(value: str, *, now: datetime | None = None) -> datetime:
    """``30d``, ``12h``, ``90m`` from now, or an ISO date/datetime (UTC when no zone is given).

    Raises ``ValueError`` with a message fit for a user (never ``OverflowError``: the CLI and
    the admin API show it as it is); a date in the past is refused because a key that is
    expired at birth is always a mistake, one past ``MAX_EXPIRY`` because it is a typo.
    """
    now = now or datetime.now(UTC)
    match = _DURATION.match(value)
    if match:
        digits, unit = match.group(1).lstrip("0") or "0", timedelta(**{_UNITS[match.group(2)]: 1})
        # Compared in the unit, before ``timedelta`` (which overflows) or ``int`` (which
        # refuses over 4,300 digits) meets the number.
        if len(digits) > 9 or int(digits) > MAX_EXPIRY // unit:
            raise _too_far(value)
        if int(digits) == 0:
            raise ValueError(f"expiry {value!r} must be a positive duration")
        return now + int(digits) * unit
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"expiry {value!r} is neither a duration (30d, 12h, 90m) nor an ISO date"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        when = when.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:00-05:00 is in year 10000 in UTC, 0001-01-01
        if when.year > 1:  # at 05:00+05:00 in year 0
            raise _too_far(value) from None
        raise ValueError(f"expiry {value!r} is in the past") from None
    if when <= now:
        raise ValueError(f"expiry {value!r} is in the past")
    if when - now > MAX_EXPIRY:
        raise _too_far(value)
    return when
