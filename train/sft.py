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
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import finer
from finer.errors import FinerError
from finer.models.families import (
    Family,
    TrainPlan,
    check_trainable,
    detect_family,
    plan_training,
    resolve_chat_template,
)
from finer.run_folder import OutputLock, partial_path, recover, staged_subfolder, swap_in, write_json

from .config import TrainerConfig
from .data import AttributeMode, Format, Mixture, crop_to_boxes, drop_too_long, load_mixture, load_split
from .instruct import mix_instructions

__all__ = [
    "RUN_FILE",
    "FinetuneConfig",
    "build_trainer",
    "describe_loss",
    "eval_rows",
    "load_recipe",
    "recipe_names",
    "run_finetune",
    "training_folder",
    "unfinished_checkpoint",
    "write_run_file",
]

logger = logging.getLogger(__name__)

#: Written last into the output folder: its presence is what makes a run look finished.
RUN_FILE = "finer_run.json"


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


def _on_gpu() -> tuple[bool, bool]:
    """(a CUDA GPU is there, it computes in bf16)."""
    import torch

    gpu = torch.cuda.is_available()
    return gpu, gpu and torch.cuda.is_bf16_supported()


def _trainer_arguments(config: TrainerConfig, output_dir: Path) -> dict[str, Any]:
    """The `TrainingArguments` that SFT and GRPO share, with the config's `None`s decided from the machine.

    `use_cpu` without a GPU is also what makes a CPU multi-process launch (torchrun) train as one gloo
    group. Columns are never pruned: the rows carry what the trainer ignores but the crop transform
    (`bbox`) and the rewards (the labels) read.
    """
    gpu, bf16_capable = _on_gpu()
    bf16 = bf16_capable if config.bf16 is None else config.bf16
    checkpointing = gpu if config.gradient_checkpointing is None else config.gradient_checkpointing
    report_to = config.report_to or ("tensorboard" if importlib.util.find_spec("tensorboard") else "none")
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "learning_rate": config.learning_rate,
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps or -1,
        "logging_steps": config.logging_steps,
        "save_steps": config.save_steps,
        "save_total_limit": config.save_total_limit,
        "seed": config.seed,
        "bf16": bf16,
        "use_cpu": not gpu,
        "gradient_checkpointing": checkpointing,
        "report_to": report_to,
        "remove_unused_columns": False,
    }


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


def _main_process() -> bool:
    """Of a multi-process launch, the one process that locks, checks and swaps the output folder."""
    return os.environ.get("RANK", "0") == "0"


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def unfinished_checkpoint(output_dir: str | Path) -> str | None:
    """The last checkpoint of an interrupted run into `output_dir`: in its staging folder, or (a run
    interrupted before runs were staged) in `output_dir` itself when that holds no finished run."""
    out = Path(output_dir)
    in_place = None if (out / RUN_FILE).is_file() else _last_checkpoint(out)
    return _last_checkpoint(partial_path(out)) or in_place


@contextlib.contextmanager
def training_folder(config: TrainerConfig) -> Iterator[None]:
    """Hold `output_dir`'s lock for the whole run and, when the run returns, swap its staging folder in.

    Runs train into `.NAME.partial` beside `output_dir` (`_prepare_output_dir`, `finer.run_folder`): an
    earlier run stays in `output_dir` until the new one is complete, and an interrupted run's checkpoints
    wait in the staging folder for `--resume`.
    """
    if not config.output_dir or not _main_process():
        yield
        return
    out = Path(config.output_dir).expanduser().absolute()
    with OutputLock(out, "--output-dir"):
        try:
            yield
        except KeyboardInterrupt:
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm([logging.getLogger("finer")]):  # on a line of its own, not the bar's
                logger.warning(_interrupted(Path(config.output_dir)))
            raise
        swap_in(partial_path(out), out)


def _interrupted(out: Path) -> str:
    """One line: what an interrupted run kept, and how to go on."""
    work = partial_path(out)
    checkpoint = _last_checkpoint(work)
    kept = f"{out} is unchanged" if out.exists() else f"{out} was not written"
    if checkpoint is None:
        return f"interrupted before the first checkpoint: {kept}; nothing to resume"
    return (
        f"interrupted: {kept}; this run's checkpoints are kept in {work} (last {Path(checkpoint).name}): "
        "run the same command with --resume to continue"
    )


def _prepare_output_dir(config: TrainerConfig) -> Path:
    """Where this run trains: the staging folder beside `output_dir`, cleared unless `--resume` continues
    its checkpoints. Refuses to replace a finished run without `overwrite`, or a folder that is not a run."""
    out = Path(config.output_dir or "")
    work = partial_path(out)
    if not _main_process():
        return work
    recover(out)
    if config.resume and not _last_checkpoint(work) and unfinished_checkpoint(out):
        out.rename(work)  # interrupted before runs were staged: continue it where runs train now
    if config.resume and _last_checkpoint(work):
        return work
    if out.is_dir() and any(out.iterdir()):
        _check_replaceable(out, config.overwrite)
        logger.info("%s holds an earlier run: it stays until this one is complete, then is replaced", out)
    interrupted = _last_checkpoint(work)
    if interrupted and not config.overwrite and not config.resume:
        raise FinerError(
            f"{work} holds an interrupted run ({Path(interrupted).name}); "
            "pass --resume to continue it or --overwrite to start over"
        )
    shutil.rmtree(work, ignore_errors=True)
    return work


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """A non-empty `output_dir` is replaced only with `overwrite`, and only when it holds a run."""
    checkpoint = _last_checkpoint(out)
    finished = (out / RUN_FILE).is_file()
    where = f"--output-dir {out}"
    if not overwrite and finished:
        raise FinerError(f"{where} holds a finished run; pass --overwrite to replace it")
    if not overwrite and checkpoint is not None:
        raise FinerError(
            f"{where} holds an unfinished run ({Path(checkpoint).name}); "
            "pass --resume to continue it or --overwrite to start over"
        )
    if not overwrite:
        raise FinerError(f"{where} is not empty; pass --overwrite to replace it or choose another")
    if not (finished or checkpoint is not None or (out / "adapter_config.json").is_file()):
        raise FinerError(f"{where} holds files that are not a finer run; choose another folder")


def _model_path(config: TrainerConfig) -> str:
    """The base model; the demo recipe's tiny model is built on first use (in a sibling, then moved)."""
    if not config.model:
        raise FinerError("no model: pass --model ID|PATH or a --config recipe that sets one")
    path = Path(config.model).expanduser()
    if config.tiny_model and not (path / "config.json").is_file():
        if os.environ.get("LOCAL_RANK", "0") != "0":  # a multi-process launch: the first process builds it
            _wait_for(path / "config.json")
            return config.model
        from finer.testing import build_tiny_vlm

        logger.info("building the tiny %s model into %s", config.tiny_model, path)
        with staged_subfolder(path) as partial:
            build_tiny_vlm(config.tiny_model, partial)
    return config.model


def _wait_for(file: Path, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not file.is_file():
        if time.monotonic() > deadline:
            raise FinerError(f"{file} did not appear in {timeout_s:.0f} s (built by the first process)")
        time.sleep(0.5)


def _base_model(config: TrainerConfig) -> tuple[str, Family]:
    """The model to train (the demo's tiny one built first) and its family, read from its config alone.

    A local folder's `config.json` is read directly and a Hub id that cannot be had is refused at once, so
    that these mistakes are told before transformers loads (seconds, not a minute of retries)."""
    model_id = _model_path(config)
    model_type = _local_model_type(model_id)
    if model_type is None:
        from finer.models.hub_access import require_obtainable

        require_obtainable(model_id)
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(model_id).model_type
        except (OSError, ValueError) as err:
            raise FinerError(f"cannot read the config of model {model_id!r}: {err}".splitlines()[0]) from None
    return model_id, detect_family(model_type, model_id)


def _local_model_type(model_id: str) -> str | None:
    """The `model_type` in a local model folder's `config.json`; None for a Hub id or a config without one."""
    path = Path(model_id).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type") or None
    except (OSError, ValueError, AttributeError) as err:
        raise FinerError(f"cannot read the config of model {model_id!r}: {err}".splitlines()[0]) from None


def _load_model(model_id: str, bf16: bool, load_in_4bit: bool) -> Any:
    import torch
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if bf16 else torch.float32}
    if load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise FinerError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes (a CUDA GPU too)")
        from accelerate import PartialState
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": PartialState().process_index}
    return AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)


def _load_planned(
    config: TrainerConfig, model_id: str, family: Family, bf16: bool, load_in_4bit: bool = False
) -> tuple[Any, TrainPlan]:
    """The model, and which of its parts train how (`train_llm`, `train_vision`, `train_projector`)."""
    model = _load_model(model_id, bf16, load_in_4bit)
    plan = plan_training(
        model, family, llm=config.train_llm, vision=config.train_vision, projector=config.train_projector
    )
    return model, plan


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
    _require_output_dir(config)
    model_id, family = _base_model(config)
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
    output_dir = _prepare_output_dir(config)

    shared = _trainer_arguments(config, output_dir)
    processor = AutoProcessor.from_pretrained(model_id)
    template = resolve_chat_template(family, processor, config.chat_template)
    model, plan = _load_planned(config, model_id, family, shared["bf16"], config.load_in_4bit)
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


def _versions() -> dict[str, str]:
    packages = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")
    return {"finer": finer.__version__, **{p: importlib.metadata.version(p) for p in packages}}


def run_finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Train, save the adapter and processor, optionally score generations; returns the run summary.

    `output_dir` is replaced only when the run is complete (`training_folder`)."""
    started = time.perf_counter()
    _require_output_dir(config)  # the cheap checks before torch loads: a mistake is told in seconds
    _base_model(config)
    with _cpu_threads(config), training_folder(config):
        return _run(config, started)


def _require_output_dir(config: TrainerConfig) -> None:
    if not config.output_dir:
        raise FinerError("no output folder: pass --output-dir DIR or a --config recipe that sets one")


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
    checkpoint = _last_checkpoint(work) if config.resume else None
    if checkpoint:
        logger.info(
            "resuming from %s (the Trainer's checkpoint: weights, optimizer, scheduler, RNG)", checkpoint
        )
    elif config.resume:
        logger.warning("--resume: no checkpoint in %s, starting from the beginning", work)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(work))  # adapter_model.safetensors + adapter_config.json + processor
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary: dict[str, Any] = {
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
        "versions": _versions(),
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


def write_run_file(output_dir: str | Path | None, summary: dict[str, Any]) -> None:
    """The run summary, written last and atomically: only a finished run's folder has it."""
    write_json(Path(output_dir or "") / RUN_FILE, summary)


def eval_rows(specs: Sequence[str], split: str, *, crop: bool = False) -> Any:
    """The `split` of every dataset, minus nothing: held-out sources are evaluated too (cropped to boxes
    when `crop`, as in training)."""
    import datasets

    splits = [load_split(spec, split) for spec in specs]
    columns = ["image", "image_id", "source", "superordinate", "coarse", "fine"]
    columns += ["bbox"] if crop else []
    rows = datasets.concatenate_datasets([ds.select_columns(columns) for ds in splits])
    return rows.with_transform(crop_to_boxes) if crop else rows
