"""Talk to a running proxy through RemoteAIProvider: a chat, a stream and a tool call.

Start the proxy first (README, first command), then:  python examples/quickstart.py
With no vendor key configured this uses the proxy's built-in, offline ``mock`` provider.
Point it elsewhere with ROBOTA_SERVER_URL, ROBOTA_KEY, ROBOTA_PROVIDER and ROBOTA_MODEL.
"""

from __future__ import annotations

import asyncio
import os

from robota_client import RemoteAIProvider

SERVER = os.environ.get("ROBOTA_SERVER_URL", "http://127.0.0.1:8787")
KEY = os.environ.get("ROBOTA_KEY", "dev-key")
PROVIDER = os.environ.get("ROBOTA_PROVIDER", "mock")
MODEL = os.environ.get("ROBOTA_MODEL", "mock-1")

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


async def main() -> None:
    async with RemoteAIProvider(SERVER, KEY, PROVIDER, MODEL) as ai:
        answer = await ai.chat([{"role": "user", "content": "Hello from the quickstart"}])
        print("chat:  ", answer.content)

        print("stream:", end=" ", flush=True)
        async for chunk in ai.chat_stream([{"role": "user", "content": "Stream this answer"}]):
            print(chunk, end="", flush=True)
        print()

        question = 'What is the weather? {"city": "Paris"}'
        call = await ai.chat([{"role": "user", "content": question}], tools=[WEATHER_TOOL])
        for tool_call in call.tool_calls or []:
            print("tool:  ", tool_call.function.name, tool_call.function.arguments)


if __name__ == "__main__":
    asyncio.run(main())
