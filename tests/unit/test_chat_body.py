"""Parsing the chat body: both spellings, TypeScript extras, clear errors."""

from __future__ import annotations

import json

import pytest

from robota_proxy.chat_body import parse_chat_request
from robota_proxy.errors import InvalidRequest


def test_typescript_robota_messages_are_accepted() -> None:
    body = {
        "provider": "openai",
        "model": "gpt-4o",
        "messages": [
            {
                "role": "user",
                "content": "hi",
                "id": "m1",
                "timestamp": "2025-01-01T00:00:00Z",
                "state": "complete",
            },
            {
                "role": "assistant",
                "content": None,
                "toolCalls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "toolCallId": "c1", "content": "42"},
        ],
        "options": {"maxTokens": 10, "stop": "END"},
    }
    request = parse_chat_request(json.dumps(body).encode())
    assert request.messages[0].id == "m1"
    assert request.messages[0].timestamp == "2025-01-01T00:00:00Z"
    assert request.messages[1].tool_calls is not None
    assert request.messages[2].tool_call_id == "c1"
    assert request.options.max_tokens == 10
    assert request.options.stop == ["END"]


def test_snake_case_is_accepted_too() -> None:
    body = {
        "provider": "openai",
        "model": "gpt-4o",
        "messages": [{"role": "tool", "tool_call_id": "c1", "content": "x"}],
        "options": {"max_tokens": 5},
    }
    request = parse_chat_request(json.dumps(body).encode())
    assert request.options.max_tokens == 5


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{nope", "not valid JSON"),
        (b"   ", "empty"),
        (b'{"provider": "x", "model": "y", "messages": [{"role": "assistant"}]}', "toolCalls"),
        (b'{"provider": "x", "model": "y", "messages": [{"role": "user"}]}', "content"),
        (
            b'{"provider": "", "model": "y", "messages": [{"role": "user", "content": "a"}]}',
            "provider",
        ),
        (
            b'{"provider": "x", "model": "y", "messages": [{"role": "user", "content": "a"}],'
            b' "options": {"maxTokens": 0}}',
            "maxTokens",
        ),
    ],
)
def test_errors_name_the_problem(body: bytes, words: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_chat_request(body)
    assert words in raised.value.message
