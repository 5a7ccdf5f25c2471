"""Resumable streams: the answer is produced into a buffer, connections read from it.

One chat stream = one producer (upstream events -> numbered entries in a ``StreamBuffer``)
and any number of readers over time (the original HTTP response, then a resumed one after a
dropped connection, possibly on another process when the buffer is Redis). Ids are
``<stream id>:<seq>`` so a ``Last-Event-ID`` alone says which stream and where in it.
"""

from robota_proxy.streams.buffer import Entry, StreamBuffer, event_id, parse_event_id
from robota_proxy.streams.memory import MemoryStreamBuffer

__all__ = ["Entry", "MemoryStreamBuffer", "StreamBuffer", "event_id", "parse_event_id"]
