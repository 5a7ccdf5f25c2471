"""The examples run as a user runs them: the mount examples under uvicorn, the scripts as
processes against the running proxy."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from robota_client import RemoteAIProvider
from tests.e2e.conftest import ROOT, USER_KEY, ProxyProcess, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBOTA_")}
    env.update(extra)
    return env


@pytest.fixture(params=["examples.fastapi_mount:app", "examples.starlette_mount:app"])
def host_app(request: pytest.FixtureRequest) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", request.param, "--port", str(port)],
        cwd=ROOT,
        env=clean_env(ROBOTA_API_KEYS=USER_KEY),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/hello", timeout=0.5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("host app did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_mounted_under_a_prefix(host_app: str) -> None:
    async with httpx.AsyncClient(base_url=host_app) as http:
        assert (await http.get("/hello")).json() == {"hello": "from the host app"}
        assert (await http.get("/llm/health")).json() == {"status": "ok"}
        refused = await http.post("/llm/ai/chat", json={})
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthenticated"

    async with RemoteAIProvider(f"{host_app}/llm", USER_KEY, "mock", "mock-1") as remote:
        answer = await remote.chat([{"role": "user", "content": "through the mount"}])
        assert answer.content == "You said: through the mount"
        chunks = [c async for c in remote.chat_stream([{"role": "user", "content": "a b c"}])]
        assert "".join(chunks) == "You said: a b c"


def run_example(script: str, proxy: ProxyProcess, *args: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, f"examples/{script}", *args],
        cwd=ROOT,
        env=clean_env(ROBOTA_SERVER_URL=proxy.url, ROBOTA_KEY=USER_KEY, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_quickstart(proxy: ProxyProcess) -> None:
    out = run_example("quickstart.py", proxy)
    assert "chat:   You said: Hello from the quickstart" in out
    assert "stream: You said: Stream this answer" in out
    assert 'tool:   get_weather {"city": "Paris"}' in out


QUESTION = "What is the weather in Paris and the time in Tokyo?"
WEATHER_RESULT = '{"city": "Paris", "temp_c": 21, "sky": "clear"}'
TIME_RESULT = '{"timezone": "Europe/Paris", "time": "12:00"}'


@pytest.mark.parametrize("stream", ["0", "1"])
@pytest.mark.parametrize("args", [(), (QUESTION,)], ids=["default question", "question given"])
def test_tool_agent_answers_its_question_with_both_tools(
    proxy: ProxyProcess, stream: str, args: tuple[str, ...]
) -> None:
    """The docstring's question, against the mock: both tools in one turn, each with
    arguments its function accepts, and a final answer built from both results."""
    out = run_example("tool_agent.py", proxy, *args, ROBOTA_STREAM=stream)
    assert out.splitlines() == [
        f'-> get_weather({{"city": "Paris"}}) = {WEATHER_RESULT}',
        f'-> get_time({{"timezone": "Europe/Paris"}}) = {TIME_RESULT}',
        f"Tool get_weather returned: {WEATHER_RESULT}; Tool get_time returned: {TIME_RESULT}",
    ]


def test_tool_agent_in_parallel_with_one_written_object(proxy: ProxyProcess) -> None:
    """Every tool at once with one JSON object: each tool gets only what it declares."""
    out = run_example("tool_agent.py", proxy, 'both in parallel {"city": "Oslo"}')
    assert out.splitlines()[-1] == (
        'Tool get_weather returned: {"city": "Oslo", "temp_c": 21, "sky": "clear"}; '
        f"Tool get_time returned: {TIME_RESULT}"
    )


def test_tool_agent_with_openai_through_the_fake_vendor(proxy: ProxyProcess, fake: object) -> None:
    from robota_proxy.testing import FakeVendors, Reply, ToolCallSpec

    assert isinstance(fake, FakeVendors)
    fake.script(
        Reply(
            tool_calls=[
                ToolCallSpec("get_weather", {"city": "Paris"}),
                ToolCallSpec("get_time", {"timezone": "Asia/Tokyo"}),
            ]
        ),
        match="Paris and the time",
    )
    fake.script(Reply(text="Paris is 21C; Tokyo is at 12:00."), match="12:00")
    out = run_example(
        "tool_agent.py",
        proxy,
        QUESTION,
        ROBOTA_PROVIDER="openai",
        ROBOTA_MODEL="gpt-4o-mini",
    )
    assert "-> get_weather(" in out and "-> get_time(" in out
    assert out.strip().endswith("Paris is 21C; Tokyo is at 12:00.")
