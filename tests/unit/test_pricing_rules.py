"""PriceBook rules a ledger row depends on, stated exactly: which entry of the prices file wins,
that a zero price is a price, that a model is priced only under its own provider, tiered
prices from genai-prices, a genai-prices data update, and the prompt bound that sets the
budget reservation."""

from __future__ import annotations

import copy
import json
import locale
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from genai_prices import data_snapshot
from genai_prices.types import ConditionalPrice, ModelInfo, ModelPrice, StartDateConstraint

from robota_client.messages import ChatRequest, Usage
from robota_proxy.policy.pricing import (
    MESSAGE_OVERHEAD_TOKENS,
    REQUEST_OVERHEAD_TOKENS,
    Price,
    PriceBook,
    PricesFileError,
    estimate_completion_tokens,
    prompt_token_bound,
    usd_text,
)

MILLION = 1_000_000


def usage(prompt: int, completion: int, cached: int = 0, written: int = 0) -> Usage:
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cached_prompt_tokens=cached or None,
        cache_write_tokens=written or None,
    )


def book_from(tmp_path: Path, data: object) -> PriceBook:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(data))
    return PriceBook.from_file(path)


# --- the prices file -----------------------------------------------------------------------


def test_the_documented_prices_file_example_loads_with_its_zero_price(tmp_path: Path) -> None:
    """The module's own example (a free self-hosted ``ollama-*``, ints for ``claude-*``, a
    default) must load, and a zero price is a price: those calls cost exactly 0, not "unknown"
    (which would refuse them or fall back to the default)."""
    book = book_from(
        tmp_path,
        {
            "openai/gpt-4o-mini": {"input": "0.15", "output": "0.60", "cache_read": "0.075"},
            "claude-*": {"input": 3, "output": 15, "cache_read": "0.3", "cache_write": "3.75"},
            "ollama-*": {"input": 0, "output": 0},
            "default": {"input": "1", "output": "3"},
        },
    )
    assert book.cost("custom", "ollama-llama3", usage(MILLION, MILLION)) == Decimal(0)
    assert book.knows("custom", "ollama-llama3")
    # 500k plain at $3, 300k read at $0.3, 200k written at $3.75, 100k out at $15.
    assert book.cost(
        "anthropic", "claude-sonnet-4-5", usage(MILLION, 100_000, 300_000, 200_000)
    ) == Decimal("1.5") + Decimal("0.09") + Decimal("0.75") + Decimal("1.5")
    assert book.cost("openai", "gpt-4o-mini", usage(MILLION, MILLION, MILLION)) == Decimal("0.675")
    # Nothing else names it: the default, $1 in and $3 out.
    assert book.cost("custom", "llama3.2", usage(MILLION, MILLION)) == Decimal(4)
    assert book.default == Price(input=Decimal(1), output=Decimal(3))


def test_zero_is_a_valid_price_for_every_field(tmp_path: Path) -> None:
    """A free cache (cache_read 0) is read as 0, not as "no cache price" (which would bill the
    cached tokens as input)."""
    book = book_from(
        tmp_path,
        {"x/y": {"input": "2", "output": "0", "cache_read": "0", "cache_write": 0}},
    )
    assert book.cost("x", "y", usage(3 * MILLION, MILLION, MILLION, MILLION)) == Decimal(2)


def test_an_exact_provider_model_wins_over_an_exact_model(tmp_path: Path) -> None:
    """A negotiated price for one provider's model beats the same model's price everywhere else."""
    book = book_from(
        tmp_path,
        {"m": {"input": 1, "output": 0}, "openai/m": {"input": 2, "output": 0}},
    )
    assert book.cost("openai", "m", usage(MILLION, 0)) == Decimal(2)
    assert book.cost("anthropic", "m", usage(MILLION, 0)) == Decimal(1)


def test_an_exact_provider_model_alone_prices_that_provider_only(tmp_path: Path) -> None:
    """A ``provider/model`` key is found by its qualified name, and does not price the same
    model name under another provider."""
    book = book_from(tmp_path, {"custom/m": {"input": 5, "output": 0}})
    assert book.cost("custom", "m", usage(MILLION, 0)) == Decimal(5)
    assert book.cost("other", "m", usage(MILLION, 0)) is None
    assert not book.knows("other", "m")


def test_an_exact_model_wins_over_a_glob_listed_before_it(tmp_path: Path) -> None:
    """An exact name is the operator's most specific word: a broad glob earlier in the file
    does not shadow it."""
    book = book_from(
        tmp_path,
        {"gpt-*": {"input": 1, "output": 0}, "gpt-x": {"input": 2, "output": 0}},
    )
    assert book.cost("openai", "gpt-x", usage(MILLION, 0)) == Decimal(2)
    assert book.cost("openai", "gpt-y", usage(MILLION, 0)) == Decimal(1)


def test_globs_match_in_file_order_on_provider_model_or_model(tmp_path: Path) -> None:
    """Globs are tried in file order, each against ``provider/model`` and against the model
    name, and every glob character (``*``, ``?``, ``[...]``) works."""
    book = book_from(
        tmp_path,
        {
            "custom/*": {"input": 1, "output": 0},
            "llama?-[ab]*": {"input": 2, "output": 0},
            "*": {"input": 3, "output": 0},
        },
    )
    # "custom/*" only matches the qualified name; it is first in the file.
    assert book.cost("custom", "llama3-a", usage(MILLION, 0)) == Decimal(1)
    # "llama?-[ab]*" only matches the model name.
    assert book.cost("other", "llama3-b", usage(MILLION, 0)) == Decimal(2)
    assert book.cost("other", "llama3-c", usage(MILLION, 0)) == Decimal(3)


def test_a_key_with_an_uppercase_x_is_an_exact_key_not_a_glob(tmp_path: Path) -> None:
    """Only ``*``, ``?`` and ``[`` make a glob: an exact key such as ``openai/X-1`` keeps its
    precedence over a glob listed before it."""
    book = book_from(
        tmp_path,
        {"X-*": {"input": 1, "output": 0}, "openai/X-1": {"input": 2, "output": 0}},
    )
    assert book.cost("openai", "X-1", usage(MILLION, 0)) == Decimal(2)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"a/b": {"input": 1, "output": 1, "cache_reed": 1, "inptu": 2}},
            "{path}: a/b: unknown field(s) cache_reed, inptu; "
            "known: input, output, cache_read, cache_write",
        ),
        ({"a/b": {"output": 1}}, "{path}: a/b: both 'input' and 'output' are required"),
        ({"a/b": {"input": 1}}, "{path}: a/b: both 'input' and 'output' are required"),
        ({"a/b": {"input": "1", "output": "-0.5"}}, "{path}: a/b.output: {negative}"),
        ({"a/b": {"input": "NaN", "output": 1}}, "{path}: a/b.input: {negative}"),
        ({"a/b": {"input": "Infinity", "output": 1}}, "{path}: a/b.input: {negative}"),
        (
            {"a/b": {"input": "lots", "output": 1}},
            "{path}: a/b.input: 'lots' is not a decimal number",
        ),
        ({"a/b": {"input": None, "output": 1}}, "{path}: a/b.input: {not_a_number}"),
        ({"a/b": {"input": [1], "output": 1}}, "{path}: a/b.input: {not_a_number}"),
        ({"a/b": {"input": 1, "output": False}}, "{path}: a/b.output: {not_a_number}"),
        ({"a/b": [1, 2]}, "{path}: a/b: a price is an object with input/output"),
        ({"default": {"input": 1}}, "default: both 'input' and 'output' are required"),
    ],
)
def test_a_bad_entry_is_refused_naming_the_entry_and_the_field(
    tmp_path: Path, data: object, message: str
) -> None:
    """The operator is told at start-up which entry and which field is wrong, and why."""
    with pytest.raises(PricesFileError) as refused:
        book_from(tmp_path, data)
    assert str(refused.value) == message.format(
        path=tmp_path / "prices.json",
        negative="a price must be a non-negative amount",
        not_a_number="a price is a number or a decimal string",
    )


def test_a_prices_file_that_is_not_an_object_is_refused_naming_the_file(tmp_path: Path) -> None:
    """The operator is told which file is wrong and what it should be."""
    path = tmp_path / "prices.json"
    path.write_text("[1, 2]")
    with pytest.raises(PricesFileError) as refused:
        PriceBook.from_file(path)
    assert str(refused.value) == f"{path}: the prices file is a JSON object"


def test_a_prices_file_that_is_not_utf8_is_refused_as_unreadable(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are a clear start-up error, not a crash or a garbled key."""
    path = tmp_path / "prices.json"
    path.write_bytes(b'{"a/b": {"input": "\xff", "output": 1}}')
    with pytest.raises(PricesFileError, match=r"^cannot read prices file "):
        PriceBook.from_file(path)


@pytest.fixture
def ascii_locale() -> Iterator[None]:
    """The host's locale says ASCII (LC_CTYPE=C without UTF-8), as on some minimal hosts."""
    saved = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)


@pytest.mark.usefixtures("ascii_locale")
def test_a_prices_file_is_utf8_whatever_the_host_locale(tmp_path: Path) -> None:
    """JSON is UTF-8: a non-ASCII key must load on a host whose locale says ASCII."""
    path = tmp_path / "prices.json"
    path.write_text('{"café/*": {"input": 7, "output": 0}}', encoding="utf-8")
    assert PriceBook.from_file(path).cost("café", "m", usage(MILLION, 0)) == Decimal(7)


def test_no_prices_file_prices_from_genai_prices_alone() -> None:
    """Without ``ROBOTA_PRICES_FILE`` the vendors' models are priced and nothing else is."""
    book = PriceBook.from_file(None)
    assert book.default is None
    assert book.cost("openai", "gpt-4o-mini", usage(MILLION, 0)) == Decimal("0.15")
    assert book.cost("custom", "m", usage(1, 1)) is None


def test_a_price_read_from_the_file_keeps_every_digit(tmp_path: Path) -> None:
    """Prices are read as Decimal text (no float), then the cost rounds up to a picodollar."""
    book = book_from(tmp_path, {"x/y": {"input": "0.123456789012345678", "output": 0}})
    assert book.cost("x", "y", usage(MILLION, 0)) == Decimal("0.123456789013")  # rounded up


def test_a_usage_without_prompt_tokens_bills_no_input() -> None:
    """An answer whose usage reports no prompt (or a broken server's negative counts) is
    billed for its output alone: not one token of input is made up."""
    book = PriceBook({"x/y": Price(input=Decimal(1000), output=Decimal(2))})
    assert book.cost("x", "y", usage(0, MILLION)) == Decimal(2)
    assert book.cost("x", "y", Usage(prompt_tokens=-5, completion_tokens=MILLION)) == Decimal(2)
    assert book.cost("x", "y", Usage(prompt_tokens=5, completion_tokens=-5)) == Decimal("0.005")


def test_usd_text_strips_only_trailing_fraction_zeros() -> None:
    """``usd_text`` is what answers and reports show: no exponent, no trailing zeros, but
    the zeros of a whole number stay."""
    assert usd_text(10 * 10**12) == "10"
    assert usd_text(1_500_000_000_000) == "1.5"
    assert usd_text(1) == "0.000000000001"
    assert usd_text(100_000_000) == "0.0001"


def test_estimated_completion_tokens_round_up_at_four_characters() -> None:
    """A stream cut before the vendor's usage is billed ~4 characters a token, never less."""
    assert [estimate_completion_tokens(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


# --- genai-prices ----------------------------------------------------------------------------


def test_a_model_is_priced_only_under_its_own_provider() -> None:
    """Anthropic's model asked for under OpenAI is not priced at Anthropic's rate: the lookup
    is made under the provider the call went to. Google sells Claude (Vertex), so it is
    priced there."""
    book = PriceBook()
    assert book.cost("openai", "claude-3-5-haiku", usage(MILLION, 0)) is None
    assert not book.knows("openai", "claude-3-5-haiku")
    assert book.cost("anthropic", "gpt-4o-mini", usage(MILLION, 0)) is None
    assert book.cost("google", "claude-3-5-haiku", usage(MILLION, 0)) == Decimal("0.8")
    # A provider genai-prices is not asked about at all.
    assert book.cost("custom", "gpt-4o-mini", usage(MILLION, 0)) is None


def test_claude_sonnet_4_5_prices_are_tiered_by_prompt_size() -> None:
    """The per-million prices the tiered expectations below are computed from, read from
    genai-prices itself, so a data change shows up here."""
    provider, model = data_snapshot.get_snapshot().find_provider_model(
        "claude-sonnet-4-5", None, "anthropic", None
    )
    price = model.get_prices(datetime.now(tz=UTC))
    tiers = {
        name: (value.base, [(tier.start, tier.price) for tier in value.tiers])
        for name in ("input_mtok", "cache_read_mtok", "cache_write_mtok", "output_mtok")
        for value in [getattr(price, name)]
    }
    assert tiers == {
        "input_mtok": (Decimal(3), [(200_000, Decimal(6))]),
        "cache_read_mtok": (Decimal("0.3"), [(200_000, Decimal("0.6"))]),
        "cache_write_mtok": (Decimal("3.75"), [(200_000, Decimal("7.5"))]),
        "output_mtok": (Decimal(15), [(200_000, Decimal("22.5"))]),
    }
    assert provider.id == "anthropic"


def test_a_tiered_price_bills_each_token_kind_at_the_tier_of_the_prompt_size() -> None:
    """Tiered prices go through genai-prices with each token kind handed over as its own count,
    so each is billed at its own price in the tier the prompt size selects."""
    book = PriceBook()
    # Under 200k prompt tokens: 30k plain at $3, 100k read at $0.30, 20k written at $3.75,
    # 10k out at $15: 0.09 + 0.03 + 0.075 + 0.15.
    small = usage(150_000, 10_000, 100_000, 20_000)
    assert book.cost("anthropic", "claude-sonnet-4-5", small) == Decimal("0.345")
    # Over 200k, every token at the higher tier: 150k plain at $6, 100k read at $0.60, 50k
    # written at $7.50, 10k out at $22.50: 0.9 + 0.06 + 0.375 + 0.225.
    large = usage(300_000, 10_000, 100_000, 50_000)
    assert book.cost("anthropic", "claude-sonnet-4-5", large) == Decimal("1.56")
    # gemini-2.5-pro has no cache-write price: writes are input ($2.50 over 200k).
    # 200k plain-or-written at $2.50, 100k read at $0.25, 10k out at $15.
    assert book.cost("google", "gemini-2.5-pro", large) == Decimal("0.675")


def test_a_tiered_price_clamps_cache_counts_larger_than_the_prompt() -> None:
    """genai-prices refuses cache reads above the input; a compatible server's 200 cached of a
    100-token prompt is billed as 100 cache reads, never as an error or negative input."""
    cost = PriceBook().cost("anthropic", "claude-sonnet-4-5", usage(100, 10, 200, 50))
    assert cost == (100 * Decimal("0.3") + 10 * Decimal(15)) / MILLION


def test_a_tiered_cost_is_in_picodollars_like_every_other() -> None:
    """What the caller is told and what the ledger stores are the same twelve-place number,
    whichever way the price was computed."""
    # 1 plain input at $3/M, 1 cache read at $0.30/M, 1 cache write at $3.75/M, 1 output at $15/M.
    cost = PriceBook().cost("anthropic", "claude-sonnet-4-5", usage(3, 1, 1, 1))
    assert str(cost) == "0.000022050000"


@pytest.fixture
def restore_genai_snapshot() -> Iterator[None]:
    """genai-prices' data is process-wide: put its own back after a test swaps it."""
    yield
    data_snapshot.set_custom_snapshot(None)


def test_the_price_in_force_today_applies() -> None:
    """o3's price fell from $10/$40 to $2/$8 per million on 2025-06-10; a call today pays the
    new price, not the first one genai-prices lists."""
    _, model = data_snapshot.get_snapshot().find_provider_model("o3", None, "openai", None)
    assert isinstance(model.prices, list)
    assert [price.constraint for price in model.prices] == [
        None,
        StartDateConstraint(start_date=date(2025, 6, 10)),
    ]
    assert PriceBook().cost("openai", "o3", usage(MILLION, MILLION)) == Decimal(10)


@pytest.fixture
def host_time_zone() -> Iterator[Callable[[str], None]]:
    """Sets the host's local time zone (a POSIX TZ string, no tzdata needed) for one test."""
    saved = os.environ.get("TZ")

    def use(zone: str) -> None:
        os.environ["TZ"] = zone
        time.tzset()

    yield use
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


@pytest.mark.usefixtures("restore_genai_snapshot")
def test_a_dated_price_change_starts_at_utc_midnight_whatever_the_host_time_zone(
    host_time_zone: Callable[[str], None],
) -> None:
    """genai-prices dates its price changes in UTC: on a host whose local date is not UTC's
    date, a call is still priced by the UTC date."""
    now = datetime.now(tz=UTC)
    if now.hour < 12:
        # Twelve hours behind UTC the local date is yesterday; the change starts today (UTC).
        host_time_zone("<-12>12")
        starts, expected = now.date(), Decimal(2)
    else:
        # Fourteen hours ahead the local date is tomorrow; the change starts tomorrow (UTC).
        host_time_zone("<+14>-14")
        starts, expected = now.date() + timedelta(days=1), Decimal(1)
    assert datetime.now().date() != datetime.now(tz=UTC).date()
    snapshot = data_snapshot.DataSnapshot(
        providers=copy.deepcopy(data_snapshot.get_snapshot().providers), from_auto_update=True
    )
    _, model = snapshot.find_provider_model("claude-3-5-haiku", None, "anthropic", None)
    model.prices = [
        ConditionalPrice(prices=ModelPrice(input_mtok=Decimal(1), output_mtok=Decimal(0))),
        ConditionalPrice(
            StartDateConstraint(start_date=starts),
            prices=ModelPrice(input_mtok=Decimal(2), output_mtok=Decimal(0)),
        ),
    ]
    data_snapshot.set_custom_snapshot(snapshot)
    assert PriceBook().cost("anthropic", "claude-3-5-haiku", usage(MILLION, 0)) == expected


class CountingPrices:
    """Counts genai-prices' price calculations (about 0.1 ms each, the cost the book avoids):
    ``measured`` for one price object's (``ModelPrice``), ``asked`` for a model's as a whole
    (``ModelInfo``, tiers and all)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = {ModelPrice: 0, ModelInfo: 0}
        for cls in (ModelPrice, ModelInfo):
            original = cls.calc_price

            def counted(*args: Any, _cls: Any = cls, _original: Any = original, **kw: Any) -> Any:
                self.calls[_cls] += 1
                return _original(*args, **kw)

            monkeypatch.setattr(cls, "calc_price", counted)

    @property
    def measured(self) -> int:
        return self.calls[ModelPrice]

    @property
    def asked(self) -> int:
        return self.calls[ModelInfo]


def test_a_linear_price_asks_genai_prices_only_the_first_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A per-token price is measured through genai-prices once (six measurements: nothing,
    a million of each of the four kinds, and a mixed check); later calls are plain Decimal
    arithmetic with the same result."""
    counting = CountingPrices(monkeypatch)
    book = PriceBook()
    tokens = usage(2000, 300, 1200, 500)
    # claude-3-5-haiku: 300 plain at $0.80, 1200 read at $0.08, 500 written at $1, 300 out at $4.
    expected = (300 * Decimal("0.8") + 1200 * Decimal("0.08") + 500 + 300 * 4) / Decimal(MILLION)
    assert book.cost("anthropic", "claude-3-5-haiku", tokens) == expected
    assert (counting.measured, counting.asked) == (6, 0)
    assert book.cost("anthropic", "claude-3-5-haiku", tokens) == expected
    assert book.cost("anthropic", "claude-3-5-haiku", usage(MILLION, MILLION)) == Decimal("4.8")
    assert (counting.measured, counting.asked) == (6, 0)


def test_a_tiered_price_asks_genai_prices_on_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A price that is not linear in the token kinds is never measured: each call goes to
    genai-prices, so its number is the library's."""
    counting = CountingPrices(monkeypatch)
    book = PriceBook()
    assert book.cost("anthropic", "claude-sonnet-4-5", usage(MILLION, 0)) == Decimal(6)
    assert book.cost("anthropic", "claude-sonnet-4-5", usage(1000, 0)) == Decimal("0.003")
    assert counting.asked == 2


def with_haiku_input_price(input_mtok: Decimal) -> data_snapshot.DataSnapshot:
    """A copy of genai-prices' data where claude-3-5-haiku's input costs ``input_mtok``, as an
    auto update of the price data would bring."""
    snapshot = data_snapshot.DataSnapshot(
        providers=copy.deepcopy(data_snapshot.get_snapshot().providers), from_auto_update=True
    )
    haiku_price(snapshot).input_mtok = input_mtok
    return snapshot


def haiku_price(snapshot: data_snapshot.DataSnapshot) -> ModelPrice:
    _, model = snapshot.find_provider_model("claude-3-5-haiku", None, "anthropic", None)
    assert isinstance(model.prices, ModelPrice)
    return model.prices


@pytest.mark.usefixtures("restore_genai_snapshot")
def test_updated_genai_prices_data_is_used_from_the_next_call() -> None:
    """genai-prices can swap its data at run time (auto update); a book that already priced a
    model must price the next call from the new data, not from what it found before."""
    book = PriceBook()
    assert book.cost("anthropic", "claude-3-5-haiku", usage(MILLION, 0)) == Decimal("0.8")
    data_snapshot.set_custom_snapshot(with_haiku_input_price(Decimal(2)))
    assert book.cost("anthropic", "claude-3-5-haiku", usage(MILLION, 0)) == Decimal(2)
    assert book.cost("anthropic", "claude-3-5-haiku", usage(MILLION, 0)) == Decimal(2)
    data_snapshot.set_custom_snapshot(None)
    assert book.cost("anthropic", "claude-3-5-haiku", usage(MILLION, 0)) == Decimal("0.8")


# --- the prompt bound ------------------------------------------------------------------------


def request(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> Any:
    body: dict[str, Any] = {"provider": "openai", "model": "m", "messages": messages}
    if tools is not None:
        body["tools"] = tools
    return ChatRequest.model_validate(body)


def test_the_bound_uses_the_documented_framing_constants() -> None:
    """The reservation a caller's budget must cover: 16 tokens a request, 8 a message."""
    assert (REQUEST_OVERHEAD_TOKENS, MESSAGE_OVERHEAD_TOKENS) == (16, 8)
    assert prompt_token_bound(request([{"role": "user", "content": "a"}])) == 16 + 8 + 1


def test_the_bound_counts_names_tool_calls_and_tool_call_ids_in_utf8_bytes() -> None:
    """Every text the vendor sees counts, in UTF-8 bytes (a BPE token is at least a byte):
    the author's name, each tool call's id, function name and arguments (plus framing), and
    the id a tool result answers. Leaving any out would reserve less than the vendor bills."""
    arguments = '{"city":"Zürich"}'  # 17 characters, 18 bytes
    bound = prompt_token_bound(
        request(
            [
                {"role": "user", "content": "hi", "name": "Zoë"},  # 2 + 4 bytes
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "call_1", "function": {"name": "wëather", "arguments": arguments}},
                        {"id": "c2", "function": {"name": "t", "arguments": "{}"}},
                    ],
                },
                {"role": "tool", "content": "sünny", "tool_call_id": "call_ü"},  # 6 + 7 bytes
            ]
        )
    )
    user = 8 + 2 + 4
    first_call = 8 + 6 + 8 + 18
    second_call = 8 + 2 + 1 + 2
    assistant = 8 + first_call + second_call
    tool = 8 + 6 + 7
    assert bound == 16 + user + assistant + tool


def test_the_bound_counts_each_tool_schema_as_compact_utf8_json() -> None:
    """A tool schema is sent as JSON; its compact UTF-8 form (non-ASCII kept as is, no spaces)
    plus framing bounds its tokens, and the bound is that exact number."""
    base = [{"role": "user", "content": "be brief"}]
    without = prompt_token_bound(request(base))
    assert without == 16 + 8 + 8
    tools = [
        {"name": "weather", "description": "météo", "parameters": {"type": "object"}},
        {"name": "t"},
    ]
    schema_1 = '{"name":"weather","description":"météo","parameters":{"type":"object"}}'
    schema_2 = '{"name":"t","description":"","parameters":{"type":"object","properties":{}}}'
    assert prompt_token_bound(request(base, tools)) == without + (
        8 + len(schema_1.encode()) + 8 + len(schema_2.encode())
    )
    assert len(schema_1.encode()) == 73
