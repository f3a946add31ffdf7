"""Stanford Cars (Krause et al. 2013) read from the devkit layout or the common class-folder copy.

Devkit layout: `cars_train/*.jpg`, `cars_test/*.jpg`, `devkit/cars_meta.mat` (`class_names`),
`devkit/cars_train_annos.mat` and `cars_test_annos_withlabels.mat` (in the root or in `devkit/`), whose
`annotations` struct arrays hold `bbox_x1 bbox_y1 bbox_x2 bbox_y2 class fname` with 1-based classes.
Class-folder copy (as redistributed on Kaggle and elsewhere): `train/<Class Name>/*.jpg`, `test/...`,
without boxes. Both give the same concept ids and image ids, so builds from either copy line up.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.io

from finer.data.coarse import CoarseRule
from finer.schema import Concept

from .base import ImageRecord, LayoutError, Source, SourceTerms, inside

SPLITS = ("train", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
DEVKIT_ANNOTATIONS = {"train": "cars_train_annos.mat", "test": "cars_test_annos_withlabels.mat"}


#: Body-type keywords in Stanford Cars class names, checked in order (the first hit wins).
CAR_BODY_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("convertible", "convertible"),
    ("minivan", "van"),
    ("van", "van"),
    ("cab", "pickup"),
    ("pickup", "pickup"),
    ("suv", "SUV"),
    ("hatchback", "hatchback"),
    ("wagon", "wagon"),
    ("coupe", "coupe"),
    ("sedan", "sedan"),
)
#: Stanford Cars classes whose names carry no body-type keyword (checked against the 196 class names).
CAR_BODY_EXCEPTIONS: dict[str, str] = {
    "acura integra type r": "coupe",
    "chevrolet corvette ron fellows edition z06": "coupe",
    "chevrolet corvette zr1": "coupe",
    "chevrolet cobalt ss": "coupe",
    "fiat 500 abarth": "hatchback",
    "acura tl type-s": "sedan",
    "buick regal gs": "sedan",
    "chevrolet hhr ss": "wagon",
    "chevrolet trailblazer ss": "SUV",
    "chrysler 300 srt-8": "sedan",
    "dodge challenger srt8": "coupe",
    "dodge charger srt-8": "sedan",
    "ford ranger supercab": "pickup",
    "jaguar xk xkr": "coupe",
    "lamborghini gallardo lp 570-4 superleggera": "coupe",
}
CAR_FALLBACK = "car"

_YEAR = re.compile(r"\s+\d{4}$")


def car_body_type(name: str) -> str | None:
    """The body type named in a Stanford Cars class name, or None when no keyword matches."""
    lowered = _YEAR.sub("", name.lower())
    words = set(re.split(r"[^a-z0-9]+", lowered))
    for keyword, body in CAR_BODY_KEYWORDS:
        if keyword in words:
            return body
    return CAR_BODY_EXCEPTIONS.get(lowered)


#: Body types decide where the name says one; an LLM names the rest, mapped onto the body types.
CAR_BODY = CoarseRule("car-body", car_body_type, fallback=lambda concept: CAR_FALLBACK, decisive=True)


def slug(name: str) -> str:
    """A stable id from a class name: lower case, runs of other characters as one hyphen."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class StanfordCarsSource(Source):
    """196 make-model-year classes; coarse body types come from the labeller (keywords offline)."""

    name = "stanford-cars"
    layout = (
        "either cars_train/, cars_test/, devkit/cars_meta.mat, devkit/cars_train_annos.mat and "
        "cars_test_annos_withlabels.mat (root or devkit/), or class folders train/<Class Name>/*.jpg, "
        "test/<Class Name>/*.jpg"
    )
    coarse_rule = CAR_BODY
    closed_levels = frozenset({"coarse"})  # the body types
    original_dataset_name = "stanford-cars"
    original_data_folder = "stanford_cars"
    terms = SourceTerms(
        title="Stanford Cars",
        homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
        license="other",
        license_name="stanford-cars-terms",
        license_link="https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
        summary=(
            "The dataset page states no licence; the images were collected from the web and belong to "
            "their owners. Use them for non-commercial research only."
        ),
        confirmed=False,
        images_redistributable=True,
        citation="""@inproceedings{KrauseStarkDengFei-Fei_3DRR2013,
  title     = {3D Object Representations for Fine-Grained Categorization},
  author    = {Krause, Jonathan and Stark, Michael and Deng, Jia and Fei-Fei, Li},
  booktitle = {4th International IEEE Workshop on 3D Representation and Recognition (3dRR-13)},
  address   = {Sydney, Australia},
  year      = {2013}
}""",
    )

    def __init__(self, root: Path | None) -> None:
        super().__init__(root)
        self.devkit = (self.root / "devkit" / "cars_meta.mat").exists()
        if self.devkit:
            mat = scipy.io.loadmat(self.root / "devkit" / "cars_meta.mat", squeeze_me=True)
            if "class_names" not in mat:
                raise LayoutError(
                    f"stanford-cars: {self.root / 'devkit' / 'cars_meta.mat'} has no class_names"
                )
            self.class_names = [str(name) for name in np.atleast_1d(mat["class_names"])]
        else:
            folders = [self.root / split for split in SPLITS if (self.root / split).is_dir()]
            if not folders:
                self.file("devkit", "cars_meta.mat")  # raises, naming the file and both layouts
            self.class_names = sorted({p.name for split in folders for p in split.iterdir() if p.is_dir()})
        if len({slug(name) for name in self.class_names}) != len(self.class_names):
            raise LayoutError("stanford-cars: two class names give the same concept id")

    def splits(self) -> list[str]:
        if self.devkit:
            return [split for split in SPLITS if self._annotations(split) is not None]
        return [split for split in SPLITS if (self.root / split).is_dir()]

    def concepts(self) -> list[Concept]:
        return [Concept(concept_id=slug(name), fine=[name], superordinate="Car") for name in self.class_names]

    def records(self, split: str) -> Iterator[ImageRecord]:
        if self.devkit:
            yield from self._devkit_records(split)
        else:
            yield from self._folder_records(split)

    def _annotations(self, split: str) -> Path | None:
        """The annotation file of a split: the test labels ship apart, in the root or in devkit/."""
        for base in (self.root / "devkit", self.root):
            if (base / DEVKIT_ANNOTATIONS[split]).exists():
                return base / DEVKIT_ANNOTATIONS[split]
        return None

    def _devkit_records(self, split: str) -> Iterator[ImageRecord]:
        path = self._annotations(split) or self.file("devkit", DEVKIT_ANNOTATIONS[split])
        images = self.file(f"cars_{split}")
        annotations = np.atleast_1d(scipy.io.loadmat(path, squeeze_me=True)["annotations"])
        missing = {"bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"} - set(
            annotations.dtype.names or ()
        )
        if missing:
            raise LayoutError(f"stanford-cars: {path} annotations lack {', '.join(sorted(missing))}")
        for row in annotations:
            label = int(row["class"])
            if not 1 <= label <= len(self.class_names):
                raise LayoutError(
                    f"stanford-cars: {path} gives {row['fname']} class {label}; cars_meta.mat has "
                    f"{len(self.class_names)} classes"
                )
            file = inside(images, str(row["fname"]))
            x1, y1, x2, y2 = (float(row[f"bbox_{corner}"]) for corner in ("x1", "y1", "x2", "y2"))
            yield ImageRecord(
                image_id=f"{split}/{file.stem}",
                concept_id=slug(self.class_names[label - 1]),
                path=file,
                bbox=[x1, y1, x2 - x1, y2 - y1],
            )

    def _folder_records(self, split: str) -> Iterator[ImageRecord]:
        base = self.file(split)
        for folder in sorted(p for p in base.iterdir() if p.is_dir()):
            for file in sorted(folder.iterdir()):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    yield ImageRecord(
                        image_id=f"{split}/{file.stem}", concept_id=slug(folder.name), path=file
                    )
