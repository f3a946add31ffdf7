"""What a model's tokens cost: a built-in, dated table of list prices, overridable by `--prices FILE`.

A model that is in neither (nor as a dated snapshot of a listed name, "gpt-4o-2024-08-06") is priced
"unknown": a cost is never guessed, and `--max-cost` refuses to run on a model it cannot price.

`--prices` takes YAML, one entry per model, in USD per million tokens:

    gpt-4o-mini: {input: 0.15, output: 0.60, batch_discount: 0.5}
    my-vllm-model: {input: 0, output: 0}

`batch_discount` is the fraction the Batch API takes off (OpenAI's is 0.5); it defaults to that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finer.errors import FinerError

__all__ = ["BATCH_DISCOUNT", "BUILTIN_PRICES", "PRICES_AS_OF", "Price", "PriceTable"]

#: When the built-in table was copied from OpenAI's pricing page; prices change, `--prices` corrects them.
PRICES_AS_OF = "2025-08"
#: What the OpenAI Batch API takes off a call's price.
BATCH_DISCOUNT = 0.5
_SNAPSHOT = re.compile(r"(.+?)(?:-\d{4}-\d{2}-\d{2})?")


@dataclass(frozen=True)
class Price:
    """USD per million input and output tokens, and the fraction a batch call saves."""

    input: float
    output: float
    batch_discount: float = BATCH_DISCOUNT

    def cost(self, input_tokens: int, output_tokens: int, *, batch: bool = False) -> float:
        usd = (input_tokens * self.input + output_tokens * self.output) / 1e6
        return usd * (1 - self.batch_discount) if batch else usd


#: OpenAI list prices (standard tier) as of PRICES_AS_OF.
BUILTIN_PRICES: dict[str, Price] = {
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-5": Price(1.25, 10.00),
    "gpt-5-mini": Price(0.25, 2.00),
    "gpt-5-nano": Price(0.05, 0.40),
    "o4-mini": Price(1.10, 4.40),
}


class PriceTable:
    """The prices a run uses: the built-in table with a `--prices` file's entries over it."""

    def __init__(self, prices: dict[str, Price] | None = None, *, source: str = f"built-in ({PRICES_AS_OF})"):
        self.prices = dict(BUILTIN_PRICES if prices is None else prices)
        self.source = source

    @classmethod
    def load(cls, path: Path | str | None) -> PriceTable:
        """The built-in table, overridden by the YAML file at `path` (when given)."""
        if path is None:
            return cls()
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise FinerError(f"--prices {path}: cannot read it as YAML ({err.__class__.__name__})") from None
        if not isinstance(data, dict) or not data:
            raise FinerError(f"--prices {path}: expected a mapping of model name to {{input:, output:}}")
        prices = {
            **BUILTIN_PRICES,
            **{str(name): _price(path, str(name), entry) for name, entry in data.items()},
        }
        return cls(prices, source=f"{path} over built-in ({PRICES_AS_OF})")

    def price(self, model: str) -> Price | None:
        """The model's price, or that of the name its dated snapshot extends; None when unknown."""
        if model in self.prices:
            return self.prices[model]
        match = _SNAPSHOT.fullmatch(model)
        return self.prices.get(match.group(1)) if match else None

    def cost(self, model: str, input_tokens: int, output_tokens: int, *, batch: bool = False) -> float | None:
        """USD for these tokens, or None ("unknown") when the model has no price."""
        price = self.price(model)
        return None if price is None else price.cost(input_tokens, output_tokens, batch=batch)


def _price(path: Path, name: str, entry: Any) -> Price:
    """One `--prices` entry, checked: non-negative numbers, a discount between 0 and 1."""
    fix = f"--prices {path}: {name!r} needs input and output USD per million tokens (numbers >= 0)"
    if not isinstance(entry, dict) or not {"input", "output"} <= entry.keys():
        raise FinerError(fix)
    unknown = set(entry) - {"input", "output", "batch_discount"}
    if unknown:
        raise FinerError(f"--prices {path}: {name!r} has unknown key(s) {sorted(unknown)}")
    values = [entry["input"], entry["output"], entry.get("batch_discount", BATCH_DISCOUNT)]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in values):
        raise FinerError(fix)
    if values[2] > 1:
        raise FinerError(f"--prices {path}: {name!r} batch_discount is a fraction between 0 and 1")
    return Price(float(values[0]), float(values[1]), float(values[2]))
