"""Verifiable rewards for GRPO on fine-grained recognition, built on `finer.eval.scoring` (docs/design.md §1).

Every function has TRL's reward signature: `GRPOTrainer` calls it with `prompts`, `completions` and every
other dataset column as keyword lists (one value per completion), and it returns one float per completion.
Completions are plain strings or conversational lists of messages (`[{"role": "assistant", "content": ...}]`,
content a string or text blocks); both are read.

The columns read are those `finer build` writes (`superordinate`, `coarse`, `fine`, `attributes_required`)
plus what `finer.train.grpo` adds per row: `level` (the level asked), and for multiple choice `gold_letter`
and `options` (the k option strings; k is their number). A row whose `gold_letter` is empty is an open
question.

* `accuracy_reward`: modified EM of the answer against the accepted labels of the asked level (hierarchical
  credit, `finer.eval.scoring.score`); in choice form, the parsed letter against `gold_letter`.
* `format_reward`: 1.0 when the output is well formed: exactly one "Answer:" marker, a non-empty answer of at
  most `MAX_ANSWER_WORDS` words (a parseable option letter in choice form), at most `MAX_COMPLETION_WORDS`
  words in all; else 0.0.
* `attribute_grounding_reward`: the fraction of the concept's required attributes named before the answer
  marker, each as a run of whole words under our normalisation; 0.0 without a marker or attributes.
* `combined_reward(weights)`: the weighted sum, 0.9 accuracy + 0.1 format by default ("From Seeing to
  Thinking").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from finer.errors import FinerError
from finer.eval.scoring import (
    MAX_ANSWER_WORDS,
    extract_answer,
    normalize_variants,
    parse_choice,
    score,
    score_choice,
)

__all__ = [
    "DEFAULT_WEIGHTS",
    "MAX_COMPLETION_WORDS",
    "REWARDS",
    "accuracy_reward",
    "attribute_grounding_reward",
    "check_reward_weights",
    "combined_reward",
    "completion_text",
    "format_reward",
    "parse_reward_weights",
]

#: "From Seeing to Thinking": reward = 0.9 · accuracy + 0.1 · format.
DEFAULT_WEIGHTS: dict[str, float] = {"accuracy": 0.9, "format": 0.1}
#: A completion longer than this many words is a runaway generation, not a well-formed answer.
MAX_COMPLETION_WORDS = 256

_MARKER_RE = re.compile(r"answer:", re.IGNORECASE)
_LAST_MARKER_RE = re.compile(r".*answer:", re.IGNORECASE | re.DOTALL)
#: Attribute lists say "none" when nothing fits (docs/design.md §1); that is no attribute to name.
_NO_ATTRIBUTE = frozenset({"", "none", "n/a"})


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """The generated text of a completion: a string as is; of messages, the assistant turns' text joined."""
    if isinstance(completion, str):
        return completion
    parts: list[str] = []
    for message in completion:
        if message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, Sequence):
            parts.extend(
                str(b.get("text", "")) for b in content if isinstance(b, Mapping) and b.get("type") == "text"
            )
    return "\n".join(parts)


def _column(kwargs: Mapping[str, Any], name: str, n: int, reward: str) -> list[Any]:
    values = kwargs.get(name)
    if values is None:
        raise FinerError(
            f"{reward} needs the dataset column {name!r}; the rows have {', '.join(sorted(kwargs))}"
        )
    values = list(values)
    if len(values) != n:
        raise FinerError(f"{reward}: column {name!r} has {len(values)} values for {n} completions")
    return values


def _choice_k(kwargs: Mapping[str, Any], i: int) -> int:
    options = kwargs.get("options")
    if options is None or not options[i]:
        raise FinerError("a choice row (non-empty gold_letter) needs its options column to know k")
    return len(options[i])


def _is_choice(kwargs: Mapping[str, Any], i: int) -> bool:
    letters = kwargs.get("gold_letter")
    return letters is not None and bool(letters[i])


def accuracy_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """Modified EM at the row's `level` (hierarchical credit), or the option letter in choice rows."""
    n = len(completions)
    choice = [_is_choice(kwargs, i) for i in range(n)]
    if not all(choice):  # open rows: the columns are checked once, with a message naming what is missing
        levels, supers, coarse, fine = (
            _column(kwargs, name, n, "accuracy_reward")
            for name in ("level", "superordinate", "coarse", "fine")
        )
    rewards = []
    for i, completion in enumerate(completions):
        text = completion_text(completion)
        if choice[i]:
            rewards.append(score_choice(text, kwargs["gold_letter"][i], _choice_k(kwargs, i)))
        else:
            rewards.append(score(text, levels[i], supers[i], coarse[i], fine[i]).em)
    return rewards


def _well_formed(text: str, choice_k: int | None) -> bool:
    if len(_MARKER_RE.findall(text)) != 1 or len(text.split()) > MAX_COMPLETION_WORDS:
        return False
    answer = extract_answer(text)
    if not answer or len(answer.split()) > MAX_ANSWER_WORDS:
        return False
    return choice_k is None or parse_choice(text, choice_k) is not None


def format_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """1.0 for one "Answer:" marker followed by one short non-empty answer (a letter in choice rows)."""
    return [
        float(_well_formed(completion_text(c), _choice_k(kwargs, i) if _is_choice(kwargs, i) else None))
        for i, c in enumerate(completions)
    ]


def _named(attribute: str, forms: tuple[str, ...]) -> bool:
    return any(a and f" {a} " in f" {t} " for a, t in zip(normalize_variants(attribute), forms, strict=True))


def attribute_grounding_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """Fraction of the row's `attributes_required` named before the last "Answer:" marker.

    Matching is by whole words under our four normalisations ("black-capped" ≡ "black capped"); "none"
    entries do not count. No marker, or a concept without required attributes, gives 0.0.
    """
    required = _column(kwargs, "attributes_required", len(completions), "attribute_grounding_reward")
    rewards = []
    for completion, attributes in zip(completions, required, strict=True):
        wanted = {a.strip() for a in attributes or () if a.strip().lower() not in _NO_ATTRIBUTE}
        marker = _LAST_MARKER_RE.match(completion_text(completion))
        if not wanted or marker is None:
            rewards.append(0.0)
            continue
        forms = normalize_variants(marker.group()[: -len("answer:")])
        rewards.append(sum(_named(a, forms) for a in wanted) / len(wanted))
    return rewards


#: The reward functions by the names `--reward-weights` uses.
REWARDS: dict[str, Callable[..., list[float]]] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "grounding": attribute_grounding_reward,
}


def check_reward_weights(weights: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise FinerError(f"unknown reward(s) {', '.join(unknown)}; choose from {', '.join(REWARDS)}")
    if not any(weights.values()):
        raise FinerError("every reward weight is 0: nothing to reward")
    return {name: float(w) for name, w in weights.items()}


def combined_reward(weights: Mapping[str, float] | None = None) -> Callable[..., list[float]]:
    """A reward function giving Σ weight · reward over `weights` (default 0.9 accuracy + 0.1 format)."""
    checked = check_reward_weights(DEFAULT_WEIGHTS if weights is None else weights)

    def combined(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        total = [0.0] * len(completions)
        for name, weight in checked.items():
            if weight:
                for i, value in enumerate(REWARDS[name](prompts, completions, **kwargs)):
                    total[i] += weight * value
        return total

    combined.__name__ = "combined_reward"
    combined.weights = checked  # type: ignore[attr-defined]
    return combined


def parse_reward_weights(text: str) -> dict[str, float]:
    """`"accuracy=0.9,format=0.1[,grounding=0.2]"` → weights; a one-line error on anything else."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            weights[name.strip()] = float(value)
        except ValueError:
            raise FinerError(f"reward weights: expected NAME=NUMBER, got {item!r}") from None
    if not weights:
        raise FinerError("reward weights: none given (e.g. accuracy=0.9,format=0.1)")
    return check_reward_weights(weights)
