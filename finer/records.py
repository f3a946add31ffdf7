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

__all__ = [
    "BuildKnowledge",
    "BuildRecord",
    "EvalRun",
    "GroundedImages",
    "GroundingRecord",
    "PredictionRecord",
    "RunRecord",
    "UsageCounts",
    "read_run_file",
]


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


class UsageCounts(TypedDict):
    """An endpoint's calls and their cost in one run (`finer.models.client.Usage.usage_json`)."""

    calls: int
    cache_hits: int
    failed_calls: int
    retries: int
    prompt_tokens: int
    completion_tokens: int
    #: USD, or "unknown" for a model without a known price.
    estimated_cost_usd: float | str
    #: Only when the calls were spread over more than one endpoint.
    calls_per_endpoint: NotRequired[dict[str, int]]


class GroundedImages(TypedDict):
    """What became of the images `finer ground` was given."""

    grounded: int
    no_attributes: int
    skipped: int
    failed: int
    malformed_replies: int


class GroundingRecord(UsageCounts):
    """``grounding.json``: what one `finer ground` run did (`finer.data.grounding`); its usage counts
    (`UsageCounts`) are those of this invocation."""

    dataset: str
    grounded_at: str
    #: The run's identity and settings (model, backend, template hash, limit, splits, ...).
    options: dict[str, Any]
    versions: dict[str, str]
    #: Rows written per split.
    counts: dict[str, int]
    images: GroundedImages
    #: Of the attributes asked, the share answered visible (None when none were asked).
    visible_rate: float | None
    dropped_attributes: int
    unanswered_attributes: int
    #: Images asked by this invocation (a resumed run counts only those it had left).
    images_this_run: int
    #: "json_schema" or "text": the reply format the endpoint took (None: no call made).
    structured_output: str | None
    #: Per image: {"split", "image_id", "reason"}.
    skipped: list[dict[str, str]]
    failed: list[dict[str, str]]
    #: Per concept: its images and per attribute how often it was seen.
    concepts: dict[str, Any]
    #: --check-cub: precision and recall against CUB's own attribute labels.
    check_cub: dict[str, Any] | None
    durations: dict[str, float]
    warnings: list[str]
    #: --batch: what the batches did (`finer.models.batch`), added after the run.
    batch: NotRequired[dict[str, Any]]


class BuildKnowledge(TypedDict):
    """build.json's ``knowledge``: where descriptions, attributes and coarse labels came from, and the
    calls that took (`finer.data.knowledge`); without knowledge only the tallies."""

    enabled: bool
    #: Per knowledge status (found, missing, ...) and per attribute extractor: how many concepts.
    status: dict[str, int]
    extractors: dict[str, int]
    calls: int
    cache_hits: int
    failed_calls: NotRequired[int]
    #: With knowledge: the extractor used, the Wikipedia fetch and the extraction's own reports.
    extractor: NotRequired[str]
    wikipedia: NotRequired[dict[str, Any] | None]
    attributes: NotRequired[dict[str, Any]]
    #: An LLM coarse labeller's report.
    coarse_llm: NotRequired[dict[str, Any]]


class BuildRecord(TypedDict):
    """``build.json``: what one `finer build` did (`finer.data.build`), written last, so only a finished
    build has it; read by the dataset card and upload (`finer.hub`) and `finer inspect`."""

    source: str
    built_at: str
    #: The `BuildConfig` as a dict, URLs stripped of any credentials.
    options: dict[str, Any]
    versions: dict[str, str]
    #: Rows written per split.
    counts: dict[str, int]
    #: How many concepts (classes) the build holds.
    concepts: int
    #: Per origin of the coarse labels ("source", "rules", "llm", ...): how many concepts.
    coarse_sources: dict[str, int]
    knowledge: BuildKnowledge
    #: Per split, the unreadable images: {"image_id", "reason"}.
    skipped: dict[str, list[dict[str, str]]]
    #: Seconds per step ("concepts_s", "<split>_s", "total_s").
    durations: dict[str, float]
    rows_per_s: float | None
    warnings: list[str]
    #: --batch: what the batches did (`finer.models.batch`), added after the build.
    batch: NotRequired[dict[str, Any]]
