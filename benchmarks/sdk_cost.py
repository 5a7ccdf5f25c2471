"""CPU per upstream call: our OpenAI adapter (whatever the code under test has: the vendor SDK
on aiohttp until 598d899, its own aiohttp pool since) against the same request made on raw
aiohttp, in one process, against the fake upstream.

    python -m benchmarks.sdk_cost [--calls 1500] [--rounds 6]

It isolates what the profile of the proxy can only attribute: how much of a request's CPU is
the adapter's own request path (options, URL and header building, response handling) rather than
the HTTP exchange itself. Rounds alternate the two, so a machine whose speed drifts (other
people's work) moves both alike; medians are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

from benchmarks import processes
from robota_client.messages import ChatRequest
from robota_proxy.upstreams.openai import OpenAIUpstream

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def measure(base_url: str, calls: int, rounds: int) -> dict[str, list[float]]:
    upstream = OpenAIUpstream(api_key="sk-bench", base_url=f"{base_url}/v1")
    request = ChatRequest.model_validate({"provider": "openai", **BODY})
    payload = json.dumps(BODY).encode()
    headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
    url = f"{base_url}/v1/chat/completions"
    async with aiohttp.ClientSession() as session:

        async def raw() -> None:
            async with session.post(url, data=payload, headers=headers) as response:
                json.loads(await response.read())

        async def sdk() -> None:
            await upstream.chat(request)

        ways: dict[str, Callable[[], Awaitable[None]]] = {
            "our OpenAI adapter": sdk,
            "raw aiohttp": raw,
        }
        results: dict[str, list[float]] = {name: [] for name in ways}
        for call in ways.values():  # warm both pools
            for _ in range(200):
                await call()
        for _ in range(rounds):
            for name, call in ways.items():
                started = time.process_time()
                for _ in range(calls):
                    await call()
                results[name].append((time.process_time() - started) / calls * 1000)
    await upstream.aclose()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sdk_cost")
    parser.add_argument("--calls", type=int, default=1500, help="calls per round and way")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    server = processes.fake_upstream(Path(tempfile.mkdtemp(prefix="robota-sdk-")), 20, 1.0)
    server.start()
    try:
        results = uvloop.run(measure(processes.base_url(server), args.calls, args.rounds))
    finally:
        server.stop()
    for name, values in results.items():
        print(f"{name:<32} {statistics.median(values):.3f} ms CPU per call (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
