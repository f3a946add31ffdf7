"""`finer ablate GRID.yaml`: the "eyes vs brain" study (docs/design.md §1, Ghosh et al.) as one resumable
grid.

Every cell, a vision encoder x a language model x a pretraining policy x a training format, is composed
(`finer compose`), pretrained on image -> caption with the language model frozen, LoRA-adapted or trained in
full (`none`: not pretrained), merged, fine-tuned in its format (`finer finetune`) and evaluated at the coarse
and fine levels (`finer eval`, hf backend). Cells share what they can: one composed model per encoder x LLM
pair, one pretraining per pair x policy.

    OUT/grid.json                       the shared settings (a later run of the same OUT must match them)
    OUT/models/V__L/                    composed models
    OUT/pretrained/V__L__P/adapter/     the pretraining run; model/ its merged weights; source.json its models
    OUT/cells/V__L__P__F/finetune/      the fine-tuning run; eval/ the evaluation; cell.json the result
    OUT/results.{md,csv,json,png}       the table and the chart, rewritten after every cell

Folders are named by the last component of each model id, so every one records the full ids it was made
from (compose.json, source.json, cell.json), and a run refuses a folder made from other ids under the same
names (`openai/x` and `me/x`) before anything runs. Each JSON file is a record of `finer.records`.

A cell whose cell.json (`finer.records.CellRecord`) says done is not run again, so growing an axis runs only
the new cells. A failed cell is reported (stage and one-line error in the table, traceback in its
error.log), the grid goes on, and the next run tries it again; an unfinished training run resumes from its
last checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import re
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from finer.errors import FinerError, one_line
from finer.eval.tasks import FINER_LEVELS
from finer.records import (
    CELL_FILE,
    COMPOSE_FILE,
    GRID_FILE,
    GRID_RESULTS_FILE,
    SOURCE_FILE,
    CellRecord,
    GridRecord,
    SourceRecord,
    read_cell_file,
    read_compose_file,
    read_grid_file,
    read_source_file,
)
from finer.run_folder import OutputLock, staged_subfolder, write_json

from .compose import DTYPES, ComposeConfig, compose
from .config import SourcedConfig
from .runs import release_memory
from .runtime import RUN_FILE, unfinished_checkpoint
from .sft import FinetuneConfig, load_recipe, run_finetune

__all__ = ["CELL_FILE", "GRID_FILE", "Cell", "GridConfig", "load_grid", "run_grid", "write_results"]

logger = logging.getLogger(__name__)

RESULTS = Path(GRID_RESULTS_FILE).stem  # .md, .csv, .json, .png
PretrainPolicy = Literal["none", "frozen", "lora", "full"]
CellFormat = Literal["direct", "finer"]
#: Pretraining learning rate per language-model policy (the projector alone takes LLaVA's 1e-3; a language
#: model trained in full needs LLaVA's fine-tuning rate); a grid's `pretraining.learning_rate` overrides it.
PRETRAIN_LEARNING_RATES = {"frozen": 1e-3, "lora": 2e-4, "full": 2e-5}
#: Training keys the grid sets per cell; `pretraining` may not set `train_llm` either (it is the axis).
MANAGED = ("model", "datasets", "output_dir", "format", "tiny_model", "resume", "overwrite")
EVAL_KEYS = (
    "dataset",
    "split",
    "limit",
    "batch_size",
    "max_new_tokens",
    "gold_parent",
    "finer_original",
    "crop_to_bbox",
)
COMPOSE_KEYS = ("vision_feature_layer", "dtype", "image_token", "seed")


def _label(spec: str) -> str:
    """A short, path-safe name of a model id or folder: its last component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(spec.rstrip("/")).name) or "model"


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    vision: str
    llm: str
    pretrain: str
    format: str

    @property
    def pair(self) -> str:
        return f"{_label(self.vision)}__{_label(self.llm)}"

    @property
    def pretrained(self) -> str:
        return f"{self.pair}__{self.pretrain}"

    @property
    def name(self) -> str:
        return f"{self.pretrained}__{self.format}"


@dataclass
class GridConfig(SourcedConfig):
    """A grid file. The four axes span the cells; `datasets` are fine-tuned on (and pretrained on, unless
    `pretrain_datasets` says otherwise); `compose` holds `finer compose` options, `pretraining` and
    `finetuning` FinetuneConfig keys for every cell's two training runs (the recipe `pretrain` and projector
    trained in full are the defaults), `evaluation` the EvalConfig keys in `EVAL_KEYS` (`dataset` defaults to
    the first of `datasets`, `split` to test, `crop_to_bbox` and `prompts_dir` to fine-tuning's)."""

    vision: list[str] = field(default_factory=list)
    llm: list[str] = field(default_factory=list)
    pretrain: list[PretrainPolicy] = field(default_factory=lambda: ["frozen"])
    format: list[CellFormat] = field(default_factory=lambda: ["direct"])
    datasets: list[str] = field(default_factory=list)
    pretrain_datasets: list[str] | None = None
    compose: dict[str, Any] = field(default_factory=dict)
    pretraining: dict[str, Any] = field(default_factory=dict)
    finetuning: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    out: str | None = None

    def cells(self) -> list[Cell]:
        return [
            Cell(v, lm, p, f)
            for v in self.vision
            for lm in self.llm
            for p in self.pretrain
            for f in self.format
        ]

    def settings(self) -> GridRecord:
        """What every cell shares, as JSON: a folder's cells are comparable only under one of these."""
        axes = ("vision", "llm", "pretrain", "format", "out")
        shared = {k: v for k, v in dataclasses.asdict(self).items() if k not in axes}
        return json.loads(json.dumps(shared))

    def check(self, where: str = "grid") -> None:
        """Every mistake a grid file can hold, found before anything runs."""
        for axis in ("vision", "llm", "pretrain", "format", "datasets"):
            if not getattr(self, axis):
                raise FinerError(f"{where}: `{axis}` is empty; list at least one")
        for axis in ("vision", "llm"):
            labels = [_label(spec) for spec in getattr(self, axis)]
            if len(set(labels)) < len(labels):
                raise FinerError(f"{where}: two `{axis}` entries share a folder name ({', '.join(labels)})")
        _keys(where, "compose", self.compose, COMPOSE_KEYS)
        composed = ComposeConfig.from_sources(
            {"vision": "", "llm": "", "out": ""}, self.compose, origin=("", where)
        )
        if composed.dtype not in DTYPES:
            raise FinerError(
                f"{where}: `compose` dtype {composed.dtype!r}: choose one of {', '.join(DTYPES)}"
            )
        for name, managed in (("pretraining", (*MANAGED, "train_llm")), ("finetuning", MANAGED)):
            mapping = getattr(self, name)
            bad = [key for key in mapping if key.replace("-", "_") in managed]
            if bad:
                raise FinerError(f"{where}: `{name}` may not set {', '.join(bad)}; the grid sets it per cell")
            FinetuneConfig.from_sources(mapping, origin=(f"{where} `{name}`",))
        _keys(where, "evaluation", self.evaluation, EVAL_KEYS)


def _keys(where: str, name: str, mapping: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = [key for key in mapping if key not in known]
    if unknown:
        raise FinerError(
            f"{where}: `{name}` has unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )


def load_grid(path: str | Path, out: str | Path | None = None) -> GridConfig:
    """A checked grid from a YAML file; `out` replaces the file's own `out`."""
    where = f"grid {path}"
    try:
        mapping = yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise FinerError(f"{where}: cannot read it ({one_line(err)})") from None
    if not isinstance(mapping, dict):
        raise FinerError(f"{where}: expected a mapping of grid keys, got {type(mapping).__name__}")
    grid = GridConfig.from_sources(mapping, {"out": str(out)} if out else {}, origin=(where, ""))
    if not grid.out:
        raise FinerError(f"{where}: no output folder; pass --out DIR or set `out` in the file")
    grid.check(where)
    return grid


def _claim(out: Path, settings: GridRecord) -> None:
    """Make `out` this grid's folder, or check it already is one run under the same shared settings."""
    path = out / GRID_FILE
    if path.is_file():
        stored = read_grid_file(out)
        differ = sorted(k for k in {*stored, *settings} if stored.get(k) != settings.get(k))
        if differ:
            raise FinerError(
                f"{out} holds a grid run with other {', '.join(differ)}; choose another --out "
                "(or delete it to start over)"
            )
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FinerError(f"--out {out} exists and is not a grid folder; choose another")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


def _check_sources(out: Path, cells: list[Cell]) -> None:
    """Refuse, before anything runs, a folder that a cell would reuse but that was made from other full model
    ids with the same last component (its name): its model, pretraining and scores are not this cell's."""
    for cell in cells:
        for folder, name, read in (
            (out / "models" / cell.pair, COMPOSE_FILE, read_compose_file),
            (out / "pretrained" / cell.pretrained, SOURCE_FILE, read_source_file),
            (out / "cells" / cell.name, CELL_FILE, read_cell_file),
        ):
            if not (folder / name).is_file():
                continue
            recorded = read(folder)
            made = (recorded["vision"], recorded["llm"])
            if made != (cell.vision, cell.llm):
                raise FinerError(
                    f"{folder} was made from vision {made[0]} + llm {made[1]}, not {cell.vision} + "
                    f"{cell.llm} (same folder name); choose another --out (or delete that folder)"
                )


def _train(config: FinetuneConfig) -> None:
    """Run `config` unless its folder holds a finished run; resume an unfinished one from its checkpoint."""
    folder = Path(config.output_dir or "")
    if (folder / RUN_FILE).is_file():
        return
    resume = unfinished_checkpoint(folder) is not None
    if folder.is_dir() and not resume:
        shutil.rmtree(folder)
    run_finetune(dataclasses.replace(config, resume=resume))
    release_memory()


class _Runner:
    """Runs cells into `out`, remembering shared stages that failed so that later cells do not retry them."""

    def __init__(self, grid: GridConfig, out: Path) -> None:
        self.grid, self.out = grid, out
        self.failed: dict[Path, str] = {}

    def shared(self, folder: Path, make: Callable[[Path], str]) -> str:
        if folder in self.failed:
            raise RuntimeError(self.failed[folder])
        try:
            return make(folder)
        except Exception as err:
            self.failed[folder] = one_line(err, 300)
            raise

    def compose(self, cell: Cell, folder: Path) -> str:
        if not (folder / COMPOSE_FILE).is_file():
            settings = {"vision": cell.vision, "llm": cell.llm, "out": str(folder), "overwrite": True}
            compose(ComposeConfig.from_sources(settings, self.grid.compose))
            release_memory()
        return str(folder)

    def pretrain(self, cell: Cell, base: str, folder: Path) -> str:
        """Pretrain the composed `base` with the cell's policy and merge the result into new weights."""
        from finer.models.loading import merge_adapter

        merged = folder / "model"
        if (merged / "config.json").is_file():
            return str(merged)
        if not (folder / SOURCE_FILE).is_file():
            folder.mkdir(parents=True, exist_ok=True)
            source: SourceRecord = {"vision": cell.vision, "llm": cell.llm, "pretrain": cell.pretrain}
            write_json(folder / SOURCE_FILE, source)
        run = {
            "model": base,
            "datasets": self.grid.pretrain_datasets or self.grid.datasets,
            "output_dir": str(folder / "adapter"),
            "train_llm": cell.pretrain,
        }
        config = FinetuneConfig.from_sources(
            load_recipe("pretrain"),
            {"learning_rate": PRETRAIN_LEARNING_RATES[cell.pretrain]},
            self.grid.pretraining,
            run,
        )
        _train(config)
        with staged_subfolder(merged) as partial:
            merge_adapter(folder / "adapter", partial)
        release_memory()
        return str(merged)

    def finetune(self, cell: Cell, base: str, folder: Path) -> str:
        run = {
            "model": base,
            "datasets": self.grid.datasets,
            "output_dir": str(folder),
            "format": cell.format,
        }
        _train(FinetuneConfig.from_sources({"train_projector": "full"}, self.grid.finetuning, run))
        return str(folder)

    def evaluate(self, cell: Cell, base: str, adapter: str, folder: Path) -> dict[str, Any]:
        """Coarse and fine modified EM of the fine-tuned cell, one model load for both levels."""
        from finer.eval.engine import EvalConfig, evaluate
        from finer.models.backends import HFBackend

        settings = dict(self.grid.evaluation)
        dataset = settings.pop("dataset", self.grid.datasets[0])
        settings.setdefault("crop_to_bbox", self.grid.finetuning.get("crop_to_bbox", False))  # as trained
        if self.grid.finetuning.get("prompts_dir"):  # asked in the words it was trained with
            settings["prompts_dir"] = Path(self.grid.finetuning["prompts_dir"])
        # The finer format is asked as it was trained (the conversation replayed), the direct one directly.
        mode = "finer" if cell.format == "finer" else "direct"
        # Mode finer's "all" is coarse and fine in one run, so both levels of an image share its first (group)
        # question; direct's "all" would add the superordinate, so it asks the two levels one at a time.
        levels = ["all"] if mode == "finer" else list(FINER_LEVELS)
        configs = [
            EvalConfig(
                dataset=dataset, out=folder, model=base, adapter=adapter, mode=mode, level=lv, **settings
            )
            for lv in levels
        ]
        first = configs[0]
        backend = HFBackend(
            base,
            adapter,
            batch_size=first.batch_size,
            max_new_tokens=first.max_new_tokens,
            temperature=first.temperature,
            seed=first.seed,
        )
        for config in configs:
            metrics = evaluate(config, backend)
        del backend
        levels = metrics["runs"][-1]["levels"]
        return {
            "mode": mode,
            "scores": {lv: levels[lv]["em"] for lv in FINER_LEVELS if lv in levels},
            "images": max((levels[lv]["count"] for lv in levels), default=0),
        }

    def cell(self, cell: Cell) -> CellRecord:
        """Run one cell through its stages; its record, done or failed (never raises but on interrupt)."""
        folder = self.out / "cells" / cell.name
        folder.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        record: CellRecord = {
            **dataclasses.asdict(cell),
            "name": cell.name,
            "status": "done",
            "stage": None,
            "error": None,
            "mode": None,
            "scores": {},
            "images": 0,
        }
        write_json(folder / CELL_FILE, {**record, "status": "running"})  # the ids, before anything is made
        stage = "compose"
        try:
            composed = self.shared(self.out / "models" / cell.pair, lambda f: self.compose(cell, f))
            model = composed
            if cell.pretrain != "none":
                stage = "pretrain"
                pretrained = self.out / "pretrained" / cell.pretrained
                model = self.shared(pretrained, lambda f: self.pretrain(cell, composed, f))
            stage = "finetune"
            adapter = self.finetune(cell, model, folder / "finetune")
            stage = "eval"
            record.update(self.evaluate(cell, model, adapter, folder / "eval"))
            (folder / "error.log").unlink(missing_ok=True)
        except Exception as err:
            record.update(status="failed", stage=stage, error=one_line(err, 300))
            (folder / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
            logger.error("%s failed at %s: %s", cell.name, stage, record["error"])
        finally:
            release_memory()
        record["duration_s"] = round(time.perf_counter() - began, 1)
        write_json(folder / CELL_FILE, record)
        return record


def run_grid(grid: GridConfig) -> dict[str, Any]:
    """Run (or resume) every cell of `grid` into `grid.out`; returns the records and the result files."""
    out = Path(grid.out or "").expanduser().absolute()
    grid.check()
    with OutputLock(out):  # a second grid into the same folder is refused, not interleaved
        return _run_grid(grid, out)


def _run_grid(grid: GridConfig, out: Path) -> dict[str, Any]:
    _claim(out, grid.settings())
    cells = grid.cells()
    _check_sources(out, cells)
    runner = _Runner(grid, out)
    records: list[CellRecord] = []
    for index, cell in enumerate(cells, 1):
        folder = out / "cells" / cell.name
        record = read_cell_file(folder) if (folder / CELL_FILE).is_file() else None
        if record is not None and record["status"] == "done":
            logger.info("cell %d/%d %s: done earlier; skipped", index, len(cells), cell.name)
        else:
            logger.info("cell %d/%d %s", index, len(cells), cell.name)
            record = runner.cell(cell)
        records.append(record)
        files = write_results(out, records)
    failed = sum(r["status"] != "done" for r in records)
    return {"out": str(out), "cells": records, "failed": failed, "files": files}


_COLUMNS = ("vision", "llm", "pretrain", "format", "status", "coarse", "fine", "images", "stage", "error")


def _row(record: CellRecord) -> dict[str, Any]:
    """One table row: short model names, a score per level (None where the cell has none)."""
    row = {k: record.get(k) for k in _COLUMNS}
    row.update((lv, (record.get("scores") or {}).get(lv)) for lv in FINER_LEVELS)
    row.update(vision=_label(record["vision"]), llm=_label(record["llm"]))
    return row


def _markdown(records: list[CellRecord]) -> str:
    def score(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = [
        "# Eyes vs brain: coarse vs fine-grained modified EM per cell",
        "",
        "| vision | LLM | pretraining | format | coarse | fine | fine − coarse | images | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        row = _row(record)
        gap = None if row["fine"] is None or row["coarse"] is None else row["fine"] - row["coarse"]
        status = "done" if row["status"] == "done" else f"failed at {row['stage']}: {row['error']}"
        cells = [
            *(row[k] for k in ("vision", "llm", "pretrain", "format")),
            score(row["coarse"]),
            score(row["fine"]),
            "–" if gap is None else f"{gap:+.3f}",
            str(row["images"] or "–"),
            status,
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(records: list[CellRecord], path: Path) -> None:
    """Coarse and fine modified EM side by side per cell (matplotlib's Agg canvas, no global pyplot)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 1.4 + 0.5 * len(records)), layout="constrained")
    axes = figure.subplots()
    positions = list(range(len(records)))
    for offset, level in ((-0.2, "coarse"), (0.2, "fine")):
        values = [(r.get("scores") or {}).get(level) or 0.0 for r in records]
        axes.barh([p + offset for p in positions], values, height=0.4, label=level)
    for position, record in zip(positions, records, strict=True):
        if record["status"] != "done":
            axes.text(0.01, position, f"failed at {record['stage']}", va="center", color="tab:red")
    names = [f"{_label(r['vision'])} + {_label(r['llm'])}\n{r['pretrain']} · {r['format']}" for r in records]
    axes.set_yticks(positions, names, fontsize="small")
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("modified EM")
    axes.set_title("Coarse vs fine-grained per cell (vision + LLM, pretraining · format)")
    axes.grid(axis="x", alpha=0.3)
    axes.legend(fontsize="small", loc="lower right")
    figure.savefig(path, dpi=120)


def write_results(out: Path, records: list[CellRecord]) -> dict[str, Path]:
    """The table (markdown, CSV, JSON: `GRID_RESULTS_FILE`) and the chart of `records` in `out`; returns the
    paths."""
    files = {ext: out / f"{RESULTS}.{ext}" for ext in ("md", "csv", "json", "png")}
    files["md"].write_text(_markdown(records), encoding="utf-8")
    with open(files["csv"], "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=_COLUMNS)
        writer.writeheader()
        writer.writerows(_row(r) for r in records)
    write_json(files["json"], records)
    _plot(records, files["png"])
    return files
