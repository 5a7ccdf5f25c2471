"""What ``serve`` says on stderr as it starts: which database, which backends, which
providers, which credentials it will accept.

Most "the proxy answers 401 to everything" reports come down to one of these being other than
the operator thought (a second ``robota.db`` in another directory, a key variable not
exported). Saying them at start makes the mistake visible before the first request. Names and
counts only: never a key, never a password. With ``ROBOTA_LOG_FORMAT=json`` each line is a
JSON object like the rest of the output (``output_lines``), so that a log shipper parses all
of it.
"""

from __future__ import annotations

import datetime
import json

from robota_proxy.config_errors import redact_url
from robota_proxy.preflight import describe_database
from robota_proxy.settings import Settings

PREFIX = "robota-proxy:"


def configured_providers(settings: Settings) -> list[str]:
    """The providers the app will build, in its order (``upstreams.registry.build_upstreams``
    decides the same from the same settings; a test keeps the two in step), without building
    any adapter."""
    enabled = {
        "mock": settings.mock_enabled,
        "openai": settings.openai_api_key is not None or bool(settings.openai_base_url),
        "anthropic": settings.anthropic_api_key is not None,
        "google": settings.google_api_key is not None,
    }
    return [name for name, on in enabled.items() if on]


def auth_summary(settings: Settings, jwt_algorithms: list[str], active_keys: int) -> str:
    if settings.auth == "disabled":
        return (
            "DISABLED (ROBOTA_AUTH=disabled): anyone who can reach this proxy can spend its "
            "vendor keys"
        )
    static = len(settings.api_keys)
    parts = [
        f"{active_keys} active rk_ key{'s' if active_keys != 1 else ''} in the database",
        f"{static} static key{'s' if static != 1 else ''} (ROBOTA_API_KEYS)",
    ]
    if jwt_algorithms:
        parts.append(f"JWT {', '.join(jwt_algorithms)}")
    return "; ".join(parts)


def nobody_can_sign_in(settings: Settings, jwt_algorithms: list[str], active_keys: int) -> bool:
    return (
        settings.auth == "keys"
        and not settings.api_keys
        and not jwt_algorithms
        and active_keys == 0
    )


def banner_lines(settings: Settings, jwt_algorithms: list[str], active_keys: int) -> list[str]:
    backends = (
        f"Redis {redact_url(settings.redis_url)}"
        if settings.redis_url
        else "memory (this process only)"
    )
    lines = [
        f"{PREFIX} database: {describe_database(settings.database_url)}",
        f"{PREFIX} rate limits, cache, resumable streams: {backends}",
        f"{PREFIX} providers: {', '.join(configured_providers(settings)) or 'none'}",
        f"{PREFIX} auth: {auth_summary(settings, jwt_algorithms, active_keys)}",
    ]
    if nobody_can_sign_in(settings, jwt_algorithms, active_keys):
        lines.append(
            f"{PREFIX} WARNING: NO CREDENTIAL CAN BE ACCEPTED: no active key in this database, "
            "no ROBOTA_API_KEYS and no JWT settings, so every request gets 401. Create a key "
            "with `robota-proxy keys create --user NAME` (same ROBOTA_DATABASE_URL, same "
            "directory) or set ROBOTA_API_KEYS"
        )
    return lines


def output_lines(lines: list[str], fmt: str) -> list[str]:
    """``lines`` as ``serve`` prints them: as they are in ``text`` mode; in ``json`` mode one
    object per line with the keys of every JSON log line (``time``, ``level``, ``logger``,
    ``message``, the prefix dropped) and ``"event": "startup"``."""
    if fmt != "json":
        return lines
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    objects = []
    for line in lines:
        message = line.removeprefix(f"{PREFIX} ")
        warning = message.lower().startswith("warning: ")
        if warning:
            message = message[len("warning: ") :]
        entry = {
            "time": now,
            "level": "warning" if warning else "info",
            "logger": "robota_proxy.banner",
            "message": message,
            "event": "startup",
        }
        objects.append(json.dumps(entry, ensure_ascii=False))
    return objects
