"""UserPermissions: the wire format an admin writes, and what a principal may call.

A permission record is a security boundary: a field the parser drops or misreads becomes an
unrestricted key, so every refusal is asserted with its exact message (the admin API answers
it as a 400) and every accepted value with the exact permissions it yields.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest

from robota_client.messages import ChatRequest
from robota_proxy.errors import Forbidden, InvalidRequest
from robota_proxy.policy.principals import Principal, UserPermissions, storable


def refused(data: dict[str, Any]) -> str:
    """The message of the 400 an admin gets for ``data``."""
    with pytest.raises(InvalidRequest) as error:
        UserPermissions.from_wire(data)
    return error.value.message


# --- reading the wire format -------------------------------------------------------------


def test_every_camel_case_field_is_read() -> None:
    wire = {
        "allowedProviders": ["openai", "anthropic"],
        "allowedModels": ["gpt-4o*"],
        "allowedFeatures": ["chat", "tools", "embeddings"],
        "rpm": 10,
        "tpm": 2000,
        "dailyRequestLimit": 500,
        "monthlyTokenLimit": 1_000_000,
        "monthlyBudgetUsd": "25.50",
    }
    assert UserPermissions.from_wire(wire) == UserPermissions(
        allowed_providers=("openai", "anthropic"),
        allowed_models=("gpt-4o*",),
        allowed_features=("chat", "tools", "embeddings"),
        rpm=10,
        tpm=2000,
        daily_requests=500,
        monthly_tokens=1_000_000,
        monthly_budget_usd=Decimal("25.50"),
    )


def test_snake_case_field_names_are_accepted_too() -> None:
    """The docstring promises snake_case: an admin scripting in Python writes the attribute
    names, and a 400 "unknown field" for them would be a surprise."""
    wire = {
        "allowed_providers": ["openai"],
        "allowed_models": ["gpt-4o"],
        "allowed_features": ["stream"],
        "rpm": 1,
        "tpm": 2,
        "daily_requests": 3,
        "monthly_tokens": 4,
        "monthly_budget_usd": 5,
    }
    assert UserPermissions.from_wire(wire) == UserPermissions(
        allowed_providers=("openai",),
        allowed_models=("gpt-4o",),
        allowed_features=("stream",),
        rpm=1,
        tpm=2,
        daily_requests=3,
        monthly_tokens=4,
        monthly_budget_usd=Decimal(5),
    )


def test_an_empty_record_is_an_unrestricted_user() -> None:
    assert UserPermissions.from_wire(None) == UserPermissions()
    assert UserPermissions.from_wire({}) == UserPermissions()


def test_a_null_field_is_unset_and_the_fields_after_it_still_count() -> None:
    """``null`` means "no limit" for that field only: it must not drop the restrictions that
    follow it in the object, which would turn a restricted key into an unrestricted one."""
    data = {"rpm": None, "allowedProviders": ["mock"], "tpm": None, "monthlyBudgetUsd": "1"}
    assert UserPermissions.from_wire(data) == UserPermissions(
        allowed_providers=("mock",), monthly_budget_usd=Decimal(1)
    )


def test_an_unknown_field_is_a_400_not_an_ignored_typo() -> None:
    assert refused({"rpm": 5, "allowedProvider": ["openai"]}) == (
        "unknown permission field 'allowedProvider'"
    )
    # Only the two spellings of a field: not the Python name of something else.
    assert refused({"key_id": "x"}) == "unknown permission field 'key_id'"


def test_lists_may_be_comma_separated_strings() -> None:
    permissions = UserPermissions.from_wire(
        {"allowedProviders": " openai, anthropic ,, ", "allowedFeatures": "chat,stream"}
    )
    assert permissions == UserPermissions(
        allowed_providers=("openai", "anthropic"), allowed_features=("chat", "stream")
    )


@pytest.mark.parametrize("field", ["allowedProviders", "allowedModels", "allowedFeatures"])
@pytest.mark.parametrize("value", [[1], ["chat", 2], 5, {"chat": True}, True])
def test_list_fields_take_only_strings(field: str, value: Any) -> None:
    assert refused({field: value}) == f"{field} must be a list of strings"


@pytest.mark.parametrize("field", ["allowedProviders", "allowedModels"])
@pytest.mark.parametrize("name", ["open\x00ai", "gpt\n4", "a\x7f", "\ud800"])
def test_names_that_cannot_be_stored_or_logged_are_refused(field: str, name: str) -> None:
    assert refused({field: ["ok", name]}) == (
        f"{field} must not contain control characters or lone surrogates"
    )


def test_unknown_features_are_named() -> None:
    assert refused({"allowedFeatures": ["chat", "video", "audio"]}) == (
        "unknown feature(s) video, audio; known: chat, stream, tools, embeddings"
    )


COUNTS = {
    "rpm": "rpm",
    "tpm": "tpm",
    "dailyRequestLimit": "daily_requests",
    "monthlyTokenLimit": "monthly_tokens",
}


@pytest.mark.parametrize("field", COUNTS)
def test_counts_from_zero_to_the_int64_safe_maximum(field: str) -> None:
    """0 is a real limit (the user may make no calls), not "unset"; 10**15 is the largest the
    counters can hold with room for a call's worst case on top."""
    name = COUNTS[field]
    assert UserPermissions.from_wire({field: 0}) == UserPermissions(**{name: 0})
    assert UserPermissions.from_wire({field: 10**15}) == UserPermissions(**{name: 10**15})
    assert refused({field: 10**15 + 1}) == f"{field} must be at most 1000000000000000"


@pytest.mark.parametrize("field", COUNTS)
@pytest.mark.parametrize("value", [True, False, -1, 1.5, 2.0, "5", [5]])
def test_counts_are_non_negative_integers_only(field: str, value: Any) -> None:
    """A JSON ``true`` is not the limit 1, nor ``"5"`` the limit 5: the admin meant
    something else, and guessing would set a limit nobody wrote."""
    assert refused({field: value}) == f"{field} must be a non-negative integer"


@pytest.mark.parametrize(
    ("value", "budget"),
    [
        ("0", Decimal(0)),
        (0, Decimal(0)),
        (12, Decimal(12)),
        (2.5, Decimal("2.5")),
        (Decimal("7.25"), Decimal("7.25")),
        ("1000000", Decimal(1_000_000)),
        # Finer than a picodollar: rounded up to whole picodollars, never down to free.
        ("0.0000000000001", Decimal("1e-12")),
        ("1.0000000000001", Decimal("1.000000000001")),
        ("1e-999999999", Decimal("1e-12")),
    ],
)
def test_budgets_are_kept_to_the_picodollar(value: Any, budget: Decimal) -> None:
    permissions = UserPermissions.from_wire({"monthlyBudgetUsd": value})
    assert permissions.monthly_budget_usd == budget


@pytest.mark.parametrize("value", ["2.50", "0.100000000000", "1E+5"])
def test_budgets_keep_the_form_the_admin_wrote(value: str) -> None:
    """An amount no finer than a picodollar is echoed as written (in plain notation)."""
    wire = UserPermissions.from_wire({"monthlyBudgetUsd": value}).to_wire()
    assert wire == {"monthlyBudgetUsd": "100000" if value == "1E+5" else value}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "monthlyBudgetUsd must be a decimal number"),
        ([1], "monthlyBudgetUsd must be a decimal number"),
        ("ten", "monthlyBudgetUsd must be a decimal number"),
        ("-0.01", "monthlyBudgetUsd must be a non-negative amount"),
        (-1, "monthlyBudgetUsd must be a non-negative amount"),
        ("NaN", "monthlyBudgetUsd must be a non-negative amount"),
        ("Infinity", "monthlyBudgetUsd must be a non-negative amount"),
        ("1000000.000000000001", "monthlyBudgetUsd must be at most 1000000 USD"),
        ("1e30", "monthlyBudgetUsd must be at most 1000000 USD"),
    ],
)
def test_bad_budgets_are_a_400(value: Any, message: str) -> None:
    assert refused({"monthlyBudgetUsd": value}) == message


def test_a_budget_is_a_json_number_or_string_only() -> None:
    """A Python caller's other number types are refused rather than read through ``str()``:
    ``Fraction(5)`` would otherwise pass as "5" and ``Fraction(1, 3)`` be a confusing error."""
    for value in (Fraction(5), Fraction(1, 3)):
        assert refused({"monthlyBudgetUsd": value}) == "monthlyBudgetUsd must be a decimal number"


# --- writing the wire format -------------------------------------------------------------


def test_to_wire_writes_camel_case_and_leaves_out_unset_fields() -> None:
    """Unset fields early in the record must not hide the ones after them."""
    assert UserPermissions().to_wire() == {}
    assert UserPermissions(monthly_budget_usd=Decimal("100000")).to_wire() == {
        "monthlyBudgetUsd": "100000"
    }
    full = UserPermissions(
        allowed_providers=("openai",),
        allowed_models=("gpt-*",),
        allowed_features=("chat",),
        rpm=0,
        tpm=2,
        daily_requests=3,
        monthly_tokens=4,
        monthly_budget_usd=Decimal("1E+2"),
    )
    assert full.to_wire() == {
        "allowedProviders": ["openai"],
        "allowedModels": ["gpt-*"],
        "allowedFeatures": ["chat"],
        "rpm": 0,
        "tpm": 2,
        "dailyRequestLimit": 3,
        "monthlyTokenLimit": 4,
        "monthlyBudgetUsd": "100",
    }
    assert UserPermissions.from_wire(full.to_wire()) == full


# --- overlay and money limits ------------------------------------------------------------


def test_a_keys_permissions_win_where_the_key_sets_them() -> None:
    user = UserPermissions(allowed_providers=("openai",), rpm=10, tpm=100)
    key = UserPermissions(rpm=2, monthly_tokens=0)
    assert user.overlay(key) == UserPermissions(
        allowed_providers=("openai",), rpm=2, tpm=100, monthly_tokens=0
    )
    assert user.overlay(None) == user
    assert user.overlay(UserPermissions()) == user


def test_money_limits_are_token_or_budget_limits() -> None:
    """Only these two make a call wait for the usage store; rate limits do not."""
    assert UserPermissions(monthly_tokens=0).has_money_limits is True
    assert UserPermissions(monthly_budget_usd=Decimal(0)).has_money_limits is True
    assert UserPermissions(rpm=1, tpm=1, daily_requests=1).has_money_limits is False
    assert UserPermissions().has_money_limits is False


# --- authorizing a call ------------------------------------------------------------------


def chat(provider: str = "openai", model: str = "gpt-4o-mini", tools: bool = False) -> ChatRequest:
    body: dict[str, Any] = {
        "provider": provider,
        "model": model,
        "messages": [{"role": "user", "content": "x"}],
    }
    if tools:
        body["tools"] = [{"name": "weather"}]
    return ChatRequest.model_validate(body)


def denial(permissions: UserPermissions, request: ChatRequest, feature: Any = "chat") -> str:
    with pytest.raises(Forbidden) as error:
        permissions.authorize(request, feature)
    return error.value.message


def test_an_unrestricted_user_may_call_anything() -> None:
    UserPermissions().authorize(chat(tools=True), "stream")


def test_providers_are_matched_exactly() -> None:
    permissions = UserPermissions(allowed_providers=("openai", "mock"))
    permissions.authorize(chat("mock"), "chat")
    assert denial(permissions, chat("anthropic")) == (
        "provider 'anthropic' is not allowed for this key"
    )
    assert denial(UserPermissions(allowed_providers=()), chat()) == (
        "provider 'openai' is not allowed for this key"
    )


def test_models_are_matched_by_any_glob_case_sensitively() -> None:
    permissions = UserPermissions(allowed_models=("gpt-4o*", "claude-*"))
    permissions.authorize(chat(model="gpt-4o-mini"), "chat")
    permissions.authorize(chat(model="claude-3-haiku"), "chat")
    assert denial(permissions, chat(model="GPT-4o")) == "model 'GPT-4o' is not allowed for this key"
    assert denial(permissions, chat(model="gpt-4")) == "model 'gpt-4' is not allowed for this key"


def test_features_include_tools_when_the_call_sends_tools() -> None:
    chat_only = UserPermissions(allowed_features=("chat",))
    chat_only.authorize(chat(), "chat")
    assert denial(chat_only, chat(), "stream") == "feature 'stream' is not allowed for this key"
    assert denial(chat_only, chat(tools=True)) == "feature 'tools' is not allowed for this key"
    UserPermissions(allowed_features=("stream", "tools")).authorize(chat(tools=True), "stream")
    # An empty tools list sends no tools.
    empty_tools = ChatRequest.model_validate(
        {
            "provider": "openai",
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [],
        }
    )
    chat_only.authorize(empty_tools, "chat")


# --- storable text and principals --------------------------------------------------------


def test_storable_text_is_utf8_without_control_characters() -> None:
    for text in ("gpt-4o mini", "café", "~", ""):
        assert storable(text) is True, text
    for text in ("\x00", "a\x1fb", "\x7f", "\ud800"):
        assert storable(text) is False, text


def test_a_principal_without_a_key_is_unrestricted() -> None:
    principal = Principal("alice")
    assert (principal.key_id, principal.permissions) == (None, UserPermissions())
