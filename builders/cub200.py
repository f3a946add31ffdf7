"""CUB-200-2011 from the official archive: `CUB_200_2011/` with its list files and `images/`.

Coarse labels come from the engine's labeller (`coarse_rule = HEAD_NOUN`): CUB has no hierarchy.
The list-file layout (`<id> <value…>` per line) is shared with NABirds: `base.ListFileSource` reads it.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

from finer.data.coarse import HEAD_NOUN
from finer.schema import Concept

from .base import LayoutError, ListFileSource, SourceTerms, read_list, read_text


def clean_class_name(raw: str) -> str:
    """Without number and underscores: "001.Black_footed_Albatross" -> "Black footed Albatross"."""
    return " ".join(re.sub(r"^\d+\.", "", raw).replace("_", " ").split())


class Cub200Source(ListFileSource):
    """CUB-200-2011: 200 bird species, train/test from `train_test_split.txt`, boxes, class attributes."""

    name = "cub200"
    layout = (
        "CUB_200_2011/ holding images.txt, classes.txt, image_class_labels.txt, train_test_split.txt, "
        "bounding_boxes.txt, images/<class>/<file>.jpg and attributes/class_attribute_labels_continuous.txt, "
        "with attributes.txt beside it; --root names CUB_200_2011/ or its parent"
    )
    coarse_rule = HEAD_NOUN
    original_dataset_name = "cub-200"
    original_data_folder = "CUB_200_2011"
    terms = SourceTerms(
        title="CUB-200-2011",
        homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
        license="other",
        license_name="cub-200-2011-terms",
        license_link="https://www.vision.caltech.edu/datasets/cub_200_2011/",
        summary=(
            "The dataset page states no licence. The images are Flickr photographs whose copyright stays "
            "with their photographers; use them for non-commercial research only."
        ),
        confirmed=False,
        images_redistributable=True,
        citation="""@techreport{WahCUB_200_2011,
  title       = {The Caltech-UCSD Birds-200-2011 Dataset},
  author      = {Wah, C. and Branson, S. and Welinder, P. and Perona, P. and Belongie, S.},
  institution = {California Institute of Technology},
  number      = {CNS-TR-2011-001},
  year        = {2011}
}""",
    )
    folder = "CUB_200_2011"
    id_width = 3

    @cached_property
    def _classes(self) -> dict[str, str]:
        """Concept id ("001") -> raw class name ("001.Black_footed_Albatross"), in file order."""
        return {self._class_id(raw, self.classes_txt): name for raw, name in read_list(self.classes_txt, 2)}

    def concepts(self) -> list[Concept]:
        return [
            Concept(concept_id=concept_id, fine=[clean_class_name(raw)], superordinate="Bird")
            for concept_id, raw in self._classes.items()
        ]

    def _concept_ids(self) -> dict[str, str]:
        return self._classes

    def class_attributes(self) -> dict[str, dict[str, float]]:
        """Per concept id, the percentage (0-100) of its images the annotators marked with each attribute.

        Kept for `--extractor cub-annotations`: the attribute names are CUB's own
        ("has_bill_shape::cone"), in `attributes.txt` order; row i of the scores file is class i + 1.
        """
        names = [name for _, name in read_list(self._attribute_names_txt(), 2)]
        scores_txt = self.file("attributes", "class_attribute_labels_continuous.txt", base=self.base)
        rows = [line.split() for line in read_text(scores_txt).splitlines() if line.strip()]
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
