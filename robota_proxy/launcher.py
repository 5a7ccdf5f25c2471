"""The ``robota-proxy`` command's entry point, importable without the server's packages.

``pip install robota-remote`` installs the client alone, yet the console script is declared by
the one distribution and so exists either way. Run without the ``[proxy]`` extra it must say
what to install in one line, not die in a traceback about ``starlette``: so this module
imports nothing of the server until it has checked that the server is installed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.util import find_spec

#: Modules the server needs that the client-only install does not bring.
SERVER_MODULES = ("starlette", "uvicorn", "sqlalchemy", "pydantic_settings")
INSTALL_HINT = 'pip install "robota-remote[proxy]"'


def missing_server_modules() -> list[str]:
    return [name for name in SERVER_MODULES if find_spec(name) is None]


def main(argv: Sequence[str] | None = None) -> int:
    missing = missing_server_modules()
    if missing:
        print(
            f"robota-proxy: the proxy is not installed ({', '.join(missing)} missing): "
            f"{INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    from robota_proxy.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
