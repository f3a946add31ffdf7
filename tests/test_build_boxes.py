"""Boxes at build time: a box must lie inside its image with positive size; one reaching outside is clipped,
one with no area inside is dropped, and both are counted in build.json's warnings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest
from PIL import Image

import finer.data.build as build_module
from finer.builders import ImageRecord, Source
from finer.data.build import BuildConfig, build
from finer.data.coarse import HEAD_NOUN
from finer.schema import Concept

BOXES = {
    "inside": [2.0, 3.0, 10.0, 12.0],
    "overhang": [-4.0, 20.0, 10.0, 50.0],  # left of and below the 20x30 image
    "negative": [10.0, 10.0, -5.0, 8.0],  # "Coordinate 'right' is less than 'left'" when cropped
    "outside": [25.0, 0.0, 5.0, 5.0],  # right of the image
    "none": None,
}


class BoxedSource(Source):
    """One class of 20x30 images, one per kind of box."""

    name = "boxed"
    layout = "<root>/<n>.jpg"
    coarse_rule = HEAD_NOUN

    def splits(self) -> list[str]:
        return ["test"]

    def concepts(self) -> list[Concept]:
        return [Concept(concept_id="c0", fine=["Barn Owl"], superordinate="Bird")]

    def records(self, split: str) -> Iterator[ImageRecord]:
        for name, box in BOXES.items():
            yield ImageRecord(name, "c0", path=self.root / f"{name}.jpg", bbox=box)


@pytest.mark.parametrize("crop", [False, True])
def test_boxes_are_clipped_or_dropped_and_counted(
    crop: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for name in BOXES:
        Image.new("RGB", (20, 30), "red").save(root / f"{name}.jpg")
    monkeypatch.setattr(build_module, "get_source", lambda name: BoxedSource)
    out = tmp_path / "out"
    build(BuildConfig(source="boxed", root=root, out=out, knowledge=False, crop_to_bbox=crop))
    rows = {row["image_id"]: row for row in datasets.load_from_disk(str(out))["test"]}
    assert len(rows) == len(BOXES)  # a bad box never costs the image
    if crop:
        assert rows["overhang"]["image"].size == (6, 10) and rows["negative"]["image"].size == (20, 30)
    else:
        assert rows["inside"]["bbox"] == BOXES["inside"]
        assert rows["overhang"]["bbox"] == [0.0, 20.0, 6.0, 10.0]
        assert rows["negative"]["bbox"] is None and rows["outside"]["bbox"] is None
    warnings = json.loads((out / "build.json").read_text())["warnings"]
    assert "test: 1 box(es) clipped to their image, 2 dropped (no area inside it)" in warnings
