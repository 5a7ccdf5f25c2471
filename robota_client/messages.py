"""The wire contract shared by the client and the proxy.

JSON on the wire is camelCase, following the seed's TypeScript types, so a TypeScript
Robota client can speak it too; Python attributes are snake_case. Both spellings are
accepted on input. Unknown fields are ignored rather than rejected so that messages coming
from TypeScript Robota (which carry ``state`` and other bookkeeping) pass through.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    model_validator,
)
from pydantic.alias_generators import to_camel

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "error"]
ErrorCode = Literal[
    "invalid_request",
    "unauthenticated",
    "forbidden",
    "not_found",
    "payload_too_large",
    "rate_limited",
    "quota_exceeded",
    "budget_exceeded",
    "upstream_error",
    "upstream_unavailable",
    "upstream_timeout",
    "internal_error",
]

# --- bounds ---------------------------------------------------------------------------------
# What a request may carry is bounded here, at the edge, by what the proxy can store and
# compute with: a value past them is a 400 naming the field, never a 500 from the database.

#: The ledger's ``provider`` column is ``varchar(100)``.
MAX_PROVIDER_LENGTH = 100
#: The ledger's ``model`` column is ``varchar(200)``.
MAX_MODEL_LENGTH = 200
#: Output tokens one call may ask for. Far above any model's output limit (a few hundred
#: thousand at most), yet small enough that the worst case a budget reserves (this many tokens
#: at the dearest price) stays orders of magnitude inside the int64 picodollar counters.
MAX_TOKENS = 10_000_000
#: A name the proxy stores (provider, model): no control characters. PostgreSQL refuses NUL
#: in text outright, and the others only make logs and reports lie.
NAME_PATTERN = r"^[^\x00-\x1f\x7f]+$"

#: HTTP status for each wire error code; the one table both halves agree on.
STATUS_BY_CODE: dict[str, int] = {
    "invalid_request": 400,
    "unauthenticated": 401,
    "forbidden": 403,
    "not_found": 404,
    "payload_too_large": 413,
    "rate_limited": 429,
    "quota_exceeded": 429,
    "budget_exceeded": 402,
    "upstream_error": 502,
    "upstream_unavailable": 503,
    "upstream_timeout": 504,
    # A bug in the proxy itself; never expected, listed so it still has a typed shape.
    "internal_error": 500,
}


class WireModel(BaseModel):
    """Base for every contract type: camelCase aliases, both spellings accepted."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready camelCase dict, leaving out unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


class FunctionCall(WireModel):
    name: str
    #: A JSON document as a string, exactly as OpenAI and the seed carry it.
    arguments: str = "{}"


class ToolCall(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def parsed_arguments(self) -> Any:
        """The arguments decoded; ``{}`` for an empty string, which some models send."""
        return json.loads(self.function.arguments) if self.function.arguments.strip() else {}


class UniversalMessage(WireModel):
    role: Role
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    metadata: dict[str, Any] | None = None
    # Carried by TypeScript Robota messages; kept when given, never required.
    id: str | None = None
    timestamp: str | None = None

    @model_validator(mode="after")
    def _check_shape(self) -> UniversalMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs toolCallId (the id of the call it answers)")
        if self.role in ("system", "user", "tool") and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or toolCalls")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages may carry toolCalls")
        return self


class ToolSchema(WireModel):
    name: str = Field(min_length=1, max_length=128)
    description: str = ""
    #: JSON Schema of the arguments object.
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


def _stop_as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class ChatOptions(WireModel):
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0, le=MAX_TOKENS)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: Annotated[list[str] | None, BeforeValidator(_stop_as_list)] = None
    #: ``auto``, ``none``, ``required``, or the name of one tool the model must call.
    tool_choice: str | None = None
    #: ``text`` (default) or ``json`` for a JSON object answer.
    response_format: Literal["text", "json"] | None = None
    #: Opt in to the response cache for non-deterministic requests.
    cache: bool | None = None
    #: Seconds for the whole call, retries included (bounded by the server's maximum).
    timeout: float | None = Field(default=None, gt=0)


class ChatRequest(WireModel):
    provider: str = Field(min_length=1, max_length=MAX_PROVIDER_LENGTH, pattern=NAME_PATTERN)
    model: str = Field(min_length=1, max_length=MAX_MODEL_LENGTH, pattern=NAME_PATTERN)
    messages: list[UniversalMessage] = Field(min_length=1)
    options: ChatOptions = Field(default_factory=ChatOptions)
    tools: list[ToolSchema] | None = None

    @model_validator(mode="after")
    def _check_tool_choice(self) -> ChatRequest:
        choice = self.options.tool_choice
        if choice and choice not in ("auto", "none", "required"):
            names = {tool.name for tool in self.tools or []}
            if choice not in names:
                raise ValueError(f"toolChoice {choice!r} names no tool in tools")
        return self


class Usage(WireModel):
    """Token counts as the vendor reported them, in one shape for every vendor.

    The token kinds nest rather than add up, so that ``prompt_tokens + completion_tokens``
    is always what the call consumed whichever vendor answered: ``prompt_tokens`` is ALL the
    input, including the tokens read from the prompt cache (``cached_prompt_tokens``) and
    those written to it (``cache_write_tokens``), and ``completion_tokens`` includes the
    hidden ``reasoning_tokens``. Vendors that count cached input apart (Anthropic) are
    summed into this shape by their adapter. The kinds are kept because they are priced
    differently (a cache read costs a fraction of plain input, a cache write more than it).
    ``None`` means the vendor did not say; ``0`` that it said none.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    #: Of the prompt tokens, how many the vendor served from its prompt cache.
    cached_prompt_tokens: int | None = None
    #: Of the prompt tokens, how many the vendor wrote to its prompt cache (Anthropic).
    cache_write_tokens: int | None = None
    #: Of the completion tokens, how many were hidden reasoning.
    reasoning_tokens: int | None = None
    #: USD; filled by the proxy when it knows the price.
    cost: float | None = None


class ResponseMetadata(WireModel):
    model_config = ConfigDict(extra="allow")

    provider: str | None = None
    model: str | None = None
    finish_reason: FinishReason | None = None
    request_id: str | None = None
    cached: bool = False


class AssistantMessage(WireModel):
    """What a chat call returns: an assistant message plus its usage and provenance."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    usage: Usage | None = None
    metadata: ResponseMetadata = Field(default_factory=ResponseMetadata)
    id: str | None = None
    timestamp: str | None = None

    def to_message(self) -> UniversalMessage:
        """The message to append to the conversation history for the next turn."""
        return UniversalMessage(
            role="assistant",
            content=self.content if self.content is not None or self.tool_calls else "",
            tool_calls=self.tool_calls,
            id=self.id,
            timestamp=self.timestamp,
        )


MessageLike: TypeAlias = UniversalMessage | AssistantMessage | Mapping[str, Any]

_MESSAGE = TypeAdapter(UniversalMessage)


def to_universal(message: MessageLike) -> UniversalMessage:
    """Accept a model, an ``AssistantMessage`` or a plain dict (either spelling)."""
    if isinstance(message, UniversalMessage):
        return message
    if isinstance(message, AssistantMessage):
        return message.to_message()
    return _MESSAGE.validate_python(dict(message))


def to_universal_list(messages: Sequence[MessageLike]) -> list[UniversalMessage]:
    return [to_universal(message) for message in messages]


# --- stream events -------------------------------------------------------------------------


class DeltaEvent(WireModel):
    type: Literal["delta"] = Field(default="delta", exclude=True)
    content: str


class ToolCallEvent(WireModel):
    """A piece of one tool call. The first piece for an ``index`` carries ``id`` and
    ``name``; later pieces only append to the arguments JSON string."""

    type: Literal["tool_call"] = Field(default="tool_call", exclude=True)
    index: int
    id: str | None = None
    name: str | None = None
    arguments_delta: str = ""


class UsageEvent(WireModel):
    type: Literal["usage"] = Field(default="usage", exclude=True)
    usage: Usage


class DoneEvent(WireModel):
    type: Literal["done"] = Field(default="done", exclude=True)
    finish_reason: FinishReason
    message: AssistantMessage


class ErrorEvent(WireModel):
    type: Literal["error"] = Field(default="error", exclude=True)
    code: str
    message: str
    retry_after: float | None = None
    request_id: str | None = None


class RestartEvent(WireModel):
    """The answer streamed so far is void: a failure midway could not be continued
    seamlessly (the vendor died and the proxy had to ask again, or fell back to another
    deployment), so a fresh complete answer follows in the same stream, from its first
    delta. Whoever assembles the stream discards what it holds (``StreamAssembler`` does);
    whoever has already shown the text must take it back or check the new answer repeats it.
    """

    type: Literal["restart"] = Field(default="restart", exclude=True)
    #: Why, for logs and for the caller's error message; not meant to be parsed.
    reason: str


StreamEvent: TypeAlias = (
    DeltaEvent | ToolCallEvent | UsageEvent | DoneEvent | ErrorEvent | RestartEvent
)

_EVENT_TYPES: dict[str, type[WireModel]] = {
    "delta": DeltaEvent,
    "tool_call": ToolCallEvent,
    "usage": UsageEvent,
    "done": DoneEvent,
    "error": ErrorEvent,
    "restart": RestartEvent,
}
#: Every event name of the contract. Both client transports skip names outside it (events
#: added after this client was written) and decode the rest, so it is kept in one place: an
#: event added to ``_EVENT_TYPES`` cannot be silently dropped by one of them.
EVENT_NAMES: frozenset[str] = frozenset(_EVENT_TYPES)


def parse_event(name: str, data: str | Mapping[str, Any]) -> StreamEvent:
    """Decode one SSE event (its ``event:`` name and ``data:`` JSON) into a typed event."""
    model = _EVENT_TYPES.get(name)
    if model is None:
        raise ValueError(f"unknown stream event {name!r}")
    payload = json.loads(data) if isinstance(data, str) else dict(data)
    event = model.model_validate(payload)
    assert isinstance(
        event, DeltaEvent | ToolCallEvent | UsageEvent | DoneEvent | ErrorEvent | RestartEvent
    )
    return event


class StreamAssembler:
    """Folds stream events into the final ``AssistantMessage``.

    The proxy uses it to build the ``done`` event's message and the client uses it to offer
    the assembled message after a stream, so both sides agree on what a stream meant. A
    ``restart`` event empties it: what came before belongs to an answer that was abandoned,
    and the final message is the fresh answer alone.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything added so far (what a ``restart`` event means)."""
        self._text: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}
        self.usage: Usage | None = None

    def add(self, event: StreamEvent) -> None:
        if isinstance(event, RestartEvent):
            self.reset()
        elif isinstance(event, DeltaEvent):
            self._text.append(event.content)
        elif isinstance(event, ToolCallEvent):
            call = self._calls.setdefault(event.index, {"id": "", "name": "", "arguments": []})
            if event.id:
                call["id"] = event.id
            if event.name:
                call["name"] = event.name
            call["arguments"].append(event.arguments_delta)
        elif isinstance(event, UsageEvent):
            self.usage = event.usage

    @property
    def text(self) -> str:
        return "".join(self._text)

    def tool_calls(self) -> list[ToolCall] | None:
        if not self._calls:
            return None
        return [
            ToolCall(
                id=call["id"],
                function=FunctionCall(name=call["name"], arguments="".join(call["arguments"])),
            )
            for _, call in sorted(self._calls.items())
        ]

    def message(self, metadata: ResponseMetadata) -> AssistantMessage:
        calls = self.tool_calls()
        text = self.text
        return AssistantMessage(
            content=text if text or not calls else None,
            tool_calls=calls,
            usage=self.usage,
            metadata=metadata,
        )


class ErrorDetail(WireModel):
    code: str
    message: str
    request_id: str | None = None
    retry_after: float | None = None
    #: Set on errors from the proxy's upstream layer: how many vendor calls it made for this
    #: request (retries and fallbacks included) before giving up. Its presence tells a client
    #: not to retry: the proxy already spent every try its policy allows (and the same count
    #: is in the ``X-Robota-Upstream-Attempts`` header).
    upstream_attempts: int | None = None


class ErrorBody(WireModel):
    """``{"error": {"code", "message", "requestId", "retryAfter"?}}``"""

    error: ErrorDetail


# --- account: usage and limits (GET /ai/usage, GET /ai/me, GET /admin/usage) -----------------
# Money is ``Decimal`` USD, a decimal string on the wire ("0.000435"): exact, never a float.


class UsageTotals(WireModel):
    """The seed's ``UsageMetrics`` (tokensUsed, requestCount, cost, lastUsed) for a group of
    calls, with the tokens broken down by the kinds vendors bill differently."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Of the prompt tokens, served from the vendor's prompt cache (billed cheaper).
    cached_prompt_tokens: int = 0
    #: Of the prompt tokens, written to the vendor's prompt cache (billed dearer).
    cache_write_tokens: int = 0
    #: Of the completion tokens, hidden reasoning (billed as output).
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    #: When the latest of these calls was made (UTC).
    last_used: datetime | None = None


class DayUsage(UsageTotals):
    #: The UTC calendar day.
    day: date


class ModelUsage(UsageTotals):
    provider: str
    model: str


class UserUsage(UsageTotals):
    user: str


class UsageReport(WireModel):
    """Usage between two UTC dates, both included: totals, per day and per model (and, in
    the admin report, per user)."""

    #: The caller; ``None`` in an admin report over every user.
    user: str | None = None
    from_date: date = Field(alias="from")
    to_date: date = Field(alias="to")
    totals: UsageTotals = Field(default_factory=UsageTotals)
    days: list[DayUsage] = Field(default_factory=list)
    models: list[ModelUsage] = Field(default_factory=list)
    users: list[UserUsage] | None = None


class TokenAllowance(WireModel):
    """A monthly token quota as it stands: ``reserved`` is held by calls in flight, and
    ``remaining`` is what a new request can still reserve."""

    limit: int
    used: int
    reserved: int
    remaining: int


class BudgetAllowance(WireModel):
    limit_usd: Decimal
    used_usd: Decimal
    reserved_usd: Decimal
    remaining_usd: Decimal


class RateAllowance(WireModel):
    """A rate limit (rpm, per day, tpm); ``remaining`` is ``None`` when the proxy runs no
    rate limiter to ask."""

    limit: int
    remaining: int | None = None
    reset_seconds: int | None = None


class Limits(WireModel):
    #: ``YYYY-MM`` (UTC), the month the monthly limits count.
    period: str
    monthly_tokens: TokenAllowance | None = None
    monthly_budget: BudgetAllowance | None = None
    rpm: RateAllowance | None = None
    daily_requests: RateAllowance | None = None
    tpm: RateAllowance | None = None


class MonthUsage(WireModel):
    """This month's settled usage as the monthly limits count it (cache hits cost no quota)."""

    requests: int = 0
    tokens: int = 0
    cost_usd: Decimal = Decimal(0)


class Me(WireModel):
    """Who the proxy thinks the caller is, what they may do, and what is left."""

    user: str
    key_id: str | None = None
    #: ``UserPermissions`` in wire form (``allowedModels``, ``monthlyBudgetUsd``...).
    permissions: dict[str, Any] = Field(default_factory=dict)
    limits: Limits
    #: This month's usage so far (settled calls).
    month: MonthUsage = Field(default_factory=MonthUsage)
