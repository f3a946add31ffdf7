"""The result files finer writes, typed once: each record's keys are declared here, and the code that
writes a file and the code that reads it both go through these types.

They are `TypedDict`s: a record is a JSON document passed around as a dict, so the on-disk JSON is the
dict itself, unchanged, and a file written by an older finer (an optional key missing, or one more key)
still loads. Optional keys are `NotRequired` (no `from __future__ import annotations` here: it would hide
`NotRequired` from `__optional_keys__`).
"""

import json
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from finer.errors import FinerError
from finer.run_folder import RUN_FILE

__all__ = ["EvalRun", "PredictionRecord", "RunRecord", "read_run_file"]


class EvalRun(TypedDict):
    """What every answer of one `finer eval` run depends on besides its image and level: part of each
    resume key and of each `PredictionRecord` (`finer.eval.engine`)."""

    model: str
    adapter: str | None
    backend: str
    #: Content fingerprints (`finer.models.fingerprint`): a model retrained at the same path is another run.
    model_fingerprint: str | None
    adapter_fingerprint: str | None
    dataset_fingerprint: str
    mode: str
    template_sha256: str
    split: str
    gold_parent: bool
    choices: int | None
    seed: int | None
    temperature: float
    max_new_tokens: int
    crop_to_bbox: NotRequired[bool]
    #: --mode choice with other distractors than siblings (`finer.eval.distractors.distractor_setup`).
    distractors: NotRequired[str]
    distractor_model: NotRequired[str]
    distractor_revision: NotRequired[str]
    distractor_space: NotRequired[str]


class PredictionRecord(TypedDict):
    """One line of ``predictions.jsonl``: a question (its gold labels and run), and the model's answer or
    why its image could not be read (``skipped``). Written by `finer.eval.engine`, scored by
    `finer.eval.report`."""

    key: str
    #: The run's `EvalRun`; a dict, as older files may hold other fields.
    run: dict[str, Any]
    level: str
    image_id: str
    source: str
    concept_id: str
    superordinate: str
    coarse: list[str]
    fine: list[str]
    #: --mode choice: the options shown, the gold letter, why each option is there (and, for clip
    #: distractors, its similarity to the gold).
    options: NotRequired[list[str]]
    answer: NotRequired[str]
    option_kinds: NotRequired[list[str]]
    option_similarity: NotRequired[list[float | None]]
    #: The reply (stored cut when too long: ``stored_truncated``); ``truncated``: cut at the token limit.
    prediction: NotRequired[str]
    truncated: NotRequired[bool]
    stored_truncated: NotRequired[bool]
    #: --mode attrseek: the attributes the model listed first.
    attributes: NotRequired[str]
    attributes_truncated: NotRequired[bool]
    #: --mode finer: the earlier turns of the replayed conversation.
    turns: NotRequired[list[str]]
    #: Why the image could not be read; such a record has no prediction and is counted, not scored.
    skipped: NotRequired[str]


class RunRecord(TypedDict):
    """``finer_run.json``: the summary of a finished training run, written last by `finer finetune` (SFT)
    and `finer grpo` (``train/runtime.py``'s `write_run_file`), read by the model card, the curriculum
    and the ablation grid. Keys only one trainer writes are `NotRequired`; a file of an older finer may
    lack others, so readers `.get` what they can do without."""

    #: The trainer's config dataclass as a dict (`dataclasses.asdict`).
    config: dict[str, Any]
    #: "grpo" for `finer grpo`; absent for SFT.
    trainer: NotRequired[str]
    family: str
    lora_target_modules: str | None
    modules_to_save: list[str]
    #: Per part (vision, projector, llm): {"trainable": n, "total": n}.
    trainable_parameters: dict[str, dict[str, int]]
    #: Per source: rows used (SFT: the mixture; GRPO: {"rows", "kept"}).
    samples: dict[str, Any]
    #: The checkpoint folder the run resumed from, if any.
    resumed_from: str | None
    global_step: int
    train_loss: float
    losses: list[float]
    train_runtime_s: float
    #: finer's and the training libraries' versions.
    versions: dict[str, str]
    #: Written once training and the optional evaluation are over.
    duration_s: NotRequired[float]
    # SFT only.
    chat_template: NotRequired[str]
    attributes_column: NotRequired[str | None]
    #: The steps ``train_loss`` averages over (after a resume, this run's own steps).
    train_loss_steps: NotRequired[list[int]]
    first_loss: NotRequired[float | None]
    last_loss: NotRequired[float | None]
    #: --eval-split: the fine-level accuracy of generations after training ({"split", "fine_accuracy", ...}).
    eval: NotRequired[dict[str, Any]]
    # GRPO only.
    reward_weights: NotRequired[dict[str, float]]
    rewards: NotRequired[list[float]]
    reward_components: NotRequired[dict[str, list[float]]]


def read_run_file(folder: Path) -> RunRecord:
    """``folder``'s `RunRecord`; a one-line `FinerError` when it is not valid JSON."""
    path = folder / RUN_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise FinerError(f"{path}: not valid JSON ({err})") from None
