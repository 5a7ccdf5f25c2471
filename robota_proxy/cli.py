"""``robota-proxy``: the command line. ``serve`` runs the app under uvicorn; ``keys`` and
``users`` manage keys and permissions (``robota_proxy.cli_keys``); ``usage`` sums the ledger.

Exit statuses, the same for every command: 0 done; 1 something named does not exist (a key
id, a user, the SQLite file); 2 a usage or configuration mistake, told in one line naming the
flag or the ``ROBOTA_*`` variable, never with a traceback; 141 stdout was closed before the
output was written (``robota-proxy usage --json | head -1``): the status a shell gives a
command killed by SIGPIPE, so ``set -o pipefail`` scripts see the output was cut short, the
same as with ``cat`` or ``yes``, but quietly.

Importing this module and its ``cli_keys`` and ``cli_usage`` costs argparse and little else:
each command imports its machinery (settings, database, the app) when it runs, so that
``--help`` and a mistyped flag answer at once (tests/unit/test_keys_cli.py pins the list).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from robota_proxy import cli_keys, cli_usage
from robota_proxy.cli_database import MissingDatabase

CONFIG_ERROR = 2
NOT_FOUND = 1
#: 128 + SIGPIPE: what a shell reports for a command whose reader went away.
BROKEN_PIPE = 141

DESCRIPTION = """\
Robota Remote proxy: an LLM gateway that holds the vendor keys.
Settings come from ROBOTA_* variables and a .env file in the current directory.

keys, users and usage work on ROBOTA_DATABASE_URL directly; no running proxy is needed.
Exit status: 0 done, 1 not found, 2 bad flag or setting, 141 output cut short.
"""


def log_config(level: str, fmt: str = "text") -> dict[str, Any]:
    """uvicorn's logging config plus our loggers, queued, in ``fmt`` (text or json): see
    ``robota_proxy.observability.logging``."""
    from robota_proxy.observability.logging import log_config as build

    return build(level, fmt)


def _serve(args: argparse.Namespace) -> int:
    """Check everything that can be checked before uvicorn starts (see ``preflight``), say
    what was found (``banner``), then run. The app opens the database again in its lifespan;
    checking here is what makes a bad database a one-line error and status 2 rather than
    uvicorn's traceback and status 3. Run by ``robota_proxy.serving``: uvicorn with a drain
    that exits 0 on SIGTERM."""
    # Imported here, when serving: see the module docstring (--help must stay light).
    import asyncio

    from robota_proxy.banner import banner_lines, output_lines
    from robota_proxy.config_errors import load_settings
    from robota_proxy.preflight import check_settings, probe_database

    settings = load_settings()
    jwt_algorithms = check_settings(settings)
    active_keys = asyncio.run(probe_database(settings.database_url))
    lines = banner_lines(settings, jwt_algorithms, active_keys)
    host = args.host or settings.host
    port = args.port or settings.port
    if args.workers > 1 and settings.redis_url is None:
        lines.append(
            f"robota-proxy: warning: {args.workers} workers without ROBOTA_REDIS_URL: each "
            "worker keeps its own rate limits, cache and resumable streams (each counts rpm "
            "on its own); set ROBOTA_REDIS_URL to share them"
        )
    for line in output_lines(lines, settings.log_format):  # JSON objects in json mode
        print(line, file=sys.stderr)
    from robota_proxy.observability.metrics import prepare_multiprocess

    # --workers N: the workers' metrics meet in PROMETHEUS_MULTIPROC_DIR (README: Metrics).
    prepare_multiprocess(args.workers)
    from robota_proxy.serving import serve

    # An import string and a factory so that --workers and --reload can start fresh copies.
    return serve(
        "robota_proxy.app:create_app",
        host=host,
        port=port,
        workers=args.workers,
        reload=args.reload,
        log_level=settings.log_level,
        log_config=log_config(settings.log_level, settings.log_format),
        access_log=False,  # our RequestContextMiddleware logs one line per request
        # On SIGTERM: running calls and streams get this long to finish (README: Graceful
        # drain); what is left is cancelled and settled, then the process exits 0.
        timeout_graceful_shutdown=settings.drain_seconds,
        # Bounded heads, head/body deadlines, a connection cap (robota_proxy.http_guard), and
        # X-Forwarded-* believed only from the addresses the operator lists (none by default).
        http="robota_proxy.http_guard:GuardedHttpToolsProtocol",
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robota-proxy",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the proxy (settings from ROBOTA_* and .env)")
    serve.add_argument("--host", help="address to bind (default ROBOTA_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default ROBOTA_PORT or 8787)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument("--reload", action="store_true", help="restart on code changes (dev)")
    serve.set_defaults(handler=_serve)
    cli_keys.add_commands(commands)
    cli_usage.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Here, not at the top: --help and usage errors exit above, before any settings exist.
    from robota_proxy.config_errors import ConfigError

    try:
        result: int = args.handler(args)
        sys.stdout.flush()  # here, where a closed pipe can still be caught
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"robota-proxy: error: {line}", file=sys.stderr)
        return CONFIG_ERROR
    except MissingDatabase as exc:
        print(f"robota-proxy: error: {exc}", file=sys.stderr)
        return NOT_FOUND
    except BrokenPipeError:
        _drop_stdout()
        return BROKEN_PIPE
    return result


def _drop_stdout() -> None:
    """Python's documented recipe: point stdout at /dev/null so that the interpreter's own
    flush at exit does not fail a second time and print "Exception ignored"."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
