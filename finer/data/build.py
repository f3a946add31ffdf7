"""The build engine: one source in, one dataset folder out (docs/design.md §3).

`build()` is the whole of `finer build`: resolve the source, pick concepts, fill coarse labels, stream
every split's rows through the image check into Arrow files, then write `concepts.jsonl`, `build.json`
and (on request) the original FINER files. The output appears under `--out` only when everything is
written (`finer.run_folder`): a crash leaves a `.partial` folder beside it, never a folder that looks
finished, and `--overwrite` replaces an earlier build only once the new one is complete.
"""

from __future__ import annotations

import inspect
import io
import json
import platform
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

import finer
from finer.builders import ImageRecord, Source, get_source
from finer.data.build_config import BuildConfig
from finer.data.coarse import CoarseLabeller
from finer.data.knowledge import add_coarse_report, add_knowledge
from finer.data.knowledge import coarse_labeller as knowledge_coarse_labeller
from finer.errors import FinerError
from finer.models.client import public_url
from finer.models.images import unreadable_reason
from finer.records import BUILD_FILE, BuildRecord
from finer.run_folder import staged_output, write_split_state
from finer.schema import Concept, image_features

CONCEPTS_FILE = "concepts.jsonl"
#: Rows are written in Arrow batches (per-row writes cost ~10x more); bytes cap the batch for embedded images.
WRITE_BATCH_ROWS = 2000
WRITE_BATCH_BYTES = 64 * 2**20


@dataclass
class SplitReport:
    rows: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    boxes: Counter[str] = field(default_factory=Counter)  # "clipped" / "dropped"


def _open_source(config: BuildConfig) -> Source:
    """The source at `config.root`, given `test_fraction` when set (only a source that splits takes it)."""
    cls = get_source(config.source)
    if config.test_fraction is None:
        return cls(config.root)
    if "test_fraction" not in inspect.signature(cls).parameters:
        raise FinerError(f"--test-fraction: {config.source} has official splits; only imagefolder takes it")
    return cls(config.root, test_fraction=config.test_fraction)  # type: ignore[call-arg]


def build(config: BuildConfig, coarse_labeller: CoarseLabeller | None = None) -> BuildRecord:
    """Build one source into `config.out`; returns the build.json content."""
    started = time.perf_counter()
    source = _open_source(config)
    with staged_output(config.out, overwrite=config.overwrite) as staged:
        summary, concepts = _build_into(staged.partial, config, source, coarse_labeller, started)
    if config.export_finer:
        from finer.data.export import export_finer

        extractors = Counter(c.attributes.extractor for c in concepts if c.attributes.extractor)
        model = extractors.most_common(1)[0][0] if extractors else "none"
        dataset = datasets.load_from_disk(str(staged.out))
        export_finer(dataset, concepts, config.export_finer, source.name, model)
    return summary


def _build_into(
    partial: Path, config: BuildConfig, source: Source, coarse_labeller: CoarseLabeller | None, started: float
) -> tuple[BuildRecord, list[Concept]]:
    """Everything of the build, written into `partial`; build.json's content and the concepts."""
    splits = _pick_splits(source, config.splits)
    concepts = _pick_concepts(source.concepts(), config.limit_classes)
    knowledge = (not source.bundled_knowledge) if config.knowledge is None else config.knowledge
    labeller = coarse_labeller or knowledge_coarse_labeller(config.knowledge_options, knowledge)
    labeller.label([c for c in concepts if not c.coarse], source.coarse_rule)
    report = add_knowledge(source, concepts, config.knowledge_options) if knowledge else {}
    add_coarse_report(report, labeller)

    timings: dict[str, float] = {"concepts_s": round(time.perf_counter() - started, 3)}
    reports = {}
    features = image_features(sorted({c.name for c in concepts}))
    for split in splits:
        t0 = time.perf_counter()
        reports[split] = _write_split(source, split, concepts, features, partial / split, config)
        timings[f"{split}_s"] = round(time.perf_counter() - t0, 3)
    (partial / "dataset_dict.json").write_text(json.dumps({"splits": splits}))
    with open(partial / CONCEPTS_FILE, "w", encoding="utf-8") as fh:
        for concept in concepts:
            fh.write(json.dumps(concept.to_json(), ensure_ascii=False) + "\n")
    summary = _summary(config, source, concepts, reports, knowledge, report, timings, started)
    (partial / BUILD_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n")
    return summary, concepts


def _pick_splits(source: Source, wanted: list[str] | None) -> list[str]:
    available = source.splits()
    if not wanted:
        return available
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise FinerError(
            f"{source.name}: no split {', '.join(unknown)} in this copy; available: {', '.join(available)}"
        )
    return list(wanted)


def _pick_concepts(concepts: list[Concept], limit: int | None) -> list[Concept]:
    """All concepts, or `limit` of them spread evenly over the sorted ids, first and last included."""
    concepts = sorted(concepts, key=lambda c: c.concept_id)
    if limit is None or limit >= len(concepts):
        return concepts
    if limit < 1:
        raise FinerError("--limit-classes must be at least 1")
    if limit == 1:
        return concepts[:1]
    last = len(concepts) - 1
    return [concepts[i * last // (limit - 1)] for i in range(limit)]


def _write_split(
    source: Source,
    split: str,
    concepts: list[Concept],
    features: datasets.Features,
    folder: Path,
    config: BuildConfig,
) -> SplitReport:
    """Stream one split's rows into `folder` in the layout `datasets.load_from_disk` reads.

    We write that layout ourselves because `save_to_disk` always embeds local files: image rows stay
    file references (fast, small) unless bytes are asked for or the pixels change.
    """
    report = SplitReport()
    folder.mkdir(parents=True)
    arrow = folder / "data-00000-of-00001.arrow"
    by_id = {c.concept_id: c for c in concepts}
    label_of = {name: i for i, name in enumerate(features["label"].names)}
    per_class: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    pending_bytes = 0
    with (
        ArrowWriter(features=features, path=str(arrow)) as writer,
        tqdm(desc=f"{source.name}/{split}", unit=" img", dynamic_ncols=True, mininterval=0.5) as bar,
    ):
        for record in source.records(split):
            concept = by_id.get(record.concept_id)
            if concept is None:
                continue
            if config.limit_per_class is not None and per_class[record.concept_id] >= config.limit_per_class:
                continue
            try:
                _fit_box(record, report.boxes)
                image, bbox = _image_cell(source, record, config)
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
                report.skipped.append({"image_id": record.image_id, "reason": unreadable_reason(err)})
                bar.set_postfix(skipped=len(report.skipped), refresh=False)
                continue
            per_class[record.concept_id] += 1
            rows.append(
                {
                    "image": image,
                    "image_id": record.image_id,
                    "source": source.name,
                    "concept_id": concept.concept_id,
                    "superordinate": concept.superordinate,
                    "coarse": concept.coarse,
                    "fine": concept.fine,
                    "label": label_of[concept.name],
                    "attributes_required": concept.attributes.required,
                    "attributes_likely": concept.attributes.likely,
                    "bbox": bbox,
                }
            )
            pending_bytes += len(image["bytes"] or b"")
            if len(rows) >= WRITE_BATCH_ROWS or pending_bytes >= WRITE_BATCH_BYTES:
                _write_rows(writer, features, rows)
                bar.update(len(rows))
                rows, pending_bytes = [], 0
        _write_rows(writer, features, rows)
        bar.update(len(rows))
        report.rows = writer.finalize()[0]
    dataset = datasets.Dataset.from_file(str(arrow), split=split)
    dataset.info.write_to_directory(str(folder))
    write_split_state(folder, arrow.name, dataset._fingerprint, split)
    if report.skipped:
        tqdm.write(
            f"{source.name}/{split}: skipped {len(report.skipped)} unreadable image(s), see build.json"
        )
    return report


def _write_rows(writer: ArrowWriter, features: datasets.Features, rows: list[dict[str, Any]]) -> None:
    """One Arrow record batch: rows are already in storage form (image cells are {path, bytes} dicts)."""
    if rows:
        columns = {name: [row[name] for row in rows] for name in features}
        writer.write_table(pa.Table.from_pydict(columns, schema=features.arrow_schema))


def _fit_box(record: ImageRecord, counts: Counter[str]) -> None:
    """Clip the record's box to its image (a box must lie inside it with positive size), or drop a box with
    no area inside; counted, so that evaluation never crops outside an image or to nothing."""
    if record.bbox is None:
        return
    with Image.open(io.BytesIO(record.data) if record.data is not None else record.path) as im:
        width, height = im.size  # the header only
    x, y, w, h = record.bbox
    left, top, right, bottom = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
    if right - left < 1 or bottom - top < 1:
        record.bbox = None
        counts["dropped"] += 1
    elif [left, top, right - left, bottom - top] != [x, y, w, h]:
        record.bbox = [left, top, right - left, bottom - top]
        counts["clipped"] += 1


def _image_cell(source: Source, record: ImageRecord, config: BuildConfig) -> tuple[dict, list[float] | None]:
    """The stored image (a file reference, or bytes when pixels change or are asked for) and its bbox."""
    bbox = record.bbox
    crop = config.crop_to_bbox and bbox is not None
    if record.data is None and record.path is None:
        raise ValueError("record has neither a path nor image bytes")
    if record.data is None and not (crop or source.adjusts_pixels or config.embed_images):
        if config.check_images:
            with Image.open(record.path) as im:
                im.verify()
        return {"path": str(record.path), "bytes": None}, bbox
    if record.data is not None and not (crop or source.adjusts_pixels):
        if config.check_images:
            with Image.open(io.BytesIO(record.data)) as im:
                im.verify()
        return {"path": None, "bytes": record.data}, bbox
    raw = record.data if record.data is not None else Path(record.path).read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        if not (crop or source.adjusts_pixels):
            im.verify()
            return {"path": None, "bytes": raw}, bbox
        fmt = im.format or "PNG"
        image = source.adjust(im.convert("RGB"))
    if bbox is not None:
        x, y, w, h = bbox
        w, h = min(w, image.width - x), min(h, image.height - y)
        bbox = [x, y, w, h]
        if crop:
            image = image.crop((round(x), round(y), round(x + w), round(y + h)))
            bbox = [0.0, 0.0, float(image.width), float(image.height)]
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="PNG")
    return {"path": None, "bytes": buf.getvalue()}, bbox


def _summary(
    config: BuildConfig,
    source: Source,
    concepts: list[Concept],
    reports: dict[str, SplitReport],
    knowledge: bool,
    knowledge_report: dict[str, Any],
    timings: dict[str, float],
    started: float,
) -> BuildRecord:
    options = asdict(config)
    for url in ("base_url", "wiki_api"):  # a URL may carry credentials in its user info or query
        if options["knowledge_options"][url]:
            options["knowledge_options"][url] = public_url(options["knowledge_options"][url])
    rows = sum(r.rows for r in reports.values())
    total_s = time.perf_counter() - started
    warnings = [
        f"{split}: skipped {len(r.skipped)} unreadable image(s)" for split, r in reports.items() if r.skipped
    ]
    warnings += [
        f"{split}: {r.boxes['clipped']} box(es) clipped to their image, {r.boxes['dropped']} dropped "
        "(no area inside it)"
        for split, r in reports.items()
        if r.boxes
    ]
    warnings += source.notes
    if not knowledge and not source.bundled_knowledge:
        warnings.append("built without knowledge: attribute columns are empty (--no-knowledge)")
    warnings += knowledge_report.get("warnings", [])
    return {
        "source": source.name,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": options,
        "versions": {
            "finer": finer.__version__,
            "python": platform.python_version(),
            "datasets": datasets.__version__,
            "pillow": Image.__version__,
        },
        "counts": {split: r.rows for split, r in reports.items()},
        "concepts": len(concepts),
        "coarse_sources": dict(Counter(c.coarse_source for c in concepts)),
        "knowledge": {
            "enabled": knowledge,
            "status": dict(Counter(c.knowledge.status if c.knowledge else "none" for c in concepts)),
            "extractors": dict(Counter(c.attributes.extractor or "none" for c in concepts)),
            "calls": 0,
            "cache_hits": 0,
            **{k: v for k, v in knowledge_report.items() if k != "warnings"},
        },
        "skipped": {split: r.skipped for split, r in reports.items()},
        "durations": {**timings, "total_s": round(total_s, 3)},
        "rows_per_s": round(rows / total_s, 1) if total_s else None,
        "warnings": warnings,
    }


def iter_concepts(path: Path) -> Iterator[Concept]:
    """Concept rows of a built dataset (its concepts.jsonl)."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield Concept.from_json(json.loads(line))
