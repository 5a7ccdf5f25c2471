"""What a call costs, in exact ``Decimal`` USD, from the vendor's reported token usage.

Prices come from ``genai-prices`` (a maintained price database, updated with the package)
rather than a table kept here, so a vendor's price change is a dependency bump, not a code
change. ``ROBOTA_PRICES_FILE`` overrides it per model (negotiated discounts, self-hosted models
behind the OpenAI adapter) and may give a ``default`` price for models nobody knows::

    {
      "openai/gpt-4o-mini": {"input": "0.15", "output": "0.60", "cache_read": "0.075"},
      "claude-*": {"input": 3, "output": 15, "cache_read": "0.3", "cache_write": "3.75"},
      "ollama-*": {"input": 0, "output": 0},
      "default": {"input": "1", "output": "3"}
    }

Keys are ``provider/model`` or a model name, either of which may be a glob; prices are USD per
million tokens. First match wins, in this order: an exact ``provider/model``, an exact model,
then the globs in file order. Numbers are read as ``Decimal`` from their text, never through
float.

Token kinds: ``prompt_tokens`` includes the tokens read from the prompt cache
(``cached_prompt_tokens``), billed at the cache-read price, and those written to it
(``cache_write_tokens``, Anthropic), billed at the cache-write price (about 1.25x input); the
rest of the prompt is billed as input. This is also genai-prices' convention (its
``input_tokens`` contains ``cache_read_tokens`` and ``cache_write_tokens``), so the usage is
handed over as it is. A model without a cache price bills those tokens as plain input.
Reasoning tokens are already inside ``completion_tokens`` (every adapter reports them so) and
are billed as output. Costs are rounded *up* to whole picodollars (1e-12 USD), the unit the
ledger stores, so what a caller is told and what the ledger holds are the same number.

The offline ``mock`` provider costs nothing unless an entry of the file names it (the
``default`` price does not apply to it): tests can price ``mock/mock-1`` to make budgets bite.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from cachetools import LRUCache
from genai_prices import Usage as PriceUsage
from genai_prices.data_snapshot import get_snapshot
from genai_prices.types import ModelInfo, ModelPrice, Provider, TieredPrices

from robota_client.messages import ChatRequest, Usage

PICO_PER_USD = 10**12
_MILLION = Decimal(1_000_000)
_PICO = Decimal(1).scaleb(-12)

#: Our provider names -> genai-prices provider ids. A provider not listed (the mock, or a
#: name added later) is priced only by the prices file.
GENAI_PROVIDER_IDS: Mapping[str, str] = {
    "openai": "openai",
    "anthropic": "anthropic",
    "google": "google",
}
_FREE_PROVIDERS = frozenset({"mock"})
_PRICE_FIELDS = ("input", "output", "cache_read", "cache_write")


@dataclass(frozen=True, slots=True)
class _TokenKinds:
    """A usage split into the disjoint kinds that have a price each.

    The cache counts are clamped into the prompt (reads first, then writes): a compatible
    server reporting more cached tokens than prompt tokens must not make the plain input
    negative, and genai-prices refuses such usage outright.
    """

    prompt: int
    cache_read: int
    cache_write: int
    output: int

    @property
    def plain_input(self) -> int:
        return self.prompt - self.cache_read - self.cache_write

    @classmethod
    def of(cls, usage: Usage) -> _TokenKinds:
        prompt = max(usage.prompt_tokens, 0)
        cache_read = min(max(usage.cached_prompt_tokens or 0, 0), prompt)
        cache_write = min(max(usage.cache_write_tokens or 0, 0), prompt - cache_read)
        return cls(prompt, cache_read, cache_write, max(usage.completion_tokens, 0))


class PricesFileError(ValueError):
    """The prices file is unreadable or says something that is not a price."""


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens of each kind. ``cache_read``/``cache_write`` default to the
    input price: a model without a cache discount bills cached tokens as plain input."""

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None

    def cost(self, usage: Usage) -> Decimal:
        tokens = _TokenKinds.of(usage)
        cache_read = self.input if self.cache_read is None else self.cache_read
        cache_write = self.input if self.cache_write is None else self.cache_write
        per_million = (
            tokens.plain_input * self.input
            + tokens.cache_read * cache_read
            + tokens.cache_write * cache_write
            + tokens.output * self.output
        )
        return per_million / _MILLION

    @classmethod
    def from_json(cls, where: str, data: Any) -> Price:
        if not isinstance(data, dict):
            raise PricesFileError(f"{where}: a price is an object with input/output")
        unknown = set(data) - set(_PRICE_FIELDS)
        if unknown:
            raise PricesFileError(
                f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(_PRICE_FIELDS)}"
            )
        if "input" not in data or "output" not in data:
            raise PricesFileError(f"{where}: both 'input' and 'output' are required")
        values = {name: _amount(f"{where}.{name}", data[name]) for name in data}
        return cls(**values)


def _amount(where: str, value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | str | Decimal):
        raise PricesFileError(f"{where}: a price is a number or a decimal string")
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise PricesFileError(f"{where}: {value!r} is not a decimal number") from None
    if not amount.is_finite() or amount < 0:
        raise PricesFileError(f"{where}: a price must be a non-negative amount")
    return amount


def to_pico(usd: Decimal) -> int:
    """USD -> whole picodollars, rounded up: the proxy never undercharges a fraction."""
    return int((usd / _PICO).to_integral_value(rounding=ROUND_CEILING))


def from_pico(pico: int) -> Decimal:
    return Decimal(pico).scaleb(-12)


def usd_text(pico: int) -> str:
    """Picodollars as a plain decimal string: ``"0.000435"``, ``"12"``, ``"0"``."""
    text = format(from_pico(pico), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


class PriceBook:
    """Prices every (provider, model); ``cost`` returns ``None`` when nothing knows it."""

    def __init__(
        self,
        overrides: Mapping[str, Price] | None = None,
        *,
        default: Price | None = None,
    ) -> None:
        self._exact = {key: price for key, price in (overrides or {}).items() if not _glob(key)}
        self._globs = [(key, price) for key, price in (overrides or {}).items() if _glob(key)]
        self.default = default
        # (provider, model) -> where its price comes from; lookups are pure, so each pair is
        # resolved once. Bounded: callers choose model names, and may choose many.
        self._resolved: LRUCache[tuple[str, str], Price | _GenaiModel | bool | None] = LRUCache(
            4096
        )

    @classmethod
    def from_file(cls, path: Path | None) -> PriceBook:
        if path is None:
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"), parse_float=Decimal)
        except (OSError, ValueError) as exc:
            raise PricesFileError(f"cannot read prices file {path}: {exc}") from None
        if not isinstance(data, dict):
            raise PricesFileError(f"{path}: the prices file is a JSON object")
        default = data.pop("default", None)
        overrides = {
            str(key): Price.from_json(f"{path}: {key}", value) for key, value in data.items()
        }
        return cls(
            overrides, default=None if default is None else Price.from_json("default", default)
        )

    # --- lookups ----------------------------------------------------------------------------

    def _override(self, provider: str, model: str) -> Price | None:
        qualified = f"{provider}/{model}"
        found = self._exact.get(qualified) or self._exact.get(model)
        if found is not None:
            return found
        for pattern, price in self._globs:
            if fnmatch.fnmatchcase(qualified, pattern) or fnmatch.fnmatchcase(model, pattern):
                return price
        return None

    def _source(self, provider: str, model: str) -> Price | _GenaiModel | bool | None:
        """An override ``Price``; the genai-prices model when it knows it; ``None`` when
        only the default (or nothing) applies; ``False`` for the free mock."""
        key = (provider, model)
        found: Price | _GenaiModel | bool | None
        try:
            found = self._resolved[key]
        except KeyError:
            pass
        else:
            if not isinstance(found, _GenaiModel) or found.current():
                return found
        found = self._override(provider, model)
        if found is None:
            found = False if provider in _FREE_PROVIDERS else _GenaiModel.find(provider, model)
        self._resolved[key] = found
        return found

    def knows(self, provider: str, model: str) -> bool:
        """Whether calls to this model can be priced (the default price counts)."""
        return self._source(provider, model) is not None or self.default is not None

    def cost(self, provider: str, model: str, usage: Usage) -> Decimal | None:
        """USD, exact and rounded up to a picodollar; ``None`` when no price is known."""
        source = self._source(provider, model)
        if source is False:
            return Decimal(0)
        if isinstance(source, Price | _GenaiModel):
            usd = source.cost(usage)
        elif self.default is not None:
            usd = self.default.cost(usage)
        else:
            return None
        return from_pico(to_pico(usd))

    def __call__(self, provider: str, model: str, usage: Usage) -> Decimal | None:
        """A ``robota_proxy.call_record.Pricer``."""
        return self.cost(provider, model, usage)


def _glob(key: str) -> bool:
    return any(char in key for char in "*?[")


class _GenaiModel:
    """A model genai-prices knows, looked up once per (provider, model).

    genai-prices matches the model and walks its unit registry on every ``calc_price`` (about
    0.1 ms a call, several per cent of a request). The model is found once here; each of its
    prices (a model may have several, chosen by the request's date) is turned once into a
    plain per-token ``Price`` *measured with genai-prices itself*: the cost of a million tokens
    of each kind, checked against a mixed usage. A price that is not linear in our four token
    kinds (tiers by prompt size, a per-request fee) keeps going through genai-prices on every
    call, so the numbers never differ from the library's.
    """

    __slots__ = ("_linear", "_model", "_provider", "_snapshot")

    def __init__(self, snapshot: object, provider: Provider, model: ModelInfo) -> None:
        self._snapshot = snapshot
        self._provider = provider
        self._model = model
        # id(ModelPrice) -> (the ModelPrice, kept alive so the id stays its own; its linear
        # Price or None). Only the snapshot's own price objects are keyed, never copies.
        self._linear: dict[int, tuple[ModelPrice, Price | None]] = {}

    @classmethod
    def find(cls, provider: str, model: str) -> _GenaiModel | None:
        provider_id = GENAI_PROVIDER_IDS.get(provider)
        if provider_id is None:
            return None
        snapshot = get_snapshot()
        try:
            found_provider, found_model = snapshot.find_provider_model(
                model, None, provider_id, None
            )
        except LookupError:
            return None
        return cls(snapshot, found_provider, found_model)

    def current(self) -> bool:
        """Whether genai-prices still prices from the data this was found in (an auto
        update swaps the snapshot)."""
        return get_snapshot() is self._snapshot

    def cost(self, usage: Usage) -> Decimal:
        # The price in force now: a model's prices may change on a date (or by time of day).
        model_price = self._model.get_prices(datetime.now(tz=UTC))
        entry = self._linear.get(id(model_price))
        if entry is None or entry[0] is not model_price:
            entry = (model_price, _linear_price(model_price))
            self._linear[id(model_price)] = entry
        linear = entry[1]
        if linear is not None:
            return linear.cost(usage)
        return _library_cost(self._model, self._provider, usage)


def _library_cost(model: ModelInfo, provider: Provider, usage: Usage) -> Decimal:
    tokens = _TokenKinds.of(usage)
    result = model.calc_price(
        # genai-prices counts cache reads and writes inside input_tokens, as our usage does,
        # and bills them at the model's cache prices (plain input when it has none).
        PriceUsage(
            input_tokens=tokens.prompt,
            cache_read_tokens=tokens.cache_read,
            cache_write_tokens=tokens.cache_write,
            output_tokens=tokens.output,
        ),
        provider,
    )
    return Decimal(result.total_price)


def _linear_price(model_price: ModelPrice) -> Price | None:
    """``model_price`` as a per-million-token ``Price``, measured through genai-prices; ``None``
    when it is not linear in our token kinds (then every call asks genai-prices)."""
    if any(isinstance(value, TieredPrices) for value in vars(model_price).values()):
        return None

    def measure(prompt: int, cache_read: int, cache_write: int, output: int) -> Decimal:
        total = model_price.calc_price(
            PriceUsage(
                input_tokens=prompt,
                cache_read_tokens=cache_read,
                cache_write_tokens=cache_write,
                output_tokens=output,
            )
        )["total_price"]
        return Decimal(total)

    million = 1_000_000
    if measure(0, 0, 0, 0) != 0:
        return None  # a fee per request, not per token
    linear = Price(
        input=measure(million, 0, 0, 0),
        output=measure(0, 0, 0, million),
        cache_read=measure(million, million, 0, 0),
        cache_write=measure(million, 0, million, 0),
    )
    probe = Usage(
        prompt_tokens=1_234_567,
        completion_tokens=76_543,
        cached_prompt_tokens=345_678,
        cache_write_tokens=23_456,
    )
    if linear.cost(probe) != measure(1_234_567, 345_678, 23_456, 76_543):
        return None
    return linear


def estimate_completion_tokens(streamed_chars: int) -> int:
    """Tokens for text whose usage the vendor never reported: ~4 characters a token,
    rounded up."""
    return math.ceil(streamed_chars / 4)


#: Tokens a vendor adds around each message (role markers, separators), generously.
MESSAGE_OVERHEAD_TOKENS = 8
#: Tokens a vendor adds once per request (reply priming, tool-use preamble).
REQUEST_OVERHEAD_TOKENS = 16


def prompt_token_bound(request: ChatRequest) -> int:
    """An upper bound of the prompt's tokens without a tokenizer: BPE tokenizers never
    produce more tokens than UTF-8 bytes, so bytes of every text the vendor sees (contents,
    tool calls, tool schemas) plus per-message framing bounds the vendor's count."""
    total = REQUEST_OVERHEAD_TOKENS
    for message in request.messages:
        total += MESSAGE_OVERHEAD_TOKENS + _utf8_len(message.content) + _utf8_len(message.name)
        for call in message.tool_calls or ():
            total += (
                MESSAGE_OVERHEAD_TOKENS
                + _utf8_len(call.id)
                + _utf8_len(call.function.name)
                + _utf8_len(call.function.arguments)
            )
        total += _utf8_len(message.tool_call_id)
    for tool in request.tools or ():
        total += MESSAGE_OVERHEAD_TOKENS + len(
            json.dumps(
                {"name": tool.name, "description": tool.description, "parameters": tool.parameters},
                ensure_ascii=False,
                separators=(",", ":"),
            ).encode()
        )
    return total


def _utf8_len(text: str | None) -> int:
    return len(text.encode()) if text else 0
