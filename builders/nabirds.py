"""NABirds from the official archive: `nabirds/` with CUB-style list files, `hierarchy.txt` and `images/`.

Coarse labels come from the NABirds hierarchy itself (`coarse_source="taxonomy"`), so the engine's coarse
labeller never runs for this source.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

from finer.schema import Concept

from .base import ImageRecord, LayoutError, Source, inside
from .cub200 import SPLIT_FLAGS, check_split, class_id, read_boxes, read_list


def _class_id(raw: str, path: Path) -> str:
    """Four digits, as the image folders number the classes (`images/0817/`)."""
    return class_id(raw, 4, path)


_PARENTHETICAL = re.compile(r"\s*\([^)]*\)")
_PARENTHETICAL_TEXT = re.compile(r"\(([^)]*)\)")
#: Group names list several groups: "Ducks, Geese, and Swans", "Herons and Egrets".
_GROUP_SEPARATORS = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+")


def strip_parenthetical(name: str) -> str:
    """The species name of a plumage/morph branch: "Common Eider (Adult male)" -> "Common Eider"."""
    return " ".join(_PARENTHETICAL.sub("", name).split())


def split_group(name: str) -> list[str]:
    """Each group of a group name is an accepted coarse label: "Ducks, Geese, and Swans" -> 3 labels."""
    return [part.strip() for part in _GROUP_SEPARATORS.split(name) if part.strip()]


class NABirdsSource(Source):
    """NABirds: 555 leaf classes of North American birds (species, or plumage/morph branches of one)."""

    name = "nabirds"
    layout = (
        "nabirds/ holding images.txt, classes.txt, hierarchy.txt, image_class_labels.txt, "
        "train_test_split.txt, bounding_boxes.txt and images/<4-digit class>/<file>.jpg; "
        "--root names nabirds/ or its parent"
    )
    folder = "nabirds"

    def __init__(self, root: Path | None) -> None:
        super().__init__(root)
        nested = self.root / self.folder
        self.base = nested if nested.is_dir() else self.root
        self.images_txt = self.file("images.txt", base=self.base)
        self.classes_txt = self.file("classes.txt", base=self.base)
        self.hierarchy_txt = self.file("hierarchy.txt", base=self.base)
        self.labels_txt = self.file("image_class_labels.txt", base=self.base)
        self.split_txt = self.file("train_test_split.txt", base=self.base)
        self.images_dir = self.file("images", base=self.base)

    def splits(self) -> list[str]:
        return ["train", "test"]

    @cached_property
    def _names(self) -> dict[str, str]:
        """Class id ("0817", as the image folders number them) -> name, for every node, in file order."""
        return {_class_id(raw, self.classes_txt): name for raw, name in read_list(self.classes_txt, 2)}

    @cached_property
    def _parents(self) -> dict[str, str]:
        """Child class id -> parent class id."""
        parents = {
            _class_id(child, self.hierarchy_txt): _class_id(parent, self.hierarchy_txt)
            for child, parent in read_list(self.hierarchy_txt, 2)
        }
        unknown = sorted((set(parents) | set(parents.values())) - set(self._names))
        if unknown:
            raise LayoutError(f"{self.hierarchy_txt}: class ids not in classes.txt: {', '.join(unknown[:5])}")
        return parents

    @cached_property
    def _labels(self) -> dict[str, str]:
        """Image id -> class id."""
        return {image: _class_id(raw, self.labels_txt) for image, raw in read_list(self.labels_txt, 2)}

    @cached_property
    def _leaves(self) -> list[str]:
        """Class ids that are concepts: leaves of the hierarchy that have images, in classes.txt order."""
        inner = set(self._parents.values())
        labelled = set(self._labels.values())
        bad = sorted(labelled - set(self._names)) or sorted(labelled & inner)
        if bad:
            raise LayoutError(f"{self.labels_txt}: images labelled with unknown or inner class {bad[0]}")
        return [node for node in self._names if node in labelled]

    def concepts(self) -> list[Concept]:
        return [self._concept(node) for node in self._leaves]

    def _concept(self, node: str) -> Concept:
        """Coarse = the parent group, or the grandparent when the parent is the species of this branch."""
        name = self._names[node]
        fine = strip_parenthetical(name)
        group = self._parent(node)
        if fine != name and self._names[group] == fine:
            group = self._parent(group)
        lineage = [group]
        while (up := self._parents.get(lineage[-1])) is not None and up not in lineage:
            lineage.append(up)
        taxonomy = {"lineage": " > ".join(self._names[ancestor] for ancestor in reversed(lineage))}
        variants = _PARENTHETICAL_TEXT.findall(name)
        if variants:
            taxonomy["variant"] = "; ".join(variants)
        return Concept(
            concept_id=node,
            fine=[fine],
            superordinate="Bird",
            coarse=split_group(self._names[group]),
            coarse_source="taxonomy",
            taxonomy=taxonomy,
        )

    def _parent(self, node: str) -> str:
        if node not in self._parents:
            raise LayoutError(f"{self.hierarchy_txt}: class {node} ({self._names[node]}) has no parent")
        return self._parents[node]

    def records(self, split: str) -> Iterator[ImageRecord]:
        check_split(self, split)
        concepts = set(self._leaves)
        flags = dict(read_list(self.split_txt, 2))
        boxes_txt = self.base / "bounding_boxes.txt"
        boxes = read_boxes(boxes_txt) if boxes_txt.exists() else {}
        for image_id, relative in read_list(self.images_txt, 2):
            flag = flags.get(image_id)
            if flag not in SPLIT_FLAGS:
                raise LayoutError(f"{self.split_txt}: image {image_id} has no 0/1 train flag")
            if SPLIT_FLAGS[flag] != split:
                continue
            label = self._labels.get(image_id)
            if label not in concepts:
                raise LayoutError(f"{self.labels_txt}: image {image_id} has no class")
            yield ImageRecord(
                image_id=image_id,
                concept_id=label,
                path=inside(self.images_dir, relative),
                bbox=boxes.get(image_id),
            )
