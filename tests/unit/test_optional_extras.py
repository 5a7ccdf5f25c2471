"""The proxy runs on its embedded defaults without the optional extras installed.

``[redis]`` and ``[postgres]`` are extras: README command 1 installs neither, so nothing on the
default path may import ``redis`` or ``asyncpg``. A fresh interpreter blocks both (as if they
were not installed), builds the app on its defaults and answers a chat through it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

PROGRAM = textwrap.dedent(
    """
    import asyncio, sys
    for name in ("redis", "redis.asyncio", "asyncpg"):
        sys.modules[name] = None  # ``import redis`` now raises ImportError

    import httpx
    from robota_proxy.app import create_app
    from robota_proxy.settings import Settings

    async def main() -> None:
        app = create_app(Settings(api_keys=["k"], database_url=sys.argv[1]))
        async with app.lifespan():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as http:
                body = {"provider": "mock", "model": "mock-1",
                        "messages": [{"role": "user", "content": "hi"}]}
                answer = await http.post(
                    "/ai/chat", json=body, headers={"Authorization": "Bearer k"}
                )
                print(answer.status_code, answer.json()["content"])
        loaded = sorted(n for n in ("redis", "asyncpg") if sys.modules.get(n) is not None)
        print("loaded:", loaded)

    asyncio.run(main())
    """
)


def test_app_serves_on_defaults_with_redis_and_asyncpg_missing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'robota.db'}"
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, url], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["200 You said: hi", "loaded: []"]
