"""Metrics, report and chart of an evaluation folder, computed from its predictions.jsonl alone.

Every prediction record carries its gold labels and the identity of its run (model, adapter and dataset
with their content fingerprints, mode, options, template hash), so the metrics can be recomputed at any
time, under either rule set, and one folder may hold several runs (direct and attrseek, base and adapter, an
adapter before and after retraining): each becomes one row of the tables and one line of the superordinate
→ coarse → fine chart. A record of a question whose image could not be read (``skipped``) is counted, not
scored; so are empty answers (scored as wrong) and replies stored cut. `compare` puts the runs of several
folders side by side.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from finer.errors import FinerError
from finer.eval.distractors import kind_accuracy, kind_section, option_kind_counts
from finer.eval.scoring import LEVELS, extract_answer, score, score_choice
from finer.records import (
    METRICS_FILE,
    LevelMetrics,
    MetricsRecord,
    PredictionRecord,
    RunMetrics,
    UsageCounts,
    read_metrics_file,
)

__all__ = [
    "CLIFF_FILE",
    "METRICS_FILE",
    "PREDICTIONS_FILE",
    "REPORT_FILE",
    "REPORT_FILES",
    "compare",
    "compute_metrics",
    "read_predictions",
    "write_report",
]

PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "report.md"
CLIFF_FILE = "cliff.png"
#: What `write_report` derives from the predictions.
REPORT_FILES = (METRICS_FILE, REPORT_FILE, CLIFF_FILE)
METRICS: tuple[tuple[str, str], ...] = (("em", "modified EM"), ("strict_em", "strict EM"), ("f1", "F1"))
# Run fields named in a label when they tell runs apart; the model's fields come first.
_MODEL_FIELDS = ("model", "adapter", "backend")
_OTHER_FIELDS = (
    "model_fingerprint",
    "adapter_fingerprint",
    "split",
    "template_sha256",
    "temperature",
    "max_new_tokens",
    "seed",
)


def read_predictions(path: Path) -> list[PredictionRecord]:
    """The complete records of a predictions file, the first per key (a line torn by a crash is not a
    record, and two runs sharing a folder at once may both answer one question); an answer wins over a
    record that its image was unreadable (the image was fixed, or readable on a later try)."""
    records: dict[str, PredictionRecord] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or "key" not in record:
                continue
            if "skipped" in records.get(record["key"], {"skipped": True}):
                records[record["key"]] = record
    return list(records.values())


def _scores(record: PredictionRecord, finer_original: bool) -> tuple[float, float, float]:
    """(modified EM, strict EM, F1) of one record; a multiple-choice answer is right or wrong in all three."""
    if "answer" in record:
        right = score_choice(record["prediction"], record["answer"], len(record["options"]))
        return right, right, right
    result = score(
        record["prediction"],
        record["level"],
        record["superordinate"],
        record["coarse"],
        record["fine"],
        finer_original=finer_original,
    )
    return result.em, result.strict_em, result.f1


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def _summary(rows: list[tuple[float, float, float]]) -> dict[str, Any]:
    return {"count": len(rows), **{name: _mean([r[i] for r in rows]) for i, (name, _) in enumerate(METRICS)}}


def _short(field: str, value: Any) -> str:
    if field in ("model", "adapter"):
        return Path(value).name if value else "no adapter"
    if field.endswith("_fingerprint"):
        return f"{field.removesuffix('_fingerprint')} {str(value)[:12]}"
    if field == "template_sha256":
        return f"template {value[:8]}"
    return f"{field}={value}"


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    """Short, distinct names for runs: the mode, plus only the fields in which runs differ."""

    def varies(field: str, among: list[dict[str, Any]]) -> bool:
        return len({json.dumps(run.get(field)) for run in among}) > 1

    bases = []
    for run in runs:
        mode = run["mode"] + ("+parent" if run.get("gold_parent") else "")
        if run["mode"] == "choice":
            mode += f"-{run['choices']}" + (f" {run['distractors']}" if run.get("distractors") else "")
        bases.append(" ".join([*(_short(f, run.get(f)) for f in _MODEL_FIELDS if varies(f, runs)), mode]))
    labels = []
    for run, base in zip(runs, bases, strict=True):
        peers = [other for other, b in zip(runs, bases, strict=True) if b == base]
        labels.append(" ".join([base, *(_short(f, run.get(f)) for f in _OTHER_FIELDS if varies(f, peers))]))
    return labels


def compute_metrics(records: Iterable[PredictionRecord], *, finer_original: bool = False) -> MetricsRecord:
    """Per run and level: modified EM, strict EM, F1, count, and the same per class; also how many answers
    were cut at the token limit (``truncated``), were empty, were stored cut (``stored_truncated``), and how
    many questions were ``skipped`` because their image could not be read."""
    by_run: dict[str, list[PredictionRecord]] = defaultdict(list)
    runs: dict[str, dict[str, Any]] = {}
    for record in records:
        run_key = json.dumps(record["run"], sort_keys=True)
        runs.setdefault(run_key, record["run"])
        by_run[run_key].append(record)
    results: list[RunMetrics] = []
    for (run_key, run), label in zip(runs.items(), _labels(list(runs.values())), strict=True):
        levels: dict[str, LevelMetrics] = {}
        for level in LEVELS:
            at_level = [r for r in by_run[run_key] if r["level"] == level]
            chosen = [r for r in at_level if "skipped" not in r]
            if not at_level:
                continue
            scored = [_scores(r, finer_original) for r in chosen]
            per_class: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
            for record, row in zip(chosen, scored, strict=True):
                per_class[record["fine"][0] if record["fine"] else record["concept_id"]].append(row)
            levels[level] = {
                **_summary(scored),
                "truncated": sum(bool(r.get("truncated")) for r in chosen),
                "empty": sum(not extract_answer(r["prediction"]) for r in chosen),
                "stored_truncated": sum(bool(r.get("stored_truncated")) for r in chosen),
                "skipped": len(at_level) - len(chosen),
                "per_class": {name: _summary(rows) for name, rows in sorted(per_class.items())},
            }
            if kinds := option_kind_counts(chosen):
                levels[level]["distractor_kinds"] = kinds
        results.append({"label": label, "run": run, "levels": levels})
    total = sum("skipped" not in record for rows in by_run.values() for record in rows)
    return {"rules": "finer-original" if finer_original else "ours", "predictions": total, "runs": results}


#: Per-level counts the report shows beside the scores.
_COUNTS = ("truncated", "empty", "stored_truncated", "skipped")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _cell(levels: dict[str, Any], level: str, metric: str = "em") -> str:
    return f"{levels[level][metric]:.3f}" if level in levels else "–"


def report_markdown(metrics: MetricsRecord) -> str:
    """The report: the runs, the cliff, a table per level, and the fine level per class."""
    runs = metrics["runs"]
    rules = (
        "the original FINER rules (`--finer-original`)"
        if metrics["rules"] == "finer-original"
        else "ours (whole words within the first 20, four normalisations; `finer.eval.scoring`)"
    )
    lines = [
        "# Evaluation report",
        "",
        f"{metrics['predictions']} predictions; scoring: {rules}. Hierarchical credit: a more specific "
        "correct answer also counts at a coarser level. Multiple choice scores the parsed letter. Per level: "
        "`truncated` answers hit the token limit, `empty` ones (scored as wrong) said nothing, "
        "`stored_truncated` replies were stored cut, `skipped` questions had an unreadable image "
        "(not scored).",
        "",
        "## Runs",
        "",
    ]
    lines += _table(
        ["run", "model", "adapter", "backend", "mode", "split", "options"],
        [
            [
                r["label"],
                f"`{r['run']['model']}`",
                f"`{r['run']['adapter']}`" if r["run"]["adapter"] else "–",
                r["run"]["backend"],
                r["run"]["mode"],
                r["run"]["split"],
                ", ".join(
                    f"{k}={r['run'][k]}"
                    for k in ("gold_parent", "choices", "temperature", "max_new_tokens", "seed")
                    if r["run"].get(k) not in (None, False)
                ),
            ]
            for r in runs
        ],
    )
    lines += ["", "## The cliff: superordinate → coarse → fine (modified EM)", ""]
    lines += _table(
        ["run", *LEVELS], [[r["label"], *(_cell(r["levels"], lv) for lv in LEVELS)] for r in runs]
    )
    lines += ["", f"![superordinate → coarse → fine]({CLIFF_FILE})"]
    for level in LEVELS:
        present = [r for r in runs if level in r["levels"]]
        if not present:
            continue
        lines += ["", f"## {level}", ""]
        lines += _table(
            ["run", *(name for _, name in METRICS), "count", *_COUNTS],
            [
                [
                    r["label"],
                    *(_cell(r["levels"], level, metric) for metric, _ in METRICS),
                    str(r["levels"][level]["count"]),
                    *(str(r["levels"][level][name]) for name in _COUNTS),
                ]
                for r in present
            ],
        )
    lines += kind_section(runs)
    fine = [r for r in runs if "fine" in r["levels"]]
    if fine:
        classes = sorted({name for r in fine for name in r["levels"]["fine"]["per_class"]})
        lines += ["", "## fine, per class (modified EM)", "", "<details>", ""]
        rows = []
        for name in classes:
            cells = []
            for r in fine:
                entry = r["levels"]["fine"]["per_class"].get(name)
                cells.append(f"{entry['em']:.3f} ({entry['count']})" if entry else "–")
            rows.append([name, *cells])
        lines += _table(["class", *(r["label"] for r in fine)], rows)
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def plot_cliff(metrics: MetricsRecord, path: Path) -> None:
    """Modified EM per level, one line per run (the Agg canvas: no display, no global pyplot state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.subplots()
    positions = range(len(LEVELS))
    for run in metrics["runs"]:
        values = [run["levels"][lv]["em"] if lv in run["levels"] else float("nan") for lv in LEVELS]
        axes.plot(positions, values, marker="o", label=run["label"])
    axes.set_xticks(list(positions), list(LEVELS))
    axes.set_ylim(0, 1.02)
    axes.set_ylabel("modified EM")
    axes.set_title("Superordinate → coarse → fine")
    axes.grid(alpha=0.3)
    if metrics["runs"]:
        axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)


def write_report(
    out: Path, *, finer_original: bool = False, usage: UsageCounts | None = None
) -> MetricsRecord:
    """Recompute metrics.json, report.md and cliff.png from ``out``/predictions.jsonl; returns the metrics
    (with `usage`, the endpoint calls of the eval that wrote them, when it made any)."""
    metrics = compute_metrics(read_predictions(out / PREDICTIONS_FILE), finer_original=finer_original)
    if usage is not None:
        metrics["usage"] = usage
    (out / METRICS_FILE).write_text(
        json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / REPORT_FILE).write_text(report_markdown(metrics), encoding="utf-8")
    plot_cliff(metrics, out / CLIFF_FILE)
    return metrics


def compare(dirs: list[Path]) -> str:
    """A markdown table of every run in ``dirs`` side by side (with the difference when there are two)."""
    columns: list[tuple[str, dict[str, Any]]] = []
    compared: list[tuple[dict[str, Any], dict[str, Any]]] = []
    rules = set()
    for folder in dirs:
        if not (Path(folder) / METRICS_FILE).is_file():
            raise FinerError(f"{folder}: no readable {METRICS_FILE}; run `finer eval --out {folder}` first")
        metrics = read_metrics_file(Path(folder))
        rules.add(metrics["rules"])
        for run in metrics["runs"]:
            name = str(folder) if len(metrics["runs"]) == 1 else f"{folder}: {run['label']}"
            columns.append((name, run["levels"]))
            compared.append((run["run"], run["levels"]))
    if not columns:
        raise FinerError("nothing to compare: the folders hold no evaluated runs")
    header = ["level", "metric", *(name for name, _ in columns)]
    two = len(columns) == 2
    if two:
        header.append("Δ")
    rows = []
    for level in LEVELS:
        if not any(level in levels for _, levels in columns):
            continue
        for metric, name in (*METRICS, ("count", "count")):
            row = [level, name]
            for _, levels in columns:
                value = levels.get(level, {}).get(metric)
                row.append("–" if value is None else str(value) if metric == "count" else f"{value:.3f}")
            if two:
                a, b = (levels.get(level, {}).get(metric) for _, levels in columns)
                row.append("–" if a is None or b is None or metric == "count" else f"{b - a:+.3f}")
            rows.append(row)
    lines = _table(header, rows)
    if by_kind := kind_accuracy(compared):
        lines += ["", "Multiple-choice accuracy by kind of distractors:", "", *by_kind]
    if len(rules) > 1:
        lines.append(f"\nwarning: the folders were scored under different rules ({', '.join(sorted(rules))})")
    return "\n".join(lines) + "\n"
