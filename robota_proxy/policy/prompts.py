"""The prompt's token bound, worked out once per request and shared through the scope."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from robota_client.messages import ChatRequest
from robota_proxy import scope as keys
from robota_proxy.policy.pricing import prompt_token_bound


def prompt_bound(scope: MutableMapping[str, Any], request: ChatRequest) -> int:
    """``prompt_token_bound(request)``, worked out once per request: the rate limits' estimate
    and the metering's reservation both start from it, and the walk over the prompt (every
    text UTF-8-encoded) is the costly part. Kept in the scope beside the very request it is
    the bound of (``PROMPT_TOKEN_BOUND``)."""
    kept = scope.get(keys.PROMPT_TOKEN_BOUND)
    if isinstance(kept, tuple) and kept[0] is request:
        bound: int = kept[1]
        return bound
    bound = prompt_token_bound(request)
    scope[keys.PROMPT_TOKEN_BOUND] = (request, bound)
    return bound
