"""What a test tells the fake vendors to answer, and how an answer is worked out.

Everything here is vendor-neutral: a ``Plan`` says what the model "said" (text, tool calls,
why it stopped, token counts) and each vendor module only renders it in its own wire format,
so one script line behaves the same whichever vendor the proxy calls.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

Vendor = Literal["openai", "anthropic", "google"]
Finish = Literal["stop", "length", "tool_calls", "content_filter"]
#: Who spoke last in the conversation a vendor received.
LastRole = Literal["user", "tool", "assistant", "system", "none"]


@dataclass(frozen=True, slots=True)
class ToolCallSpec:
    """One tool call the fake model makes; ``id`` is minted in the vendor's style if None."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Fault:
    """A failure to inject.

    ``latency`` and ``status`` apply to any request; the stream faults count *content*
    chunks (a text piece or a tool-argument fragment; for Gemini every data chunk), not
    framing events such as ``message_start`` or ``[DONE]``, so one fault means the same
    thing for every vendor.
    """

    #: Seconds to wait before the response starts.
    latency: float = 0.0
    #: Seconds to wait between two stream events.
    chunk_latency: float = 0.0
    #: Answer with this HTTP status and the vendor's error body instead of a reply.
    status: int | None = None
    #: Seconds sent in ``retry-after`` with ``status``.
    retry_after: float | None = None
    #: The vendor error message with ``status``; a vendor-typical one when None.
    message: str | None = None
    #: This content chunk (0-based) is replaced by text that is not JSON.
    malformed_at: int | None = None
    #: After this many content chunks the connection is cut without ending the body.
    drop_after: int | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """What the fake model answers.

    ``text=None`` means the deterministic default (``Echo: ...`` / ``Tool said: ...``) when
    there are no tool calls, and no text when there are. Token counts left None are derived
    from word counts, so tests can predict them without a tokenizer.
    """

    text: str | None = None
    tool_calls: list[ToolCallSpec] = field(default_factory=list)
    #: ``stop``/``tool_calls`` by default; ``length`` and ``content_filter`` on request.
    finish: Finish | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: Of the prompt tokens, how many the vendor reports as served from its prompt cache.
    cached_tokens: int = 0
    #: Of the prompt tokens, how many the vendor reports as written to its prompt cache.
    #: Only Anthropic reports cache writes; the other vendors fold them into plain input.
    cache_write_tokens: int = 0
    #: Of the completion tokens, how many the vendor reports as hidden reasoning.
    reasoning_tokens: int = 0
    #: Anthropic only: a ``thinking`` block (with a signature the fake checks when the block
    #: is sent back) before the answer; the other vendors never show their reasoning.
    thinking: str | None = None
    fault: Fault | None = None


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One call a vendor endpoint received, as the proxy sent it."""

    vendor: Vendor
    path: str
    #: Header names lower-cased.
    headers: dict[str, str]
    body: dict[str, Any]
    stream: bool
    model: str = ""
    #: The role of the last message (``tool`` for tool results in any vendor's format).
    last_role: LastRole = "none"
    #: The text a ``match`` string is tested against: the last message's text, or all the
    #: tool results of the final round joined by newlines.
    last_text: str = ""


Matcher: TypeAlias = str | Callable[[RecordedRequest], bool] | None


@dataclass(frozen=True, slots=True)
class Conversation:
    """What a vendor module extracted from a request body."""

    last_role: LastRole = "none"
    last_text: str = ""
    #: Whitespace-separated words across every message text (system and tool results too).
    words: int = 0


@dataclass(slots=True)
class Rule:
    reply: Reply | Fault
    match: Matcher
    times: int | None
    vendor: Vendor | None

    def matches(self, request: RecordedRequest) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.vendor is not None and self.vendor != request.vendor:
            return False
        if self.match is None:
            return True
        if isinstance(self.match, str):
            return self.match in request.last_text
        return bool(self.match(request))


@dataclass(frozen=True, slots=True)
class Plan:
    """A reply fully worked out: every vendor renders exactly this."""

    text: str
    tool_calls: list[ToolCallSpec]
    finish: Finish
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    fault: Fault | None
    thinking: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def count_words(text: str) -> int:
    return len(text.split())


def default_text(conversation: Conversation) -> str:
    if conversation.last_role == "tool":
        return f"Tool said: {conversation.last_text}"
    return f"Echo: {conversation.last_text}"


def make_plan(chosen: Reply | Fault | None, conversation: Conversation) -> Plan:
    """Fill in every default of ``chosen`` (None: no rule matched) for this conversation."""
    reply = Reply(fault=chosen) if isinstance(chosen, Fault) else chosen or Reply()
    calls = list(reply.tool_calls)
    text = reply.text if reply.text is not None else "" if calls else default_text(conversation)
    finish: Finish = reply.finish or ("tool_calls" if calls else "stop")
    prompt = reply.prompt_tokens if reply.prompt_tokens is not None else max(1, conversation.words)
    completion = (
        reply.completion_tokens
        if reply.completion_tokens is not None
        else count_words(text) + 5 * len(calls)
    )
    return Plan(
        text=text,
        tool_calls=calls,
        finish=finish,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=min(reply.cached_tokens, prompt),
        cache_write_tokens=min(reply.cache_write_tokens, prompt - min(reply.cached_tokens, prompt)),
        reasoning_tokens=min(reply.reasoning_tokens, completion),
        fault=reply.fault,
        thinking=reply.thinking,
    )
