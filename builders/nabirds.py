"""NABirds from the official archive: `nabirds/` with CUB-style list files, `hierarchy.txt` and `images/`.

Coarse labels come from the NABirds hierarchy itself (`coarse_source="taxonomy"`), so the engine's coarse
labeller never runs for this source.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

from finer.schema import Concept

from .base import LayoutError, ListFileSource, SourceTerms, read_list

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


class NABirdsSource(ListFileSource):
    """NABirds: 555 leaf classes of North American birds (species, or plumage/morph branches of one)."""

    name = "nabirds"
    layout = (
        "nabirds/ holding images.txt, classes.txt, hierarchy.txt, image_class_labels.txt, "
        "train_test_split.txt, bounding_boxes.txt and images/<4-digit class>/<file>.jpg; "
        "--root names nabirds/ or its parent"
    )
    folder = "nabirds"
    id_width = 4
    original_dataset_name = "nabirds"
    original_data_folder = "nabirds"
    terms = SourceTerms(
        title="NABirds",
        homepage="https://dl.allaboutbirds.org/nabirds",
        license="other",
        license_name="nabirds-terms",
        license_link="https://dl.allaboutbirds.org/nabirds",
        summary=(
            "Distributed by the Cornell Lab of Ornithology under its terms of use: non-commercial research "
            "only; the photographs belong to the citizen scientists who contributed them."
        ),
        confirmed=False,
        images_redistributable=True,
        citation="""@inproceedings{van2015building,
  title     = {Building a Bird Recognition App and Large Scale Dataset With Citizen Scientists:
               The Fine Print in Fine-Grained Dataset Collection},
  author    = {Van Horn, Grant and Branson, Steve and Farrell, Ryan and Haber, Scott and Barry, Jessie
               and Ipeirotis, Panos and Perona, Pietro and Belongie, Serge},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {595--604},
  year      = {2015}
}""",
    )

    def __init__(self, root: Path | None) -> None:
        super().__init__(root)
        self.hierarchy_txt = self.file("hierarchy.txt", base=self.base)

    @cached_property
    def _names(self) -> dict[str, str]:
        """Class id ("0817", as the image folders number them) -> name, for every node, in file order."""
        return {self._class_id(raw, self.classes_txt): name for raw, name in read_list(self.classes_txt, 2)}

    @cached_property
    def _parents(self) -> dict[str, str]:
        """Child class id -> parent class id."""
        parents = {
            self._class_id(child, self.hierarchy_txt): self._class_id(parent, self.hierarchy_txt)
            for child, parent in read_list(self.hierarchy_txt, 2)
        }
        unknown = sorted((set(parents) | set(parents.values())) - set(self._names))
        if unknown:
            raise LayoutError(f"{self.hierarchy_txt}: class ids not in classes.txt: {', '.join(unknown[:5])}")
        return parents

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

    def _concept_ids(self) -> set[str]:
        return set(self._leaves)
