"""Export a build in the original FINER file formats, so the original code can read our datasets.

Formats, as read by the FINER repository (github.com/wjdghks950/Finer: `scripts/data_loader.py` writes the
label files, `llava/eval/run_knowledge_probe.py` and `llava/serve/wiki_linearize_attr.py` read both):

- `unified-{ds}-{split}-combined.jsonl`: one row per image, `{idx, basic-level-lbl, coarse-level-lbl,
  fine-level-lbl, img_path, metadata}`; `idx` counts from 0 within the split, the two label fields are
  lists of accepted labels, `img_path` is an absolute image path and `metadata` is free per dataset.
- `parsed-{ds}-{model}-wiki-text-combined.json`: a JSON list of `{id, name, attr_binomial: {required,
  likely}}`. The original reads it as `attr_dict[fine2cidx[label]]` for *every* label in
  `fine-level-lbl`, so `id` must equal the row's list position and every accepted fine label needs a row.

`ds` is spelled as the original code spells it: the label files use its `--dataset-name` values
(`cub-200`, `stanford-dogs`, ...), the attribute file its data-folder names (`CUB_200_2011`, ...); each
source class says both (`original_dataset_name`, `original_data_folder`).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import datasets
from PIL import Image

from finer.builders import source_class
from finer.errors import FinerError
from finer.schema import Concept


def export_finer(
    dataset_dict: datasets.DatasetDict,
    concepts: list[Concept],
    out_dir: Path,
    source_name: str,
    model_name: str,
) -> list[Path]:
    """Write the label file of every split and the attribute file into `out_dir`; returns their paths.

    Images stored as file references keep their path; images stored as bytes (re-encoded, or embedded)
    are written under `out_dir/images/{split}/` so that `img_path` always names a file on disk.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    source = source_class(source_name)
    labels_name = source.original_dataset_name or source_name
    written = [_write_split(dataset, split, out_dir, labels_name) for split, dataset in dataset_dict.items()]
    attributes = out_dir / (
        f"parsed-{source.original_data_folder or source_name}-{_file_part(model_name)}"
        "-wiki-text-combined.json"
    )
    attributes.write_text(json.dumps(attribute_rows(concepts), ensure_ascii=False) + "\n", encoding="utf-8")
    return [*written, attributes]


def attribute_rows(concepts: list[Concept]) -> list[dict]:
    """One row per accepted fine label, `id` = list position.

    Canonical names come first, sorted (so a concept's `id` equals its `label` index in our datasets),
    then the other accepted labels (an aircraft's family, ...), sorted. A canonical name carries its
    concept's attributes; another label carries the attributes shared by every concept that accepts it
    (a family's variants), since we extract attributes per concept, not per family.
    """
    by_name = {c.name: c for c in concepts}
    holders: dict[str, list[Concept]] = {}
    for concept in concepts:
        for label in concept.fine[1:]:
            if label not in by_name:
                holders.setdefault(label, []).append(concept)
    rows = []
    for label in [*sorted(by_name), *sorted(holders)]:
        group = [by_name[label]] if label in by_name else holders[label]
        attributes = {kind: _shared(group, kind) for kind in ("required", "likely")}
        rows.append({"id": len(rows), "name": label, "attr_binomial": attributes})
    return rows


def _shared(group: list[Concept], kind: str) -> list[str]:
    """The `kind` attributes of the first concept that every other concept of the group also has."""
    first, *others = (getattr(c.attributes, kind) for c in group)
    return [a for a in first if all(a in other for other in others)]


def _write_split(dataset: datasets.Dataset, split: str, out_dir: Path, ds: str) -> Path:
    path = out_dir / f"unified-{ds}-{split}-combined.jsonl"
    images = out_dir / "images" / split
    cells = dataset.cast_column("image", datasets.Image(decode=False))
    with open(path, "w", encoding="utf-8") as fh:
        for idx, row in enumerate(cells):
            record = {
                "idx": idx,
                "basic-level-lbl": row["superordinate"],
                "coarse-level-lbl": list(row["coarse"]),
                "fine-level-lbl": list(row["fine"]),
                "img_path": _image_path(row["image"], images, idx, row["image_id"]),
                "metadata": {
                    "image_id": row["image_id"],
                    "concept_id": row["concept_id"],
                    "source": row["source"],
                },
            }
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _image_path(cell: dict, folder: Path, idx: int, image_id: str) -> str:
    """The absolute path of the image file, writing stored bytes out first."""
    if cell.get("bytes") is not None:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{idx:06d}-{_file_part(image_id)}{_extension(cell['bytes'], cell.get('path'))}"
        target.write_bytes(cell["bytes"])
        return str(target)
    if cell.get("path"):
        return str(Path(cell["path"]).absolute())
    raise FinerError(f"image {image_id!r} has neither bytes nor a path; rebuild the dataset")


def _extension(data: bytes, path: str | None) -> str:
    """The file extension of encoded image bytes, read from their header (re-encoded bytes may differ)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
    except OSError:
        fmt = None
    if fmt:
        return ".jpg" if fmt == "JPEG" else f".{fmt.lower()}"
    return Path(path).suffix if path else ""


def _file_part(text: str) -> str:
    """`text` safe inside a file name; an extractor tag's kind ("llm:") is dropped."""
    return re.sub(r"[^\w.+-]+", "_", re.sub(r"^(llm|vlm):", "", text)).strip("_") or "none"
