"""Robota Remote client: use models held by a Robota proxy as if they were local.

The names below are imported on first use (PEP 562): the proxy imports this package for its
wire contract (``robota_client.messages``) and must not pay for the client's HTTP, WebSocket
and retry machinery at start-up (issue 13's cold start).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from robota_client.errors import (
        BudgetExceededError,
        ForbiddenError,
        InternalError,
        InvalidRequestError,
        NotFoundError,
        PayloadTooLargeError,
        ProtocolError,
        QuotaExceededError,
        RateLimitedError,
        RemoteConnectionError,
        RemoteError,
        StreamRestarted,
        UnauthenticatedError,
        UpstreamError,
        UpstreamTimeoutError,
        UpstreamUnavailableError,
    )
    from robota_client.messages import (
        AssistantMessage,
        ChatOptions,
        ChatRequest,
        DeltaEvent,
        DoneEvent,
        ErrorEvent,
        FunctionCall,
        MessageLike,
        ResponseMetadata,
        RestartEvent,
        StreamEvent,
        ToolCall,
        ToolCallEvent,
        ToolSchema,
        UniversalMessage,
        Usage,
        UsageEvent,
    )
    from robota_client.provider import AIProvider, ChatStream, RemoteAIProvider, TextStream
    from robota_client.sync import SyncChatStream, SyncRemoteAIProvider, SyncTextStream
    from robota_client.transport import ChatEvent, EventStream, HTTPTransport

_MODULES = {
    "BudgetExceededError": "robota_client.errors",
    "ForbiddenError": "robota_client.errors",
    "InternalError": "robota_client.errors",
    "InvalidRequestError": "robota_client.errors",
    "NotFoundError": "robota_client.errors",
    "PayloadTooLargeError": "robota_client.errors",
    "ProtocolError": "robota_client.errors",
    "QuotaExceededError": "robota_client.errors",
    "RateLimitedError": "robota_client.errors",
    "RemoteConnectionError": "robota_client.errors",
    "RemoteError": "robota_client.errors",
    "StreamRestarted": "robota_client.errors",
    "UnauthenticatedError": "robota_client.errors",
    "UpstreamError": "robota_client.errors",
    "UpstreamTimeoutError": "robota_client.errors",
    "UpstreamUnavailableError": "robota_client.errors",
    "AssistantMessage": "robota_client.messages",
    "ChatOptions": "robota_client.messages",
    "ChatRequest": "robota_client.messages",
    "DeltaEvent": "robota_client.messages",
    "DoneEvent": "robota_client.messages",
    "ErrorEvent": "robota_client.messages",
    "FunctionCall": "robota_client.messages",
    "MessageLike": "robota_client.messages",
    "ResponseMetadata": "robota_client.messages",
    "RestartEvent": "robota_client.messages",
    "StreamEvent": "robota_client.messages",
    "ToolCall": "robota_client.messages",
    "ToolCallEvent": "robota_client.messages",
    "ToolSchema": "robota_client.messages",
    "UniversalMessage": "robota_client.messages",
    "Usage": "robota_client.messages",
    "UsageEvent": "robota_client.messages",
    "AIProvider": "robota_client.provider",
    "ChatStream": "robota_client.provider",
    "RemoteAIProvider": "robota_client.provider",
    "TextStream": "robota_client.provider",
    "SyncChatStream": "robota_client.sync",
    "SyncRemoteAIProvider": "robota_client.sync",
    "SyncTextStream": "robota_client.sync",
    "ChatEvent": "robota_client.transport",
    "EventStream": "robota_client.transport",
    "HTTPTransport": "robota_client.transport",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'robota_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AIProvider",
    "AssistantMessage",
    "BudgetExceededError",
    "ChatEvent",
    "ChatOptions",
    "ChatRequest",
    "ChatStream",
    "DeltaEvent",
    "DoneEvent",
    "ErrorEvent",
    "EventStream",
    "ForbiddenError",
    "FunctionCall",
    "HTTPTransport",
    "InternalError",
    "InvalidRequestError",
    "MessageLike",
    "NotFoundError",
    "PayloadTooLargeError",
    "ProtocolError",
    "QuotaExceededError",
    "RateLimitedError",
    "RemoteAIProvider",
    "RemoteConnectionError",
    "RemoteError",
    "ResponseMetadata",
    "RestartEvent",
    "StreamEvent",
    "StreamRestarted",
    "SyncChatStream",
    "SyncRemoteAIProvider",
    "SyncTextStream",
    "TextStream",
    "ToolCall",
    "ToolCallEvent",
    "ToolSchema",
    "UnauthenticatedError",
    "UniversalMessage",
    "UpstreamError",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
    "Usage",
    "UsageEvent",
]
