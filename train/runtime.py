"""The trainer runtime that SFT (`finer finetune`) and GRPO (`finer grpo`) share.

Both trainers take a `TrainerConfig`, resolve the base model and its family from the config alone (so
mistakes are told before transformers loads), train into the staging folder beside `output_dir` under its
lock (`training_folder`, `finer.run_folder`), load the model with the part plan of the family registry,
derive the shared `TrainingArguments` from the machine, and write `finer_run.json` last.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import finer
from finer.errors import FinerError, one_line
from finer.models.families import Family, TrainPlan, detect_family, plan_training
from finer.records import RunRecord
from finer.run_folder import (
    RUN_FILE,
    OutputLock,
    partial_path,
    recover,
    staged_subfolder,
    swap_in,
    write_json,
)

from .config import TrainerConfig

__all__ = [
    "RUN_FILE",
    "base_model",
    "last_checkpoint",
    "load_planned",
    "main_process",
    "on_gpu",
    "prepare_output_dir",
    "require_output_dir",
    "trainer_arguments",
    "training_folder",
    "unfinished_checkpoint",
    "versions",
    "write_run_file",
]

logger = logging.getLogger(__name__)


def on_gpu() -> tuple[bool, bool]:
    """(a CUDA GPU is there, it computes in bf16)."""
    import torch

    gpu = torch.cuda.is_available()
    return gpu, gpu and torch.cuda.is_bf16_supported()


def trainer_arguments(config: TrainerConfig, output_dir: Path) -> dict[str, Any]:
    """The `TrainingArguments` that SFT and GRPO share, with the config's `None`s decided from the machine.

    `use_cpu` without a GPU is also what makes a CPU multi-process launch (torchrun) train as one gloo
    group. Columns are never pruned: the rows carry what the trainer ignores but the crop transform
    (`bbox`) and the rewards (the labels) read.
    """
    gpu, bf16_capable = on_gpu()
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
        "activation_checkpointing": checkpointing,  # transformers 5 (gradient_checkpointing is deprecated)
        "report_to": report_to,
        "remove_unused_columns": False,
    }


def main_process() -> bool:
    """Of a multi-process launch, the one process that locks, checks and swaps the output folder."""
    return os.environ.get("RANK", "0") == "0"


def last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def unfinished_checkpoint(output_dir: str | Path) -> str | None:
    """The last checkpoint of an interrupted run into `output_dir`: in its staging folder, or (a run
    interrupted before runs were staged) in `output_dir` itself when that holds no finished run."""
    out = Path(output_dir)
    in_place = None if (out / RUN_FILE).is_file() else last_checkpoint(out)
    return last_checkpoint(partial_path(out)) or in_place


@contextlib.contextmanager
def training_folder(config: TrainerConfig) -> Iterator[None]:
    """Hold `output_dir`'s lock for the whole run and, when the run returns, swap its staging folder in.

    Runs train into `.NAME.partial` beside `output_dir` (`prepare_output_dir`, `finer.run_folder`): an
    earlier run stays in `output_dir` until the new one is complete, and an interrupted run's checkpoints
    wait in the staging folder for `--resume`.
    """
    if not config.output_dir or not main_process():
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
    checkpoint = last_checkpoint(work)
    kept = f"{out} is unchanged" if out.exists() else f"{out} was not written"
    if checkpoint is None:
        return f"interrupted before the first checkpoint: {kept}; nothing to resume"
    return (
        f"interrupted: {kept}; this run's checkpoints are kept in {work} (last {Path(checkpoint).name}): "
        "run the same command with --resume to continue"
    )


def prepare_output_dir(config: TrainerConfig) -> Path:
    """Where this run trains: the staging folder beside `output_dir`, cleared unless `--resume` continues
    its checkpoints. Refuses to replace a finished run without `overwrite`, or a folder that is not a run."""
    out = Path(config.output_dir or "")
    work = partial_path(out)
    if not main_process():
        return work
    recover(out)
    if config.resume and not last_checkpoint(work) and unfinished_checkpoint(out):
        out.rename(work)  # interrupted before runs were staged: continue it where runs train now
    if config.resume and last_checkpoint(work):
        return work
    if out.is_dir() and any(out.iterdir()):
        _check_replaceable(out, config.overwrite)
        logger.info("%s holds an earlier run: it stays until this one is complete, then is replaced", out)
    interrupted = last_checkpoint(work)
    if interrupted and not config.overwrite and not config.resume:
        raise FinerError(
            f"{work} holds an interrupted run ({Path(interrupted).name}); "
            "pass --resume to continue it or --overwrite to start over"
        )
    shutil.rmtree(work, ignore_errors=True)
    return work


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """A non-empty `output_dir` is replaced only with `overwrite`, and only when it holds a run."""
    checkpoint = last_checkpoint(out)
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


def base_model(config: TrainerConfig) -> tuple[str, Family]:
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
            raise FinerError(f"cannot read the config of model {model_id!r}: {one_line(err)}") from None
    return model_id, detect_family(model_type, model_id)


def _local_model_type(model_id: str) -> str | None:
    """The `model_type` in a local model folder's `config.json`; None for a Hub id or a config without one."""
    path = Path(model_id).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type") or None
    except (OSError, ValueError, AttributeError) as err:
        raise FinerError(f"cannot read the config of model {model_id!r}: {one_line(err)}") from None


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


def load_planned(
    config: TrainerConfig, model_id: str, family: Family, bf16: bool, load_in_4bit: bool = False
) -> tuple[Any, TrainPlan]:
    """The model, and which of its parts train how (`train_llm`, `train_vision`, `train_projector`)."""
    model = _load_model(model_id, bf16, load_in_4bit)
    plan = plan_training(
        model, family, llm=config.train_llm, vision=config.train_vision, projector=config.train_projector
    )
    return model, plan


def versions() -> dict[str, str]:
    packages = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")
    return {"finer": finer.__version__, **{p: importlib.metadata.version(p) for p in packages}}


def require_output_dir(config: TrainerConfig) -> None:
    if not config.output_dir:
        raise FinerError("no output folder: pass --out DIR or a --config recipe that sets one")


def write_run_file(output_dir: str | Path | None, summary: RunRecord) -> None:
    """The run summary, written last and atomically: only a finished run's folder has it."""
    write_json(Path(output_dir or "") / RUN_FILE, summary)
