"""``python -m robota_proxy.testing``: the fake vendors as a standalone server, for trying
the proxy or the examples by hand without any vendor account. Unscripted, every vendor
answers with its deterministic echo reply."""

from __future__ import annotations

import argparse
import signal
import time
from types import FrameType

from robota_proxy.testing.server import FakeVendors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m robota_proxy.testing",
        description="Serve fake OpenAI, Anthropic and Gemini endpoints on 127.0.0.1.",
    )
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free)")
    parser.add_argument(
        "--api-key", default="test-vendor-key", help="the key every vendor endpoint accepts"
    )
    args = parser.parse_args(argv)
    stop = _StopRequest()
    with FakeVendors(api_key=args.api_key, port=args.port) as fake:
        print(f"OpenAI:    {fake.openai_base_url}", flush=True)
        print(f"Anthropic: {fake.anthropic_base_url}", flush=True)
        print(f"Google:    {fake.google_base_url}", flush=True)
        print(f"API key:   {fake.api_key}   (Ctrl-C to stop)", flush=True)
        while not stop.requested:
            time.sleep(0.1)


class _StopRequest:
    """Ctrl-C and ``kill`` both stop the server cleanly. The handlers are installed
    explicitly: a process started in the background by a non-interactive shell inherits
    SIGINT as ignored, and Python then leaves it ignored, so Ctrl-C alone would not do."""

    def __init__(self) -> None:
        self.requested = False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


if __name__ == "__main__":
    main()
