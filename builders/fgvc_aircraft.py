"""FGVC-Aircraft 2013b (Maji et al. 2013) read from its official layout.

`fgvc-aircraft-2013b/data/` holds `images/<id>.jpg`, the name lists `variants.txt`, `families.txt`,
`manufacturers.txt` (only the first is read: the per-split files name every level), per-split labels
`images_{variant,family,manufacturer}_{split}.txt` (an id, a space, then a name that may itself contain
spaces) and `images_box.txt` (id xmin ymin xmax ymax, 1-based pixels).
Every image carries a 20-pixel copyright banner at the bottom, which the authors ask users to remove.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from finer.schema import Concept

from .base import ImageRecord, LayoutError, Source, SourceTerms, inside, read_text

#: The official splits; `trainval` is the union of train and val, so it is not offered separately.
SPLITS = ("train", "val", "test")
LEVELS = ("variant", "family", "manufacturer")
BANNER_PX = 20


def slug(name: str) -> str:
    """A stable id from a variant name ("F/A-18" -> "f-a-18")."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def crop_box(box: list[float], height: int) -> list[float]:
    """A box [x, y, w, h] clipped to an image of `height` rows (the banner cut off below)."""
    x, y, w, h = box
    top = min(y, height)
    return [x, top, w, max(0.0, min(y + h, height) - top)]


class FGVCAircraftSource(Source):
    """100 aircraft variants: fine = [variant, family], coarse = the manufacturer from the taxonomy."""

    name = "fgvc-aircraft"
    layout = (
        "fgvc-aircraft-2013b/data/ with images/<id>.jpg, variants.txt, "
        "images_{variant,family,manufacturer}_{train,val,test}.txt, images_box.txt "
        "(--root may be the parent, fgvc-aircraft-2013b or its data/)"
    )
    adjusts_pixels = True
    closed_levels = frozenset({"coarse"})  # the manufacturers
    original_dataset_name = "fgvc-aircraft"
    original_data_folder = "fgvc-aircraft-2013b"
    terms = SourceTerms(
        title="FGVC-Aircraft",
        homepage="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
        license="other",
        license_name="fgvc-aircraft-terms",
        license_link="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
        summary=(
            "The images are made available by aircraft spotters for non-commercial research purposes "
            "only; the photographers keep the copyright and must be asked for any other use."
        ),
        confirmed=True,
        images_redistributable=True,
        citation="""@techreport{maji13fine-grained,
  title         = {Fine-Grained Visual Classification of Aircraft},
  author        = {Maji, S. and Kannala, J. and Rahtu, E. and Blaschko, M. and Vedaldi, A.},
  year          = {2013},
  eprint        = {1306.5151},
  archivePrefix = {arXiv},
  primaryClass  = {cs-cv}
}""",
    )

    def __init__(self, root: Path | None) -> None:
        super().__init__(root)
        candidates = (self.root, self.root / "data", self.root / "fgvc-aircraft-2013b" / "data")
        found = [base for base in candidates if (base / "variants.txt").is_file()]
        self.data = found[0] if found else self.root / "fgvc-aircraft-2013b" / "data"
        self.variants = _names(self.file("variants.txt", base=self.data))
        self.images = self.file("images", base=self.data)
        self.boxes = {
            image_id: [float(v) for v in corners.split()]
            for image_id, corners in _pairs(self.file("images_box.txt", base=self.data))
        }
        # The hierarchy is a tree: read each variant's family and manufacturer off the labelled images.
        self.parents: dict[str, tuple[str, str]] = {}
        for split in self.splits():
            family, maker = (dict(self._labels(level, split)) for level in LEVELS[1:])
            for image_id, variant in self._labels("variant", split):
                if image_id not in family or image_id not in maker:
                    raise LayoutError(
                        f"fgvc-aircraft: image {image_id} has a variant but no family or manufacturer"
                    )
                self.parents.setdefault(variant, (family[image_id], maker[image_id]))

    def splits(self) -> list[str]:
        found = [split for split in SPLITS if (self.data / f"images_variant_{split}.txt").is_file()]
        if not found:
            self.file("images_variant_train.txt", base=self.data)  # raises, naming the file and the layout
        return found

    def concepts(self) -> list[Concept]:
        concepts = []
        for variant in self.variants:
            family, manufacturer = self.parents.get(variant, ("", ""))
            concepts.append(
                Concept(
                    concept_id=slug(variant),
                    fine=list(dict.fromkeys(n for n in (variant, family) if n)),
                    superordinate="Airplane",
                    coarse=[manufacturer] if manufacturer else [],
                    coarse_source="taxonomy" if manufacturer else "",
                    taxonomy={"manufacturer": manufacturer, "family": family, "variant": variant},
                )
            )
        return concepts

    def records(self, split: str) -> Iterator[ImageRecord]:
        known = set(self.variants)
        for image_id, variant in self._labels("variant", split):
            if variant not in known:
                raise LayoutError(
                    f"fgvc-aircraft: variant {variant!r} of image {image_id} is not in variants.txt"
                )
            path = inside(self.images, f"{image_id}.jpg")
            yield ImageRecord(
                image_id=image_id, concept_id=slug(variant), path=path, bbox=self._box(image_id, path)
            )

    def adjust(self, image: Image.Image) -> Image.Image:
        """Cut the 20-pixel copyright banner off the bottom, as the dataset's authors ask."""
        return image.crop((0, 0, image.width, image.height - BANNER_PX))

    def _labels(self, level: str, split: str) -> list[tuple[str, str]]:
        return _pairs(self.file(f"images_{level}_{split}.txt", base=self.data))

    def _box(self, image_id: str, path: Path) -> list[float] | None:
        """The 1-based inclusive box as 0-based [x, y, w, h], clipped to the image without its banner."""
        if image_id not in self.boxes:
            return None
        x1, y1, x2, y2 = self.boxes[image_id]
        box = [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1]
        try:
            with Image.open(path) as image:  # reads the header only
                return crop_box(box, image.height - BANNER_PX)
        except OSError:
            return box  # an unreadable image: the build engine's image check drops the row


def _names(path: Path) -> list[str]:
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def _pairs(path: Path) -> list[tuple[str, str]]:
    """Lines "<id> <rest>" of a list file; the rest keeps its inner spaces ("de Havilland")."""
    pairs = []
    for line in _names(path):
        image_id, _, rest = line.partition(" ")
        pairs.append((image_id, rest.strip()))
    return pairs
