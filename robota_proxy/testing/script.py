"""What a test tells the fake vendors to answer, and how an answer is worked out.

Everything here is vendor-neutral: a ``Plan`` says what the model "said" (text, tool calls,
why it stopped, token counts) and each vendor module only renders it in its own wire format,
so one script line behaves the same whichever vendor the proxy calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias

Vendor = Literal["openai", "anthropic", "google"]
Finish = Literal["stop", "length", "tool_calls", "content_filter"]
#: Who spoke last in the conversation a vendor received.
LastRole = Literal["user", "tool", "assistant", "system", "none"]
#: A request error each vendor words in its own way (see ``Fault.error_kind``).
ErrorKind = Literal["context_length", "content_policy"]
#: What a vendor does with a conversation ending in an assistant turn that has text:
#: ``continue`` it (answer only the rest of the planned text), ``ignore`` it (answer the
#: whole planned text afresh) or ``reject`` the request with the vendor's 400.
PrefillMode = Literal["continue", "ignore", "reject"]


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
    #: After this many content chunks the stream goes silent with the connection open, for
    #: ``stall_seconds``, then is cut like ``drop_after``: what a read timeout must catch.
    stall_after: int | None = None
    stall_seconds: float = 30.0
    #: Streams only: the status line and the framing before the first content chunk (the
    #: role chunk, Anthropic's ``message_start``) go out at once, the first content chunk
    #: this many seconds later: a slow first token, unlike ``latency`` which holds the
    #: headers. A non-streamed answer has nothing to send early, so it is simply delayed.
    first_token_latency: float = 0.0
    #: Streams only: everything, usage included, is sent and the body ends cleanly, but the
    #: vendor's end marker is missing (OpenAI ``[DONE]``, Anthropic ``message_stop``; Gemini
    #: has none, so its final chunk, the one naming the finish reason and usage, is left out
    #: and the last text piece goes in a plain chunk).
    no_terminal: bool = False
    #: The vendor's own answer to a prompt that is too long (a 400 everywhere) or that its
    #: safety system refuses (OpenAI: a 400; Anthropic: a 200 with ``stop_reason`` ``refusal``;
    #: Gemini: a 200 with ``promptFeedback.blockReason`` ``SAFETY`` and no candidate).
    #: ``status`` must then be None or 400; ``message`` replaces the vendor's text.
    error_kind: ErrorKind | None = None
    #: The rule carrying this fault matches only during its first ``active_for`` seconds
    #: (from ``script()``, on the monotonic clock), then stays installed but never matches
    #: again: a vendor that is down for a while and comes back.
    active_for: float | None = None

    def __post_init__(self) -> None:
        if self.error_kind is not None and self.status not in (None, 400):
            raise ValueError("error_kind is a 400 (or a 200 refusal): leave status None or 400")
        if self.active_for is not None and self.active_for < 0:
            raise ValueError("active_for must not be negative")


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
    #: The text of a final assistant turn (a prefill the model is asked to continue), None
    #: when the conversation does not end with an assistant turn that has text.
    prefill: str | None = None
    #: ``time.monotonic()`` when the request arrived, to assert the spacing of retries.
    received_at: float = field(default_factory=time.monotonic)


Matcher: TypeAlias = str | Callable[[RecordedRequest], bool] | None


@dataclass(frozen=True, slots=True)
class Conversation:
    """What a vendor module extracted from a request body."""

    last_role: LastRole = "none"
    last_text: str = ""
    #: Whitespace-separated words across every message text (system and tool results too).
    words: int = 0
    #: The final assistant turn's text, when there is one to continue; ``last_role`` and
    #: ``last_text`` then describe the turn before it (what the answer is an answer to), so a
    #: script line matches a continued request as it matched the first one.
    prefill: str | None = None


@dataclass(slots=True)
class Rule:
    reply: Reply | Fault
    match: Matcher
    times: int | None
    vendor: Vendor | None
    #: ``time.monotonic()`` when the rule was scripted; ``Fault.active_for`` counts from it.
    installed_at: float = field(default_factory=time.monotonic)

    @property
    def fault(self) -> Fault | None:
        return self.reply if isinstance(self.reply, Fault) else self.reply.fault

    def matches(self, request: RecordedRequest, now: float | None = None) -> bool:
        """``now`` (monotonic) is for tests of the time window; the clock by default."""
        if self.times is not None and self.times <= 0:
            return False
        fault = self.fault
        if fault is not None and fault.active_for is not None:
            elapsed = (time.monotonic() if now is None else now) - self.installed_at
            if elapsed >= fault.active_for:
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
    #: A safety refusal answered with a 200 (``Fault.error_kind`` ``content_policy``): the
    #: vendor renders it its own way (no content block, a blocked prompt).
    refused: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def count_words(text: str) -> int:
    return len(text.split())


def default_text(conversation: Conversation) -> str:
    if conversation.last_role == "tool":
        return f"Tool said: {conversation.last_text}"
    return f"Echo: {conversation.last_text}"


def make_plan(
    chosen: Reply | Fault | None, conversation: Conversation, *, continue_prefill: bool = False
) -> Plan:
    """Fill in every default of ``chosen`` (None: no rule matched) for this conversation.

    With ``continue_prefill`` and a conversation ending in an assistant text P, a planned
    text that starts with P is cut to what follows P, as a model continuing its own words
    would answer; a text that does not start with P is answered whole.
    """
    reply = Reply(fault=chosen) if isinstance(chosen, Fault) else chosen or Reply()
    calls = list(reply.tool_calls)
    text = reply.text if reply.text is not None else "" if calls else default_text(conversation)
    prefill = conversation.prefill
    if continue_prefill and prefill is not None and text.startswith(prefill):
        text = text[len(prefill) :]
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


def refusal(plan: Plan) -> Plan:
    """``plan`` as a safety refusal where the vendor answers one with a 200: nothing said,
    nothing generated, finish ``content_filter``."""
    return replace(
        plan,
        text="",
        tool_calls=[],
        finish="content_filter",
        completion_tokens=0,
        reasoning_tokens=0,
        thinking=None,
        refused=True,
    )
