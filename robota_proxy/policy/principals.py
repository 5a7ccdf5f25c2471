"""Who is calling and what they may do: the identity every later stop keys on.

``UserPermissions`` carries the seed's fields (allowedProviders, allowedModels, allowedFeatures,
monthlyTokenLimit, dailyRequestLimit) plus the limits a gateway needs (rpm, tpm, monthly budget).
``None`` always means "no limit / anything allowed", so an empty record is an unrestricted user.
Permissions may live on the user (shared by all their keys) and on a key; the key's fields win
where it sets them (``overlay``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields, replace
from decimal import ROUND_CEILING, Decimal
from typing import Any, Literal, Protocol

from robota_client.messages import ChatRequest
from robota_proxy.errors import Forbidden, InvalidRequest

#: ``embeddings`` is ``POST /v1/embeddings``. An explicit ``allowedFeatures`` list is taken at
#: its word: a list written before embeddings existed does not grant them; no list grants all.
Feature = Literal["chat", "stream", "tools", "embeddings"]
FEATURES: tuple[Feature, ...] = ("chat", "stream", "tools", "embeddings")

# Wire (camelCase, the seed's names) <-> attribute names.
_WIRE_NAMES = {
    "allowed_providers": "allowedProviders",
    "allowed_models": "allowedModels",
    "allowed_features": "allowedFeatures",
    "rpm": "rpm",
    "tpm": "tpm",
    "daily_requests": "dailyRequestLimit",
    "monthly_tokens": "monthlyTokenLimit",
    "monthly_budget_usd": "monthlyBudgetUsd",
}


#: The largest count a permission may set (tokens, requests per minute/day): the counters are
#: int64 in both databases, and a quota check adds a call's worst case to what is used and
#: reserved, so the limit leaves room for that sum (and stays exact as a JavaScript number).
MAX_COUNT = 10**15
#: The largest monthly budget, USD. Money is stored as int64 picodollars (at most about
#: 9.2e18, i.e. $9.2 million), and the budget check adds used + reserved + a call's worst
#: case: $1 million (1e18 picodollars) leaves that sum far from the edge. A stored "1e30"
#: made every later call of its user a 500.
MAX_BUDGET_USD = Decimal(1_000_000)
#: A budget is kept to whole picodollars (the unit of the counters), rounded up.
_PICO = Decimal("1e-12")


@dataclass(frozen=True, slots=True)
class UserPermissions:
    allowed_providers: tuple[str, ...] | None = None
    #: Glob patterns (``gpt-4o*``, ``claude-*``), matched against the model name.
    allowed_models: tuple[str, ...] | None = None
    allowed_features: tuple[Feature, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    daily_requests: int | None = None
    monthly_tokens: int | None = None
    monthly_budget_usd: Decimal | None = None

    def overlay(self, other: UserPermissions | None) -> UserPermissions:
        """These permissions with every field ``other`` sets taking precedence."""
        if other is None:
            return self
        changes = {
            f.name: getattr(other, f.name)
            for f in fields(other)
            if getattr(other, f.name) is not None
        }
        return replace(self, **changes)

    @property
    def has_money_limits(self) -> bool:
        return self.monthly_tokens is not None or self.monthly_budget_usd is not None

    def authorize(self, request: ChatRequest, feature: Feature) -> None:
        """Raise ``Forbidden`` naming what was denied; called before any upstream call."""
        if self.allowed_providers is not None and request.provider not in self.allowed_providers:
            raise Forbidden(f"provider {request.provider!r} is not allowed for this key")
        if self.allowed_models is not None and not any(
            fnmatch.fnmatchcase(request.model, pattern) for pattern in self.allowed_models
        ):
            raise Forbidden(f"model {request.model!r} is not allowed for this key")
        wanted: list[Feature] = [feature]
        if request.tools:
            wanted.append("tools")
        if self.allowed_features is not None:
            for name in wanted:
                if name not in self.allowed_features:
                    raise Forbidden(f"feature {name!r} is not allowed for this key")

    def to_wire(self) -> dict[str, Any]:
        """camelCase JSON, leaving out unset fields; the budget as a decimal string."""
        out: dict[str, Any] = {}
        for name, wire in _WIRE_NAMES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Decimal):
                value = format(value, "f")  # "100000", never "1E+5"
            out[wire] = value
        return out

    @classmethod
    def from_wire(cls, data: dict[str, Any] | None) -> UserPermissions:
        """Accepts camelCase or snake_case; rejects unknown fields and bad values with
        ``InvalidRequest`` so an admin typo is an error, not an unrestricted key."""
        if not data:
            return cls()
        by_wire = {wire: name for name, wire in _WIRE_NAMES.items()}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = by_wire.get(key, key)
            if name not in _WIRE_NAMES:
                raise InvalidRequest(f"unknown permission field {key!r}")
            if value is None:
                continue
            values[name] = _coerce(name, value)
        return cls(**values)


def _coerce(name: str, value: Any) -> Any:
    if name in ("allowed_providers", "allowed_models", "allowed_features"):
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise InvalidRequest(f"{_WIRE_NAMES[name]} must be a list of strings")
        if not all(storable(v) for v in value):
            raise InvalidRequest(
                f"{_WIRE_NAMES[name]} must not contain control characters or lone surrogates"
            )
        if name == "allowed_features":
            unknown = [v for v in value if v not in FEATURES]
            if unknown:
                raise InvalidRequest(
                    f"unknown feature(s) {', '.join(unknown)}; known: {', '.join(FEATURES)}"
                )
        return tuple(value)
    if name == "monthly_budget_usd":
        if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
            raise InvalidRequest(f"{_WIRE_NAMES[name]} must be a decimal number")
        try:
            amount = Decimal(str(value))
        except ArithmeticError:
            raise InvalidRequest(f"{_WIRE_NAMES[name]} must be a decimal number") from None
        if not amount.is_finite() or amount < 0:
            raise InvalidRequest(f"{_WIRE_NAMES[name]} must be a non-negative amount")
        if amount > MAX_BUDGET_USD:
            raise InvalidRequest(f"{_WIRE_NAMES[name]} must be at most {MAX_BUDGET_USD} USD")
        exponent = amount.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -12:
            # Finer than the counters' picodollar: "1e-999999999" is kept as one picodollar,
            # not as a billion-digit string in every answer. Coarser amounts keep their form.
            amount = amount.quantize(_PICO, rounding=ROUND_CEILING).normalize()
        return amount
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"{_WIRE_NAMES[name]} must be a non-negative integer")
    if value > MAX_COUNT:
        raise InvalidRequest(f"{_WIRE_NAMES[name]} must be at most {MAX_COUNT}")
    return value


def storable(text: str) -> bool:
    """Whether ``text`` can be stored and logged as it is: UTF-8 encodable (no lone
    surrogate) and free of control characters (PostgreSQL refuses NUL)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return not any(ord(char) < 0x20 or char == "\x7f" for char in text)


#: The longest user id anywhere: the users table, the ledger's user column and every counter key
#: hold it whole, so an id that would be cut in one place and not another is refused at the edge.
MAX_USER_LENGTH = 200


@dataclass(frozen=True, slots=True)
class Principal:
    #: The user the call is accounted to.
    user: str
    #: The public, non-secret id of the credential used (never the key itself).
    key_id: str | None = None
    permissions: UserPermissions = field(default_factory=UserPermissions)


class Authenticator(Protocol):
    """Turns a bearer credential into a principal. Raise ``policy.refusals.AuthRefused`` to
    say why a credential is refused; ``None`` means "not valid" without a reason."""

    async def authenticate(self, credential: str) -> Principal | None: ...
