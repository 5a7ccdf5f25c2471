"""Server-Sent Events framing for the chat stream.

Writing a frame is three lines of the SSE format; parsing (the hard direction) is left to
``httpx-sse`` on the client. Data is compact JSON, which never contains a raw newline, so each
event is exactly one ``data:`` line.
"""

from __future__ import annotations

from robota_client.messages import StreamEvent

HEADERS = {
    "Cache-Control": "no-cache",
    # Reverse proxies (nginx) must not buffer a token stream.
    "X-Accel-Buffering": "no",
}


def frame(event_id: int | str, event: StreamEvent) -> bytes:
    return encode(str(event_id), event.type, event.to_json())


def encode(event_id: str, name: str, data: str) -> bytes:
    """One event whose JSON is already serialised (as kept in a stream buffer)."""
    return f"id: {event_id}\nevent: {name}\ndata: {data}\n\n".encode()
