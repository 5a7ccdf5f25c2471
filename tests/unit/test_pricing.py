"""PriceBook: genai-prices for the vendors' models, the prices file on top, exact Decimals."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price

from robota_client.messages import ChatRequest, Usage
from robota_proxy.policy.pricing import (
    Price,
    PriceBook,
    PricesFileError,
    from_pico,
    prompt_token_bound,
    to_pico,
    usd_text,
)


def usage(
    prompt: int, completion: int, cached: int = 0, *, written: int = 0, reasoning: int = 0
) -> Usage:
    """``prompt`` is all the input (cache reads and writes included), ``completion`` all the
    output (reasoning included), as the adapters report them."""
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cached_prompt_tokens=cached or None,
        cache_write_tokens=written or None,
        reasoning_tokens=reasoning or None,
    )


def write_prices(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(data))
    return path


# Published prices per million tokens (input, output), as genai-prices knows them.
@pytest.mark.parametrize(
    ("provider", "model", "input_price", "output_price"),
    [
        ("openai", "gpt-4o-mini", "0.15", "0.6"),
        ("anthropic", "claude-3-5-haiku", "0.8", "4"),
        ("anthropic", "claude-3-5-haiku-20241022", "0.8", "4"),
        ("google", "gemini-2.5-flash", "0.3", "2.5"),
    ],
)
def test_genai_prices_for_the_three_vendors(
    provider: str, model: str, input_price: str, output_price: str
) -> None:
    book = PriceBook()
    cost = book.cost(provider, model, usage(1_000_000, 1_000_000))
    assert cost == Decimal(input_price) + Decimal(output_price)
    assert isinstance(cost, Decimal)
    small = book.cost(provider, model, usage(1000, 500))
    assert small == (1000 * Decimal(input_price) + 500 * Decimal(output_price)) / 1_000_000
    assert book.knows(provider, model)


def test_cached_prompt_tokens_are_cheaper() -> None:
    book = PriceBook()
    plain = book.cost("openai", "gpt-4o-mini", usage(1000, 0))
    cached = book.cost("openai", "gpt-4o-mini", usage(1000, 0, cached=800))
    assert plain is not None and cached is not None
    # 200 at $0.15/M + 800 at the cache-read price $0.075/M
    assert cached == (200 * Decimal("0.15") + 800 * Decimal("0.075")) / 1_000_000
    assert cached < plain


def test_genai_prices_data_has_the_published_cache_prices() -> None:
    """The per-million prices the exact expectations below are computed from, read from
    genai-prices itself, so a data change shows up here rather than as a puzzling sum."""
    haiku = calc_price(GenaiUsage(), model_ref="claude-3-5-haiku", provider_id="anthropic")
    assert (
        haiku.model_price.input_mtok,
        haiku.model_price.output_mtok,
        haiku.model_price.cache_read_mtok,
        haiku.model_price.cache_write_mtok,
    ) == (Decimal("0.8"), Decimal("4"), Decimal("0.08"), Decimal("1"))
    o3 = calc_price(GenaiUsage(), model_ref="o3-mini", provider_id="openai")
    assert (
        o3.model_price.input_mtok,
        o3.model_price.output_mtok,
        o3.model_price.cache_read_mtok,
        o3.model_price.cache_write_mtok,
    ) == (Decimal("1.1"), Decimal("4.4"), Decimal("0.55"), None)
    flash = calc_price(GenaiUsage(), model_ref="gemini-2.5-flash", provider_id="google")
    assert (
        flash.model_price.input_mtok,
        flash.model_price.output_mtok,
        flash.model_price.cache_read_mtok,
    ) == (Decimal("0.3"), Decimal("2.5"), Decimal("0.03"))


def test_anthropic_cache_writes_reads_and_thinking_each_at_their_price() -> None:
    # 2007 input = 7 plain + 1200 read from the cache + 800 written to it; 300 output of
    # which 120 thinking. claude-3-5-haiku per MTok: input $0.80, cache read $0.08,
    # cache write $1, output $4 (thinking is output).
    # (7 * 0.8 + 1200 * 0.08 + 800 * 1 + 300 * 4) / 1e6 = (5.6 + 96 + 800 + 1200) / 1e6
    cost = PriceBook().cost(
        "anthropic", "claude-3-5-haiku", usage(2007, 300, 1200, written=800, reasoning=120)
    )
    assert cost == Decimal("0.0021016")
    # Before cache writes were told apart they were billed as input: $0.20/MTok less.
    folded = PriceBook().cost("anthropic", "claude-3-5-haiku", usage(2007, 300, 1200))
    assert folded == Decimal("0.0019416")
    assert cost - folded == 800 * (Decimal(1) - Decimal("0.8")) / 1_000_000


def test_openai_reasoning_is_output_and_cached_input_is_a_cache_read() -> None:
    # o3-mini per MTok: input $1.10, cache read $0.55, output $4.40.
    # 2048 input of which 1536 cached; 700 output of which 512 reasoning.
    # (512 * 1.1 + 1536 * 0.55 + 700 * 4.4) / 1e6 = (563.2 + 844.8 + 3080) / 1e6
    book = PriceBook()
    cost = book.cost("openai", "o3-mini", usage(2048, 700, 1536, reasoning=512))
    assert cost == Decimal("0.004488")
    assert cost == book.cost("openai", "o3-mini", usage(2048, 700, 1536))


def test_gemini_cached_content_is_a_cache_read() -> None:
    # gemini-2.5-flash per MTok: input $0.30, cache read $0.03, output $2.50 (thoughts too).
    # (952 * 0.3 + 2048 * 0.03 + 600 * 2.5) / 1e6 = (285.6 + 61.44 + 1500) / 1e6
    cost = PriceBook().cost("google", "gemini-2.5-flash", usage(3000, 600, 2048, reasoning=450))
    assert cost == Decimal("0.00184704")


def test_cache_writes_without_a_cache_write_price_are_plain_input() -> None:
    book = PriceBook()
    # gpt-4o-mini has no cache-write price: the writes cost what input costs.
    assert book.cost("openai", "gpt-4o-mini", usage(1000, 10, written=400)) == book.cost(
        "openai", "gpt-4o-mini", usage(1000, 10)
    )
    override = PriceBook({"x/y": Price(input=Decimal(2), output=Decimal(0))})
    assert override.cost("x", "y", usage(1_000_000, 0, written=500_000)) == Decimal(2)


def test_cache_counts_larger_than_the_prompt_are_clamped_not_negative() -> None:
    # A compatible server reporting 80 reads + 50 writes of a 100-token prompt: 80 reads,
    # the 20 left as writes, nothing as plain input; genai-prices alone would refuse it.
    cost = PriceBook().cost("anthropic", "claude-3-5-haiku", usage(100, 0, 80, written=50))
    assert cost == (80 * Decimal("0.08") + 20 * Decimal(1)) / 1_000_000
    book = PriceBook({"x/y": Price(input=Decimal(1), output=Decimal(0), cache_write=Decimal(10))})
    assert book.cost("x", "y", usage(100, 0, 80, written=50)) == Decimal(20 * 10 + 80) / 10**6


def test_decimal_exactness_no_float_drift() -> None:
    book = PriceBook({"openai/exact": Price(input=Decimal("0.1"), output=Decimal("0.2"))})
    total = sum(
        (book.cost("openai", "exact", usage(1, 1)) or Decimal(1) for _ in range(1000)), Decimal(0)
    )
    # 1000 * (0.1 + 0.2) / 1e6 exactly; with floats 0.1 + 0.2 != 0.3
    assert total == Decimal("0.0003")
    assert to_pico(Decimal("0.0003")) == 300_000_000
    assert from_pico(300_000_000) == Decimal("0.0003")
    assert usd_text(300_000_000) == "0.0003"
    assert usd_text(0) == "0"
    assert usd_text(12 * 10**12) == "12"


def test_costs_round_up_to_whole_picodollars() -> None:
    book = PriceBook({"x/y": Price(input=Decimal("0.0000001"), output=Decimal(0))})
    # 1 token at 1e-7 $/M = 1e-13 $: a tenth of a picodollar, charged as one.
    assert book.cost("x", "y", usage(1, 0)) == Decimal("1E-12")


def test_override_file_wins_over_genai_prices(tmp_path: Path) -> None:
    path = write_prices(
        tmp_path,
        {
            "openai/gpt-4o-mini": {"input": "1", "output": "2", "cache_read": "0.5"},
            "claude-*": {"input": 10, "output": 20},
        },
    )
    book = PriceBook.from_file(path)
    assert book.cost("openai", "gpt-4o-mini", usage(1_000_000, 1_000_000)) == Decimal(3)
    assert book.cost("openai", "gpt-4o-mini", usage(1_000_000, 0, cached=1_000_000)) == Decimal(
        "0.5"
    )
    assert book.cost("anthropic", "claude-3-5-haiku", usage(1_000_000, 0)) == Decimal(10)
    # Not overridden: still genai-prices.
    assert book.cost("google", "gemini-2.5-flash", usage(1_000_000, 0)) == Decimal("0.3")


def test_override_file_prices_cache_writes(tmp_path: Path) -> None:
    path = write_prices(
        tmp_path,
        {
            "anthropic/claude-*": {
                "input": "3",
                "output": "15",
                "cache_read": "0.3",
                "cache_write": "3.75",
            },
            "anthropic/no-cache-prices": {"input": "3", "output": "15"},
        },
    )
    book = PriceBook.from_file(path)
    # (7 * 3 + 1200 * 0.3 + 800 * 3.75 + 300 * 15) / 1e6 = (21 + 360 + 3000 + 4500) / 1e6
    tokens = usage(2007, 300, 1200, written=800, reasoning=120)
    assert book.cost("anthropic", "claude-sonnet-4-5", tokens) == Decimal("0.007881")
    # Without cache prices, reads and writes are plain input: (2007 * 3 + 300 * 15) / 1e6.
    assert book.cost("anthropic", "no-cache-prices", tokens) == Decimal("0.010521")


def test_unknown_model_has_no_price_unless_a_default_is_set(tmp_path: Path) -> None:
    plain = PriceBook()
    assert plain.cost("openai", "no-such-model-xyz", usage(10, 10)) is None
    assert not plain.knows("openai", "no-such-model-xyz")
    assert plain.cost("custom", "llama3.2", usage(10, 10)) is None

    with_default = PriceBook.from_file(
        write_prices(tmp_path, {"default": {"input": "2", "output": "4"}})
    )
    assert with_default.knows("openai", "no-such-model-xyz")
    assert with_default.cost("openai", "no-such-model-xyz", usage(1_000_000, 1_000_000)) == 6


def test_mock_is_free_unless_the_file_prices_it(tmp_path: Path) -> None:
    assert PriceBook().cost("mock", "mock-1", usage(100, 100)) == 0
    assert PriceBook().knows("mock", "mock-1")
    default_only = PriceBook.from_file(
        write_prices(tmp_path, {"default": {"input": "2", "output": "4"}})
    )
    assert default_only.cost("mock", "mock-1", usage(100, 100)) == 0
    priced = PriceBook.from_file(
        write_prices(tmp_path, {"mock/mock-1": {"input": "1", "output": "1"}})
    )
    assert priced.cost("mock", "mock-1", usage(1_000_000, 1_000_000)) == 2


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ([], "JSON object"),
        ({"a/b": {"input": 1}}, "required"),
        ({"a/b": {"input": 1, "output": 1, "cache_reed": 1}}, "unknown field"),
        ({"a/b": {"input": -1, "output": 1}}, "non-negative"),
        ({"a/b": {"input": "cheap", "output": 1}}, "not a decimal"),
        ({"a/b": {"input": True, "output": 1}}, "number"),
        ({"default": "free"}, "object"),
    ],
)
def test_bad_prices_files_are_refused_clearly(tmp_path: Path, data: object, problem: str) -> None:
    with pytest.raises(PricesFileError, match=problem):
        PriceBook.from_file(write_prices(tmp_path, data))


def test_unreadable_prices_file(tmp_path: Path) -> None:
    with pytest.raises(PricesFileError, match="cannot read"):
        PriceBook.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PricesFileError, match="cannot read"):
        PriceBook.from_file(tmp_path / "bad.json")


def test_float_looking_prices_are_read_exactly(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text('{"a/b": {"input": 0.1, "output": 0.2}}')
    book = PriceBook.from_file(tmp_path / "p.json")
    assert book.cost("a", "b", usage(1_000_000, 1_000_000)) == Decimal("0.3")


def test_prompt_bound_counts_bytes_tools_and_framing() -> None:
    request = ChatRequest.model_validate(
        {
            "provider": "openai",
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "héllo"},  # 6 bytes in UTF-8
            ],
        }
    )
    bound = prompt_token_bound(request)
    assert bound == 16 + (8 + 8) + (8 + 6)
    with_tools = ChatRequest.model_validate(
        {**request.to_wire(), "tools": [{"name": "weather", "parameters": {"type": "object"}}]}
    )
    # The tool schema as the vendor gets it, compact JSON, plus a message's framing.
    schema = '{"name":"weather","description":"","parameters":{"type":"object"}}'
    assert prompt_token_bound(with_tools) == bound + 8 + len(schema.encode())
    assert len(schema) == 66
