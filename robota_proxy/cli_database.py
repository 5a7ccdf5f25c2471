"""The database the ``keys``, ``users`` and ``usage`` commands work on, and the one rule
about it: a command never creates a SQLite file by accident.

``sqlite:///robota.db`` is relative to the working directory. Run from another directory, a
command that created the file it did not find would write the key into a second, empty
database the proxy never reads, and the key would get 401 with nothing to say why. So each
command prints the database it uses (one stderr line, ``database: /abs/path``), and a
missing SQLite file is an error (exit 1) naming that path, unless the command was given
``--create-database``. ``serve`` creates the file as before: starting the proxy is the
deliberate way to make a database.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from robota_proxy.storage.database import Database

CREATE_FLAG = "--create-database"


class MissingDatabase(Exception):
    """The SQLite file is not there and the command was not told to create it: exit 1."""


@asynccontextmanager
async def cli_database(*, create: bool = False) -> AsyncIterator[Database]:
    """The configured database, opened; ``ConfigError`` for a bad URL or one that cannot
    be opened, ``MissingDatabase`` for a SQLite file that does not exist."""
    # Imported when a command opens the database: --help needs none of it (cli.py).
    from robota_proxy.config_errors import load_settings
    from robota_proxy.preflight import (
        check_database_url,
        describe_database,
        open_database,
        sqlite_file,
    )

    url = load_settings().database_url
    check_database_url(url)
    print(f"database: {describe_database(url)}", file=sys.stderr)
    path = sqlite_file(url)
    if path is not None and not create and not path.exists():
        raise MissingDatabase(_missing(url, path))
    database = await open_database(url)
    try:
        yield database
    finally:
        await database.aclose()


def _missing(url: str, path: Path) -> str:
    from robota_proxy.storage.database import parse_url  # when a command runs: see cli.py

    written = parse_url(url).database or ""
    relative = "" if Path(written).is_absolute() else ", relative to the current directory"
    return (
        f"no database at {path} (ROBOTA_DATABASE_URL is {url}{relative}). Run this where the "
        "proxy runs, or set ROBOTA_DATABASE_URL to the proxy's database; to start a new one, "
        f"run `robota-proxy serve` once or `keys create` with {CREATE_FLAG}"
    )
