"""The data contract (docs/design.md §3): concept rows, image-row features, and the three label levels.

Every builder produces `Concept`s and image rows in this shape; every later step (knowledge, training,
evaluation) reads only this shape. Coarse labels come from `finer.data.coarse`; everything else about a
concept
comes from its source builder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import datasets

LEVELS: tuple[str, ...] = ("superordinate", "coarse", "fine")
Level = Literal["superordinate", "coarse", "fine"]

KnowledgeStatus = Literal["found", "missing", "disambiguation", "bundled"]


@dataclass
class Knowledge:
    """Where a concept's description came from (Wikipedia, or bundled with the source)."""

    text: str
    status: KnowledgeStatus
    title: str = ""
    url: str = ""
    revision_id: int | None = None
    section: str = ""


@dataclass
class Attributes:
    """Visible traits of a concept: `required` are external and distinguishing, `likely` may not show."""

    required: list[str] = field(default_factory=list)
    likely: list[str] = field(default_factory=list)
    extractor: str = ""
    prompt_sha256: str = ""


@dataclass
class Concept:
    """One fine-grained class with its three label levels.

    `coarse` and `fine` are lists of accepted labels, canonical first. `coarse_source` says where the
    coarse label came from: "taxonomy" (the source's own hierarchy), "rules" or "llm:<model>".
    """

    concept_id: str
    fine: list[str]
    superordinate: str
    coarse: list[str] = field(default_factory=list)
    coarse_source: str = ""
    taxonomy: dict[str, str] = field(default_factory=dict)
    knowledge: Knowledge | None = None
    attributes: Attributes = field(default_factory=Attributes)

    @property
    def name(self) -> str:
        """The canonical fine name."""
        return self.fine[0]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Concept:
        row = dict(row)
        knowledge = row.pop("knowledge", None)
        attributes = row.pop("attributes", None) or {}
        return cls(
            **row,
            knowledge=Knowledge(**knowledge) if knowledge else None,
            attributes=Attributes(**attributes),
        )


def image_features(class_names: list[str]) -> datasets.Features:
    """Features of the image rows; `label` indexes the sorted canonical fine names."""
    import datasets  # here, not above: every module reads this one, `finer --help` too

    strings = datasets.List(datasets.Value("string"))
    return datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("string"),
            "source": datasets.Value("string"),
            "concept_id": datasets.Value("string"),
            "superordinate": datasets.Value("string"),
            "coarse": strings,
            "fine": strings,
            "label": datasets.ClassLabel(names=class_names),
            "attributes_required": strings,
            "attributes_likely": strings,
            "bbox": datasets.List(datasets.Value("float32")),
        }
    )
