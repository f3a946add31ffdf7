"""`finer eval`: ask a model about every image of a split at one or three levels, score, and report.

The run is resumable by construction: each answer is appended to ``predictions.jsonl`` (and flushed) as
soon as it exists, keyed by everything it depends on (model, adapter and dataset by their *content*
fingerprints, mode, level, options, template hash, image id), and a re-run asks only for the keys the file
lacks. Metrics, report and chart are then recomputed from the whole file (`finer.eval.report`), so a crash,
a `--limit` raised later, or a second mode evaluated into the same folder all end in one consistent report.
A retrained adapter saved at the same path is asked again (both runs stay in the report); a folder that
holds answers about another dataset (or another build of it) is refused unless ``--overwrite`` empties it.
An image that cannot be read is skipped, recorded and counted (`finer.models.backends`), never the end of
the run; replies are stored up to `MAX_STORED_CHARS` characters. With `--batch` (`finer.models.batch`) an
endpoint's answers come through the Batch API and reach the run through a reply cache of its own
(`_reply_cache`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from finer.appendlog import AppendLog
from finer.cache import cache_key
from finer.errors import FinerError
from finer.eval.distractors import DEFAULT_MODEL, Neighbours, check_distractors, distractor_setup
from finer.eval.report import PREDICTIONS_FILE, REPORT_FILES, write_report
from finer.eval.tasks import MODE_TEMPLATES, MODES, EvalPlan, Task
from finer.models.backends import Backend, Generation, HFBackend, OpenAIBackend
from finer.models.fingerprint import files_fingerprint, weights_fingerprint
from finer.models.images import crop_box
from finer.prompts import template_sha256
from finer.records import EvalRun, PredictionRecord
from finer.run_folder import OutputLock

__all__ = ["BACKENDS", "BATCH_CACHE", "EvalConfig", "PredictionLog", "evaluate", "load_split"]

BACKENDS: tuple[str, ...] = ("hf", "openai")
#: The reply cache of `finer eval --batch` without `--cache`: inside the eval folder, beside its answers.
BATCH_CACHE = ".replies"
#: Columns every mode reads; `image` and `attributes_required` are needed per mode.
LABEL_COLUMNS: tuple[str, ...] = ("image_id", "superordinate", "coarse", "fine")
#: A reply is stored up to this many characters (its answer part kept, `stored_truncated` set): a model
#: that rambles for megabytes must not make a predictions file of gigabytes.
MAX_STORED_CHARS = 4000
_MARKER_RE = re.compile("answer:", re.IGNORECASE)  # the marker `extract_answer` looks for


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
    #: --backend openai: seconds per request and retries (None: the shared client's defaults).
    timeout: float | None = None
    max_retries: int | None = None
    #: --backend openai: a folder to keep replies in and read them from (`--cache`; `--batch` leaves its
    #: answers there for the run). None keeps none: predictions.jsonl is the record.
    cache: Path | None = None
    limit: int | None = None
    gold_parent: bool = False
    choices: int = 5
    temperature: float = 0.0
    max_new_tokens: int = 128
    prompts_dir: Path | None = None
    finer_original: bool = False
    seed: int = 0
    crop_to_bbox: bool = False
    distractors: str = "siblings"
    distractor_model: str = DEFAULT_MODEL
    distractor_space: str = "text"
    overwrite: bool = False


def _check(config: EvalConfig) -> None:
    if config.mode not in MODES:
        raise FinerError(f"unknown mode {config.mode!r}; choose one of {', '.join(MODES)}")
    if config.backend not in BACKENDS:
        raise FinerError(f"unknown backend {config.backend!r}; choose one of {', '.join(BACKENDS)}")
    if config.adapter and config.backend != "hf":
        raise FinerError("--adapter needs --backend hf: an endpoint serves its own weights")
    if not 2 <= config.choices <= 26:
        raise FinerError(f"--choices must be between 2 and 26, not {config.choices}")
    check_distractors(config.distractors, config.distractor_space)
    if config.distractors != "siblings" and config.mode != "choice":
        raise FinerError(f"--distractors {config.distractors} needs --mode choice")
    if config.temperature < 0 or config.max_new_tokens < 1 or config.batch_size < 1:
        raise FinerError("--temperature must be >= 0, --max-new-tokens and --batch-size >= 1")


def load_split(dataset: str, split: str, columns: list[str]) -> tuple[Any, list[dict[str, Any]]]:
    """One split of a built dataset (a `finer build` folder or a Hub repo) and its concepts.

    The concepts (for distractors and closed lists) come from concepts.jsonl beside a local dataset or the
    `concepts` config of a Hub repo, else from the split's own rows. Raises a one-line `FinerError` when
    the split or a needed column is missing.
    """
    rows, concepts, _ = _open_split(dataset, split, columns)
    return rows, concepts


def _open_split(dataset: str, split: str, columns: list[str]) -> tuple[Any, list[dict[str, Any]], str]:
    """`load_split` plus the dataset's fingerprint: the content of every split of a local folder (its
    Arrow files: a rebuild with the same rows, or a copy, is the same dataset; other rows or pixels are
    not), or of the one split of a Hub repo."""
    from finer.data.datasets_io import load_built, load_concepts, pick_split  # `datasets`: not for --help

    loaded = load_built(dataset, "--dataset", split=split)
    rows = pick_split(loaded, split, "--dataset", dataset, columns)
    concepts = load_concepts(dataset, LABEL_COLUMNS[1:])
    if concepts is None:
        concepts = rows.select_columns(list(LABEL_COLUMNS[1:])).to_list()
    parts = {name: _content(part) for name, part in loaded.items()} if hasattr(loaded, "items") else {}
    return rows, concepts, cache_key(parts or _content(rows))[:16]


def _content(split: Any) -> str:
    """A split's identity by content; `datasets`' own fingerprint (new with every build) when it has no
    files behind it."""
    files = [Path(entry["filename"]) for entry in split.cache_files]
    return files_fingerprint(files) if files else split._fingerprint


def _stored(text: str) -> tuple[str, bool]:
    """``text`` cut to `MAX_STORED_CHARS` (and whether it was cut): its head, and from its last "Answer:"
    on when that lies further back, so that what scoring reads survives the cut."""
    if len(text) <= MAX_STORED_CHARS:
        return text, False
    half = MAX_STORED_CHARS // 2
    last = max((match.start() for match in _MARKER_RE.finditer(text)), default=0)
    if last < half:
        return text[:MAX_STORED_CHARS], True
    dropped = len(text) - half - min(half, len(text) - last)
    return f"{text[:half]}\n[… {dropped} characters not stored …]\n{text[last : last + half]}", True


class PredictionLog:
    """``predictions.jsonl``: append-only, one flushed line per answer; a `Sink` for the backends.

    A last line torn by a crash is cut off before the first append (`finer.appendlog`).
    """

    def __init__(self, log: AppendLog, recorded_skips: set[str] | None = None) -> None:
        """``recorded_skips``: keys whose image the file already records as unreadable (not written twice)."""
        self.log = log
        self.answered = 0
        self.failures: list[str] = []
        self.unreadable: list[str] = []
        self.recorded_skips = recorded_skips or set()
        self._bar: tqdm | None = None

    def start(self, total: int) -> None:
        """Show progress over the ``total`` questions about to be asked."""
        self._bar = tqdm(total=total, desc="eval", unit=" q", dynamic_ncols=True, disable=None)

    def done(self, task: Task, turns: list[Generation]) -> None:
        prediction, cut = _stored(turns[-1].text)
        record: PredictionRecord = {
            **task.record,
            "prediction": prediction,
            "truncated": turns[-1].truncated,
            "stored_truncated": cut,
        }
        if task.attributes_turn is not None:
            said = turns[task.attributes_turn]
            attributes, cut = _stored(said.text)
            record["attributes"], record["attributes_truncated"] = attributes, said.truncated
            record["stored_truncated"] |= cut
        if len(turns) > 2:  # the finer replay: the group the model named first
            stored = [_stored(turn.text) for turn in turns[:-1]]
            record["turns"] = [text for text, _ in stored]
            record["stored_truncated"] |= any(cut for _, cut in stored)
        self.log.write(record)
        self.answered += 1
        if self._bar is not None:
            self._bar.update()

    def failed(self, task: Task, reason: str) -> None:
        """Not written: the next run asks again."""
        self.failures.append(f"{task.record['image_id']} ({task.record['level']}): {reason}")
        if self._bar is not None:
            self._bar.update()

    def skipped(self, task: Task, reason: str) -> None:
        """Its image is unreadable: recorded once (the report counts it), tried again by the next run."""
        self.unreadable.append(f"{task.record['image_id']} ({task.record['level']}): {reason}")
        if task.key not in self.recorded_skips:
            skipped: PredictionRecord = {**task.record, "skipped": reason}
            self.log.write(skipped)
            self.recorded_skips.add(task.key)
        if self._bar is not None:
            self._bar.update()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self.log.close()


def _make_backend(config: EvalConfig, run: EvalRun) -> Backend:
    if config.backend == "openai":
        return OpenAIBackend(
            config.model,
            config.base_url,
            concurrency=config.concurrency,
            temperature=config.temperature,
            max_new_tokens=config.max_new_tokens,
            template_sha256=run["template_sha256"],
            timeout=config.timeout,
            max_retries=config.max_retries,
            cache=_reply_cache(config.cache, run),
        )
    return HFBackend(
        config.model,
        config.adapter,
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=config.seed,
    )


def _reply_cache(cache: Path | None, run: EvalRun) -> Path | None:
    """The run's own part of the reply cache (`--cache`, `--batch`): one folder per run identity, so a reply
    is reused only by the run that asked for it (another `--seed` at a `--temperature` above 0 samples
    anew, as the identity's seed says), whatever other runs share the cache."""
    return None if cache is None else Path(cache).expanduser() / f"eval-{cache_key(run)[:16]}"


def _run_identity(config: EvalConfig, template_hash: str, dataset_fingerprint: str) -> EvalRun:
    """What every answer of this run depends on besides its image and level: part of each key and record.

    The model and adapter count by their content (`weights_fingerprint`), so one retrained at the same path
    is asked again; an endpoint's model by its name. The seed only matters for choice distractors and
    sampling.
    """
    local = config.backend == "hf"
    run: EvalRun = {
        "model": config.model,
        "adapter": config.adapter,
        "backend": config.backend,
        "model_fingerprint": weights_fingerprint(config.model) if local else None,
        "adapter_fingerprint": weights_fingerprint(config.adapter),
        "dataset_fingerprint": dataset_fingerprint,
        "mode": config.mode,
        "template_sha256": template_hash,
        "split": config.split,
        "gold_parent": config.gold_parent,
        "choices": config.choices if config.mode == "choice" else None,
        "seed": config.seed if config.mode == "choice" or config.temperature > 0 else None,
        "temperature": config.temperature,
        "max_new_tokens": config.max_new_tokens,
    }
    if config.crop_to_bbox:
        run["crop_to_bbox"] = True
    return run


def _check_folder(
    config: EvalConfig, out: Path, answers: AppendLog, run: dict[str, Any], warnings: list[str]
) -> tuple[set[str], set[str]]:
    """The keys ``out`` has answered and those it records as unreadable; refuses (one line) a folder that
    holds answers about another dataset, and warns when the model or adapter at the same path changed."""
    done: set[str] = set()
    skips: set[str] = set()
    runs: dict[str, dict[str, Any]] = {}
    for record in answers.records():
        (skips if "skipped" in record else done).add(record.get("key", ""))
        if isinstance(record.get("run"), dict):
            runs.setdefault(json.dumps(record["run"], sort_keys=True), record["run"])
    for other in runs.values():
        if other.get("dataset_fingerprint") != run["dataset_fingerprint"]:
            raise FinerError(
                f"--out {out} holds answers about another dataset (or another build of it) than "
                f"--dataset {config.dataset}; pass --overwrite to start afresh, or choose another --out"
            )
    for field in ("model", "adapter"):
        if run[field] and any(
            other.get(field) == run[field]
            and other.get(f"{field}_fingerprint") != run[f"{field}_fingerprint"]
            for other in runs.values()
        ):
            warnings.append(
                f"the {field} at {run[field]} changed since {out} was written: asked again; "
                "the report keeps the earlier answers as a run of their own"
            )
    return done, skips - done


def _answer_warnings(run: dict[str, Any]) -> list[str]:
    """Empty answers (scored as wrong) and replies cut for storage in one run of the report, if any."""
    warnings = []
    if empty := sum(level["empty"] for level in run["levels"].values()):
        warnings.append(f"{run['label']}: {empty} empty answer(s), scored as wrong")
    if cut := sum(level["stored_truncated"] for level in run["levels"].values()):
        warnings.append(f"{run['label']}: {cut} reply(ies) stored cut to {MAX_STORED_CHARS} characters")
    return warnings


def evaluate(config: EvalConfig, backend: Backend | None = None) -> dict[str, Any]:
    """Run (or resume) one evaluation into ``config.out`` and rewrite its metrics, report and chart.

    ``backend`` replaces the one the config names (tests, or a model already in memory). Returns the
    metrics with what this call did: ``asked``, ``answered``, ``failed``, ``warnings`` and ``usage``.
    """
    _check(config)
    with OutputLock(config.out):  # a second eval into the same folder is refused, not asked twice
        return _evaluate(config, backend)


def _evaluate(config: EvalConfig, backend: Backend | None) -> dict[str, Any]:
    """`evaluate`'s body, run while holding ``config.out``'s lock."""
    columns = list(LABEL_COLUMNS)
    columns += ["attributes_required"] if config.mode == "probe" else ["image"]
    columns += ["bbox"] if config.crop_to_bbox else []
    rows_ds, concepts, dataset_fingerprint = _open_split(config.dataset, config.split, columns)
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
    drawn: dict[str, Any] = {}
    neighbours: Neighbours | None = None
    if config.mode == "choice":
        drawn, neighbours = distractor_setup(
            config.distractors,
            config.dataset,
            concepts,
            model=config.distractor_model,
            space=config.distractor_space,
        )
        warnings += [f"distractors: {warning}" for warning in (neighbours.warnings if neighbours else ())]
    plan = EvalPlan(
        run={**_run_identity(config, template_hash, dataset_fingerprint), **drawn},
        concepts=concepts,
        neighbours=neighbours.levels if neighbours else None,
        images=image if image_column else None,
        prompts_dir=config.prompts_dir,
    )
    levels = plan.levels(config.level)
    if config.mode == "choice" and config.level == "all" and len(levels) < 3:
        warnings.append(f"choice: only {', '.join(levels)} offer two or more labels to choose from")

    out = Path(config.out).expanduser()
    if out.exists() and not out.is_dir():
        raise FinerError(f"--out {out} is a file; pass a folder")
    if config.overwrite:
        for name in (PREDICTIONS_FILE, *REPORT_FILES):
            (out / name).unlink(missing_ok=True)
    answers = AppendLog(out / PREDICTIONS_FILE)
    done, recorded_skips = _check_folder(config, out, answers, plan.run, warnings)
    pending: dict[str, tuple[int, str]] = {}
    for index, row in enumerate(rows):
        for level in levels:
            if plan.askable(row, level) and (key := plan.key(row, level)) not in done:
                pending.setdefault(key, (index, level))
    if pending and backend is None:
        backend = _make_backend(config, plan.run)  # loads the model: only when there is work
    out.mkdir(parents=True, exist_ok=True)
    log = PredictionLog(answers, recorded_skips)
    try:
        if pending:
            log.start(len(pending))
            tasks = (plan.task(index, rows[index], level) for index, level in pending.values())
            backend.run(tasks, log)  # type: ignore[union-attr]
    finally:
        log.close()
    if log.unreadable:
        warnings.append(
            f"skipped {len(log.unreadable)} question(s) whose image cannot be read "
            f"(e.g. {log.unreadable[0]}); listed in {out / PREDICTIONS_FILE} as 'skipped', "
            "asked again by the next run"
        )
    if log.failures:
        if not log.answered:
            raise FinerError(f"every request failed, e.g. {log.failures[0]}")
        warnings.append(
            f"{len(log.failures)} of {len(pending)} requests failed (e.g. {log.failures[0]}); "
            "run the same command again to retry them"
        )
    counted = getattr(backend, "usage", None)  # an endpoint's calls, tokens and cost (--backend openai)
    usage = counted.usage_json() if counted is not None else None
    metrics = write_report(out, finer_original=config.finer_original, usage=usage)
    identity = json.dumps(plan.run, sort_keys=True)
    current = next((r for r in metrics["runs"] if json.dumps(r["run"], sort_keys=True) == identity), None)
    if current is not None:
        warnings += _answer_warnings(current)
    return {
        **metrics,
        "current": current["label"] if current else None,
        "asked": len(pending),
        "answered": log.answered,
        "failed": len(log.failures),
        "skipped": len(log.unreadable),
        "warnings": warnings,
        "usage": usage,
    }
