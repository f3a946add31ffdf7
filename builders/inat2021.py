"""iNaturalist 2021 from its official COCO-like annotation files (train.json, val.json, train_mini.json).

Built for scale (2.7 M training images): each file is parsed once, and image/annotation objects are turned
into tuples while the JSON is decoded, so no per-image dict ever exists beyond the one being decoded. What
stays is one file name string and two integers per image.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finer.errors import FinerError
from finer.schema import Concept

from .base import ImageRecord, LayoutError, Source, SourceTerms, inside

#: Split files in their usual order; `public_test.json` has no labels and is not a split here.
SPLIT_FILES: dict[str, str] = {"train": "train.json", "train_mini": "train_mini.json", "val": "val.json"}
RANKS: tuple[str, ...] = ("kingdom", "phylum", "class", "order", "family", "genus", "specific_epithet")


@dataclass
class _Split:
    """One parsed split file: categories as given, images as parallel compact columns."""

    categories: list[dict[str, Any]]
    image_ids: array
    category_ids: array
    file_names: list[str]


def _compact(obj: dict[str, Any]) -> Any:
    """JSON object hook: an image becomes (id, file_name), an annotation (image_id, category_id)."""
    if "file_name" in obj:
        return obj["id"], obj["file_name"]
    if "category_id" in obj:
        return obj["image_id"], obj["category_id"]
    return obj


def load_split(path: Path) -> _Split:
    """Parse one annotation file into compact columns, or a `LayoutError` saying what is wrong with it."""
    try:
        # Text first, so the raw bytes are gone before parsing: the file is never held twice.
        data = json.loads(path.read_text(encoding="utf-8"), object_hook=_compact)
        annotations, images, categories = data["annotations"], data["images"], data["categories"]
    except OSError as exc:
        raise LayoutError(f"{path}: cannot read it ({exc.strerror})") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise LayoutError(f"{path}: not an iNat-2021 annotation file ({exc!r})") from exc
    if not all(type(item) is tuple for item in annotations):
        raise LayoutError(f"{path}: an annotation without image_id and category_id")
    labels = dict(annotations)
    del data, annotations
    image_ids, category_ids, file_names = array("q"), array("q"), []
    try:
        for item in images:
            if type(item) is not tuple:
                raise LayoutError(f"{path}: an image without id and file_name")
            image_id, file_name = item
            if image_id not in labels:
                raise LayoutError(f"{path}: image {image_id} has no annotation")
            image_ids.append(image_id)
            category_ids.append(labels[image_id])
            file_names.append(file_name)
    except TypeError as exc:
        raise LayoutError(f"{path}: image and category ids must be integers ({exc})") from exc
    return _Split(categories, image_ids, category_ids, file_names)


class INat2021Source(Source):
    """iNat-2021: 10,000 species; superordinate = supercategory, coarse = family, fine = binomial + common."""

    name = "inat2021"
    layout = (
        "<root>/train.json, val.json (train_mini.json optional) in the iNat-2021 COCO-like format, "
        "with the image folders (train/, val/, …) their file_name fields point to, relative to <root>"
    )
    original_dataset_name = "inaturalist"
    original_data_folder = "inaturalist"
    terms = SourceTerms(
        title="iNaturalist 2021",
        homepage="https://github.com/visipedia/inat_comp/tree/master/2021",
        license="other",
        license_name="inaturalist-2021-terms",
        license_link="https://github.com/visipedia/inat_comp/tree/master/2021#terms-of-use",
        summary=(
            "The competition terms allow non-commercial research and educational use only, require the "
            "iNaturalist Terms of Service, and forbid distributing the dataset images. Each image also "
            "has its own licence and rights holder, listed in the official annotation files."
        ),
        confirmed=True,
        images_redistributable=False,
        citation="""@inproceedings{van2021benchmarking,
  title     = {Benchmarking Representation Learning for Natural World Image Collections},
  author    = {Van Horn, Grant and Cole, Elijah and Beery, Sara and Wilber, Kimberly and Belongie, Serge
               and Mac Aodha, Oisin},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {12884--12893},
  year      = {2021}
}""",
    )

    def __init__(self, root: Path | None) -> None:
        super().__init__(root)
        self.paths = {
            split: self.root / file for split, file in SPLIT_FILES.items() if (self.root / file).is_file()
        }
        if not self.paths:
            self.file(SPLIT_FILES["train"])
        self._loaded: dict[str, _Split] = {}

    def splits(self) -> list[str]:
        return list(self.paths)

    def _split(self, split: str) -> _Split:
        if split not in self.paths:
            raise FinerError(
                f"{self.name} has no split {split!r} under {self.root}; found {', '.join(self.paths)}"
            )
        if split not in self._loaded:
            self._loaded[split] = load_split(self.paths[split])
        return self._loaded[split]

    def concepts(self) -> list[Concept]:
        """From the smallest split file: every iNat-2021 file lists the same 10,000 categories."""
        smallest = min(self.paths, key=lambda split: self.paths[split].stat().st_size)
        try:
            return [_concept(category) for category in self._split(smallest).categories]
        except (KeyError, ValueError) as exc:
            raise LayoutError(
                f"{self.paths[smallest]}: a category lacks a field or an integer id ({exc!r})"
            ) from exc

    def records(self, split: str) -> Iterator[ImageRecord]:
        data = self._split(split)
        concept_ids = {category_id: concept_id(category_id) for category_id in set(data.category_ids)}
        for image_id, category_id, file_name in zip(
            data.image_ids, data.category_ids, data.file_names, strict=True
        ):
            yield ImageRecord(
                image_id=str(image_id), concept_id=concept_ids[category_id], path=inside(self.root, file_name)
            )


def concept_id(category_id: int) -> str:
    """Five digits, as the image folders number the categories ("00000_Animalia_…"): ids sort numerically."""
    return f"{category_id:05d}"


def _concept(category: dict[str, Any]) -> Concept:
    binomial = f"{category['genus']} {category['specific_epithet']}"
    common = category.get("common_name", "")
    return Concept(
        concept_id=concept_id(category["id"]),
        fine=[binomial, common] if common and common != binomial else [binomial],
        superordinate=category["supercategory"],
        coarse=[category["family"]],
        coarse_source="taxonomy",
        taxonomy={rank: category[rank] for rank in RANKS if rank in category},
    )
