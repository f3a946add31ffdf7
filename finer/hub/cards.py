"""The Hub dataset card of a built dataset: YAML metadata, how it was built, its columns, terms, citations.

The licence comes from the source dataset's own terms. Most of the sources are research-only and have no
SPDX identifier, so the card says `license: other` with a `license_name` and a link to the terms, and its
body says in plain words what the terms allow and what we could not confirm.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import datasets
import yaml

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


@dataclass(frozen=True)
class SourceTerms:
    """What a source's terms allow, where they are written, and how sure we are of them."""

    title: str
    homepage: str
    license: str  # a Hub licence id, or "other" with license_name / license_link
    license_name: str
    license_link: str
    summary: str
    #: False where we summarise from secondary sources only: the card asks readers to check the terms.
    confirmed: bool
    #: False where the terms forbid passing the images on: then only private repositories are allowed.
    images_redistributable: bool
    citation: str


TERMS: dict[str, SourceTerms] = {
    "cub200": SourceTerms(
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
    ),
    "nabirds": SourceTerms(
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
    ),
    "stanford-dogs": SourceTerms(
        title="Stanford Dogs",
        homepage="http://vision.stanford.edu/aditya86/ImageNetDogs/",
        license="other",
        license_name="imagenet-terms",
        license_link="https://www.image-net.org/download.php",
        summary=(
            "Built from ImageNet images and annotations, so the ImageNet Terms of Access apply: "
            "non-commercial research and educational use only; the images are copyrighted by their owners."
        ),
        confirmed=True,
        images_redistributable=True,
        citation="""@inproceedings{KhoslaYaoJayadevaprakashFeiFei_FGVC2011,
  title     = {Novel Dataset for Fine-Grained Image Categorization},
  author    = {Khosla, Aditya and Jayadevaprakash, Nityananda and Yao, Bangpeng and Fei-Fei, Li},
  booktitle = {First Workshop on Fine-Grained Visual Categorization,
               IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  address   = {Colorado Springs, CO},
  year      = {2011}
}

@inproceedings{deng2009imagenet,
  title     = {ImageNet: A Large-Scale Hierarchical Image Database},
  author    = {Deng, Jia and Dong, Wei and Socher, Richard and Li, Li-Jia and Li, Kai and Fei-Fei, Li},
  booktitle = {IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2009}
}""",
    ),
    "stanford-cars": SourceTerms(
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
    ),
    "fgvc-aircraft": SourceTerms(
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
    ),
    "inat2021": SourceTerms(
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
    ),
    "demo": SourceTerms(
        title="finer demo birds",
        homepage="",
        license="apache-2.0",
        license_name="",
        license_link="",
        summary=(
            "Images drawn procedurally by finer's demo source and descriptions written for it: "
            "Apache-2.0, like the toolkit."
        ),
        confirmed=True,
        images_redistributable=True,
        citation="",
    ),
}

#: For `imagefolder` and any source without an entry: finer cannot know where the images came from.
UNKNOWN_TERMS = SourceTerms(
    title="Image folder",
    homepage="",
    license="other",
    license_name="unknown",
    license_link="",
    summary=(
        "Unknown: finer cannot tell where these images came from. The publisher must state their licence "
        "here and in the `license` field before anyone reuses them."
    ),
    confirmed=False,
    images_redistributable=True,
    citation="",
)

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
    """The terms of a source by its finer name; unknown ones for image folders and anything new."""
    return TERMS.get(source, UNKNOWN_TERMS)


def size_category(rows: int) -> str:
    """The Hub's size category for a row count."""
    return next((label for bound, label in SIZE_CATEGORIES if rows < bound), "n>1B")


def dataset_card(
    *,
    repo_id: str,
    build: dict[str, Any],
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


def _intro(repo_id: str, pretty_name: str, terms: SourceTerms, build: dict[str, Any]) -> str:
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
    build: dict[str, Any], built_on: datetime, concepts: list[Concept], terms: SourceTerms
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
