"""The checks pydantic cannot make, run by ``serve`` before uvicorn starts and by the
commands that open the database.

``Settings`` validates each value alone; whether the database exists, the driver of a URL is
installed, the JWT key file is a key, or the prices file parses is only known by trying. The
app tries all of that too, but inside uvicorn, where a failure is a traceback and exit status
3 (or, in a worker, a restart loop). Trying here first turns each into the one-line
``ConfigError`` of ``config_errors``; the app's own checks stay, for mounted use.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.exc import SQLAlchemyError

from robota_proxy.config_errors import ConfigError, redact_url
from robota_proxy.settings import Settings
from robota_proxy.storage.database import (
    Database,
    DatabaseDriverMissing,
    DatabaseURLError,
    async_url,
    parse_url,
)
from robota_proxy.storage.key_store import KeyStore

DATABASE_VAR = "ROBOTA_DATABASE_URL"
REDIS_VAR = "ROBOTA_REDIS_URL"
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def check_database_url(url: str) -> None:
    """The URL parses, names SQLite or PostgreSQL, and its driver is installed."""
    try:
        async_url(url)
    except DatabaseDriverMissing as exc:
        raise ConfigError(f"{DATABASE_VAR} is {redact_url(url)} but {exc}") from None
    except DatabaseURLError as exc:
        raise ConfigError(f"{DATABASE_VAR} is {redact_url(url)!r}: {exc}") from None


def check_redis_url(url: str | None) -> None:
    """A Redis URL the client library accepts, and the library itself (the ``redis`` extra)."""
    if url is None:
        return
    if urlsplit(url).scheme not in _REDIS_SCHEMES:
        raise ConfigError(
            f"{REDIS_VAR} is {redact_url(url)!r}: expected redis://host:6379/0 "
            "(or rediss://, unix://)"
        )
    try:
        importlib.import_module("redis")
    except ImportError:
        raise ConfigError(
            f"{REDIS_VAR} is {redact_url(url)} but redis is not installed: "
            'pip install "robota-remote[proxy,redis]"'
        ) from None


def check_jwt(settings: Settings) -> list[str]:
    """The algorithms JWTs are verified with (none when JWT is not configured). The checks
    are ``policy.jwt``'s own, the ones the app makes at start, so the two cannot disagree."""
    secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
    if not secret and settings.jwt_public_key_file is None:
        return []
    # Only when JWT is configured: PyJWT and cryptography are ~80 ms of import.
    from robota_proxy.policy.jwt import JwtConfigError, verification_key

    try:
        _, algorithms = verification_key(
            secret, settings.jwt_public_key_file, settings.jwt_algorithms
        )
    except JwtConfigError as exc:
        message = str(exc)
        if "ROBOTA_" not in message:
            message = f"ROBOTA_JWT_PUBLIC_KEY_FILE: {message}"
        raise ConfigError(message) from None
    return algorithms


def check_prices(settings: Settings) -> None:
    if settings.prices_file is None:
        return
    # Imported only when a file is set: the price database is large to load.
    from robota_proxy.policy.pricing import PriceBook, PricesFileError

    try:
        PriceBook.from_file(settings.prices_file)
    except PricesFileError as exc:
        raise ConfigError(f"ROBOTA_PRICES_FILE: {exc}") from None


def check_settings(settings: Settings) -> list[str]:
    """Everything ``serve`` needs before the database is opened; returns the JWT
    algorithms (for the banner)."""
    check_database_url(settings.database_url)
    check_redis_url(settings.redis_url)
    algorithms = check_jwt(settings)
    check_prices(settings)
    return algorithms


def sqlite_file(url: str) -> Path | None:
    """The absolute path of a SQLite file database (relative paths are relative to the
    working directory, which is the trap this makes visible); ``None`` otherwise."""
    parsed = parse_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:":
        return None
    return Path(database).expanduser().resolve()


def describe_database(url: str) -> str:
    """What an operator needs to recognise the database: never a password."""
    path = sqlite_file(url)
    if path is not None:
        return str(path)
    if parse_url(url).get_backend_name() == "sqlite":
        return "SQLite in memory (lost when the process ends)"
    return parse_url(url).render_as_string(hide_password=True)


async def open_database(url: str) -> Database:
    """The database, opened (migrations applied), or a ``ConfigError`` naming the variable:
    a PostgreSQL database that does not exist, a server that does not answer, a SQLite
    directory that cannot be written."""
    check_database_url(url)
    database: Database | None = None
    try:
        database = Database(url)  # makes a SQLite file's directory, which can fail too
        await database.open()
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        if database is not None:
            await database.aclose()
        raise ConfigError(
            f"{DATABASE_VAR} is {describe_database(url)}: cannot open it: {_reason(exc, url)}"
        ) from None
    return database


def _reason(exc: BaseException, url: str) -> str:
    """The driver's own first line (``database "x" does not exist``), without SQLAlchemy's
    wrapping and never with the password."""
    cause = getattr(exc, "orig", None) or exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    password = parse_url(url).password
    if password:
        text = text.replace(str(password), "***")
    return redact_url(text)


async def active_key_count(database: Database) -> int:
    """Keys that would be accepted now. Counted through ``KeyRecord.status`` rather than in
    SQL so that "active" means here exactly what it means to the authenticator; run once
    at start, so reading every key record is affordable."""
    records = await KeyStore(database).list_keys()
    return sum(1 for record in records if record.status() == "active")


async def probe_database(url: str) -> int:
    """Open the database as the app will (creating a SQLite file, applying migrations) and
    count its active keys; raises ``ConfigError`` when it cannot be opened."""
    database = await open_database(url)
    try:
        return await active_key_count(database)
    finally:
        await database.aclose()
