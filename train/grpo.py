"""`finer grpo`: GRPO with verifiable rewards (DESIGN §1, "From Seeing to Thinking") on built datasets.

TRL's `GRPOTrainer` samples `num_generations` answers per image, scores each with the rewards of
`finer.train.rewards` (modified EM or the option letter, plus format, optionally attribute grounding) and
reinforces the better ones. The model, LoRA plan (`--train-llm / --train-vision / --train-projector`), output
folder rules and run summary are those of `finer finetune` (`finer.train.sft`, `finer.train.families`).

Rows are prompt-only conversations as TRL's GRPO takes them for VLMs: `prompt` holds the rendered question
with an `{"type": "image"}` slot and `image` the dataset's own image column, which TRL puts into the slot.
The label columns ride along untouched for the rewards: `superordinate`, `coarse`, `fine`,
`attributes_required`, plus `level`, and in `choice` form `gold_letter` and `options`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets

from finer.errors import FinerError
from finer.eval_tasks import LabelPool, choice_options, closed_list
from finer.prompts import render
from finer.scoring import LEVELS

from .config import SourcedConfig
from .data import load_split
from .families import LlmPolicy, ProjectorPolicy, VisionPolicy, check_trainable, detect_family, plan_training
from .rewards import DEFAULT_WEIGHTS, REWARDS, check_reward_weights
from .sft import _load_model, _model_path, _on_gpu, _prepare_output_dir, _versions, write_run_file

__all__ = ["GrpoConfig", "GrpoFormat", "grpo_dataset", "run_grpo"]

logger = logging.getLogger(__name__)

GrpoFormat = Literal["open", "choice"]
_LABELS = ("superordinate", "coarse", "fine")


@dataclass
class GrpoConfig(SourcedConfig):
    """One GRPO run. `format` "open" asks the `direct` prompt at `level`; "choice" a `choices`-way question
    (options seeded per image by `seed`, as `finer eval --mode choice` does). `reward_weights` name rewards of
    `finer.train.rewards.REWARDS` (accuracy, format, grounding). `batch_size` counts completions per device
    step and must be a multiple of `num_generations`. `None` means "decide from the machine" (as in SFT)."""

    model: str | None = None
    datasets: list[str] = field(default_factory=list)
    output_dir: str | None = None
    format: GrpoFormat = "open"
    level: str = "fine"
    choices: int = 5
    split: str = "train"
    prompts_dir: str | None = None
    reward_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    train_llm: LlmPolicy = "lora"
    train_vision: VisionPolicy = "frozen"
    train_projector: ProjectorPolicy = "frozen"
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    learning_rate: float = 1e-5
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    num_generations: int = 8
    max_completion_length: int = 64
    temperature: float = 1.0
    beta: float = 0.0
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    seed: int = 42
    bf16: bool | None = None
    gradient_checkpointing: bool | None = None
    report_to: str | None = None
    resume: bool = False
    overwrite: bool = False
    tiny_model: str | None = None


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
) -> tuple[datasets.Dataset, dict[str, dict[str, int]]]:
    """Prompt-only rows of `specs`' `split` for GRPO, and per source how many rows came in and were kept.

    Choice questions draw distractors from the labels of the dataset itself; a row without a label at
    `level` cannot be asked as a choice and is skipped (counted).
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
        keep, prompts, letters, options = [], [], [], []
        closed: dict[str, list[str] | None] = {}
        for i, row in enumerate(rows):
            counts.setdefault(row["source"], Counter())["rows"] += 1
            if fmt == "choice":
                if not _canonical(row[level]):
                    continue
                opts, letter = choice_options(row, level, pool, choices, seed)
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
        part = ds.select_columns(["image", *columns])
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
    return dataset, summary


def run_grpo(config: GrpoConfig) -> dict[str, Any]:
    """Train with GRPO, save the adapter and processor, write `finer_run.json`; returns the run summary."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.trainer_utils import get_last_checkpoint
    from trl import GRPOConfig, GRPOTrainer

    started = time.perf_counter()
    if not config.output_dir:
        raise FinerError("no output folder: pass --output-dir DIR")
    weights = check_reward_weights(config.reward_weights)
    if config.batch_size * config.grad_accum % config.num_generations:
        raise FinerError(
            f"--batch-size × --grad-accum ({config.batch_size * config.grad_accum}) must be a multiple of "
            f"--num-generations ({config.num_generations})"
        )
    model_id = _model_path(config)  # type: ignore[arg-type]
    try:
        model_type = AutoConfig.from_pretrained(model_id).model_type
    except (OSError, ValueError) as err:
        raise FinerError(f"cannot read the config of model {model_id!r}: {err}".splitlines()[0]) from None
    family = detect_family(model_type, model_id)
    dataset, samples = grpo_dataset(
        config.datasets,
        fmt=config.format,
        level=config.level,
        choices=config.choices,
        seed=config.seed,
        split=config.split,
        prompts_dir=config.prompts_dir,
        need_attributes=bool(weights.get("grounding")),
    )
    output_dir = _prepare_output_dir(config)  # type: ignore[arg-type]

    gpu, bf16_capable = _on_gpu()
    bf16 = bf16_capable if config.bf16 is None else config.bf16
    checkpointing = gpu if config.gradient_checkpointing is None else config.gradient_checkpointing
    processor = AutoProcessor.from_pretrained(model_id)
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"  # generation pads on the left
    model = _load_model(model_id, bf16, False)
    plan = plan_training(
        model, family, llm=config.train_llm, vision=config.train_vision, projector=config.train_projector
    )
    names = [name for name, weight in weights.items() if weight]
    args = GRPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        beta=config.beta,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        bf16=bf16,
        use_cpu=not gpu,
        gradient_checkpointing=checkpointing,
        reward_weights=[weights[name] for name in names],
        report_to=config.report_to or ("tensorboard" if importlib.util.find_spec("tensorboard") else "none"),
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
    checkpoint = get_last_checkpoint(config.output_dir) if config.resume else None
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(config.output_dir)  # adapter_model.safetensors + adapter_config.json + processor
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    rewards = [entry["reward"] for entry in history if "reward" in entry]
    summary: dict[str, Any] = {
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
        "versions": _versions(),
    }
    summary["duration_s"] = round(time.perf_counter() - started, 2)
    if trainer.is_world_process_zero():
        write_run_file(config.output_dir, summary)
    return summary
