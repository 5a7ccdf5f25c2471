"""A tool-calling agent loop through RemoteAIProvider.

The loop is written exactly as it would be against a local provider: ask, run the tools the
model requests here on the client, send back the results, repeat until the model answers.
The proxy never runs tools; it only carries the calls and results.

    python examples/tool_agent.py "What is the weather in Paris and the time in Tokyo?"

(that question is the default). Against the offline ``mock`` provider the model asks for both
tools in one turn, as a real model would, and its final answer quotes both results.

Settings: ROBOTA_SERVER_URL, ROBOTA_KEY, ROBOTA_PROVIDER (default mock), ROBOTA_MODEL,
ROBOTA_STREAM=1 to use streaming turns.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from robota_client import RemoteAIProvider
from robota_client.messages import AssistantMessage, MessageLike, ToolSchema


def get_weather(city: str) -> dict[str, Any]:
    return {"city": city, "temp_c": 21, "sky": "clear"}


def get_time(timezone: str) -> dict[str, Any]:
    return {"timezone": timezone, "time": "12:00"}


TOOLS: dict[str, tuple[ToolSchema, Callable[..., dict[str, Any]]]] = {
    "get_weather": (
        ToolSchema(
            name="get_weather",
            description="Current weather for a city",
            parameters={
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        ),
        get_weather,
    ),
    "get_time": (
        ToolSchema(
            name="get_time",
            description="Current time in a time zone",
            parameters={
                "type": "object",
                "properties": {"timezone": {"type": "string"}},
                "required": ["timezone"],
            },
        ),
        get_time,
    ),
}


async def turn(ai: RemoteAIProvider, messages: list[MessageLike], stream: bool) -> AssistantMessage:
    schemas = [schema for schema, _ in TOOLS.values()]
    if not stream:
        return await ai.chat(messages, tools=schemas)
    events = ai.stream(messages, tools=schemas)
    async for _ in events:
        pass
    assert events.message is not None
    return events.message


async def run(question: str, *, max_turns: int = 5) -> str:
    ai = RemoteAIProvider(
        os.environ.get("ROBOTA_SERVER_URL", "http://127.0.0.1:8787"),
        os.environ.get("ROBOTA_KEY", "dev-key"),
        os.environ.get("ROBOTA_PROVIDER", "mock"),
        os.environ.get("ROBOTA_MODEL", "mock-1"),
    )
    stream = os.environ.get("ROBOTA_STREAM") == "1"
    messages: list[MessageLike] = [{"role": "user", "content": question}]
    async with ai:
        for _ in range(max_turns):
            answer = await turn(ai, messages, stream)
            if not answer.tool_calls:
                return answer.content or ""
            messages.append(answer)
            for call in answer.tool_calls:
                _, function = TOOLS[call.function.name]
                result = json.dumps(function(**call.parsed_arguments()))
                print(f"-> {call.function.name}({call.function.arguments}) = {result}")
                messages.append({"role": "tool", "toolCallId": call.id, "content": result})
    raise RuntimeError(f"no final answer after {max_turns} turns")


if __name__ == "__main__":
    question = " ".join(sys.argv[1:]) or "What is the weather in Paris and the time in Tokyo?"
    print(asyncio.run(run(question)))
