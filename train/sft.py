"""`finer finetune`: supervised fine-tuning of a VLM on built datasets with TRL's `SFTTrainer` and PEFT LoRA.

One `FinetuneConfig` holds everything (TRL style); recipes (`train/recipes/*.yaml`) and the command line fill
it, the command line last. `run_finetune` then: resolves the family and its training chat template, renders
the datasets into conversations, lets `SFTTrainer` (with `assistant_only_loss=True`, TRL's own collator and
the family's LoRA plan) train, saves the adapter (safetensors) and processor, optionally scores generations,
and writes `finer_run.json` last: an output folder without it is an unfinished run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.resources
import importlib.util
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finer.errors import FinerError
from finer.models.families import (
    Family,
    TrainPlan,
    check_trainable,
    resolve_chat_template,
)
from finer.records import RunRecord

from .config import TrainerConfig
from .data import AttributeMode, Format, Mixture, crop_to_boxes, drop_too_long, load_mixture, load_split
from .instruct import mix_instructions
from .runtime import (
    RUN_FILE,
    base_model,
    last_checkpoint,
    load_planned,
    prepare_output_dir,
    require_output_dir,
    trainer_arguments,
    training_folder,
    versions,
    write_run_file,
)

__all__ = [
    "RUN_FILE",
    "FinetuneConfig",
    "build_trainer",
    "describe_loss",
    "eval_rows",
    "load_recipe",
    "recipe_names",
    "run_finetune",
]

logger = logging.getLogger(__name__)


@dataclass
class FinetuneConfig(TrainerConfig):
    """Everything one fine-tuning run needs; field names are the recipe keys and (dashed) CLI options.

    The shared fields, and what their `None` means, are `TrainerConfig`'s. Liger kernels are opt-in (TRL
    deprecates them). `eval_split`, when set, scores the trained model's generations on that split at the
    fine level (see `finer.train.evaluate`). `instruction_data` mixes in general LLaVA-style instruction
    conversations, `instruction_ratio` per fine-grained row (see `finer.train.instruct`). `max_length`
    `None` keeps every conversation however long.
    """

    format: Format = "finer"
    attributes: AttributeMode = "auto"
    hold_out: str | None = None
    instruction_data: str | None = None
    instruction_images: str | None = None
    instruction_ratio: float = 0.5
    chat_template: str | None = None
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_length: int | None = 2048
    load_in_4bit: bool = False
    use_liger_kernel: bool = False
    dataloader_num_workers: int = 0
    eval_split: str | None = None
    eval_batch_size: int = 16


def recipe_names(folder: str = "recipes") -> list[str]:
    """The recipes shipped in `finer.train/<folder>/`: `recipes` (runs), `recipes/curricula` (curricula)."""
    shipped = _shipped(folder).iterdir()
    return sorted(e.name.removesuffix(".yaml") for e in shipped if e.name.endswith(".yaml"))


def _shipped(folder: str) -> Any:
    return importlib.resources.files("finer.train").joinpath(*folder.split("/"))


def load_recipe(name_or_path: str | Path, folder: str = "recipes") -> dict[str, Any]:
    """A recipe's mapping, from a YAML file or by the name of a recipe shipped in `folder` (`demo-tiny`)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif str(name_or_path) in recipe_names(folder):
        text = (_shipped(folder) / f"{name_or_path}.yaml").read_text(encoding="utf-8")
    else:
        raise FinerError(
            f"no recipe {str(name_or_path)!r}: give a YAML file or one of {', '.join(recipe_names(folder))}"
        )
    try:
        recipe = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise FinerError(f"recipe {name_or_path}: invalid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(recipe, dict):
        raise FinerError(
            f"recipe {name_or_path}: expected a mapping of config keys, got {type(recipe).__name__}"
        )
    return recipe


@contextlib.contextmanager
def _cpu_threads(config: FinetuneConfig) -> Iterator[None]:
    """On a CPU with data workers, leave the workers their cores for the run, then restore the thread count:
    oversubscribed OpenMP threads spin-wait on each other, which made steps several times slower on a busy
    two-core machine."""
    import torch

    before = torch.get_num_threads()
    if not torch.cuda.is_available() and config.dataloader_num_workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores - config.dataloader_num_workers))
        logger.info(
            "CPU: %d torch thread(s) beside %d data worker(s)",
            torch.get_num_threads(),
            config.dataloader_num_workers,
        )
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Prepared:
    """A trainer ready to `train()`, and what went into it (for the log and the run summary)."""

    trainer: Any
    mixture: Mixture
    family: Family
    plan: TrainPlan
    template: str
    trainable: dict[str, tuple[int, int]]
    work_dir: Path  # where it trains: `output_dir`'s staging folder


def build_trainer(config: FinetuneConfig) -> Prepared:
    """Everything up to `train()`: checks first (family, datasets, output folder), then model and trainer.

    User errors surface before anything is written, so a failed start leaves nothing that looks like a run.
    """
    require_output_dir(config)
    model_id, family = base_model(config)
    from transformers import AutoProcessor
    from trl import SFTConfig, SFTTrainer

    mixture = load_mixture(
        config.datasets,
        fmt=config.format,
        split=config.split,
        attributes=config.attributes,
        hold_out=config.hold_out,
        prompts_dir=config.prompts_dir,
        crop=config.crop_to_bbox,
    )
    if config.instruction_data:
        mix_instructions(
            mixture,
            config.instruction_data,
            config.instruction_ratio,
            images=config.instruction_images,
            seed=config.seed,
        )
    output_dir = prepare_output_dir(config)

    shared = trainer_arguments(config, output_dir)
    processor = AutoProcessor.from_pretrained(model_id)
    template = resolve_chat_template(family, processor, config.chat_template)
    model, plan = load_planned(config, model_id, family, shared["bf16"], config.load_in_4bit)
    # The rows are already what TRL's collator reads (messages, image) plus what it ignores (source, and bbox
    # for the crop transform, which TRL's column pruning, off in `shared`, would drop before it is read).
    args = SFTConfig(
        **shared,
        assistant_only_loss=True,
        max_length=None,  # drop_too_long below: TRL would truncate, image tokens included
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a fraction of the steps when below 1
        weight_decay=config.weight_decay,
        use_liger_kernel=config.use_liger_kernel,
        dataloader_num_workers=config.dataloader_num_workers,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=mixture.dataset,
        processing_class=processor,
        peft_config=plan.lora_config(config.lora_r, config.lora_alpha, config.lora_dropout),
    )
    trainable = check_trainable(trainer.model, plan)
    # Measured with the trainer's own collator: exactly the tokens the model will see.
    drop_too_long(mixture, lambda row: trainer.data_collator([row])["input_ids"].shape[1], config.max_length)
    trainer.train_dataset = mixture.dataset
    return Prepared(trainer, mixture, family, plan, template, trainable, output_dir)


def run_finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Train, save the adapter and processor, optionally score generations; returns the run summary.

    `output_dir` is replaced only when the run is complete (`training_folder`)."""
    started = time.perf_counter()
    require_output_dir(config)  # the cheap checks before torch loads: a mistake is told in seconds
    base_model(config)
    with _cpu_threads(config), training_folder(config):
        return _run(config, started)


def _run(config: FinetuneConfig, started: float) -> dict[str, Any]:
    """`run_finetune`'s body; `finer_run.json` is written last, so only a finished run has it."""
    prepared = build_trainer(config)
    trainer, mixture, work = prepared.trainer, prepared.mixture, prepared.work_dir
    logger.info("family %s; chat template: %s", prepared.family.name, prepared.template)
    logger.info(
        "LoRA targets: %s; trained in full: %s", prepared.plan.target_modules, prepared.plan.modules_to_save
    )
    for source, count in mixture.summary().items():
        logger.info(
            "%s: %d rows -> %d trained, %d held out, %d too long",
            source,
            count["rows"],
            count["trained"],
            count["held_out"],
            count["too_long"],
        )
    checkpoint = last_checkpoint(work) if config.resume else None
    if checkpoint:
        logger.info(
            "resuming from %s (the Trainer's checkpoint: weights, optimizer, scheduler, RNG)", checkpoint
        )
    elif config.resume:
        logger.warning("--resume: no checkpoint in %s, starting from the beginning", work)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(work))  # adapter_model.safetensors + adapter_config.json + processor
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary: RunRecord = {
        "config": dataclasses.asdict(config),
        "family": prepared.family.name,
        "chat_template": prepared.template,
        "lora_target_modules": prepared.plan.target_modules,
        "modules_to_save": list(prepared.plan.modules_to_save),
        "trainable_parameters": {p: {"trainable": t, "total": n} for p, (t, n) in prepared.trainable.items()},
        "samples": mixture.summary(),
        "attributes_column": mixture.attributes or None,
        "resumed_from": Path(checkpoint).name if checkpoint else None,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        # The Trainer averages the loss over this run's own steps: after a resume, not the earlier ones.
        "train_loss_steps": [_checkpoint_step(checkpoint) + 1, trainer.state.global_step],
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "versions": versions(),
    }
    main_process = trainer.is_world_process_zero()  # of a multi-process launch, one evaluates and writes
    if config.eval_split and main_process:
        from .evaluate import evaluate_fine

        evaluation = evaluate_fine(
            trainer.model,
            trainer.processing_class,
            eval_rows(config.datasets, config.eval_split, crop=config.crop_to_bbox),
            config.format,
            batch_size=config.eval_batch_size,
            prompts_dir=config.prompts_dir,
        )
        logger.info(
            "fine-level accuracy on %s: %.3f over %d images (chance %.3f)",
            config.eval_split,
            evaluation["fine_accuracy"],
            evaluation["images"],
            evaluation["chance"],
        )
        summary["eval"] = {"split": config.eval_split, **evaluation}
    summary["duration_s"] = round(time.perf_counter() - started, 2)
    if main_process:
        write_run_file(work, summary)
    return summary


def _checkpoint_step(checkpoint: str | None) -> int:
    """The step a `checkpoint-N` folder was saved at; 0 for none."""
    return int(Path(checkpoint).name.rsplit("-", 1)[-1]) if checkpoint else 0


def describe_loss(summary: dict[str, Any]) -> str:
    """The final loss line: after a resume it names the steps this run trained ("... over steps 3–5")."""
    first, last = summary["train_loss_steps"]
    over = f" over steps {first}–{last}" if first > 1 else ""
    return f"mean loss {summary['train_loss']:.3f}{over}"


def eval_rows(specs: Sequence[str], split: str, *, crop: bool = False) -> Any:
    """The `split` of every dataset, minus nothing: held-out sources are evaluated too (cropped to boxes
    when `crop`, as in training)."""
    import datasets

    splits = [load_split(spec, split) for spec in specs]
    columns = ["image", "image_id", "source", "superordinate", "coarse", "fine"]
    columns += ["bbox"] if crop else []
    rows = datasets.concatenate_datasets([ds.select_columns(columns) for ds in splits])
    return rows.with_transform(crop_to_boxes) if crop else rows
