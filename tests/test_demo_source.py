"""The embedded demo source: labels, bundled knowledge, split sizes, determinism and the images themselves."""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from finer.builders import ImageRecord, demo, get_source
from finer.builders.demo import IMAGE_SIZE, SPECIES, SPLIT_SIZES, DemoSource, render
from finer.errors import FinerError


@pytest.fixture(scope="module")
def records() -> dict[str, list[ImageRecord]]:
    """Every record of the default source, rendered once for the whole module (about 2.5 MB)."""
    source = DemoSource()
    return {split: list(source.records(split)) for split in source.splits()}


def test_registered_and_needs_no_root() -> None:
    source = get_source("demo")()
    assert isinstance(source, DemoSource)
    assert source.name == "demo"
    assert source.bundled_knowledge


def test_eight_concepts_in_four_pairs() -> None:
    concepts = DemoSource().concepts()
    assert len(concepts) == 8
    assert len({c.concept_id for c in concepts}) == 8
    groups = Counter(c.coarse[0] for c in concepts)
    assert len(groups) == 4 and set(groups.values()) == {2}
    for concept in concepts:
        assert re.fullmatch(r"[a-z]+(-[a-z]+)*", concept.concept_id)
        assert concept.superordinate == "Bird"
        assert concept.coarse_source == "taxonomy"
        common, binomial = concept.fine
        assert concept.name == common
        assert re.fullmatch(r"[A-Z][a-z]+ [a-z]+", binomial)
        assert concept.taxonomy["genus"] == binomial.split()[0]
        assert concept.taxonomy["family"] in concept.coarse
        assert concept.taxonomy["order"] == "Passeriformes"


def test_taxonomy_does_not_give_the_fine_label_away() -> None:
    # The knowledge probe shows the taxonomy beside the attributes; naming the species there would leak it.
    for concept in DemoSource().concepts():
        shown = " ".join(concept.taxonomy.values()).lower()
        assert all(label.lower() not in shown for label in concept.fine)


def test_every_concept_has_bundled_knowledge_and_attributes() -> None:
    for concept in DemoSource().concepts():
        knowledge = concept.knowledge
        assert knowledge is not None
        assert knowledge.status == "bundled"
        assert knowledge.title == concept.name
        assert knowledge.section == "Description"
        assert 3 <= len(re.split(r"(?<=\.)\s+", knowledge.text.strip())) <= 5
        assert concept.name in knowledge.text
        attributes = concept.attributes
        assert attributes.extractor == "bundled"
        assert attributes.required and all(a.strip() for a in attributes.required)
        assert attributes.likely and all(a.strip() for a in attributes.likely)
        assert not set(attributes.required) & set(attributes.likely)


def test_pairs_differ_in_required_attributes() -> None:
    by_group: dict[str, list[set[str]]] = {}
    for concept in DemoSource().concepts():
        by_group.setdefault(concept.coarse[0], []).append(set(concept.attributes.required))
    for first, second in by_group.values():
        assert first - second and second - first


def test_concepts_are_fresh_copies() -> None:
    source = DemoSource()
    source.concepts()[0].attributes.required.append("edited")
    assert "edited" not in source.concepts()[0].attributes.required


def test_split_sizes(records: dict[str, list[ImageRecord]]) -> None:
    assert DemoSource().splits() == ["train", "test"]
    for split, rows in records.items():
        counts = Counter(r.concept_id for r in rows)
        assert counts == {s.concept_id: SPLIT_SIZES[split] for s in SPECIES}
    assert sum(len(rows) for rows in records.values()) == 8 * sum(SPLIT_SIZES.values())


def test_image_ids_are_unique_and_well_formed(records: dict[str, list[ImageRecord]]) -> None:
    ids = [r.image_id for rows in records.values() for r in rows]
    assert len(set(ids)) == len(ids)
    for split, rows in records.items():
        for r in rows:
            concept_id, where, index = r.image_id.split("/")
            assert (concept_id, where) == (r.concept_id, split)
            assert re.fullmatch(r"\d{3}", index) and int(index) < SPLIT_SIZES[split]


def test_no_two_images_identical(records: dict[str, list[ImageRecord]]) -> None:
    digests = [hashlib.sha256(r.data).hexdigest() for rows in records.values() for r in rows]
    assert len(set(digests)) == len(digests)


def test_images_decode_at_the_expected_size_with_the_bird_inside(
    records: dict[str, list[ImageRecord]],
) -> None:
    for rows in records.values():
        for r in rows:
            assert r.path is None and r.data
            with Image.open(io.BytesIO(r.data)) as image:
                assert image.format == "JPEG"
                image.load()
                assert image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
            x, y, w, h = r.bbox
            assert x >= 0 and y >= 0 and x + w <= IMAGE_SIZE and y + h <= IMAGE_SIZE
            assert w * h >= 0.15 * IMAGE_SIZE**2


def test_same_seed_same_bytes_other_seed_other_bytes(records: dict[str, list[ImageRecord]]) -> None:
    again = list(DemoSource(seed=0).records("test"))
    assert [(r.image_id, r.data, r.bbox) for r in again] == [
        (r.image_id, r.data, r.bbox) for r in records["test"]
    ]
    other = list(DemoSource(seed=1).records("test"))
    assert [r.image_id for r in other] == [r.image_id for r in records["test"]]
    assert all(a.data != b.data for a, b in zip(other, records["test"], strict=True))


def test_records_render_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting(*args: object) -> tuple[bytes, list[float]]:
        calls.append(args)
        return render(*args)

    monkeypatch.setattr(demo, "render", counting)
    stream = DemoSource().records("train")
    assert calls == []
    next(stream)
    assert len(calls) == 1


def test_the_pair_trait_changes_the_picture() -> None:
    # Same random draws, other species of the pair: the same pose on the same background, so every
    # large difference inside the bird's box comes from the plumage.
    by_group: dict[str, list[demo.Species]] = {}
    for species in SPECIES:
        by_group.setdefault(species.group, []).append(species)
    for first, second in by_group.values():
        (a, box), (b, _) = (render(s, np.random.default_rng(7)) for s in (first, second))
        x, y, w, h = (int(v) for v in box)
        pixels = [np.asarray(Image.open(io.BytesIO(d)), int)[y : y + h, x : x + w] for d in (a, b)]
        changed = (np.abs(pixels[0] - pixels[1]).max(axis=2) > 60).mean()
        assert changed > 0.02, (first.common, second.common, changed)


def test_unknown_split_raises() -> None:
    with pytest.raises(FinerError, match="validation"):
        DemoSource().records("validation")


def test_negative_seed_raises() -> None:
    with pytest.raises(FinerError, match="seed"):
        DemoSource(seed=-1)
