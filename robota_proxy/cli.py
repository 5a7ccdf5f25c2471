"""``robota-proxy``: the command line. ``serve`` runs the app under uvicorn; ``keys`` and
``users`` manage keys and permissions (``robota_proxy.cli_keys``)."""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from typing import Any

from robota_proxy import cli_keys, cli_usage
from robota_proxy.settings import Settings


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config plus our loggers. Passed to uvicorn rather than applied here
    because uvicorn applies it again inside every worker process it starts."""
    import uvicorn.config  # here, not at the top: ``keys`` and ``usage`` start faster without

    config: dict[str, Any] = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["robota"] = {
        "format": "%(asctime)s %(levelname)s %(name)s: %(message)s",
    }
    config["handlers"]["robota"] = {
        "class": "logging.StreamHandler",
        "formatter": "robota",
        "stream": "ext://sys.stderr",
    }
    config["loggers"]["robota_proxy"] = {
        "handlers": ["robota"],
        "level": level.upper(),
        "propagate": False,
    }
    return config


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = Settings()
    host = args.host or settings.host
    port = args.port or settings.port
    if args.workers > 1 and settings.redis_url is None:
        print(
            f"robota-proxy: warning: {args.workers} workers without ROBOTA_REDIS_URL: each "
            "worker keeps its own rate limits, cache and resumable streams (each counts rpm "
            "on its own); set ROBOTA_REDIS_URL to share them",
            file=sys.stderr,
        )
    # An import string and a factory so that --workers and --reload can start fresh copies.
    uvicorn.run(
        "robota_proxy.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=args.workers,
        reload=args.reload,
        log_level=settings.log_level.lower(),
        log_config=log_config(settings.log_level),
        access_log=False,  # our RequestContextMiddleware logs one line per request
        timeout_graceful_shutdown=30,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robota-proxy", description=__doc__)
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
    handler = args.handler
    result: int = handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
