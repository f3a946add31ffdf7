"""The Hub dataset card of a built dataset: YAML metadata, how it was built, its columns, terms, citations.

The licence comes from the source dataset's own terms, the `terms` attribute of its `finer.builders` class.
Most of the sources are research-only and have no SPDX identifier, so the card says `license: other` with a
`license_name` and a link to the terms, and its body says in plain words what the terms allow and what we
could not confirm.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

import datasets
import yaml

from finer.builders import SourceTerms, source_class
from finer.records import BuildRecord
from finer.schema import Concept

TASK_CATEGORIES = ["image-classification", "visual-question-answering"]
CONCEPTS_CONFIG = "concepts"
CONCEPTS_SPLIT = "train"

FINER_CITATION = """@inproceedings{kim2024finer,
  title         = {Finer: Investigating and Enhancing Fine-Grained Visual Concept Recognition
                   in Large Vision Language Models},
  author        = {Kim, Jeonghwan and Ji, Heng},
  booktitle     = {Proceedings of the 2024 Conference on Empirical Methods
                   in Natural Language Processing (EMNLP)},
  year          = {2024},
  eprint        = {2402.16315},
  archivePrefix = {arXiv}
}"""


#: The Hub's size categories: (exclusive upper bound on rows, label).
SIZE_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
)

IMAGE_COLUMNS: dict[str, str] = {
    "image": "the image, embedded as bytes",
    "image_id": "the source's own id of the image, unique within the source",
    "source": "the finer source name",
    "concept_id": "stable id of the fine concept (joins the `concepts` config)",
    "superordinate": "superordinate label (one string)",
    "coarse": "accepted coarse labels, canonical first",
    "fine": "accepted fine labels, canonical first",
    "label": "index of the canonical fine name",
    "attributes_required": "visible, distinguishing attributes of the concept",
    "attributes_likely": "attributes of the concept that may not be visible",
    "bbox": "x, y, w, h of the object in pixels, where the source has boxes",
    "attributes_visible": "the concept's attributes a VLM saw in this image",
}

CONCEPT_COLUMNS: dict[str, str] = {
    "concept_id": "stable id of the fine concept",
    "fine": "accepted fine labels, canonical first",
    "superordinate": "superordinate label",
    "coarse": "accepted coarse labels, canonical first",
    "coarse_source": 'where the coarse label came from: "taxonomy", "rules" or "llm:<model>"',
    "taxonomy": "the source's own hierarchy",
    "knowledge": "the description attributes were read from: text, status, title, url, revision_id, section",
    "attributes": "required and likely attributes, the extractor and its prompt template's sha256",
}

#: build.json options worth showing; the others are local paths or engine details.
SHOWN_OPTIONS = ("splits", "limit_classes", "limit_per_class", "knowledge", "crop_to_bbox")


def terms_for(source: str) -> SourceTerms:
    """The terms of a source by its finer name (its `Source.terms`); unknown ones for image folders and
    any name finer does not know."""
    return source_class(source).terms


def size_category(rows: int) -> str:
    """The Hub's size category for a row count."""
    return next((label for bound, label in SIZE_CATEGORIES if rows < bound), "n>1B")


def dataset_card(
    *,
    repo_id: str,
    build: BuildRecord,
    built_on: datetime,
    concepts: list[Concept],
    image_features: datasets.Features,
    concept_features: datasets.Features,
) -> str:
    """README.md for the Hub: YAML metadata, then how it was built, terms, columns and citations.

    `push_to_hub` later adds `dataset_info` and updates `configs` in the same YAML block.
    """
    source = build["source"]
    terms = terms_for(source)
    counts: dict[str, int] = build["counts"]
    meta: dict[str, Any] = {
        "pretty_name": f"{terms.title}: FINER image-attribute-label triples",
        "license": terms.license,
    }
    if terms.license == "other":
        meta["license_name"] = terms.license_name
        if terms.license_link:
            meta["license_link"] = terms.license_link
    meta |= {
        "language": ["en"],
        "task_categories": TASK_CATEGORIES,
        "tags": ["fine-grained", "finer", source],
        "size_categories": [size_category(sum(counts.values()))],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"data/{split}-*"} for split in counts],
            },
            {
                "config_name": CONCEPTS_CONFIG,
                "data_files": [{"split": CONCEPTS_SPLIT, "path": f"{CONCEPTS_CONFIG}/{CONCEPTS_SPLIT}-*"}],
            },
        ],
    }
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    sections = [
        _intro(repo_id, meta["pretty_name"], terms, build),
        _terms_section(terms, concepts),
        _build_section(build, built_on, concepts, terms),
        _columns_section(image_features, concept_features),
        _citation_section(terms),
    ]
    return f"---\n{header}---\n\n" + "\n\n".join(sections) + "\n"


def _intro(repo_id: str, pretty_name: str, terms: SourceTerms, build: BuildRecord) -> str:
    version = build.get("versions", {}).get("finer", "unknown")
    return f"""# {pretty_name}

Built with finer {version} from the `{build["source"]}` source ({terms.title}): every image has labels at \
three levels (superordinate, coarse, fine), and every fine concept has its visible attributes and the \
description they were read from. The data serve attribute-grounded fine-grained recognition with \
vision-language models, following FINER (Kim & Ji, EMNLP 2024).

```python
from datasets import load_dataset

images = load_dataset("{repo_id}")  # one split per official split
concepts = load_dataset("{repo_id}", "{CONCEPTS_CONFIG}", split="{CONCEPTS_SPLIT}")  # one row per concept
```"""


def _terms_section(terms: SourceTerms, concepts: list[Concept]) -> str:
    lines = ["## Licence and terms of use", "", f"**{terms.summary}**"]
    if terms.license_link:
        lines += [
            f"Terms: <{terms.license_link}>.",
            "",
            f"The `license` field says `other` (`{terms.license_name}`) because no standard licence "
            "identifier describes these terms; the labels and attributes derived here inherit them.",
        ]
    if not terms.confirmed and terms.license_link:
        lines += [
            "",
            "finer could not confirm these terms from an official licence text: check the source's own "
            "page before any reuse.",
        ]
    if not terms.images_redistributable:
        lines += ["", "The terms forbid distributing the images: keep this repository private."]
    if any(c.knowledge and c.knowledge.status in ("found", "disambiguation") for c in concepts):
        lines += [
            "",
            "Knowledge texts in the `concepts` config are excerpts of Wikipedia articles, licensed CC BY-SA "
            "4.0; each row's `url` and `revision_id` name the article version quoted.",
        ]
    return "\n".join(lines)


def _build_section(
    build: BuildRecord, built_on: datetime, concepts: list[Concept], terms: SourceTerms
) -> str:
    versions = build.get("versions", {})
    knowledge = build.get("knowledge", {})
    extractors = Counter(c.attributes.extractor or "none" for c in concepts)
    models = sorted(
        {
            label.split(":", 1)[1]
            for label in [*extractors, *(c.coarse_source for c in concepts)]
            if label.startswith(("llm:", "vlm:"))
        }
    )
    templates = Counter(
        (c.attributes.extractor, c.attributes.prompt_sha256) for c in concepts if c.attributes.prompt_sha256
    )
    options = build.get("options", {})
    shown = ", ".join(f"{k}={options[k]}" for k in SHOWN_OPTIONS if options.get(k) is not None)
    source = build["source"]
    source_cell = f"`{source}` ({terms.title}, <{terms.homepage}>)" if terms.homepage else f"`{source}`"
    rows = [
        ("Source", source_cell),
        (
            "finer",
            f"{versions.get('finer', 'unknown')} (datasets {versions.get('datasets', '?')}, "
            f"Python {versions.get('python', '?')})",
        ),
        ("Built", built_on.astimezone(UTC).strftime("%Y-%m-%d")),
        ("Concepts", str(build.get("concepts", len(concepts)))),
        ("Coarse labels from", _tally(build.get("coarse_sources", {}))),
        ("Knowledge", "fetched" if knowledge.get("enabled") else "not fetched (bundled or none)"),
        ("Knowledge status", _tally(knowledge.get("status", {}))),
        ("Attribute extractors", _tally(extractors)),
        ("Models", ", ".join(f"`{m}`" for m in models) or "none"),
        (
            "Prompt templates (sha256)",
            "; ".join(f"`{sha}` ({ex}, {n} concepts)" for (ex, sha), n in sorted(templates.items()))
            or "none",
        ),
        ("Model calls", f"{knowledge.get('calls', 0)} ({knowledge.get('cache_hits', 0)} served from cache)"),
        ("Options", shown or "defaults"),
    ]
    table = ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    counts: dict[str, int] = build["counts"]
    splits = ["| split | images |", "|---|---:|", *(f"| {s} | {n:,} |" for s, n in counts.items())]
    splits.append(f"| **total** | **{sum(counts.values()):,}** |")
    out = ["## How it was built", "", *table, "", "### Images per split", "", *splits]
    warnings = build.get("warnings", [])
    if warnings:
        out += ["", "### Build warnings", "", *(f"- {w}" for w in warnings)]
    return "\n".join(out)


def _tally(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {n}" for key, n in sorted(counts.items())) or "none"


def _columns_section(image_features: datasets.Features, concept_features: datasets.Features) -> str:
    out = ["## Columns", "", "### `default` config: one row per image", ""]
    out += _column_table(image_features, IMAGE_COLUMNS)
    out += ["", f"### `{CONCEPTS_CONFIG}` config: one row per fine concept", ""]
    out += _column_table(concept_features, CONCEPT_COLUMNS)
    return "\n".join(out)


def _column_table(features: datasets.Features, meanings: dict[str, str]) -> list[str]:
    rows = [
        f"| `{name}` | {_type_name(feature)} | {meanings.get(name, '')} |"
        for name, feature in features.items()
    ]
    return ["| column | type | meaning |", "|---|---|---|", *rows]


def _type_name(feature: Any) -> str:
    """A short, readable type for the column tables."""
    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.ClassLabel):
        return f"class label ({feature.num_classes} names)"
    if isinstance(feature, datasets.Value):
        return feature.dtype
    if isinstance(feature, datasets.List):
        return f"list[{_type_name(feature.feature)}]"
    if isinstance(feature, dict):
        return "struct"
    return type(feature).__name__


def _citation_section(terms: SourceTerms) -> str:
    out = [
        "## Citation",
        "",
        "FINER (the protocol this dataset follows):",
        "",
        "```bibtex",
        FINER_CITATION,
        "```",
    ]
    if terms.citation:
        out += ["", f"{terms.title} (the source dataset):", "", "```bibtex", terms.citation, "```"]
    return "\n".join(out)
