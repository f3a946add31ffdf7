"""The build engine on a small in-test source: limits, image checks, atomic output, coarse labels."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest
from PIL import Image

import finer.data.build as build_module
from finer.builders import ImageRecord, Source
from finer.data.build import BuildConfig, build, iter_concepts
from finer.data.coarse import HEAD_NOUN, CoarseRule
from finer.errors import FinerError
from finer.records import BuildKnowledge, BuildRecord
from finer.schema import Concept, image_features
from tests.records_check import declared


def _jpeg(path: Path, size: tuple[int, int] = (20, 30), colour: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")
    return path


class ToySource(Source):
    """Three dog breeds, two splits, one corrupt and one missing image, boxes on every record."""

    name = "toy"
    layout = "<root>/<breed>/<n>.jpg"
    coarse_rule = HEAD_NOUN
    breeds = ("Curly coated Retriever", "Golden Retriever", "Miniature Poodle")

    def splits(self) -> list[str]:
        return ["train", "test"]

    def concepts(self) -> list[Concept]:
        return [Concept(concept_id=f"c{i}", fine=[b], superordinate="Dog") for i, b in enumerate(self.breeds)]

    def records(self, split: str) -> Iterator[ImageRecord]:
        n = 4 if split == "train" else 2
        for i, _ in enumerate(self.breeds):
            for j in range(n):
                path = self.root / split / f"c{i}" / f"{j}.jpg"
                yield ImageRecord(f"{split}-{i}-{j}", f"c{i}", path=path, bbox=[2.0, 3.0, 10.0, 12.0])


class BannerToySource(ToySource):
    """Pixels change (like FGVC-Aircraft's banner): images are re-encoded as bytes."""

    name = "banner-toy"
    adjusts_pixels = True

    def adjust(self, image: Image.Image) -> Image.Image:
        return image.crop((0, 0, image.width, image.height - 5))


#: A rule a new source brings in its own module: miniature breeds are toy dogs, the rest it cannot tell.
TOY_SIZE = CoarseRule(
    "toy-size", lambda name: "Toy dog" if "Miniature" in name else None, lambda concept: "dog", decisive=True
)


class SizedToySource(ToySource):
    """The toy breeds with their own coarse rule instead of the shared head-noun rule."""

    name = "sized-toy"
    coarse_rule = TOY_SIZE


@pytest.fixture
def toy_root(tmp_path: Path) -> Path:
    root = tmp_path / "toy"
    for split, n in (("train", 4), ("test", 2)):
        for i in range(3):
            for j in range(n):
                _jpeg(root / split / f"c{i}" / f"{j}.jpg")
    (root / "train" / "c1" / "2.jpg").write_bytes(b"not a jpeg at all")
    (root / "test" / "c2" / "1.jpg").unlink()
    return root


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> None:
    sources = {"toy": ToySource, "banner-toy": BannerToySource, "sized-toy": SizedToySource}
    monkeypatch.setattr(build_module, "get_source", lambda name: sources[name])


def test_build_writes_contract_and_skips_broken_images(toy: None, toy_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = build(BuildConfig(source="toy", root=toy_root, out=out, knowledge=False))
    ds = datasets.load_from_disk(str(out))
    assert set(ds) == {"train", "test"}
    assert ds["train"].num_rows == 11 and ds["test"].num_rows == 5
    assert summary["counts"] == {"train": 11, "test": 5}
    assert {s["image_id"] for s in summary["skipped"]["train"]} == {"train-1-2"}
    assert summary["skipped"]["test"] == [{"image_id": "test-2-1", "reason": "missing file"}]
    assert set(ds["train"].features) == set(image_features(["x"]))
    row = ds["train"][0]
    assert row["coarse"] == ["Retriever"] and row["superordinate"] == "Dog"
    assert ds["train"].features["label"].int2str(row["label"]) == row["fine"][0]
    assert row["bbox"] == [2.0, 3.0, 10.0, 12.0]
    assert row["image"].size == (20, 30)
    on_disk = json.loads((out / "build.json").read_text())
    declared(on_disk, BuildRecord)
    declared(on_disk["knowledge"], BuildKnowledge)
    assert on_disk["coarse_sources"] == {"rules": 3}
    assert any("without knowledge" in w for w in on_disk["warnings"])
    concepts = list(iter_concepts(out / "concepts.jsonl"))
    assert [c.coarse for c in concepts] == [["Retriever"], ["Retriever"], ["Poodle"]]
    assert not list(tmp_path.glob(".out.partial*"))


def test_a_source_brings_its_own_coarse_rule(toy: None, toy_root: Path, tmp_path: Path) -> None:
    summary = build(BuildConfig(source="sized-toy", root=toy_root, out=tmp_path / "out", knowledge=False))
    concepts = list(iter_concepts(tmp_path / "out" / "concepts.jsonl"))
    assert [c.coarse for c in concepts] == [["dog"], ["dog"], ["Toy dog"]]
    assert summary["coarse_sources"] == {"rules:fallback": 2, "rules": 1}


def test_images_are_file_references_unless_embedded(toy: None, toy_root: Path, tmp_path: Path) -> None:
    build(BuildConfig(source="toy", root=toy_root, out=tmp_path / "ref", knowledge=False))
    build(BuildConfig(source="toy", root=toy_root, out=tmp_path / "emb", knowledge=False, embed_images=True))
    undecoded = datasets.Image(decode=False)
    ref = datasets.load_from_disk(str(tmp_path / "ref"))["test"].cast_column("image", undecoded)[0]["image"]
    emb = datasets.load_from_disk(str(tmp_path / "emb"))["test"].cast_column("image", undecoded)[0]["image"]
    assert ref["bytes"] is None and Path(ref["path"]).is_file()
    assert emb["bytes"] and Image.open(io.BytesIO(emb["bytes"])).size == (20, 30)


def test_limits_are_deterministic(toy: None, toy_root: Path, tmp_path: Path) -> None:
    cfg = dict(source="toy", root=toy_root, knowledge=False, limit_classes=2, limit_per_class=1)
    build(BuildConfig(out=tmp_path / "a", **cfg))
    build(BuildConfig(out=tmp_path / "b", **cfg))
    a = datasets.load_from_disk(str(tmp_path / "a"))["train"]
    b = datasets.load_from_disk(str(tmp_path / "b"))["train"]
    assert a["image_id"] == b["image_id"] == ["train-0-0", "train-2-0"]


def test_crop_to_bbox_and_pixel_adjustment(toy: None, toy_root: Path, tmp_path: Path) -> None:
    build(BuildConfig(source="toy", root=toy_root, out=tmp_path / "crop", knowledge=False, crop_to_bbox=True))
    row = datasets.load_from_disk(str(tmp_path / "crop"))["train"][0]
    assert row["image"].size == (10, 12) and row["bbox"] == [0.0, 0.0, 10.0, 12.0]
    build(BuildConfig(source="banner-toy", root=toy_root, out=tmp_path / "adj", knowledge=False))
    row = datasets.load_from_disk(str(tmp_path / "adj"))["train"][0]
    assert row["image"].size == (20, 25)


def test_out_refuses_non_empty_without_overwrite(toy: None, toy_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build(BuildConfig(source="toy", root=toy_root, out=out, knowledge=False, splits=["test"]))
    with pytest.raises(FinerError, match="not empty; pass --overwrite"):
        build(BuildConfig(source="toy", root=toy_root, out=out, knowledge=False))
    build(BuildConfig(source="toy", root=toy_root, out=out, knowledge=False, overwrite=True))
    assert set(datasets.load_from_disk(str(out))) == {"train", "test"}


def test_unknown_split_and_missing_root(toy: None, toy_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FinerError, match="no split val"):
        build(BuildConfig(source="toy", root=toy_root, out=tmp_path / "o", knowledge=False, splits=["val"]))
    with pytest.raises(FinerError, match="--root is required"):
        build(BuildConfig(source="toy", root=None, out=tmp_path / "o", knowledge=False))
    with pytest.raises(FinerError, match="not a folder"):
        build(BuildConfig(source="toy", root=tmp_path / "nope", out=tmp_path / "o", knowledge=False))
    assert not (tmp_path / "o").exists()


def test_crash_leaves_nothing_that_looks_finished(
    toy: None, toy_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self: ToySource, split: str) -> Iterator[ImageRecord]:
        yield from ToySource.records(self, "train")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ToySource, "records", boom)
    with pytest.raises(RuntimeError):
        build(BuildConfig(source="toy", root=toy_root, out=tmp_path / "out", knowledge=False))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial*"))


KILL_BEFORE_SWAP_IN = """
import os, signal, sys
from pathlib import Path

real = Path.rename


def rename(self, target):
    if self.name.endswith(".partial") and self.is_dir():  # the complete new build about to go in: kill
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, target)


Path.rename = rename
from finer.cli import main

main(sys.argv[1:])
"""


def test_overwrite_killed_mid_swap_keeps_a_complete_build(tmp_path: Path) -> None:
    """`finer build --overwrite` SIGKILLed as the new build goes in: the earlier build is back, whole."""
    import subprocess
    import sys

    out = tmp_path / "demo"
    argv = ["build", "demo", "--out", str(out), "--splits", "test", "--limit-classes", "2"]
    first = subprocess.run([sys.executable, "-m", "finer", *argv], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    before = json.loads((out / "build.json").read_text())
    killed = subprocess.run([sys.executable, "-c", KILL_BEFORE_SWAP_IN, *argv, "--overwrite"])
    assert killed.returncode == -9
    again = subprocess.run([sys.executable, "-m", "finer", *argv], capture_output=True, text=True)
    assert again.returncode == 2 and "not empty; pass --overwrite" in again.stderr
    assert json.loads((out / "build.json").read_text()) == before and (out / "concepts.jsonl").is_file()
    assert datasets.load_from_disk(str(out))["test"].num_rows == before["counts"]["test"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
