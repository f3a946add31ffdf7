"""`finer eval`: ask a model about every image of a split at one or three levels, score, and report.

The run is resumable by construction: each answer is appended to ``predictions.jsonl`` (and flushed) as
soon as it exists, keyed by everything it depends on (model, adapter, mode, level, options, template hash,
image id), and a re-run asks only for the keys the file lacks. Metrics, report and chart are then
recomputed from the whole file (`finer.eval.report`), so a crash, a `--limit` raised later, or a second
mode evaluated into the same folder all end in one consistent report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from finer.appendlog import AppendLog
from finer.data.datasets_io import load_built, load_concepts, pick_split
from finer.errors import FinerError
from finer.eval.report import PREDICTIONS_FILE, write_report
from finer.eval.tasks import MODE_TEMPLATES, MODES, EvalPlan, Task
from finer.models.backends import Backend, Generation, HFBackend, OpenAIBackend
from finer.models.images import crop_box
from finer.prompts import template_sha256

__all__ = ["BACKENDS", "EvalConfig", "PredictionLog", "evaluate", "load_split"]

BACKENDS: tuple[str, ...] = ("hf", "openai")
#: Columns every mode reads; `image` and `attributes_required` are needed per mode.
LABEL_COLUMNS: tuple[str, ...] = ("image_id", "superordinate", "coarse", "fine")


@dataclass
class EvalConfig:
    """Everything `finer eval` was asked to do (docs/design.md §4)."""

    dataset: str
    out: Path
    model: str
    split: str = "test"
    mode: str = "direct"
    level: str = "all"
    backend: str = "hf"
    adapter: str | None = None
    batch_size: int = 8
    base_url: str | None = None
    concurrency: int = 16
    limit: int | None = None
    gold_parent: bool = False
    choices: int = 5
    temperature: float = 0.0
    max_new_tokens: int = 128
    prompts_dir: Path | None = None
    finer_original: bool = False
    seed: int = 0
    crop_to_bbox: bool = False


def _check(config: EvalConfig) -> None:
    if config.mode not in MODES:
        raise FinerError(f"unknown mode {config.mode!r}; choose one of {', '.join(MODES)}")
    if config.backend not in BACKENDS:
        raise FinerError(f"unknown backend {config.backend!r}; choose one of {', '.join(BACKENDS)}")
    if config.adapter and config.backend != "hf":
        raise FinerError("--adapter needs --backend hf: an endpoint serves its own weights")
    if not 2 <= config.choices <= 26:
        raise FinerError(f"--choices must be between 2 and 26, not {config.choices}")
    if config.temperature < 0 or config.max_new_tokens < 1 or config.batch_size < 1:
        raise FinerError("--temperature must be >= 0, --max-new-tokens and --batch-size >= 1")


def load_split(dataset: str, split: str, columns: list[str]) -> tuple[Any, list[dict[str, Any]]]:
    """One split of a built dataset (a `finer build` folder or a Hub repo) and its concepts.

    The concepts (for distractors and closed lists) come from concepts.jsonl beside a local dataset or the
    `concepts` config of a Hub repo, else from the split's own rows. Raises a one-line `FinerError` when
    the split or a needed column is missing.
    """
    rows = pick_split(load_built(dataset, "--dataset", split=split), split, "--dataset", dataset, columns)
    concepts = load_concepts(dataset, LABEL_COLUMNS[1:])
    if concepts is None:
        concepts = rows.select_columns(list(LABEL_COLUMNS[1:])).to_list()
    return rows, concepts


class PredictionLog:
    """``predictions.jsonl``: append-only, one flushed line per answer; a `Sink` for the backends.

    A last line torn by a crash is cut off before the first append (`finer.appendlog`).
    """

    def __init__(self, log: AppendLog) -> None:
        self.log = log
        self.answered = 0
        self.failures: list[str] = []
        self._bar: tqdm | None = None

    def start(self, total: int) -> None:
        """Show progress over the ``total`` questions about to be asked."""
        self._bar = tqdm(total=total, desc="eval", unit=" q", dynamic_ncols=True, disable=None)

    def done(self, task: Task, turns: list[Generation]) -> None:
        record = dict(task.record, prediction=turns[-1].text, truncated=turns[-1].truncated)
        if task.attributes_turn is not None:
            said = turns[task.attributes_turn]
            record.update(attributes=said.text, attributes_truncated=said.truncated)
        if len(turns) > 2:  # the finer replay: the group the model named first
            record.update(turns=[turn.text for turn in turns[:-1]])
        self.log.write(record)
        self.answered += 1
        if self._bar is not None:
            self._bar.update()

    def failed(self, task: Task, reason: str) -> None:
        """Not written: the next run asks again."""
        self.failures.append(f"{task.record['image_id']} ({task.record['level']}): {reason}")
        if self._bar is not None:
            self._bar.update()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self.log.close()


def _make_backend(config: EvalConfig, template_hash: str) -> Backend:
    if config.backend == "openai":
        return OpenAIBackend(
            config.model,
            config.base_url,
            concurrency=config.concurrency,
            temperature=config.temperature,
            max_new_tokens=config.max_new_tokens,
            template_sha256=template_hash,
        )
    return HFBackend(
        config.model,
        config.adapter,
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=config.seed,
    )


def _run_identity(config: EvalConfig, template_hash: str) -> dict[str, Any]:
    """What every answer of this run depends on besides its image and level: part of each key and record.

    The seed only matters for choice distractors and sampling.
    """
    return {
        "model": config.model,
        "adapter": config.adapter,
        "backend": config.backend,
        "mode": config.mode,
        "template_sha256": template_hash,
        "split": config.split,
        "gold_parent": config.gold_parent,
        "choices": config.choices if config.mode == "choice" else None,
        "seed": config.seed if config.mode == "choice" or config.temperature > 0 else None,
        "temperature": config.temperature,
        "max_new_tokens": config.max_new_tokens,
        **({"crop_to_bbox": True} if config.crop_to_bbox else {}),
    }


def evaluate(config: EvalConfig, backend: Backend | None = None) -> dict[str, Any]:
    """Run (or resume) one evaluation into ``config.out`` and rewrite its metrics, report and chart.

    ``backend`` replaces the one the config names (tests, or a model already in memory). Returns the
    metrics with what this call did: ``asked``, ``answered``, ``failed``, ``warnings`` and ``usage``.
    """
    _check(config)
    columns = list(LABEL_COLUMNS)
    columns += ["attributes_required"] if config.mode == "probe" else ["image"]
    columns += ["bbox"] if config.crop_to_bbox else []
    rows_ds, concepts = load_split(config.dataset, config.split, columns)
    if config.limit is not None:
        rows_ds = rows_ds.select(range(min(config.limit, rows_ds.num_rows)))
    rows = rows_ds.select_columns([c for c in rows_ds.column_names if c != "image"]).to_list()
    warnings = []
    if config.mode == "probe":
        bare = sum(not row["attributes_required"] for row in rows)
        if rows and bare == len(rows):
            raise FinerError(
                f"--mode probe: no row of {config.dataset} has attributes_required; "
                "build the dataset with knowledge (attributes) first"
            )
        if bare:
            warnings.append(f"probe: {bare} of {len(rows)} rows have no attributes; asked with none")
    pixels = ["image", *(["bbox"] if config.crop_to_bbox else [])]
    image_column = None if config.mode == "probe" else rows_ds.select_columns(pixels)

    def image(index: int) -> Image.Image:
        row = image_column[index]  # type: ignore[index]
        return crop_box(row["image"], row.get("bbox"))

    template_hash = template_sha256(MODE_TEMPLATES.get(config.mode, config.mode), config.prompts_dir)
    plan = EvalPlan(
        run=_run_identity(config, template_hash),
        concepts=concepts,
        images=image if image_column else None,
        prompts_dir=config.prompts_dir,
    )
    levels = plan.levels(config.level)
    if config.mode == "choice" and config.level == "all" and len(levels) < 3:
        warnings.append(f"choice: only {', '.join(levels)} offer two or more labels to choose from")

    out = Path(config.out).expanduser()
    if out.exists() and not out.is_dir():
        raise FinerError(f"--out {out} is a file; pass a folder")
    answers = AppendLog(out / PREDICTIONS_FILE)
    done = {record.get("key") for record in answers.records()}
    pending: dict[str, tuple[int, str]] = {}
    for index, row in enumerate(rows):
        for level in levels:
            if plan.askable(row, level) and (key := plan.key(row, level)) not in done:
                pending.setdefault(key, (index, level))
    if pending and backend is None:
        backend = _make_backend(config, template_hash)  # loads the model: only when there is work
    out.mkdir(parents=True, exist_ok=True)
    log = PredictionLog(answers)
    try:
        if pending:
            log.start(len(pending))
            tasks = (plan.task(index, rows[index], level) for index, level in pending.values())
            backend.run(tasks, log)  # type: ignore[union-attr]
    finally:
        log.close()
    if log.failures:
        if not log.answered:
            raise FinerError(f"every request failed, e.g. {log.failures[0]}")
        warnings.append(
            f"{len(log.failures)} of {len(pending)} requests failed (e.g. {log.failures[0]}); "
            "run the same command again to retry them"
        )
    metrics = write_report(out, finer_original=config.finer_original)
    return {
        **metrics,
        "asked": len(pending),
        "answered": log.answered,
        "failed": len(log.failures),
        "warnings": warnings,
        "usage": usage.usage_json() if (usage := getattr(backend, "usage", None)) is not None else None,
    }
