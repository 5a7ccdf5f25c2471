"""Fake OpenAI, Anthropic and Gemini servers for tests, examples and benchmarks.

They listen on 127.0.0.1 and speak each vendor's wire format closely enough for the
official SDKs, so the proxy is tested against its real HTTP clients without a network or a
vendor key::

    with FakeVendors(api_key="test-vendor-key") as fake:
        fake.script(Reply(text="Hi"), match="hello")
        ...  # point the proxy at fake.openai_base_url / anthropic_base_url / google_base_url
"""

from robota_proxy.testing.script import (
    ErrorKind,
    Fault,
    PrefillMode,
    RecordedRequest,
    Reply,
    ToolCallSpec,
)
from robota_proxy.testing.server import FakeVendors

__all__ = [
    "ErrorKind",
    "FakeVendors",
    "Fault",
    "PrefillMode",
    "RecordedRequest",
    "Reply",
    "ToolCallSpec",
]
