"""The result files finer writes, typed once: each record's keys are declared here, and the code that
writes a file and the code that reads it both go through these types (docs/design.md §7.1).

They are `TypedDict`s: a record is a JSON document passed around as a dict, so the on-disk JSON is the
dict itself, unchanged, and a file written by an older finer (an optional key missing, or one more key)
still loads. Optional keys are `NotRequired` (no `from __future__ import annotations` here: it would hide
`NotRequired` from `__optional_keys__`).

A file is read through its `read_*` function (`read_record`): one that cannot be read, is not JSON or
lacks a key its record requires is a one-line `FinerError` naming the file and the fix, not a `KeyError`
far from it.
"""

import json
import types
from pathlib import Path
from typing import (
    Any,
    NotRequired,
    TypedDict,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

from finer.appendlog import AppendLog
from finer.errors import FinerError, one_line
from finer.run_folder import RUN_FILE

__all__ = [
    "BUILD_FILE",
    "GROUNDING_FILE",
    "CELL_FILE",
    "COMPOSE_FILE",
    "CURRICULUM_FILE",
    "GRID_FILE",
    "METRICS_FILE",
    "GRID_RESULTS_FILE",
    "SOURCE_FILE",
    "STAGE_EVAL_FILE",
    "STAGE_FILE",
    "BuildKnowledge",
    "BuildRecord",
    "CellRecord",
    "ClassMetrics",
    "ComposeRecord",
    "CurriculumRecord",
    "EvalRun",
    "GridRecord",
    "GroundedImages",
    "GroundingRecord",
    "GroundingResult",
    "GroundingSkip",
    "GroundingVerdicts",
    "LevelMetrics",
    "MetricsRecord",
    "PredictionRecord",
    "RunMetrics",
    "RunRecord",
    "SourceRecord",
    "SplitScores",
    "StageEvalRecord",
    "StageEvaluation",
    "StageRecord",
    "StageSummary",
    "UsageCounts",
    "read_build_file",
    "read_cell_file",
    "read_compose_file",
    "read_grid_file",
    "read_grounding_results",
    "read_metrics_file",
    "read_record",
    "read_run_file",
    "read_source_file",
    "read_stage_eval_file",
    "read_stage_file",
    "record_problem",
]

BUILD_FILE = "build.json"
GROUNDING_FILE = "grounding.json"
METRICS_FILE = "metrics.json"
CELL_FILE = "cell.json"
STAGE_FILE = "stage.json"
#: `finer ablate`: the grid's shared settings, a pretraining's models; its table as JSON: every cell's
#: `CellRecord`, in grid order.
GRID_FILE = "grid.json"
SOURCE_FILE = "source.json"
GRID_RESULTS_FILE = "results.json"
#: Beside a composed model's weights (`finer compose`).
COMPOSE_FILE = "compose.json"
#: `finer curriculum`: a stage's scores, the whole run's summary.
STAGE_EVAL_FILE = "eval.json"
CURRICULUM_FILE = "curriculum.json"

Record = TypeVar("Record")


def record_problem(value: Any, kind: Any, where: str = "") -> str | None:
    """What keeps the JSON ``value`` from being a ``kind`` (a record type, or a list, mapping or union
    of them): the keys a record in it requires and lacks, or a record, list or mapping in it of another
    JSON type, named by its path (``runs[0].levels``); None when there is nothing. Scalars are left to
    their readers."""
    origin, args = get_origin(kind), get_args(kind)
    if is_typeddict(kind):
        if not isinstance(value, dict):
            return f"`{where}` is not a JSON object" if where else "not a JSON object"
        hints = get_type_hints(kind)
        missing = [key for key in hints if key in kind.__required_keys__ and key not in value]
        if missing:
            return "lacks " + ", ".join(f"`{_member(where, key)}`" for key in missing)
        for key, hint in hints.items():
            if key in value and (problem := record_problem(value[key], hint, _member(where, key))):
                return problem
    elif origin is list:
        if not isinstance(value, list):
            return f"`{where}` is not a list"
        for index, item in enumerate(value):
            if problem := record_problem(item, args[0], f"{where}[{index}]"):
                return problem
    elif origin is dict:
        if not isinstance(value, dict):
            return f"`{where}` is not a JSON object"
        for key, item in value.items():
            if problem := record_problem(item, args[1], _member(where, key)):
                return problem
    elif origin in (Union, types.UnionType) and value is not None:
        arms = [arm for arm in args if arm is not type(None)]
        if len(arms) == 1:
            return record_problem(value, arms[0], where)
    return None


def _member(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def read_record(path: Path, kind: type[Record], fix: str) -> Record:
    """The ``kind`` record the JSON file ``path`` holds, with any key it does not declare kept (a newer
    finer may add some); a one-line `FinerError` naming the file, what is wrong and ``fix`` when it
    cannot be read, is not JSON, or lacks what ``kind`` requires (`record_problem`)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise FinerError(f"{path}: cannot be read ({err.strerror or one_line(err)}); {fix}") from None
    except ValueError as err:
        raise FinerError(f"{path}: not valid JSON ({one_line(err)}); {fix}") from None
    if problem := record_problem(value, kind):
        raise FinerError(f"{path}: {problem}; {fix}")
    return value


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


class ClassMetrics(TypedDict):
    """The scores of a set of answers (`finer.eval.report`): modified EM, strict EM and F1, each a mean
    over ``count`` answers."""

    count: int
    em: float
    strict_em: float
    f1: float


class LevelMetrics(ClassMetrics):
    """One run's scores at one level, with what its answers were and the same scores per class."""

    #: Answers cut at the token limit.
    truncated: int
    #: Per class (its fine label): its scores.
    per_class: dict[str, ClassMetrics]
    #: Empty answers (scored as wrong), replies stored cut, questions whose image could not be read (not
    #: scored); a metrics.json of an older finer lacks them.
    empty: NotRequired[int]
    stored_truncated: NotRequired[int]
    skipped: NotRequired[int]
    #: --mode choice: per kind of distractor, {"offered": n, "chosen": n} (`finer.eval.distractors`).
    distractor_kinds: NotRequired[dict[str, dict[str, int]]]


class RunMetrics(TypedDict):
    """One run of an evaluation folder: its short label (`finer compare`'s column), identity and scores."""

    label: str
    #: The run's `EvalRun`; a dict, as older files may hold other fields.
    run: dict[str, Any]
    #: Per level asked (superordinate, coarse, fine).
    levels: dict[str, LevelMetrics]


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


class MetricsRecord(TypedDict):
    """``metrics.json``: the scores of every run in an evaluation folder, recomputed from its
    ``predictions.jsonl`` by `finer.eval.report.write_report` (``finer eval``), read by ``finer
    compare``; `finer.eval.engine.evaluate` returns it with what the call did."""

    #: "ours" or "finer-original" (``--finer-original``).
    rules: str
    #: Answers scored (questions with an unreadable image are not).
    predictions: int
    runs: list[RunMetrics]
    #: --backend openai: the last `finer eval` call's endpoint calls, tokens and cost (per endpoint too).
    usage: NotRequired[UsageCounts]
    #: --batch: what the batches did (`finer.models.batch`), added after the run.
    batch: NotRequired[dict[str, Any]]


def read_metrics_file(folder: Path) -> MetricsRecord:
    """``folder``'s `MetricsRecord` (`read_record`)."""
    return read_record(
        folder / METRICS_FILE,
        MetricsRecord,
        f"run the same `finer eval --out {folder}` again to recompute it from predictions.jsonl",
    )


class SplitScores(TypedDict):
    """The fine (and, in the finer format, coarse) accuracy of a model's generations on one split
    (``train/evaluate.py``'s `evaluate_fine`): finer_run.json's ``eval`` and a curriculum stage's scores."""

    split: str
    images: int
    fine_accuracy: float
    #: One over the number of classes.
    chance: float
    #: Up to four fine-level answers: {"fine", "answers"}.
    samples: list[dict[str, Any]]
    #: Questions left without an answer (a failed generation, an unreadable image); finer_run.json files
    #: of the first finer lack it.
    failed: NotRequired[int]
    #: The finer format only.
    coarse_accuracy: NotRequired[float]


class RunRecord(TypedDict):
    """``finer_run.json``: the summary of a finished training run, written last by `finer finetune` (SFT)
    and `finer grpo` (``train/runtime.py``'s `write_run_file`), read by the model card and the curriculum.
    Its required keys are those every finer version wrote; keys only one trainer writes, or added later,
    are `NotRequired`."""

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
    #: --eval-split: the accuracy of generations after training.
    eval: NotRequired[SplitScores]
    # GRPO only.
    reward_weights: NotRequired[dict[str, float]]
    rewards: NotRequired[list[float]]
    reward_components: NotRequired[dict[str, list[float]]]


def read_run_file(folder: Path) -> RunRecord:
    """The `RunRecord` in the training output folder ``folder`` (`read_record`)."""
    return read_record(folder / RUN_FILE, RunRecord, f"delete {folder} and train it again")


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
    #: --backend openai: the last `finer eval` call's endpoint calls, tokens and cost (per endpoint too).
    usage: NotRequired[UsageCounts]
    #: --batch: what the batches did (`finer.models.batch`), added after the run.
    batch: NotRequired[dict[str, Any]]


class GroundingResult(TypedDict):
    """One line of ``grounding.jsonl``, `finer ground`'s results log (`finer.data.grounding`): what became
    of one image, keyed by all its verdicts depend on. ``status`` says which it is: "ok"
    (`GroundingVerdicts`) or "skipped" (`GroundingSkip`). A failed call writes no line: it is asked again."""

    key: str
    split: str
    image_id: str
    status: str


class GroundingVerdicts(GroundingResult):
    """An image the model answered about (``status`` "ok")."""

    #: Per attribute listed and answered: "visible", "not visible" or "unsure".
    answers: dict[str, str]
    #: The attributes answered "visible", in the order they were listed.
    visible: list[str]
    #: How many answered names were not in the list.
    dropped: int


class GroundingSkip(GroundingResult):
    """An image that could not be read (``status`` "skipped")."""

    reason: str


_GROUNDING_RESULTS: dict[str, type[GroundingResult]] = {"ok": GroundingVerdicts, "skipped": GroundingSkip}


def read_grounding_results(path: Path) -> dict[str, GroundingResult]:
    """The records of a ``grounding.jsonl`` by key. A line torn by a kill is no record (its image is asked
    again, `AppendLog`); a whole line that is not a record of its status is a one-line `FinerError`."""
    results: dict[str, GroundingResult] = {}
    for record in AppendLog(path).records():
        problem = record_problem(record, GroundingResult)
        if problem is None:
            status = record["status"]
            kind = _GROUNDING_RESULTS.get(status) if isinstance(status, str) else None
            problem = record_problem(record, kind) if kind else f"has status {status!r}, not ok or skipped"
        if problem is not None:
            raise FinerError(
                f"{path}: the record of image {record.get('image_id')!r} {problem}; delete the file to "
                "ground those images again (cached replies cost no calls)"
            )
        results[record["key"]] = record
    return results


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


def read_build_file(folder: Path) -> BuildRecord:
    """``folder``'s `BuildRecord` (`read_record`)."""
    return read_record(folder / BUILD_FILE, BuildRecord, "run its `finer build` again with --overwrite")


class CellRecord(TypedDict):
    """``cell.json``: one cell of `finer ablate`'s grid and its result (``train/ablate.py``), written with
    ``status`` "running" before the cell makes anything (so the folder records the model ids it is made
    from) and again when it is done or failed; a done cell is not run again."""

    #: The cell's axes: the full vision and language model ids, pretraining policy and training format.
    vision: str
    llm: str
    pretrain: str
    format: str
    #: Its folder's name under cells/.
    name: str
    #: "running", "done" or "failed".
    status: str
    #: A failed cell: the step that failed (compose, pretrain, finetune, eval) and its one-line error.
    stage: str | None
    error: str | None
    #: The evaluation's mode and modified EM per level (coarse, fine), and how many images it asked.
    mode: str | None
    scores: dict[str, float]
    images: int
    #: Written when the cell is over.
    duration_s: NotRequired[float]


def read_cell_file(folder: Path) -> CellRecord:
    """The `CellRecord` in the cell folder ``folder`` (`read_record`)."""
    return read_record(folder / CELL_FILE, CellRecord, f"delete {folder} to run the cell again")


class StageRecord(TypedDict):
    """``stage.json``: one stage of `finer curriculum` (``train/curriculum.py``), written before it
    trains; its hash tells a stage run under other settings (then refused unless --overwrite)."""

    name: str
    #: "sft" or "grpo".
    trainer: str
    #: Of the trainer, the stage's config (but its logging cadence) and the previous stage's hash.
    hash: str
    #: The trainer's config dataclass as a dict (`dataclasses.asdict`), model and output folder filled in.
    config: dict[str, Any]


def read_stage_file(folder: Path) -> StageRecord:
    """The `StageRecord` in the stage folder ``folder`` (`read_record`)."""
    return read_record(
        folder / STAGE_FILE, StageRecord, "pass --overwrite to re-run the stage and those after it"
    )


class StageEvaluation(TypedDict):
    """How `finer curriculum` scores every stage (curriculum.json's ``eval``); in a stage's eval.json, with
    the stage's ``prompts_dir`` when it sets one."""

    split: str
    datasets: list[str]
    #: The training format asked in: "finer" (coarse and fine) or "direct" (fine).
    format: str
    crop_to_bbox: bool
    batch_size: int
    max_new_tokens: int
    prompts_dir: NotRequired[str]


class StageEvalRecord(TypedDict):
    """``eval.json``: a curriculum stage's scores and the settings they were computed under
    (``train/curriculum.py``), reused while a later run's settings are the same."""

    settings: StageEvaluation
    scores: SplitScores


def read_stage_eval_file(folder: Path) -> StageEvalRecord:
    """The `StageEvalRecord` in the stage folder ``folder`` (`read_record`)."""
    return read_record(folder / STAGE_EVAL_FILE, StageEvalRecord, "delete it to score the stage again")


class StageSummary(TypedDict):
    """One stage of a `finer curriculum` run, as the summary (and its table) tells it."""

    stage: int
    name: str
    trainer: str
    #: "trained", "resumed" or "skipped" (finished earlier).
    status: str
    hash: str
    #: The weights it started from; ``model`` the merged ones it ended with.
    started_from: str
    model: str
    #: Per part (vision, projector, llm): its training policy.
    parts: dict[str, str]
    global_step: int
    final_loss: float | None
    final_reward: float | None
    train_duration_s: float | None
    #: None when the curriculum evaluates nothing (``eval_split: null``).
    eval: SplitScores | None
    duration_s: float


class CurriculumRecord(TypedDict):
    """``curriculum.json``: the summary of the last `finer curriculum` invocation (``train/curriculum.py``),
    written last; the command prints it as a table."""

    model: str
    output_dir: str
    final_model: str
    eval: StageEvaluation | None
    stages: list[StageSummary]
    duration_s: float
    versions: dict[str, str]


class GridRecord(TypedDict):
    """``grid.json``: what every cell of a `finer ablate` folder shares (``train/ablate.py``'s
    `GridConfig.settings`: the grid file but its axes and ``out``), written when a run claims the folder; a
    later run into it must share them."""

    datasets: list[str]
    pretrain_datasets: list[str] | None
    #: `finer compose` options, the two training runs' FinetuneConfig keys, the evaluation's EvalConfig keys.
    compose: dict[str, Any]
    pretraining: dict[str, Any]
    finetuning: dict[str, Any]
    evaluation: dict[str, Any]


def read_grid_file(out: Path) -> GridRecord:
    """The `GridRecord` of the grid folder ``out`` (`read_record`)."""
    return read_record(out / GRID_FILE, GridRecord, f"choose another --out (or delete {out} to start over)")


class SourceRecord(TypedDict):
    """``source.json``: the full model ids a `finer ablate` pretraining folder pretrains, and its policy,
    written before it trains; a run with other ids under the same folder name is refused."""

    vision: str
    llm: str
    pretrain: str


def read_source_file(folder: Path) -> SourceRecord:
    """The `SourceRecord` in the pretraining folder ``folder`` (`read_record`)."""
    return read_record(folder / SOURCE_FILE, SourceRecord, f"delete {folder} to pretrain it again")


class ComposeRecord(TypedDict):
    """``compose.json``: what a composed model was made from and how (`finer compose`,
    ``train/compose.py``), written beside its weights; `finer ablate` checks a reused model's ids in it."""

    #: The `ComposeConfig`; ``out`` the folder written, ``dtype`` the weights' own.
    vision: str
    llm: str
    out: str
    overwrite: bool
    vision_feature_layer: int
    dtype: str
    image_token: str
    seed: int
    #: The encoder family (clip, siglip, dinov2) and its token layout ("default" drops a CLS token).
    encoder: str
    vision_feature_select_strategy: str
    #: Image tokens per image, and the processed image's [height, width].
    image_tokens: int
    image_size: list[int]
    #: Per part (vision, projector, llm): its parameter count.
    parameters: dict[str, int]
    versions: dict[str, str]


def read_compose_file(folder: Path) -> ComposeRecord:
    """The `ComposeRecord` in the composed model's folder ``folder`` (`read_record`)."""
    return read_record(folder / COMPOSE_FILE, ComposeRecord, f"delete {folder} to compose it again")
