"""A quick check that a fine-tuned model really learned, on the evaluation harness's own path.

The questions and the generation are those of `finer eval` (`finer.eval.tasks.EvalPlan`,
`finer.models.backends.
HFBackend`), run on the model still in memory: `--format finer` is scored with `finer eval --mode finer` (the
training conversation replayed: the model names the group, lists attributes of *its* group, then names the
species), `--format direct` with `finer eval --mode direct --level fine`. Nothing of the gold coarse or fine
label reaches the prompt, so the accuracy measures what the model reads from the image. Scoring is
`finer.eval.scoring.score` (modified EM) at the fine level, and at the coarse level for the first FINER turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from finer.eval.scoring import score
from finer.eval.tasks import FINER_LEVELS, EvalPlan, Task
from finer.models.backends import Generation, HFBackend

__all__ = ["evaluate_fine"]

_COLUMNS = ("image_id", "source", "superordinate", "coarse", "fine")


class _Answers:
    """A `finer.models.backends.Sink` that keeps every answer in memory, by task key."""

    def __init__(self) -> None:
        self.turns: dict[str, list[Generation]] = {}
        self.failures: list[str] = []

    def done(self, task: Task, turns: list[Generation]) -> None:
        self.turns[task.key] = turns

    def failed(self, task: Task, reason: str) -> None:
        self.failures.append(reason)

    def skipped(self, task: Task, reason: str) -> None:
        self.failures.append(f"unreadable image ({reason})")


def evaluate_fine(
    model: Any,
    processor: Any,
    ds: datasets.Dataset,
    fmt: str,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    prompts_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-level modified-EM accuracy of `model` on `ds` (FINER format: the first turn's group too).

    `ds` holds the contract's label columns and `image`; a transform on it (cropping to boxes) applies to
    the images the model sees.
    """
    mode = "finer" if fmt == "finer" else "direct"
    levels = FINER_LEVELS if mode == "finer" else ("fine",)
    rows = ds.with_format(None).select_columns(list(_COLUMNS)).to_list()
    plan = EvalPlan(
        run={"mode": mode, "gold_parent": False},
        concepts=rows,
        images=lambda index: ds[index]["image"],
        prompts_dir=prompts_dir,
    )
    tasks = [plan.task(i, row, level) for i, row in enumerate(rows) for level in levels]
    tokenizer = processor.tokenizer
    padding_side, was_training = tokenizer.padding_side, model.training
    model.eval()
    answers = _Answers()
    try:
        backend = HFBackend(model, processor=processor, batch_size=batch_size, max_new_tokens=max_new_tokens)
        backend.run(iter(tasks), answers)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)

    hits: dict[str, list[bool]] = {level: [] for level in levels}
    samples: list[dict[str, Any]] = []
    for task in tasks:
        turns = answers.turns.get(task.key)
        level, record = task.record["level"], task.record
        labels = (record["superordinate"], record["coarse"], record["fine"])
        hits[level].append(bool(turns) and score(turns[-1].text, level, *labels).em)
        if level == "fine" and turns and len(samples) < 4:
            samples.append({"fine": record["fine"][0], "answers": [t.text for t in turns]})
    n = len(rows)
    result: dict[str, Any] = {
        "images": n,
        "fine_accuracy": sum(hits["fine"]) / n if n else 0.0,
        "chance": 1 / len({tuple(row["fine"]) for row in rows}) if n else 0.0,
        "failed": len(answers.failures),
        "samples": samples,
    }
    if "coarse" in hits:
        result["coarse_accuracy"] = sum(hits["coarse"]) / n if n else 0.0
    return result
