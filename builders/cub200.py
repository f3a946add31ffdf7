"""CUB-200-2011 from the official archive: `CUB_200_2011/` with its list files and `images/`.

Coarse labels come from the engine's labeller (`coarse_rule = "head-noun"`): CUB has no hierarchy.
The CUB list-file format (`<id> <value…>` per line) is shared with NABirds, which reuses `read_list`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

from finer.errors import FinerError
from finer.schema import Concept

from .base import ImageRecord, LayoutError, Source, inside

#: `train_test_split.txt` flag -> split name (1 = train).
SPLIT_FLAGS: dict[str, str] = {"1": "train", "0": "test"}


def read_list(path: Path, columns: int) -> Iterator[list[str]]:
    """Rows of a CUB-style list file; the last column takes the rest of the line (names with spaces)."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            row = line.strip().split(maxsplit=columns - 1)
            if not row:
                continue
            if len(row) != columns:
                raise LayoutError(f"{path}:{number}: expected {columns} fields, found {line.strip()!r}")
            yield row


def class_id(raw: str, width: int, path: Path) -> str:
    """A class id zero-padded as the dataset numbers its folders ("1" -> "001"), so ids sort numerically."""
    if not raw.isdigit():
        raise LayoutError(f"{path}: class id {raw!r} is not a number")
    return raw.zfill(width)


def read_boxes(path: Path) -> dict[str, list[float]]:
    """`<image id> <x> <y> <width> <height>` per line -> image id -> [x, y, w, h]."""
    try:
        return {image_id: [float(v) for v in values.split()] for image_id, values in read_list(path, 2)}
    except ValueError as exc:
        raise LayoutError(f"{path}: a box that is not four numbers ({exc})") from exc


def check_split(source: Source, split: str) -> None:
    """A one-line error for a split the source does not have (the engine passes user input through)."""
    if split not in source.splits():
        raise FinerError(f"{source.name} has no split {split!r}; choose from {', '.join(source.splits())}")


def clean_class_name(raw: str) -> str:
    """Without number and underscores: "001.Black_footed_Albatross" -> "Black footed Albatross"."""
    return " ".join(re.sub(r"^\d+\.", "", raw).replace("_", " ").split())


class Cub200Source(Source):
    """CUB-200-2011: 200 bird species, train/test from `train_test_split.txt`, boxes, class attributes."""

    name = "cub200"
    layout = (
        "CUB_200_2011/ holding images.txt, classes.txt, image_class_labels.txt, train_test_split.txt, "
        "bounding_boxes.txt, images/<class>/<file>.jpg and attributes/class_attribute_labels_continuous.txt, "
        "with attributes.txt beside it; --root names CUB_200_2011/ or its parent"
    )
    coarse_rule = "head-noun"
    folder = "CUB_200_2011"

    def __init__(self, root: Path | None) -> None:
        super().__init__(root)
        nested = self.root / self.folder
        self.base = nested if nested.is_dir() else self.root
        self.images_txt = self.file("images.txt", base=self.base)
        self.classes_txt = self.file("classes.txt", base=self.base)
        self.labels_txt = self.file("image_class_labels.txt", base=self.base)
        self.split_txt = self.file("train_test_split.txt", base=self.base)
        self.images_dir = self.file("images", base=self.base)

    def splits(self) -> list[str]:
        return ["train", "test"]

    @cached_property
    def _classes(self) -> dict[str, str]:
        """Concept id ("001") -> raw class name ("001.Black_footed_Albatross"), in file order."""
        return {class_id(raw, 3, self.classes_txt): name for raw, name in read_list(self.classes_txt, 2)}

    def concepts(self) -> list[Concept]:
        return [
            Concept(concept_id=concept_id, fine=[clean_class_name(raw)], superordinate="Bird")
            for concept_id, raw in self._classes.items()
        ]

    def records(self, split: str) -> Iterator[ImageRecord]:
        check_split(self, split)
        labels = {image: class_id(raw, 3, self.labels_txt) for image, raw in read_list(self.labels_txt, 2)}
        flags = dict(read_list(self.split_txt, 2))
        boxes_txt = self.base / "bounding_boxes.txt"
        boxes = read_boxes(boxes_txt) if boxes_txt.exists() else {}
        for image_id, relative in read_list(self.images_txt, 2):
            flag = flags.get(image_id)
            if flag not in SPLIT_FLAGS:
                raise LayoutError(f"{self.split_txt}: image {image_id} has no 0/1 train flag")
            if SPLIT_FLAGS[flag] != split:
                continue
            label = labels.get(image_id)
            if label not in self._classes:
                raise LayoutError(f"{self.labels_txt}: image {image_id} has no class listed in classes.txt")
            yield ImageRecord(
                image_id=image_id,
                concept_id=label,
                path=inside(self.images_dir, relative),
                bbox=boxes.get(image_id),
            )

    def class_attributes(self) -> dict[str, dict[str, float]]:
        """Per concept id, the percentage (0-100) of its images the annotators marked with each attribute.

        Kept for `--extractor cub-annotations`: the attribute names are CUB's own
        ("has_bill_shape::cone"), in `attributes.txt` order; row i of the scores file is class i + 1.
        """
        names = [name for _, name in read_list(self._attribute_names_txt(), 2)]
        scores_txt = self.file("attributes", "class_attribute_labels_continuous.txt", base=self.base)
        rows = [line.split() for line in scores_txt.read_text(encoding="utf-8").splitlines() if line.strip()]
        concept_ids = sorted(self._classes, key=int)
        if len(rows) != len(concept_ids) or any(len(row) != len(names) for row in rows):
            raise LayoutError(
                f"{scores_txt}: expected {len(concept_ids)} rows of {len(names)} scores "
                f"(one per class, one per attribute in attributes.txt)"
            )
        try:
            return {
                concept_id: dict(zip(names, map(float, row), strict=True))
                for concept_id, row in zip(concept_ids, rows, strict=True)
            }
        except ValueError as exc:
            raise LayoutError(f"{scores_txt}: a score that is not a number ({exc})") from exc

    def _attribute_names_txt(self) -> Path:
        """`attributes.txt`: beside `CUB_200_2011/` in the official archive, inside it in some re-packs."""
        candidates = [
            self.base.parent / "attributes.txt",
            self.base / "attributes.txt",
            self.base / "attributes" / "attributes.txt",
        ]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise LayoutError(f"{self.name}: missing {candidates[0]}; expected layout: {self.layout}")
