"""`finer grpo`: GRPO with verifiable rewards (docs/design.md §1, "From Seeing to Thinking") on built
datasets.

TRL's `GRPOTrainer` samples `num_generations` answers per image, scores each with the rewards of
`finer.train.rewards` (modified EM or the option letter, plus format, optionally attribute grounding) and
reinforces the better ones. The model, LoRA plan (`--train-llm / --train-vision / --train-projector`), output
folder rules and run summary are those of `finer finetune` (`finer.train.sft`, `finer.models.families`).

Rows are prompt-only conversations as TRL's GRPO takes them for VLMs: `prompt` holds the rendered question
with an `{"type": "image"}` slot and `image` the dataset's own image column, which TRL puts into the slot.
The label columns ride along untouched for the rewards: `superordinate`, `coarse`, `fine`,
`attributes_required`, plus `level`, and in `choice` form `gold_letter` and `options`. With `crop_to_bbox`,
`bbox` rides along too and each image is cropped to it when the trainer reads the row (`crop_to_boxes`, as
in SFT; TRL's GRPO keeps every column, so the transform sees the box).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets

from finer.data.datasets_io import load_concepts
from finer.errors import FinerError
from finer.eval.distractors import DEFAULT_MODEL, distractor_setup
from finer.eval.scoring import LEVELS
from finer.eval.tasks import LabelPool, choice_question, closed_list
from finer.models.families import Family, check_trainable
from finer.prompts import render
from finer.records import RunRecord

from .config import TrainerConfig
from .data import crop_to_boxes, load_split
from .rewards import DEFAULT_WEIGHTS, REWARDS, check_reward_weights
from .runtime import (
    base_model,
    load_planned,
    prepare_output_dir,
    require_output_dir,
    trainer_arguments,
    training_folder,
    versions,
    write_run_file,
)

__all__ = ["GrpoConfig", "GrpoFormat", "grpo_dataset", "run_grpo"]

logger = logging.getLogger(__name__)

GrpoFormat = Literal["open", "choice"]
DistractorKind = Literal["siblings", "random", "clip"]
DistractorSpace = Literal["text", "image", "both"]
_LABELS = ("superordinate", "coarse", "fine")


@dataclass
class GrpoConfig(TrainerConfig):
    """One GRPO run. `format` "open" asks the `direct` prompt at `level`; "choice" a `choices`-way question
    (options seeded per image by `seed`, wrong options drawn as `distractors` says, as `finer eval --mode
    choice` does). `reward_weights` name rewards of
    `finer.train.rewards.REWARDS` (accuracy, format, grounding). `batch_size` counts completions per device
    step and must be a multiple of `num_generations`. The shared fields, and what their `None` means
    ("decide from the machine", as in SFT), are `TrainerConfig`'s; GRPO's LoRA rank and learning rate are
    lower than SFT's."""

    format: GrpoFormat = "open"
    level: str = "fine"
    choices: int = 5
    distractors: DistractorKind = "siblings"
    distractor_model: str = DEFAULT_MODEL
    distractor_space: DistractorSpace = "text"
    reward_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    lora_r: int = 64
    lora_alpha: int = 128
    learning_rate: float = 1e-5
    num_generations: int = 8
    max_completion_length: int = 64
    temperature: float = 1.0
    beta: float = 0.0


def _canonical(labels: str | Sequence[str]) -> str:
    return labels if isinstance(labels, str) else (labels[0] if labels else "")


def grpo_dataset(
    specs: Sequence[str],
    *,
    fmt: GrpoFormat,
    level: str,
    choices: int = 5,
    seed: int = 42,
    split: str = "train",
    prompts_dir: str | Path | None = None,
    need_attributes: bool = False,
    crop: bool = False,
    distractors: str = "siblings",
    distractor_model: str = DEFAULT_MODEL,
    distractor_space: str = "text",
) -> tuple[datasets.Dataset, dict[str, dict[str, int]]]:
    """Prompt-only rows of `specs`' `split` for GRPO, and per source how many rows came in and were kept.

    Choice questions draw distractors from the labels of the dataset itself (`distractors`: siblings,
    random, or clip neighbours mined from its concepts, `finer.eval.distractors`); a row without a label at
    `level` cannot be asked as a choice and is skipped (counted). With `crop`, the rows keep `bbox` and
    their images are cropped to it when read (`crop_to_boxes`), nothing is rewritten.
    """
    if level not in LEVELS:
        raise FinerError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    if fmt not in ("open", "choice"):
        raise FinerError(f"unknown format {fmt!r}; choose open or choice")
    if not specs:
        raise FinerError("no dataset to train on: pass --dataset DIR (repeat it to mix several)")
    parts, counts = [], {}
    for spec in specs:
        ds = load_split(spec, split)
        wanted = [
            "image",
            "source",
            "image_id",
            *_LABELS,
            *(["attributes_required"] if need_attributes else []),
            *(["bbox"] if crop else []),
        ]
        missing = [c for c in wanted if c not in ds.column_names]
        if missing:
            raise FinerError(f"dataset {spec!r} lacks {', '.join(missing)}: is it a `finer build` output?")
        has_attributes = "attributes_required" in ds.column_names
        columns = ["source", "image_id", *_LABELS, *(["attributes_required"] if has_attributes else [])]
        values = ds.select_columns(columns).to_dict()
        rows = [{c: values[c][i] for c in columns} for i in range(len(ds))]
        pool = LabelPool.of(rows, level)
        if fmt == "choice" and len(pool.labels) < 2:
            raise FinerError(f"dataset {spec!r} has a single {level} label: nothing to choose from")
        mined = None
        if fmt == "choice":
            concepts = load_concepts(spec, _LABELS) or [{c: row[c] for c in _LABELS} for row in rows]
            model, space = distractor_model, distractor_space
            mined = distractor_setup(distractors, spec, concepts, model=model, space=space)[1]
        keep, prompts, letters, options = [], [], [], []
        closed: dict[str, list[str] | None] = {}
        for i, row in enumerate(rows):
            counts.setdefault(row["source"], Counter())["rows"] += 1
            if fmt == "choice":
                if not _canonical(row[level]):
                    continue
                question = choice_question(
                    row,
                    level,
                    pool,
                    choices,
                    seed,
                    distractors=distractors,
                    neighbours=mined.levels.get(level) if mined else None,
                )
                opts, letter = question.options, question.answer
                prompts.append(render("choice", prompts_dir=prompts_dir, choices=opts, parent=None))
                letters.append(letter)
                options.append(opts)
            else:
                if row["source"] not in closed:
                    listed = closed_list(row["source"], level, rows)
                    closed[row["source"]] = listed
                prompt = render(
                    "direct", prompts_dir=prompts_dir, level=level, parent=None, choices=closed[row["source"]]
                )
                prompts.append(prompt)
                letters.append("")
                options.append([])
            keep.append(i)
            counts[row["source"]]["kept"] += 1
        part = ds.select_columns(["image", *(["bbox"] if crop else []), *columns])
        if not has_attributes:
            part = part.add_column("attributes_required", [[] for _ in range(len(part))])
        if len(keep) < len(part):
            part = part.select(keep)
        part = part.add_column("prompt", prompts).add_column("level", [level] * len(part))
        parts.append(part.add_column("gold_letter", letters).add_column("options", options))
    dataset = datasets.concatenate_datasets(parts)
    if not len(dataset):
        raise FinerError(f"no row of the datasets can be asked at the {level} level")
    summary = {source: {"rows": c["rows"], "kept": c["kept"]} for source, c in sorted(counts.items())}
    return (dataset.with_transform(crop_to_boxes) if crop else dataset), summary


def run_grpo(config: GrpoConfig) -> dict[str, Any]:
    """Train with GRPO, save the adapter and processor, write `finer_run.json`; returns the run summary.

    `output_dir` is replaced only when the run is complete (`training_folder`)."""
    started = time.perf_counter()
    # the cheap checks before torch and TRL load: a mistake is told in seconds
    require_output_dir(config)
    weights = check_reward_weights(config.reward_weights)
    if config.batch_size * config.grad_accum % config.num_generations:
        raise FinerError(
            f"--batch-size × --grad-accum ({config.batch_size * config.grad_accum}) must be a multiple of "
            f"--num-generations ({config.num_generations})"
        )
    model_id, family = base_model(config)
    with training_folder(config):
        return _run_grpo(config, started, weights, model_id, family)


def _run_grpo(
    config: GrpoConfig, started: float, weights: dict[str, float], model_id: str, family: Family
) -> dict[str, Any]:
    from transformers import AutoProcessor
    from transformers.trainer_utils import get_last_checkpoint
    from trl import GRPOConfig, GRPOTrainer

    dataset, samples = grpo_dataset(
        config.datasets,
        fmt=config.format,
        level=config.level,
        choices=config.choices,
        seed=config.seed,
        split=config.split,
        prompts_dir=config.prompts_dir,
        need_attributes=bool(weights.get("grounding")),
        crop=config.crop_to_bbox,
        distractors=config.distractors,
        distractor_model=config.distractor_model,
        distractor_space=config.distractor_space,
    )
    output_dir = prepare_output_dir(config)

    shared = trainer_arguments(config, output_dir)
    processor = AutoProcessor.from_pretrained(model_id)
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"  # generation pads on the left
    model, plan = load_planned(config, model_id, family, shared["bf16"])
    names = [name for name, weight in weights.items() if weight]
    args = GRPOConfig(
        **shared,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        beta=config.beta,
        reward_weights=[weights[name] for name in names],
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[REWARDS[name] for name in names],
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=plan.lora_config(config.lora_r, config.lora_alpha, config.lora_dropout),
    )
    trainable = check_trainable(trainer.model, plan)
    checkpoint = get_last_checkpoint(str(output_dir)) if config.resume else None
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(output_dir))  # adapter_model.safetensors + adapter_config.json + processor
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    rewards = [entry["reward"] for entry in history if "reward" in entry]
    summary: RunRecord = {
        "config": dataclasses.asdict(config),
        "trainer": "grpo",
        "family": family.name,
        "reward_weights": {name: weights[name] for name in names},
        "lora_target_modules": plan.target_modules,
        "modules_to_save": list(plan.modules_to_save),
        "trainable_parameters": {p: {"trainable": t, "total": n} for p, (t, n) in trainable.items()},
        "samples": samples,
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "losses": losses,
        "rewards": rewards,
        "reward_components": {
            name: [
                e[f"rewards/{REWARDS[name].__name__}/mean"]
                for e in history
                if f"rewards/{REWARDS[name].__name__}/mean" in e
            ]
            for name in names
        },
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "versions": versions(),
    }
    summary["duration_s"] = round(time.perf_counter() - started, 2)
    if trainer.is_world_process_zero():
        write_run_file(output_dir, summary)
    return summary
