"""`finer curriculum`: staged post-training ("From Seeing to Thinking", docs/design.md §1), resumable.

A recipe lists stages in order, e.g. perception (SFT with the vision tower trainable) then reasoning (GRPO
with it frozen). Each stage runs `finer finetune` (`sft`) or `finer grpo` (`grpo`) with its own data, format,
part policies and hyper-parameters, starting from the previous stage's weights; after every stage the model is
scored on an evaluation split (`finer.train.evaluate`), and one summary closes the run.

Both trainers train a PEFT adapter (LoRA and parts in full) on the model they start from, so carrying weights
forward means merging: after a stage its adapter is folded into its starting weights (`merge_and_unload`) and
saved as a plain transformers model, which the next stage's trainer loads and applies its own policy to.

    OUT/curriculum.json             the summary of the last invocation (`CurriculumRecord`)
    OUT/01-perception/stage.json    trainer, resolved config and hash (`StageRecord`, written before training)
    OUT/01-perception/train/        the trainer's output folder: adapter, checkpoints, finer_run.json last
    OUT/01-perception/model/        the merged model: what the next stage starts from
    OUT/01-perception/eval.json     its scores on the evaluation split (`StageEvalRecord`)

A stage whose train/ holds the run file is finished and never re-run; an unfinished one resumes from its last
checkpoint. The hash covers the trainer, the stage's config (but its logging and checkpointing cadence) and
the previous stage's hash, so a change to a stage also reaches every stage after it; a stage that changed
since it ran is refused unless `overwrite`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finer.errors import FinerError
from finer.records import (
    CURRICULUM_FILE,
    STAGE_EVAL_FILE,
    STAGE_FILE,
    CurriculumRecord,
    SplitScores,
    StageEvalRecord,
    StageEvaluation,
    StageRecord,
    StageSummary,
    read_run_file,
    read_stage_eval_file,
    read_stage_file,
)
from finer.run_folder import OutputLock, staged_subfolder, write_json

from .config import SourcedConfig
from .data import Format, load_split
from .grpo import GrpoConfig, run_grpo
from .runs import release_memory
from .runtime import RUN_FILE, unfinished_checkpoint, versions
from .sft import FinetuneConfig, eval_rows, run_finetune

__all__ = [
    "CURRICULA",
    "MANAGED",
    "CurriculumConfig",
    "Stage",
    "format_table",
    "plan_stages",
    "run_curriculum",
]

logger = logging.getLogger(__name__)

#: Where shipped curriculum recipes live (`load_recipe(name, CURRICULA)`), apart from single-run recipes.
CURRICULA = "recipes/curricula"
TRAINERS: dict[str, tuple[type[FinetuneConfig] | type[GrpoConfig], Callable[[Any], dict[str, Any]]]] = {
    "sft": (FinetuneConfig, run_finetune),
    "grpo": (GrpoConfig, run_grpo),
}
#: Trainer keys the curriculum sets itself: a stage may not.
MANAGED = ("model", "output_dir", "tiny_model", "resume", "overwrite", "eval_split")
#: Keys that change how a stage runs or logs, not the weights it ends with: left out of its hash.
OPERATIONAL = (
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "report_to",
    "dataloader_num_workers",
    "gradient_checkpointing",
    "eval_batch_size",
)
_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")


@dataclass
class CurriculumConfig(SourcedConfig):
    """A curriculum recipe. Stage 1 starts from `model` (`tiny_model`: a `finer.testing` family built there
    when missing, as in the demo). Each entry of `stages` names its `trainer` (sft or grpo), optionally a
    `name`, and sets any key of that trainer's config but those in `MANAGED`. `datasets` and `defaults`
    apply to every stage that does not set the key itself (a `defaults` key only to the stages whose trainer
    knows it). After each stage the model is scored on `eval_split` of `eval_datasets` (default `datasets`,
    else the first stage's) in `eval_format` (finer: coarse and fine accuracy; direct: fine);
    `eval_split: null` skips it. `overwrite` re-runs the stages that changed since they ran."""

    model: str | None = None
    output_dir: str | None = None
    tiny_model: str | None = None
    datasets: list[str] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    eval_split: str | None = "test"
    eval_datasets: list[str] | None = None
    eval_format: Format = "finer"
    eval_crop_to_bbox: bool = False
    eval_batch_size: int = 16
    eval_max_new_tokens: int = 128
    overwrite: bool = False


@dataclass
class Stage:
    """One resolved stage: its trainer's config (model and output folder filled in) and its hash."""

    index: int
    name: str
    trainer: str
    config: FinetuneConfig | GrpoConfig
    hash: str
    folder: Path

    @property
    def label(self) -> str:
        return f"stage {self.index} ({self.name})"

    @property
    def train_dir(self) -> Path:
        return self.folder / "train"

    @property
    def model_dir(self) -> Path:
        return self.folder / "model"

    def recorded_hash(self) -> str | None:
        """The hash this stage's folder was trained with, if it holds a readable stage.json."""
        try:
            return read_stage_file(self.folder)["hash"]
        except FinerError:
            return None

    def changed(self) -> bool:
        """The folder holds work done under other settings (or by something else)."""
        busy = self.folder.is_dir() and any(self.folder.iterdir())
        return busy and self.recorded_hash() != self.hash


def plan_stages(config: CurriculumConfig, where: str = "curriculum") -> list[Stage]:
    """Every stage resolved and checked (keys, types, datasets and splits); nothing is loaded or written."""
    if not config.model:
        raise FinerError(
            f"{where}: no model: set `model` (a Hub id or a folder) for the first stage to start from"
        )
    if not config.output_dir:
        raise FinerError(f"{where}: no output folder: set `output_dir` or pass --out DIR")
    if not config.stages:
        raise FinerError(f"{where}: no stages: list them under `stages`, each with a trainer (sft or grpo)")
    known = {key for cls, _ in TRAINERS.values() for key in cls.field_names()}
    for key in config.defaults:
        name = key.replace("-", "_")
        if name in MANAGED:
            raise FinerError(f"{where}: defaults: {key!r} is set by the curriculum, not per stage")
        if name not in known:
            raise FinerError(
                f"{where}: defaults: unknown key {key!r}; known keys: {', '.join(sorted(known))}"
            )
    stages: list[Stage] = []
    for index, entry in enumerate(config.stages, start=1):
        stages.append(_stage(config, index, dict(entry), stages[-1] if stages else None, where))
    for spec, split in {(s, st.config.split) for st in stages for s in st.config.datasets}:
        load_split(spec, split)
    if config.eval_split:
        for spec in _eval_datasets(config, stages):
            load_split(spec, config.eval_split)
    return stages


def _stage(
    config: CurriculumConfig, index: int, entry: dict[str, Any], previous: Stage | None, where: str
) -> Stage:
    trainer = entry.pop("trainer", None)
    if trainer not in TRAINERS:
        raise FinerError(f"{where}: stage {index}: trainer must be one of sft, grpo, not {trainer!r}")
    name = entry.pop("name", trainer)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise FinerError(
            f"{where}: stage {index}: name must be letters, digits, '.', '_' or '-', not {name!r}"
        )
    label = f"{where}: stage {index} ({name})"
    for key in entry:
        if key.replace("-", "_") in MANAGED:
            raise FinerError(
                f"{label}: {key!r} is set by the curriculum (the top-level model and eval_split, --out)"
            )
    cls, _ = TRAINERS[trainer]
    shared = {"datasets": config.datasets} if config.datasets else {}
    shared.update({k: v for k, v in config.defaults.items() if k.replace("-", "_") in cls.field_names()})
    folder = Path(config.output_dir or "") / f"{index:02d}-{name}"
    managed = {
        "model": config.model if previous is None else str(previous.model_dir),
        "output_dir": str(folder / "train"),
        "tiny_model": config.tiny_model if previous is None else None,
    }
    settings = cls.from_sources(shared, entry, managed, origin=(f"{where}: defaults", label, "curriculum"))
    if not settings.datasets:
        raise FinerError(
            f"{label}: no datasets: set `datasets` in the stage, in defaults or at the top level"
        )
    tuned = {k: v for k, v in dataclasses.asdict(settings).items() if k not in MANAGED + OPERATIONAL}
    start = config.model if previous is None else previous.hash
    text = json.dumps({"trainer": trainer, "config": tuned, "start": start}, sort_keys=True)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return Stage(index, name, trainer, settings, digest, folder)


def _eval_datasets(config: CurriculumConfig, stages: list[Stage]) -> list[str]:
    return config.eval_datasets or config.datasets or stages[0].config.datasets


def run_curriculum(config: CurriculumConfig, where: str = "curriculum") -> CurriculumRecord:
    """Run (or resume) every stage in order, evaluate after each, write `CURRICULUM_FILE`; returns it."""
    started = time.perf_counter()
    stages = plan_stages(config, where)
    for stage in stages:
        if stage.changed() and not config.overwrite:
            if (stage.folder / STAGE_FILE).is_file():
                read_stage_file(stage.folder)  # a damaged one: its own one-line error
            raise FinerError(
                f"{stage.label} changed since it ran in {stage.folder} (settings {stage.recorded_hash()} -> "
                f"{stage.hash}); pass --overwrite to re-run it and the stages after it"
            )
    evaluation: StageEvaluation | None = None
    if config.eval_split:
        evaluation = {
            "split": config.eval_split,
            "datasets": _eval_datasets(config, stages),
            "format": config.eval_format,
            "crop_to_bbox": config.eval_crop_to_bbox,
            "batch_size": config.eval_batch_size,
            "max_new_tokens": config.eval_max_new_tokens,
        }
    out = Path(config.output_dir or "")
    with OutputLock(out):  # a second curriculum into the same folder is refused, not interleaved
        results = [_run_stage(stage, evaluation, out) for stage in stages]
        summary: CurriculumRecord = {
            "model": config.model,
            "output_dir": str(out),
            "final_model": str(stages[-1].model_dir),
            "eval": evaluation,
            "stages": results,
            "duration_s": round(time.perf_counter() - started, 2),
            "versions": versions(),
        }
        write_json(out / CURRICULUM_FILE, summary)
    return summary


def _run_stage(stage: Stage, evaluation: StageEvaluation | None, out: Path) -> StageSummary:
    """Train the stage unless it is finished, merge its weights forward, evaluate; its summary row."""
    began = time.perf_counter()
    if stage.changed():  # only reached with overwrite: run_curriculum refused otherwise
        logger.info("%s: settings changed; discarding %s", stage.label, stage.folder)
        shutil.rmtree(stage.folder)
    run_file = stage.train_dir / RUN_FILE
    if run_file.is_file():
        status = "skipped"
        logger.info("%s: finished earlier; skipped", stage.label)
    else:
        checkpoint = unfinished_checkpoint(stage.train_dir)  # in train/'s staging folder, once interrupted
        if checkpoint is None and stage.train_dir.is_dir():
            shutil.rmtree(stage.train_dir)  # a run killed before its first checkpoint: nothing to continue
        resume = checkpoint is not None
        status = "resumed" if resume else "trained"
        logger.info("%s: %s with %s from %s", stage.label, status, stage.trainer, stage.config.model)
        stage.folder.mkdir(parents=True, exist_ok=True)
        state: StageRecord = {
            "name": stage.name,
            "trainer": stage.trainer,
            "hash": stage.hash,
            "config": dataclasses.asdict(stage.config),
        }
        write_json(stage.folder / STAGE_FILE, state)
        _, run = TRAINERS[stage.trainer]
        try:
            run(dataclasses.replace(stage.config, resume=resume))
        except FinerError:
            if not resume:  # a start refused before training: leave nothing that looks like a stage
                shutil.rmtree(stage.folder)
                if not any(out.iterdir()):
                    out.rmdir()
            raise
        release_memory()
    record = read_run_file(stage.train_dir)
    model = processor = None
    if not (stage.model_dir / "config.json").is_file():
        model, processor = _merge(stage)
    scores = _evaluate(stage, evaluation, model, processor) if evaluation else None
    del model
    release_memory()
    losses, rewards = record.get("losses") or [], record.get("rewards") or []
    config = stage.config
    row: StageSummary = {
        "stage": stage.index,
        "name": stage.name,
        "trainer": stage.trainer,
        "status": status,
        "hash": stage.hash,
        "started_from": config.model,
        "model": str(stage.model_dir),
        "parts": {
            "vision": config.train_vision,
            "projector": config.train_projector,
            "llm": config.train_llm,
        },
        "global_step": record["global_step"],
        "final_loss": losses[-1] if losses else None,
        "final_reward": rewards[-1] if rewards else None,
        "train_duration_s": record.get("duration_s"),
        "eval": scores,
        "duration_s": round(time.perf_counter() - began, 2),
    }
    return row


def _merge(stage: Stage) -> tuple[Any, Any]:
    """Fold the stage's adapter into its starting weights and save them as model/ (complete or absent).

    Not `finer.models.loading.merge_adapter`: the merged model stays in memory for the stage's evaluation,
    and the processor is the one the stage trained with, its padding side restored to the base's.
    """
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from finer.models.loading import check_lora_loaded, pick_device

    start = stage.config.model
    logger.info("%s: merging its adapter into %s -> %s", stage.label, start, stage.model_dir)
    base = AutoModelForImageTextToText.from_pretrained(start, dtype="auto", device_map=pick_device()[0])
    peft_model = PeftModel.from_pretrained(base, str(stage.train_dir))
    # An adapter that silently failed to load would carry the starting weights forward (docs/design.md §5).
    check_lora_loaded(peft_model, stage.label, stage.train_dir)
    model = peft_model.merge_and_unload()
    model.config._name_or_path = str(stage.model_dir)
    processor = AutoProcessor.from_pretrained(stage.train_dir)  # the processor the stage trained with
    # GRPO saves its tokenizer padding on the left (for generation); a later SFT stage trains as the base did.
    processor.tokenizer.padding_side = AutoProcessor.from_pretrained(start).tokenizer.padding_side
    with staged_subfolder(stage.model_dir) as partial:
        model.save_pretrained(partial)
        processor.save_pretrained(partial)
    return model, processor


def _evaluate(stage: Stage, settings: StageEvaluation, model: Any, processor: Any) -> SplitScores:
    """Scores of the stage's model on the eval split, asked with the stage's own prompts (as `finer finetune`
    scores its run); kept in `STAGE_EVAL_FILE` and reused while settings agree."""
    from .evaluate import evaluate_fine

    if stage.config.prompts_dir:  # only when set, so that eval.json files written without it still agree
        settings = {**settings, "prompts_dir": stage.config.prompts_dir}
    if (stage.folder / STAGE_EVAL_FILE).is_file():
        stored = read_stage_eval_file(stage.folder)
        if stored["settings"] == settings:
            return stored["scores"]
    if model is None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from finer.models.loading import pick_device

        device = pick_device()[0]
        model = AutoModelForImageTextToText.from_pretrained(stage.model_dir, dtype="auto", device_map=device)
        processor = AutoProcessor.from_pretrained(stage.model_dir)
    rows = eval_rows(settings["datasets"], settings["split"], crop=settings["crop_to_bbox"])
    scores = evaluate_fine(
        model,
        processor,
        rows,
        settings["format"],
        batch_size=settings["batch_size"],
        max_new_tokens=settings["max_new_tokens"],
        prompts_dir=settings.get("prompts_dir"),
    )
    scores: SplitScores = {"split": settings["split"], **scores}
    logger.info(
        "%s: fine accuracy %.3f on %d %s images (chance %.3f)",
        stage.label,
        scores["fine_accuracy"],
        scores["images"],
        settings["split"],
        scores["chance"],
    )
    record: StageEvalRecord = {"settings": settings, "scores": scores}
    write_json(stage.folder / STAGE_EVAL_FILE, record)
    return scores


def format_table(summary: CurriculumRecord) -> str:
    """The summary as a markdown table: one row per stage."""

    def number(value: float | None, digits: int = 3) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    header = [
        "stage",
        "trainer",
        "trained parts",
        "status",
        "steps",
        "final loss",
        "final reward",
        "fine acc",
        "coarse acc",
        "train time",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["stages"]:
        parts = ", ".join(f"{part} {policy}" for part, policy in row["parts"].items() if policy != "frozen")
        scores = row["eval"] or {}
        cells = [
            f"{row['stage']} {row['name']}",
            row["trainer"],
            parts,
            row["status"],
            str(row["global_step"]),
            number(row["final_loss"]),
            number(row["final_reward"]),
            number(scores.get("fine_accuracy")),
            number(scores.get("coarse_accuracy")),
            f"{number(row['train_duration_s'], 1)} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
