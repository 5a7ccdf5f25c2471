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


def frame(event_id: int, event: StreamEvent) -> bytes:
    return f"id: {event_id}\nevent: {event.type}\ndata: {event.to_json()}\n\n".encode()
