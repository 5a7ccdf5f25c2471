"""A vendor's event stream of JSON objects, read so that one bad chunk does not end it.

A vendor (or a proxy in front of it) now and then sends an event whose data is not JSON: a
cut line, a debugging print, a keep-alive in the wrong place. The vendor SDKs' readers raise
on it and the whole answer is lost. Here such a chunk is skipped and counted, the stream goes
on, and the count is logged once, at the end of the stream, with the request id. The events
are framed by ``httpx-sse`` (never by hand, see ``vendor_http``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from httpx_sse import ServerSentEvent

from robota_proxy.scope import current_request_id

log = logging.getLogger("robota_proxy.upstream")

JSONDict = dict[str, Any]


async def json_events(
    events: AsyncIterator[ServerSentEvent], vendor: str, *, done: str | None = None
) -> AsyncGenerator[tuple[str, JSONDict], None]:
    """``(event name, data object)`` per event; ``done``: the data that ends the stream
    (OpenAI's ``[DONE]``). Data that is not a JSON object is skipped and counted."""
    skipped = 0
    try:
        async for sse in events:
            data = sse.data
            if done is not None and data == done:
                return
            if not data:
                continue
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                skipped += 1
                continue
            yield sse.event, parsed
    finally:
        if skipped:
            log.warning(
                "request %s: skipped %d malformed chunk%s in a stream from %s",
                current_request_id.get() or "-",
                skipped,
                "" if skipped == 1 else "s",
                vendor,
            )
