"""The OpenAPI 3.1 document of every HTTP route, generated from the wire models.

Generated rather than written so that it cannot drift from what the proxy accepts and
answers: the bodies, bounds and enums come from the pydantic models of the wire contract
(``robota_client.messages``) through ``pydantic.json_schema.models_json_schema``. The routes
that answer plain dicts (the admin API, ``/ai/models``, ``/admin/metrics``, ``/health``) are
described by the small models below, which their unit test holds against real answers.

The committed copy (``docs/openapi.json``) is what clients and fuzzers (schemathesis) read;
regenerate it with ``python -m robota_proxy.openapi > docs/openapi.json``. A unit test
regenerates it and fails when the two differ, and another fails when a route of the app is
missing from it.
"""

from __future__ import annotations

import copy
import functools
import json
from datetime import date, datetime
from decimal import Decimal
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, RootModel, WithJsonSchema
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from robota_client.messages import (
    STATUS_BY_CODE,
    AssistantMessage,
    ChatRequest,
    ErrorBody,
    Me,
    StreamEvent,
    UsageReport,
    WireModel,
)
from robota_proxy.dialects import ANTHROPIC_MESSAGES_PATH, OPENAI_CHAT_PATH, OPENAI_EMBEDDINGS_PATH
from robota_proxy.dialects.anthropic import COUNT_TOKENS_PATH, error_type
from robota_proxy.dialects.openai_embeddings import MAX_INPUTS
from robota_proxy.policy.principals import MAX_BUDGET_USD, MAX_COUNT, Feature
from robota_proxy.routes.admin import MAX_ADMIN_BODY_BYTES
from robota_proxy.routes.openai_compat import MODELS_PATH
from robota_proxy.routes.openapi import OPENAPI_PATH
from robota_proxy.routes.usage_report import FIRST_DAY, LAST_DAY
from robota_proxy.routes.ws import PATH as WS_PATH
from robota_proxy.storage.key_store import MAX_USER_LENGTH
from robota_proxy.streams.response import STREAM_ID_HEADER
from robota_proxy.wire.paths import CHAT_PATH, STREAM_PATH

RESUME_PATH = f"{STREAM_PATH}/{{stream_id}}"

_REF = "#/components/schemas/{model}"
# The longest ``name`` of a key that ``POST /admin/keys`` accepts (routes/admin.py).
_MAX_KEY_NAME = 200
# A resumable position: ``<stream id>:<seq>`` or a bare seq (routes/resume.py, streams/buffer.py).
_STREAM_ID = r"s_[0-9a-f]{32}"
# ``[0-9]``, not ``\d``: Python's ``\d`` (a fuzzer's generator) also matches '²'-like digits.
_LAST_EVENT_ID = rf"^\s*([0-9]{{1,9}}|{_STREAM_ID}:[0-9]{{1,9}})?\s*$"
_DAY = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
_DAYS = f"Days from {FIRST_DAY} to {LAST_DAY}."
# No control characters in what is stored (PostgreSQL refuses NUL); a user also needs one
# character that is not a space.
_TEXT = r"^[^\x00-\x1f\x7f]*$"
_USER = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
_NAMES = list[Annotated[str, Field(pattern=_TEXT)]] | Annotated[str, Field(pattern=_TEXT)] | None
_COUNT = Field(default=None, ge=0, le=MAX_COUNT)
# Features as one comma-separated string: blank items are dropped, the others must be known.
_FEATURE = "|".join(get_args(Feature))
_FEATURE_LIST = rf"^\s*({_FEATURE})?\s*(,\s*({_FEATURE})?\s*)*$"
# A budget: ``Decimal(str(value))``, finite and not negative (policy/principals.py).
_AMOUNT = {
    "anyOf": [
        {"type": "number", "minimum": 0, "maximum": int(MAX_BUDGET_USD)},
        {"type": "string", "pattern": r"^\s*\+?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$"},
        {"type": "null"},
    ]
}


# --- shapes of the answers built as plain dicts ----------------------------------------------


class ProviderModels(WireModel):
    #: ``null``: the provider passes any model name through to its vendor.
    models: list[str] | None


class ModelCatalogue(WireModel):
    """``GET /ai/models``: the configured providers and the models each one serves."""

    providers: dict[str, ProviderModels]


class Health(WireModel):
    status: Literal["ok"]


class ReadyCheck(WireModel):
    """One check of ``GET /ready`` as the admin sees it."""

    ok: bool
    latency_ms: float = Field(ge=0)
    #: Why a failed check failed: exception types and the OS's words, never a URL.
    reason: str | None = None
    #: What a passing check found (the providers' names).
    found: str | None = None


class Readiness(WireModel):
    """``GET /ready``: whether this process can serve; the failed checks by name, and with
    the admin key every check's detail."""

    status: Literal["ready", "not_ready"]
    failed: list[Literal["database", "draining", "providers", "redis"]] | None = None
    checks: dict[str, ReadyCheck] | None = None


class UpstreamAttempt(WireModel):
    #: ``provider/model`` of the attempt's target.
    target: str
    outcome: str
    count: int = Field(ge=1)


class Metrics(WireModel):
    """``GET /admin/metrics``: this process's upstream attempts by target and outcome, and
    the state of each circuit breaker it has used."""

    upstream_attempts: list[UpstreamAttempt]
    circuit_breakers: dict[str, Literal["closed", "open", "half_open"]] = Field(
        default_factory=dict
    )


class Permissions(WireModel):
    """``UserPermissions`` as the admin API answers it: only the fields that are set."""

    allowed_providers: list[str] | None = None
    #: Glob patterns matched against the model name (``gpt-4o*``).
    allowed_models: list[str] | None = None
    allowed_features: list[Feature] | None = None
    rpm: int | None = _COUNT
    tpm: int | None = _COUNT
    daily_request_limit: int | None = _COUNT
    monthly_token_limit: int | None = _COUNT
    #: USD, a decimal string.
    monthly_budget_usd: Decimal | None = Field(default=None, ge=0, le=MAX_BUDGET_USD)


class PermissionsInput(WireModel):
    """``UserPermissions`` as the admin API accepts it: an unknown field is a 400, so that a
    typo is an error rather than an unrestricted key; ``null`` leaves a field unset; lists
    may also be given as one comma-separated string."""

    model_config = ConfigDict(extra="forbid")

    allowed_providers: _NAMES = None
    allowed_models: _NAMES = None
    allowed_features: list[Feature] | Annotated[str, Field(pattern=_FEATURE_LIST)] | None = None
    rpm: int | None = _COUNT
    tpm: int | None = _COUNT
    daily_request_limit: int | None = _COUNT
    monthly_token_limit: int | None = _COUNT
    #: USD, a number or a decimal string; not negative, at most ``MAX_BUDGET_USD``.
    monthly_budget_usd: Annotated[Decimal | None, WithJsonSchema(_AMOUNT)] = None


class CreateKeyRequest(WireModel):
    """``POST /admin/keys``. The expiry is ``expiresAt`` or ``expiresIn``, not both; a date
    in the past is a 400."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"not": {"required": ["expiresAt", "expiresIn"]}}
    )

    #: Blank is refused; surrounding spaces are trimmed.
    user: str = Field(min_length=1, max_length=MAX_USER_LENGTH, pattern=_USER)
    permissions: PermissionsInput | None = None
    #: An ISO date or datetime (UTC when no zone is given), or a duration as ``expiresIn``;
    #: at most 100 years ahead (``policy.keys.MAX_EXPIRY``).
    expires_at: str | None = None
    #: ``30d``, ``12h``, ``90m`` or a number of seconds.
    expires_in: (
        Annotated[str, Field(pattern=r"^\s*[0-9]*[1-9][0-9]*\s*[dhm]\s*$")]
        | Annotated[int, Field(gt=0)]
        | None
    ) = None
    name: str | None = Field(default=None, max_length=_MAX_KEY_NAME, pattern=_TEXT)


class PermissionsEnvelope(WireModel):
    #: Required here: a body without ``permissions`` is the permissions object itself.
    permissions: PermissionsInput | None


class SetUserRequest(RootModel[PermissionsEnvelope | PermissionsInput]):
    """``PUT /admin/users/{user}``: ``{"permissions": {...}}`` or the permissions object
    itself. They replace the user's permissions whole; an empty body clears them."""


class KeyInfo(WireModel):
    """A key as the admin API shows it: everything but the secret."""

    id: str
    user: str
    name: str | None
    #: This key's overrides of its user's permissions.
    permissions: Permissions
    status: Literal["active", "revoked", "expired"]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class CreatedKey(KeyInfo):
    """The one answer that carries the key itself: it is stored only as a hash."""

    key: str


class KeyList(WireModel):
    keys: list[KeyInfo]


class UserInfo(WireModel):
    user: str
    permissions: Permissions
    created_at: datetime
    #: Set while the user is revoked: all their keys and tokens are refused.
    revoked_at: datetime | None


class UserWithKeys(UserInfo):
    keys: list[KeyInfo]


# --- the compatible surfaces (``/v1/*``): the vendors' own wire, snake_case ---------------------
#
# Faithful enough for a client generator and a fuzzer, not a copy of the vendors' references:
# the fields the dialects read, with their bounds (``robota_proxy.dialects``), and any other
# field allowed where the proxy passes the caller's JSON through to a target of the same
# vendor (a field it cannot translate for another vendor's target is a 400 naming it).


class VendorModel(BaseModel):
    """A vendor's object: unknown fields pass through."""

    model_config = ConfigDict(extra="allow")


_MODEL_NAME = Field(
    min_length=1,
    description="`provider/model`, a fallback alias, or a bare name (a model a provider "
    "lists, else the vendor's own).",
)
_STREAM = Field(
    default=None, description="`true`: the answer as Server-Sent Events (`text/event-stream`)."
)
_POSITIVE = Field(default=None, gt=0, le=10_000_000)


class OpenAIToolCall(VendorModel):
    id: str
    type: Literal["function"] = "function"
    function: dict[str, Any] = Field(description="`{name, arguments}`: arguments as JSON text.")


class OpenAIChatMessage(VendorModel):
    """One message: ``developer`` is read as ``system``; content is text or content parts
    (parts other than text only reach an OpenAI-compatible target)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[OpenAIToolCall] | None = None
    tool_call_id: str | None = None


class OpenAIChatRequest(VendorModel):
    """``POST /v1/chat/completions``: OpenAI's ``chat.completions.create`` body."""

    model: str = _MODEL_NAME
    messages: list[OpenAIChatMessage] = Field(min_length=1)
    stream: bool | None = _STREAM
    stream_options: dict[str, Any] | None = Field(
        default=None, description="`{include_usage: true}`: a last chunk with the usage."
    )
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = _POSITIVE
    max_completion_tokens: int | None = _POSITIVE
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = Field(
        default=None, description="Function tools: `{type: function, function: {name, ...}}`."
    )
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = Field(
        default=None, description="`{type: text | json_object | json_schema, ...}`."
    )
    n: int | None = Field(default=None, ge=1)
    parallel_tool_calls: bool | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None


class OpenAIUsage(VendorModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class OpenAIChoice(VendorModel):
    index: int
    message: dict[str, Any] = Field(description="`{role: assistant, content, tool_calls?}`.")
    finish_reason: str | None


class OpenAIChatCompletion(VendorModel):
    """A ``chat.completion``: rendered by the proxy, or an OpenAI-compatible target's own."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[OpenAIChoice]
    usage: OpenAIUsage | None = None


class OpenAIChatCompletionChunk(VendorModel):
    """One ``data:`` frame of a streamed completion; the last one with the usage has no
    choices."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: OpenAIUsage | None = None


class OpenAIModel(VendorModel):
    id: str = Field(description="`provider/model`, or an alias.")
    object: Literal["model"]
    created: int
    owned_by: str


class OpenAIModelList(VendorModel):
    """``GET /v1/models``: what the caller may use."""

    object: Literal["list"]
    data: list[OpenAIModel]


_TOKEN_ID = Annotated[int, Field(ge=0)]


class OpenAIEmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: OpenAI's ``embeddings.create`` body. An unknown field is a
    400, as at OpenAI."""

    model_config = ConfigDict(extra="forbid")

    model: str = _MODEL_NAME
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | Annotated[list[_TOKEN_ID], Field(min_length=1)]
        | Annotated[list[Annotated[list[_TOKEN_ID], Field(min_length=1)]], Field(min_length=1)]
    ) = Field(description=f"Texts or token ids (never both); at most {MAX_INPUTS} inputs.")
    dimensions: int | None = Field(default=None, ge=1)
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None


class OpenAIEmbedding(VendorModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 little-endian float32.")


class OpenAIEmbeddingUsage(VendorModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingList(VendorModel):
    object: Literal["list"]
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIEmbeddingUsage


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    #: The request field at fault, when one is.
    param: str | None
    #: The Robota wire code (``invalid_request``, ``rate_limited``, ...).
    code: str | None


class OpenAIErrorBody(BaseModel):
    """OpenAI's error shape, so that its SDK raises its own typed exceptions."""

    error: OpenAIErrorDetail


class AnthropicInputMessage(VendorModel):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]] = Field(
        description="Text, or content blocks `{type, ...}` (`text`, `tool_use`, "
        "`tool_result`; any other only reaches an Anthropic target)."
    )


class AnthropicCountTokensRequest(VendorModel):
    """``POST /v1/messages/count_tokens``: the message without ``max_tokens``."""

    model: str = _MODEL_NAME
    messages: list[AnthropicInputMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = Field(
        default=None, description="Client tools `{name, description?, input_schema}`."
    )
    tool_choice: dict[str, Any] | None = Field(
        default=None, description="`{type: auto | any | none}` or `{type: tool, name}`."
    )
    thinking: dict[str, Any] | None = None


class AnthropicMessagesRequest(AnthropicCountTokensRequest):
    """``POST /v1/messages``: Anthropic's ``messages.create`` body."""

    max_tokens: int = Field(ge=1, le=10_000_000)
    stream: bool | None = _STREAM
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stop_sequences: list[str] | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None


class AnthropicUsage(VendorModel):
    input_tokens: int
    output_tokens: int


class AnthropicMessage(VendorModel):
    """A ``message``: rendered by the proxy, or an Anthropic target's own."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    stop_sequence: str | None = None
    usage: AnthropicUsage


class AnthropicTokenCount(VendorModel):
    """Anthropic's count for an Anthropic target; the proxy's prompt estimate (an upper
    bound) for any other."""

    input_tokens: int = Field(ge=0)


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorBody(BaseModel):
    """Anthropic's error shape, so that its SDK raises its own typed exceptions."""

    type: Literal["error"]
    error: AnthropicErrorDetail
    request_id: str | None = None


# --- parameters, described by models too -------------------------------------------------------


class UsageQuery(BaseModel):
    from_: date | None = Field(
        default=None,
        alias="from",
        description="First UTC day, included; the first day of the current month by "
        f"default. {_DAYS}",
        json_schema_extra={"pattern": _DAY},
    )
    to: date | None = Field(
        default=None,
        description=f"Last UTC day, included, not before `from`; today by default. {_DAYS}",
        json_schema_extra={"pattern": _DAY},
    )


class AdminUsageQuery(UsageQuery):
    user: str | None = Field(
        default=None, pattern=_TEXT, description="One user's usage; everyone's if left out."
    )


class KeysQuery(BaseModel):
    user: str | None = Field(default=None, pattern=_TEXT, description="Only this user's keys.")


class KeyPath(BaseModel):
    key_id: str = Field(description="The key's public id (`rk_<id>_...` holds it).")


class UserPath(BaseModel):
    user: str = Field(max_length=MAX_USER_LENGTH, pattern=_USER, description="The user's id.")


class StreamPath(BaseModel):
    stream_id: str = Field(
        pattern=rf"^{_STREAM_ID}$",
        description=f"The `{STREAM_ID_HEADER}` header of the streamed answer.",
    )


class ResumeHeaders(BaseModel):
    last_event_id: str | None = Field(
        default=None,
        alias="Last-Event-ID",
        description="The `id:` of the last event received (`<stream id>:<seq>`, or a bare "
        "seq); the stream is replayed after it, or from its start when left out.",
        json_schema_extra={"pattern": _LAST_EVENT_ID},
    )


# --- the document ----------------------------------------------------------------------------

_SCHEMA_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (ChatRequest, "validation"),
    (AssistantMessage, "serialization"),
    *((event, "serialization") for event in get_args(StreamEvent)),
    (ErrorBody, "serialization"),
    (ModelCatalogue, "serialization"),
    (Me, "serialization"),
    (UsageReport, "serialization"),
    (CreateKeyRequest, "validation"),
    (CreatedKey, "serialization"),
    (KeyList, "serialization"),
    (KeyInfo, "serialization"),
    (SetUserRequest, "validation"),
    (UserInfo, "serialization"),
    (UserWithKeys, "serialization"),
    (Metrics, "serialization"),
    (Health, "serialization"),
    (Readiness, "serialization"),
    (OpenAIChatRequest, "validation"),
    (OpenAIChatCompletion, "serialization"),
    (OpenAIChatCompletionChunk, "serialization"),
    (OpenAIModelList, "serialization"),
    (OpenAIEmbeddingRequest, "validation"),
    (OpenAIEmbeddingList, "serialization"),
    (OpenAIErrorBody, "serialization"),
    (AnthropicMessagesRequest, "validation"),
    (AnthropicCountTokensRequest, "validation"),
    (AnthropicMessage, "serialization"),
    (AnthropicTokenCount, "serialization"),
    (AnthropicErrorBody, "serialization"),
]

#: Statuses whose error may carry ``Retry-After`` (the limiter's, or a vendor's passed on).
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_AUTH_ERRORS = (401, 429)
_CHAT_ERRORS = (400, 401, 402, 403, 404, 413, 429, 502, 503, 504)
_ADMIN_ERRORS = (401, 403, 429)
#: ``count_tokens`` is not metered: no budget to exceed.
_COUNT_ERRORS = tuple(status for status in _CHAT_ERRORS if status != 402)
#: Anthropic's SDKs send the key as ``x-api-key``; ``Authorization: Bearer`` works too.
_ANTHROPIC_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"anthropicApiKey": []}]


def _event_name(model: type[BaseModel]) -> str:
    default = model.model_fields["type"].default
    assert isinstance(default, str)
    return default


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(name: str, description: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref(name)}},
        **extra,
    }


def _errors(*statuses: int, dialect: str = "") -> dict[str, Any]:
    """The error responses of ``statuses``; ``dialect``: ``OpenAI`` or ``Anthropic`` for
    the ``/v1/*`` operations, whose errors are in that vendor's shape."""
    return {
        str(status): {"$ref": f"#/components/responses/{dialect}Error{status}"}
        for status in statuses
    }


def _parameters(model: type[BaseModel], where: str) -> list[dict[str, Any]]:
    """One OpenAPI parameter per field of ``model``: query strings and headers have no
    ``null``, so an optional field is a parameter that may be left out."""
    schema = model.model_json_schema(by_alias=True)
    required = set(schema.get("required", ()))
    parameters = []
    for name, field in schema["properties"].items():
        field = {k: v for k, v in field.items() if k not in ("title", "default")}
        branches = [b for b in field.pop("anyOf", []) if b != {"type": "null"}]
        if len(branches) == 1:
            field = {**branches[0], **field}
        elif branches:
            field["anyOf"] = branches
        parameter: dict[str, Any] = {"name": name, "in": where}
        description = field.pop("description", None)
        if description:
            parameter["description"] = description
        parameter["required"] = where == "path" or name in required
        parameter["schema"] = field
        parameters.append(parameter)
    return parameters


def _message_rules(schemas: dict[str, Any]) -> None:
    """The cross-field rules of ``UniversalMessage`` (its ``_check_shape`` validator), which
    pydantic cannot put in a schema by itself; without them a fuzzer would send messages the
    proxy must refuse, and a client generator would accept them. A unit test holds these
    rules against the validator."""
    string = {"type": "string"}
    calls = {"type": "array", "minItems": 1}
    schemas["UniversalMessage"]["allOf"] = [
        {
            "if": {"properties": {"role": {"const": "tool"}}},
            "then": {
                "required": ["toolCallId"],
                "properties": {"toolCallId": {"type": "string", "minLength": 1}},
            },
        },
        {
            "if": {"properties": {"role": {"enum": ["system", "user", "tool"]}}},
            "then": {"required": ["content"], "properties": {"content": string}},
        },
        {
            "if": {"properties": {"role": {"const": "assistant"}}},
            "then": {
                "anyOf": [
                    {"required": ["content"], "properties": {"content": string}},
                    {"required": ["toolCalls"], "properties": {"toolCalls": calls}},
                ]
            },
        },
        {
            "if": {"required": ["toolCalls"], "properties": {"toolCalls": calls}},
            "then": {"properties": {"role": {"const": "assistant"}}},
        },
    ]


def _components() -> dict[str, Any]:
    _, defs = models_json_schema(_SCHEMA_MODELS, ref_template=_REF, by_alias=True)
    schemas: dict[str, Any] = defs["$defs"]
    _message_rules(schemas)
    codes: dict[int, list[str]] = {}
    for code, status in STATUS_BY_CODE.items():
        codes.setdefault(status, []).append(code)
    responses: dict[str, Any] = {}
    for status in sorted(codes):
        listed = ", ".join(f"`{code}`" for code in codes[status])
        kinds = ", ".join(sorted({f"`{error_type(code)}`" for code in codes[status]}))
        for prefix, schema, description in (
            ("", "ErrorBody", f"The contract's error body; `error.code`: {listed}."),
            ("OpenAI", "OpenAIErrorBody", f"OpenAI's error body; `error.code`: {listed}."),
            ("Anthropic", "AnthropicErrorBody", f"Anthropic's error body; `error.type`: {kinds}."),
        ):
            response = _json(schema, description)
            if status in _RETRY_STATUSES:
                response["headers"] = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
            responses[f"{prefix}Error{status}"] = response
    return {
        "schemas": schemas,
        "responses": responses,
        "headers": {
            "RetryAfter": {
                "description": "Whole seconds to wait before trying again.",
                "schema": {"type": "integer", "minimum": 1},
            },
            "StreamId": {
                "description": "The stream's id, to resume it after a dropped connection.",
                "schema": {"type": "string", "pattern": f"^{_STREAM_ID}$"},
            },
        },
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "A proxy key (`rk_...`) or a JWT (HS256, RS256 or ES256).",
            },
            "anthropicApiKey": {
                "type": "apiKey",
                "in": "header",
                "name": "x-api-key",
                "description": "The same credentials as `bearer`, as Anthropic's SDKs send "
                "them; `Authorization` wins when both are sent.",
            },
            "adminKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "`ROBOTA_ADMIN_KEY`; without one configured the admin API "
                "answers 403.",
            },
        },
    }


def _event_stream(description: str) -> dict[str, Any]:
    events = {_event_name(model): _ref(model.__name__) for model in get_args(StreamEvent)}
    names = ", ".join(f"`{name}`" for name in events)
    return {
        "description": description,
        "headers": {STREAM_ID_HEADER: {"$ref": "#/components/headers/StreamId"}},
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "string",
                    "description": "Server-Sent Events, each `id: <stream id>:<seq>`, "
                    f"`event: <name>` ({names}) and one `data:` line of JSON whose schema "
                    "`x-sse-events` names by event; `done` or `error` ends the stream.",
                },
                "x-sse-events": events,
            }
        },
    }


def _chat_body() -> dict[str, Any]:
    return {
        "required": True,
        "description": "At most `ROBOTA_MAX_BODY_BYTES` (4 MiB by default), else 413.",
        "content": {"application/json": {"schema": _ref("ChatRequest")}},
    }


def _vendor_body(name: str) -> dict[str, Any]:
    return {
        "required": True,
        "description": "At most `ROBOTA_MAX_BODY_BYTES` (4 MiB by default), else 413.",
        "content": {"application/json": {"schema": _ref(name)}},
    }


def _vendor_answer(name: str, description: str, stream: dict[str, Any] | None) -> dict[str, Any]:
    """The 200 of a ``/v1`` chat operation: JSON, or ``text/event-stream`` with ``stream``."""
    answer = _json(name, description)
    if stream is not None:
        answer["content"]["text/event-stream"] = stream
    return answer


def _openai_stream() -> dict[str, Any]:
    return {
        "schema": {
            "type": "string",
            "description": "With `stream: true`: Server-Sent Events without names, each one "
            "`data:` line of JSON, a `chat.completion.chunk` (the last one with the usage "
            "and no choices, when `stream_options.include_usage` asked for it), then "
            "`data: [DONE]`. A failure after the first chunk is a closing "
            '`data: {"error": {...}}` frame.',
        },
        "x-sse-events": {
            "message": {
                "anyOf": [_ref("OpenAIChatCompletionChunk"), _ref("OpenAIErrorBody")],
            }
        },
    }


#: Anthropic's stream events, by name (its ``event:``, the same as the data's ``type``).
_ANTHROPIC_EVENTS = (
    "message_start",
    "ping",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
)


def _anthropic_stream() -> dict[str, Any]:
    events: dict[str, Any] = {
        name: {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"const": name}},
        }
        for name in _ANTHROPIC_EVENTS
    }
    events["error"] = _ref("AnthropicErrorBody")
    return {
        "schema": {
            "type": "string",
            "description": "With `stream: true`: Anthropic's Server-Sent Events, each "
            "`event: <type>` and one `data:` line of JSON of that `type`, from "
            "`message_start` to `message_stop` (`message_delta` carries the cumulative "
            "usage). A failure after the first event is a closing `event: error`.",
        },
        "x-sse-events": events,
    }


def _admin_body(name: str, *, required: bool) -> dict[str, Any]:
    return {
        "required": required,
        "description": f"A JSON object of at most {MAX_ADMIN_BODY_BYTES} bytes, else 413.",
        "content": {"application/json": {"schema": _ref(name)}},
    }


def _paths() -> dict[str, Any]:
    admin: list[dict[str, list[str]]] = [{"adminKey": []}]
    public: list[dict[str, list[str]]] = []
    return {
        CHAT_PATH: {
            "post": {
                "operationId": "chat",
                "tags": ["chat"],
                "summary": "One chat call, answered whole.",
                "requestBody": _chat_body(),
                "responses": {
                    "200": _json("AssistantMessage", "The answer, its usage and provenance."),
                    **_errors(*_CHAT_ERRORS),
                },
            }
        },
        STREAM_PATH: {
            "post": {
                "operationId": "chatStream",
                "tags": ["chat"],
                "summary": "One chat call, streamed as Server-Sent Events.",
                "description": "A vendor that refuses the call before its first event gets "
                "a plain error status; a failure after it is a closing `error` event.",
                "requestBody": _chat_body(),
                "responses": {
                    "200": _event_stream("The answer as it is produced."),
                    **_errors(*_CHAT_ERRORS),
                },
            }
        },
        RESUME_PATH: {
            "get": {
                "operationId": "resumeStream",
                "tags": ["chat"],
                "summary": "The rest of a stream after a dropped connection.",
                "description": "Within the resume window, by the user who started it; no "
                "second vendor call and no second charge. Anyone else's stream, or an "
                "unknown, expired or cancelled one, is the same 404.",
                "parameters": [
                    *_parameters(StreamPath, "path"),
                    *_parameters(ResumeHeaders, "header"),
                ],
                "responses": {
                    "200": _event_stream("The events after `Last-Event-ID`."),
                    **_errors(400, 401, 404, 429),
                },
            }
        },
        WS_PATH: {
            "get": {
                "operationId": "webSocket",
                "tags": ["chat"],
                "summary": "Many chat calls over one WebSocket (upgrade).",
                "description": "OpenAPI cannot describe a WebSocket: this is its handshake, "
                "a GET with `Connection: Upgrade` and `Upgrade: websocket`. Frames from the "
                'client: `{"type": "request", "id", "body": ChatRequest, "stream"}`, '
                '`{"type": "cancel", "id"}`, `{"type": "resume", "id", "streamId", '
                '"lastEventId"}`, `{"type": "ping"}`, `{"type": "stats"}`; from the '
                'server: `{"id", "event", "eventId", "data"}` with the events of the SSE '
                "stream. A refused handshake is answered with the error body.",
                "responses": {
                    "101": {"description": "Switching to the WebSocket protocol."},
                    **_errors(401, 403),
                    "404": {
                        "$ref": "#/components/responses/Error404",
                        "description": "A plain GET, without the upgrade, reaches no route.",
                    },
                    **_errors(429),
                },
            }
        },
        "/ai/models": {
            "get": {
                "operationId": "listModels",
                "tags": ["account"],
                "summary": "The providers this proxy serves and their models.",
                "responses": {
                    "200": _json("ModelCatalogue", "Providers by name."),
                    **_errors(*_AUTH_ERRORS),
                },
            }
        },
        "/ai/me": {
            "get": {
                "operationId": "me",
                "tags": ["account"],
                "summary": "The caller, their permissions, and what is left of each limit.",
                "responses": {
                    "200": _json("Me", "The caller's account."),
                    **_errors(*_AUTH_ERRORS),
                },
            }
        },
        "/ai/usage": {
            "get": {
                "operationId": "usage",
                "tags": ["account"],
                "summary": "The caller's usage between two UTC days, both included.",
                "parameters": _parameters(UsageQuery, "query"),
                "responses": {
                    "200": _json("UsageReport", "Totals, per day and per model."),
                    **_errors(400, *_AUTH_ERRORS),
                },
            }
        },
        "/admin/keys": {
            "post": {
                "operationId": "createKey",
                "tags": ["admin"],
                "summary": "Create a key; the answer is the only place the key ever appears.",
                "security": admin,
                "requestBody": _admin_body("CreateKeyRequest", required=True),
                "responses": {
                    "201": _json("CreatedKey", "The key and its record."),
                    **_errors(400, *_ADMIN_ERRORS, 413),
                },
            },
            "get": {
                "operationId": "listKeys",
                "tags": ["admin"],
                "summary": "Every key, or one user's.",
                "security": admin,
                "parameters": _parameters(KeysQuery, "query"),
                "responses": {
                    "200": _json("KeyList", "The keys, without their secrets."),
                    **_errors(400, *_ADMIN_ERRORS),
                },
            },
        },
        "/admin/keys/{key_id}": {
            "parameters": _parameters(KeyPath, "path"),
            "get": {
                "operationId": "getKey",
                "tags": ["admin"],
                "summary": "One key's record.",
                "security": admin,
                "responses": {
                    "200": _json("KeyInfo", "The key, without its secret."),
                    **_errors(*_ADMIN_ERRORS, 404),
                },
            },
            "delete": {
                "operationId": "revokeKey",
                "tags": ["admin"],
                "summary": "Revoke a key; it stops working within a second.",
                "security": admin,
                "responses": {
                    "200": _json("KeyInfo", "The revoked key."),
                    **_errors(*_ADMIN_ERRORS, 404),
                },
            },
        },
        "/admin/users/{user}": {
            "parameters": _parameters(UserPath, "path"),
            "put": {
                "operationId": "setUser",
                "tags": ["admin"],
                "summary": "Replace a user's permissions, creating the user if needed.",
                "security": admin,
                "requestBody": _admin_body("SetUserRequest", required=False),
                "responses": {
                    "200": _json("UserInfo", "The user as stored."),
                    **_errors(400, *_ADMIN_ERRORS, 413),
                },
            },
            "get": {
                "operationId": "getUser",
                "tags": ["admin"],
                "summary": "A user's permissions and keys.",
                "security": admin,
                "responses": {
                    "200": _json("UserWithKeys", "The user and their keys."),
                    **_errors(*_ADMIN_ERRORS, 404),
                },
            },
            "delete": {
                "operationId": "revokeUser",
                "tags": ["admin"],
                "summary": "Revoke a user: all their keys and tokens stop working within a second.",
                "description": "Idempotent (the first revocation time is kept). The keys' own "
                "states are left as they are, for a restore. A JWT subject without a record is "
                "404: create it with PUT first.",
                "security": admin,
                "responses": {
                    "200": _json("UserInfo", "The revoked user."),
                    **_errors(*_ADMIN_ERRORS, 404),
                },
            },
        },
        "/admin/users/{user}/restore": {
            "parameters": _parameters(UserPath, "path"),
            "post": {
                "operationId": "restoreUser",
                "tags": ["admin"],
                "summary": "Undo a user's revocation; keys revoked or expired on their own "
                "stay refused.",
                "security": admin,
                "responses": {
                    "200": _json("UserInfo", "The restored user."),
                    **_errors(*_ADMIN_ERRORS, 404),
                },
            },
        },
        "/admin/usage": {
            "get": {
                "operationId": "adminUsage",
                "tags": ["admin"],
                "summary": "Usage between two UTC days, both included, per user too.",
                "security": admin,
                "parameters": _parameters(AdminUsageQuery, "query"),
                "responses": {
                    "200": _json("UsageReport", "Totals, per day, per model and per user."),
                    **_errors(400, *_ADMIN_ERRORS),
                },
            }
        },
        "/admin/metrics": {
            "get": {
                "operationId": "adminMetrics",
                "tags": ["admin"],
                "summary": "This process's upstream attempts by target and outcome.",
                "security": admin,
                "responses": {
                    "200": _json("Metrics", "Attempt counts."),
                    **_errors(*_ADMIN_ERRORS),
                },
            }
        },
        OPENAI_CHAT_PATH: {
            "post": {
                "operationId": "openaiChatCompletions",
                "tags": ["openai"],
                "summary": "OpenAI's chat completions: any OpenAI client with "
                "`base_url=<proxy>/v1`.",
                "description": "The same chain as `/ai/chat` (keys, permissions, limits, "
                "budget, fallbacks). An OpenAI-compatible target gets the caller's JSON "
                "with the model rewritten, and its answer comes back as it came; any other "
                "gets it translated, and a field that cannot be translated is a 400 naming "
                "it in `error.param`.",
                "requestBody": _vendor_body("OpenAIChatRequest"),
                "responses": {
                    "200": _vendor_answer(
                        "OpenAIChatCompletion",
                        "A `chat.completion`, or its chunks with `stream: true`.",
                        _openai_stream(),
                    ),
                    **_errors(*_CHAT_ERRORS, dialect="OpenAI"),
                },
            }
        },
        MODELS_PATH: {
            "get": {
                "operationId": "openaiListModels",
                "tags": ["openai"],
                "summary": "The models the caller may use, as OpenAI lists them.",
                "responses": {
                    "200": _json("OpenAIModelList", "`provider/model` ids and aliases."),
                    **_errors(*_AUTH_ERRORS, dialect="OpenAI"),
                },
            }
        },
        OPENAI_EMBEDDINGS_PATH: {
            "post": {
                "operationId": "openaiEmbeddings",
                "tags": ["openai"],
                "summary": "OpenAI's embeddings, for a target that has them (OpenAI-"
                "compatible or Google); any other is a 400.",
                "requestBody": _vendor_body("OpenAIEmbeddingRequest"),
                "responses": {
                    "200": _json("OpenAIEmbeddingList", "One embedding per input, in order."),
                    **_errors(*_CHAT_ERRORS, dialect="OpenAI"),
                },
            }
        },
        ANTHROPIC_MESSAGES_PATH: {
            "post": {
                "operationId": "anthropicMessages",
                "tags": ["anthropic"],
                "summary": "Anthropic's messages: any Anthropic client with `base_url=<proxy>`.",
                "description": "The same chain as `/ai/chat`. An Anthropic target gets the "
                "caller's JSON with the model rewritten (thinking blocks, cache breakpoints "
                "and betas survive) and the `anthropic-version` and `anthropic-beta` "
                "headers; any other gets it translated, and a field or block that cannot be "
                "translated is a 400 naming it.",
                "security": _ANTHROPIC_SECURITY,
                "requestBody": _vendor_body("AnthropicMessagesRequest"),
                "responses": {
                    "200": _vendor_answer(
                        "AnthropicMessage",
                        "A `message`, or its events with `stream: true`.",
                        _anthropic_stream(),
                    ),
                    **_errors(*_CHAT_ERRORS, dialect="Anthropic"),
                },
            }
        },
        COUNT_TOKENS_PATH: {
            "post": {
                "operationId": "anthropicCountTokens",
                "tags": ["anthropic"],
                "summary": "The input tokens of a message: Anthropic's count, or the "
                "proxy's estimate (an upper bound) for another vendor's model.",
                "description": "Authorized like a chat call to the same model; not metered.",
                "security": _ANTHROPIC_SECURITY,
                "requestBody": _vendor_body("AnthropicCountTokensRequest"),
                "responses": {
                    "200": _json("AnthropicTokenCount", "The count."),
                    **_errors(*_COUNT_ERRORS, dialect="Anthropic"),
                },
            }
        },
        "/health": {
            "get": {
                "operationId": "health",
                "tags": ["operations"],
                "summary": "Liveness; needs no credentials and calls no vendor.",
                "security": public,
                "responses": {"200": _json("Health", "The process is up.")},
            }
        },
        "/ready": {
            "get": {
                "operationId": "ready",
                "tags": ["operations"],
                "summary": "Readiness: the database and Redis answer, a provider is "
                "configured, the process is not draining.",
                "description": "Public: the failed checks by name. With the admin key "
                "(optional) each check's latency and reason as well.",
                "security": [{}, *admin],
                "responses": {
                    "200": _json("Readiness", "Ready to serve."),
                    "503": _json("Readiness", "Not ready: `failed` names the checks."),
                    **_errors(*_ADMIN_ERRORS),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "prometheusMetrics",
                "tags": ["operations"],
                "summary": "Prometheus metrics in the text exposition format (README: Metrics).",
                "description": "Behind the admin key; also served without a key on "
                "`ROBOTA_METRICS_ADDR` when that is set.",
                "security": admin,
                "responses": {
                    "200": {
                        "description": "The metrics of every worker.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(*_ADMIN_ERRORS),
                },
            }
        },
        OPENAPI_PATH: {
            "get": {
                "operationId": "openapi",
                "tags": ["operations"],
                "summary": "This document.",
                "security": public,
                "responses": {
                    "200": {
                        "description": "The OpenAPI 3.1 document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


def _version() -> str:
    try:
        return version("robota-remote")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


@functools.cache
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Robota Remote proxy",
            "version": _version(),
            "description": "The Robota wire (`/ai/*`), the operator's API (`/admin/*`), "
            "and the OpenAI- and Anthropic-compatible surfaces (`/v1/*`). On the Robota "
            'wire JSON is camelCase and every error is `{"error": {"code", "message", '
            '"requestId", "retryAfter"?}}`; `/v1/*` speaks each vendor\'s own wire, '
            "errors included. Paths are below the mount point.",
        },
        "security": [{"bearer": []}],
        "tags": [
            {"name": "chat", "description": "Chat calls: whole, streamed, resumed, over WS."},
            {"name": "account", "description": "The caller's own models, account and usage."},
            {"name": "admin", "description": "Keys, users and usage; needs the admin key."},
            {
                "name": "openai",
                "description": "OpenAI's wire: chat completions, models, "
                "embeddings; errors in OpenAI's shape.",
            },
            {
                "name": "anthropic",
                "description": "Anthropic's wire: messages and token "
                "counts; errors in Anthropic's shape.",
            },
            {"name": "operations", "description": "Liveness and this document."},
        ],
        "paths": _paths(),
        "components": _components(),
    }


def openapi_document() -> dict[str, Any]:
    """The document, a fresh copy each time (callers may add ``servers``)."""
    return copy.deepcopy(_document())


def openapi_json() -> str:
    """The document as committed in ``docs/openapi.json``: indented, one trailing newline."""
    return json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    print(openapi_json(), end="")
