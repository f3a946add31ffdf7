"""What one run may spend and how fast: prices, `--dry-run`, `--max-cost`, `--rpm`/`--tpm`, shared by every
`ChatClient` the run opens (knowledge extraction, coarse labels, grounding and evaluation each open
their own, sometimes on their own event loop).

The CLI builds one `RunPolicy` from its options and makes it the active one for the run
(`with use_policy(policy): ...`); a client picks up the active policy when it is made. Library callers
that set none get the default: built-in prices, no budget, no rate limits, real calls.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from tqdm.auto import tqdm

from finer.errors import FinerError
from finer.models.pricing import PriceTable
from finer.models.ratelimit import RateLimiter
from finer.models.tokens import TokenCount

__all__ = ["Budget", "BudgetExceeded", "Projection", "RunPolicy", "active_policy", "use_policy"]

#: Output tokens assumed for a call that sets no `max_tokens` when no cached reply of its step shows
#: the real mean (an estimate, and the projection says so).
DEFAULT_OUTPUT_TOKENS = 256


class BudgetExceeded(FinerError):
    """The run stopped starting calls at `--max-cost` (the CLI prints it and exits non-zero)."""


class Budget:
    """`--max-cost`: a call starts only if what was spent, what calls in flight may spend, and its own
    projected cost stay within the budget; once one is refused, no other starts."""

    def __init__(self, max_cost: float) -> None:
        self.max_cost = max_cost
        self.spent = 0.0
        self.reserved = 0.0
        self.refused = 0
        self._lock = threading.Lock()

    def reserve(self, cost: float) -> bool:
        """Whether a call projected to cost `cost` may start (then its cost is held until `settle`)."""
        with self._lock:
            if self.refused or self.spent + self.reserved + cost > self.max_cost:
                self.refused += 1
                return False
            self.reserved += cost
            return True

    def settle(self, reserved: float, cost: float) -> None:
        """A call ended: release what it held and count what it cost (0 when it failed)."""
        with self._lock:
            self.reserved -= reserved
            self.spent += cost

    def message(self) -> str:
        return (
            f"stopped at --max-cost {self.max_cost:g} USD: spent {self.spent:.4f} USD, "
            f"{self.refused} call(s) not started; what was done is written, and a re-run with a "
            "higher --max-cost resumes from it"
        )


@dataclass
class _Step:
    """Projected calls of one step (one prompt template at one model)."""

    model: str
    calls: int = 0
    cached: int = 0
    text_tokens: int = 0
    image_tokens: int = 0
    max_tokens: list[int] = field(default_factory=list)
    cached_output: list[int] = field(default_factory=list)
    text_exact: bool = True
    images_exact: bool = True

    def output_tokens(self) -> tuple[int, str]:
        """Projected output tokens and how they were projected."""
        if self.cached_output:
            mean = sum(self.cached_output) / len(self.cached_output)
            return round(mean * self.calls), f"mean of {len(self.cached_output)} cached replies"
        if len(self.max_tokens) == self.calls:
            return sum(self.max_tokens), "max_tokens (an upper bound)"
        rest = self.calls - len(self.max_tokens)
        return sum(
            self.max_tokens
        ) + rest * DEFAULT_OUTPUT_TOKENS, f"estimate ({DEFAULT_OUTPUT_TOKENS} per call)"


class Projection:
    """`--dry-run`: every request the run would send, counted instead of sent, per step."""

    def __init__(self) -> None:
        self.steps: dict[str, _Step] = {}
        self._lock = threading.Lock()

    def _step(self, template_sha256: str, model: str) -> _Step:
        return self.steps.setdefault(f"{_template_name(template_sha256)} @ {model}", _Step(model))

    def add(self, template_sha256: str, model: str, tokens: TokenCount, max_tokens: int | None) -> None:
        with self._lock:
            step = self._step(template_sha256, model)
            step.calls += 1
            step.text_tokens += tokens.text
            step.image_tokens += tokens.images
            step.text_exact &= tokens.text_exact
            step.images_exact &= tokens.images_exact
            if max_tokens is not None:
                step.max_tokens.append(max_tokens)

    def add_cached(self, template_sha256: str, model: str, completion_tokens: Any) -> None:
        with self._lock:
            step = self._step(template_sha256, model)
            step.cached += 1
            if isinstance(completion_tokens, int):
                step.cached_output.append(completion_tokens)

    def to_json(self, prices: PriceTable) -> dict[str, Any]:
        """Calls, tokens and USD per step and in total (unknown once a step's model has no price)."""
        steps, total_cost, total_calls, total_tokens = {}, 0.0, 0, 0
        for name, step in self.steps.items():
            output, how = step.output_tokens()
            cost = prices.cost(step.model, step.text_tokens + step.image_tokens, output)
            steps[name] = {
                "calls": step.calls,
                "cached_calls": step.cached,
                "input_text_tokens": step.text_tokens,
                "text_tokens_counted": "tokenizer" if step.text_exact else "estimate (4 characters a token)",
                "input_image_tokens": step.image_tokens,
                "image_tokens_counted": "tile rule" if step.images_exact else "estimate (gpt-4o tile rule)",
                "output_tokens": output,
                "output_tokens_from": how,
                "usd": "unknown" if cost is None else round(cost, 6),
            }
            total_calls += step.calls
            total_tokens += step.text_tokens + step.image_tokens + output
            total_cost = None if cost is None or total_cost is None else total_cost + cost
        return {
            "steps": steps,
            "calls": total_calls,
            "cached_calls": sum(step.cached for step in self.steps.values()),
            "tokens": total_tokens,
            "usd": "unknown" if total_cost is None else round(total_cost, 6),
            "prices": prices.source,
        }


@cache
def _builtin_templates() -> dict[str, str]:
    from finer.prompts import available_templates, template_sha256

    return {template_sha256(name): name for name in available_templates()}


def _template_name(sha: str) -> str:
    """The built-in template a hash belongs to, else a short form of the hash (a user's template)."""
    return _builtin_templates().get(sha, f"template {sha[:8]}")


@dataclass
class RunPolicy:
    """Prices, optional dry run, budget and rate limits for every call of one run."""

    prices: PriceTable = field(default_factory=PriceTable)
    projection: Projection | None = None
    budget: Budget | None = None
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(on_pause=announce_pause))
    #: `--batch`'s collecting pass: misses are recorded here (a `finer.models.batch.Collector`), not sent.
    collector: Any = None

    @classmethod
    def from_options(
        cls,
        *,
        prices: Any = None,
        dry_run: bool = False,
        max_cost: float | None = None,
        rpm: float | None = None,
        tpm: float | None = None,
    ) -> RunPolicy:
        """The policy of the CLI's options (`--prices`, `--dry-run`, `--max-cost`, `--rpm`, `--tpm`)."""
        if max_cost is not None and max_cost <= 0:
            raise FinerError("--max-cost must be above 0 USD")
        return cls(
            prices=PriceTable.load(prices),
            projection=Projection() if dry_run else None,
            budget=Budget(max_cost) if max_cost is not None else None,
            limiter=RateLimiter(rpm, tpm, on_pause=announce_pause),
        )

    def check_model(self, model: str) -> None:
        """`--max-cost` needs a price: refuse up front rather than spend blind."""
        if self.budget is not None and self.prices.price(model) is None:
            raise FinerError(
                f"--max-cost needs the price of model {model!r}, which is unknown; "
                "give it with --prices FILE (YAML: model: {input: USD/M, output: USD/M})"
            )


def announce_pause(seconds: float) -> None:
    """Show a run-wide pause on the progress bars (and as a line above them)."""
    tqdm.write(f"rate limited (HTTP 429): the whole run pauses {seconds:.1f} s")
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.set_postfix_str(f"paused {seconds:.0f}s (429)", refresh=True)


_ACTIVE: list[RunPolicy] = []


def active_policy() -> RunPolicy:
    """The policy of the run in progress; outside `use_policy`, a default one of the caller's own."""
    return _ACTIVE[-1] if _ACTIVE else RunPolicy()


@contextmanager
def use_policy(policy: RunPolicy) -> Iterator[RunPolicy]:
    """Make `policy` the one every client made inside the block uses."""
    _ACTIVE.append(policy)
    try:
        yield policy
    finally:
        _ACTIVE.remove(policy)
