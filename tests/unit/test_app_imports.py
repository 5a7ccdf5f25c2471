"""What ``import robota_proxy.app`` leaves for later (issue 13, cold start).

Each module below is imported where it is first needed, not with the app: PyJWT and
cryptography when JWT auth is configured, SQLAlchemy's asyncio extension (and the ORM it
imports) when an engine is made, a dialect's ``INSERT`` when a statement is built for it,
prometheus-client when metrics are built, the OpenAPI document's models on the first
``GET /openapi.json``, the client's HTTP and WebSocket machinery (httpx, websockets) never
(the proxy uses ``robota_client`` for its wire contract only; the alerts' webhook client
imports httpx when it opens). Together they were a few hundred milliseconds of every start; this
keeps a top-level import from bringing one back unnoticed. The probe runs in a fresh
interpreter: the test process may have imported any of them already.
"""

from __future__ import annotations

import subprocess
import sys

APP_NEVER_IMPORTS = [
    "cryptography",
    "httpx",
    "jwt",
    "prometheus_client",
    "robota_proxy.openapi",
    "robota_proxy.policy.jwt",
    "robota_client.provider",
    "robota_client.transport",
    "websockets",
    "sqlalchemy.dialects.postgresql",
    "sqlalchemy.dialects.sqlite",
    "sqlalchemy.ext.asyncio",
    "sqlalchemy.orm",
]

PROBE = """
import sys
import robota_proxy.app
print(",".join(m for m in {heavy!r} if m in sys.modules))
"""


def test_importing_the_app_leaves_the_lazy_modules_unimported() -> None:
    probe = PROBE.format(heavy=APP_NEVER_IMPORTS)
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout == "\n"
