"""The cub200, nabirds, inat2021 and imagefolder sources on synthetic copies of their official layouts."""

from __future__ import annotations

import inspect
import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

import finer.builders.inat2021 as inat_module
from finer.builders import SOURCES, LayoutError, Source, get_source, source_class
from finer.builders.base import UNKNOWN_TERMS
from finer.builders.cub200 import Cub200Source
from finer.builders.imagefolder import ImageFolderSource
from finer.builders.inat2021 import INat2021Source
from finer.builders.nabirds import NABirdsSource, split_group
from finer.data.build import BuildConfig, build, iter_concepts
from finer.data.coarse import HEAD_NOUN
from finer.errors import FinerError
from tests.layouts import (
    CUB_ATTRIBUTES,
    CUB_CORRUPT,
    CUB_IMAGES,
    CUB_SCORES,
    IMAGEFOLDER_CORRUPT,
    INAT_CORRUPT,
    NABIRDS_CORRUPT,
    NABIRDS_IMAGES,
    cub_box,
    jpeg,
    nabirds_box,
    write_cub,
    write_imagefolder,
    write_inat,
    write_nabirds,
)


def _counts(source: Source) -> dict[str, int]:
    return {split: sum(1 for _ in source.records(split)) for split in source.splits()}


def _one_line_layout_error(call, *needles: str) -> None:
    with pytest.raises(LayoutError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


# --- CUB-200-2011 ----------------------------------------------------------------------------------------


@pytest.fixture
def cub(tmp_path: Path) -> Path:
    return write_cub(tmp_path / "download")


def test_cub_concepts_have_cleaned_fine_names_and_no_coarse(cub: Path) -> None:
    concepts = Cub200Source(cub).concepts()
    assert [c.concept_id for c in concepts] == ["001", "002", "003"]
    assert [c.fine for c in concepts] == [["Black footed Albatross"], ["Laysan Albatross"], ["Pine Grosbeak"]]
    assert {c.superordinate for c in concepts} == {"Bird"}
    assert all(c.coarse == [] and c.coarse_source == "" for c in concepts)
    assert Cub200Source.coarse_rule is HEAD_NOUN


def test_cub_splits_follow_train_test_split(cub: Path) -> None:
    source = Cub200Source(cub)
    assert source.splits() == ["train", "test"]
    assert _counts(source) == {"train": 6, "test": 3}
    test = list(source.records("test"))
    assert [r.image_id for r in test] == ["3", "6", "9"]
    assert [r.concept_id for r in test] == ["001", "002", "003"]
    assert all(r.path.is_file() and r.path.is_relative_to(cub / "images") for r in test)


def test_cub_boxes_are_x_y_w_h(cub: Path) -> None:
    boxes = {r.image_id: r.bbox for r in Cub200Source(cub).records("train")}
    assert boxes["1"] == cub_box("1") == [1.0, 1.5, 4.0, 4.0]
    assert boxes == {i: cub_box(i) for i, (_, t) in CUB_IMAGES.items() if t == "1"}


def test_cub_without_box_file_has_no_boxes(cub: Path) -> None:
    (cub / "bounding_boxes.txt").unlink()
    assert {r.bbox for r in Cub200Source(cub).records("test")} == {None}


@pytest.mark.parametrize("box", ["1 2 3", "1 2 3 4 5", "1 2 three 4"])
def test_a_box_that_is_not_four_numbers_names_the_image(cub: Path, box: str) -> None:
    (cub / "bounding_boxes.txt").write_text(f"1 {box}\n")
    with pytest.raises(LayoutError, match=r"bounding_boxes.txt: image 1: box .* is not four numbers"):
        list(Cub200Source(cub).records("train"))


@pytest.mark.parametrize("given", ["folder", "parent"])
def test_cub_root_may_be_the_folder_or_its_parent(cub: Path, given: str) -> None:
    source = Cub200Source(cub if given == "folder" else cub.parent)
    assert source.base == cub
    assert [r.path for r in source.records("train")][0] == cub / "images" / (
        "001.Black_footed_Albatross/Black_footed_Albatross_0001_1.jpg"
    )
    assert source.class_attributes()["001"][CUB_ATTRIBUTES[0]] == 80.5


@pytest.mark.parametrize(
    "missing", ["images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt", "images"]
)
def test_cub_missing_file_is_named_with_the_layout(cub: Path, missing: str) -> None:
    path = cub / missing
    if path.is_dir():
        path.rename(cub / "pictures")
    else:
        path.unlink()
    _one_line_layout_error(lambda: Cub200Source(cub.parent), f"missing {path}", Cub200Source.layout)


def test_cub_wrong_root_names_the_first_file_looked_for(tmp_path: Path) -> None:
    _one_line_layout_error(lambda: Cub200Source(tmp_path), str(tmp_path / "images.txt"), "CUB_200_2011/")


@pytest.mark.parametrize(
    "escape", ["../../../../etc/passwd", "/etc/passwd", "001.Black_footed_Albatross/../../x"]
)
def test_cub_refuses_list_paths_outside_the_root(cub: Path, escape: str) -> None:
    lines = (cub / "images.txt").read_text().splitlines()
    lines[0] = f"1 {escape}"
    (cub / "images.txt").write_text("\n".join(lines) + "\n")
    _one_line_layout_error(lambda: list(Cub200Source(cub).records("train")), "refusing path", escape)


def test_cub_class_attributes_keep_the_annotation_scores(cub: Path) -> None:
    scores = Cub200Source(cub).class_attributes()
    assert list(scores) == ["001", "002", "003"]
    assert {cid: list(row.values()) for cid, row in scores.items()} == {
        f"00{c}": v for c, v in CUB_SCORES.items()
    }
    assert list(scores["002"]) == CUB_ATTRIBUTES


def test_cub_class_attributes_need_attributes_txt(cub: Path) -> None:
    (cub.parent / "attributes.txt").unlink()
    source = Cub200Source(cub)
    assert _counts(source) == {"train": 6, "test": 3}  # the images build without it
    _one_line_layout_error(source.class_attributes, str(cub.parent / "attributes.txt"))


def test_cub_malformed_list_line_is_a_layout_error(cub: Path) -> None:
    (cub / "train_test_split.txt").write_text("1\n")
    _one_line_layout_error(lambda: list(Cub200Source(cub).records("train")), "train_test_split.txt:1")


# --- NABirds ---------------------------------------------------------------------------------------------


@pytest.fixture
def nabirds(tmp_path: Path) -> Path:
    return write_nabirds(tmp_path)


def test_nabirds_concepts_are_the_leaves_with_images(nabirds: Path) -> None:
    concepts = {c.concept_id: c for c in NABirdsSource(nabirds).concepts()}
    assert list(concepts) == ["0011", "0012", "0020", "0031"]  # not 0032: a leaf without images
    assert {c.superordinate for c in concepts.values()} == {"Bird"}
    assert {c.coarse_source for c in concepts.values()} == {"taxonomy"}
    # Plumage branches of "Common Eider": the grandparent's group, split on "," and " and ".
    for cid in ("0011", "0012"):
        assert concepts[cid].fine == ["Common Eider"]
        assert concepts[cid].coarse == ["Ducks", "Geese", "Swans"]
    assert concepts["0011"].taxonomy == {
        "lineage": "Birds > Ducks, Geese, and Swans",
        "variant": "Adult male",
    }
    # A parenthetical whose parent is not the species: the parent is the group.
    assert concepts["0020"].fine == ["Great Blue Heron"]
    assert concepts["0020"].coarse == ["Herons", "Egrets"]
    assert concepts["0031"].fine == ["Bewick's Wren"]
    assert concepts["0031"].coarse == ["Wrens"]
    assert concepts["0031"].taxonomy == {"lineage": "Birds > Perching Birds > Wrens"}


@pytest.mark.parametrize(
    ("group", "labels"),
    [
        ("Ducks, Geese, and Swans", ["Ducks", "Geese", "Swans"]),
        ("Herons and Egrets", ["Herons", "Egrets"]),
        ("Hawks, Kites, Eagles and Allies", ["Hawks", "Kites", "Eagles", "Allies"]),
        ("Sandpipers", ["Sandpipers"]),
        ("Sanderling", ["Sanderling"]),
    ],
)
def test_nabirds_group_names_split_into_accepted_labels(group: str, labels: list[str]) -> None:
    assert split_group(group) == labels


@pytest.mark.parametrize("given", ["folder", "parent"])
def test_nabirds_splits_and_boxes(nabirds: Path, given: str) -> None:
    source = NABirdsSource(nabirds if given == "folder" else nabirds.parent)
    assert _counts(source) == {"train": 8, "test": 4}
    train = list(source.records("train"))
    assert Counter(r.concept_id for r in train) == {"0011": 2, "0012": 2, "0020": 2, "0031": 2}
    assert {r.image_id: r.bbox for r in train} == {
        i: nabirds_box(i) for i, (_, t) in NABIRDS_IMAGES.items() if t == "1"
    }
    assert train[0].path == nabirds / "images" / "0011" / f"{NABIRDS_CORRUPT.replace('-', '')}.jpg"


def test_nabirds_refuses_list_paths_outside_the_root(nabirds: Path) -> None:
    lines = (nabirds / "images.txt").read_text().splitlines()
    lines[0] = f"{NABIRDS_CORRUPT} ../../../etc/passwd"
    (nabirds / "images.txt").write_text("\n".join(lines) + "\n")
    _one_line_layout_error(lambda: list(NABirdsSource(nabirds).records("train")), "refusing path")


def test_nabirds_missing_hierarchy_is_named(nabirds: Path) -> None:
    (nabirds / "hierarchy.txt").unlink()
    _one_line_layout_error(lambda: NABirdsSource(nabirds), str(nabirds / "hierarchy.txt"), "nabirds/")


def test_nabirds_images_of_inner_classes_are_refused(nabirds: Path) -> None:
    labels = (nabirds / "image_class_labels.txt").read_text().replace(" 11\n", " 10\n", 1)
    (nabirds / "image_class_labels.txt").write_text(labels)
    _one_line_layout_error(NABirdsSource(nabirds).concepts, "inner class 0010")


# --- iNaturalist 2021 ------------------------------------------------------------------------------------


def test_inat_splits_are_the_files_present(tmp_path: Path) -> None:
    assert INat2021Source(write_inat(tmp_path / "a")).splits() == ["train", "val"]
    assert INat2021Source(write_inat(tmp_path / "b", mini=True)).splits() == ["train", "train_mini", "val"]
    (tmp_path / "b" / "train.json").unlink()
    assert INat2021Source(tmp_path / "b").splits() == ["train_mini", "val"]


def test_inat_concepts_three_levels_and_ranks(tmp_path: Path) -> None:
    concepts = INat2021Source(write_inat(tmp_path)).concepts()
    assert [c.concept_id for c in concepts] == ["00000", "00001", "00002"]
    owl = concepts[1]
    assert owl.superordinate == "Birds"
    assert owl.coarse == ["Strigidae"] and owl.coarse_source == "taxonomy"
    assert owl.fine == ["Bubo virginianus", "Great Horned Owl"]
    assert owl.taxonomy == {
        "kingdom": "Animalia",
        "phylum": "Chordata",
        "class": "Aves",
        "order": "Strigiformes",
        "family": "Strigidae",
        "genus": "Bubo",
        "specific_epithet": "virginianus",
    }
    assert [c.superordinate for c in concepts] == ["Animalia", "Birds", "Fungi"]


def test_inat_records_per_split(tmp_path: Path) -> None:
    root = write_inat(tmp_path, mini=True)
    source = INat2021Source(root)
    assert _counts(source) == {"train": 6, "train_mini": 3, "val": 3}
    val = list(source.records("val"))
    assert [r.image_id for r in val] == ["7", "8", "9"]
    assert [r.concept_id for r in val] == ["00000", "00001", "00002"]
    owl_folder = "00001_Animalia_Chordata_Aves_Strigiformes_Strigidae_Bubo_virginianus"
    assert val[1].path == root / "val" / owl_folder / "000008-uuid.jpg"
    assert all(r.path.is_file() and r.bbox is None for r in val)


def test_inat_parses_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_inat(tmp_path)
    (tmp_path / "val.json").unlink()
    parsed: list[Path] = []
    real = inat_module.load_split
    monkeypatch.setattr(inat_module, "load_split", lambda path: parsed.append(path) or real(path))
    source = INat2021Source(tmp_path)
    assert len(source.concepts()) == 3
    assert sum(1 for _ in source.records("train")) == 6
    assert parsed == [tmp_path / "train.json"]


@pytest.mark.parametrize(
    "escape",
    ["../outside.jpg", "train/../../outside.jpg", "/etc/passwd", "train/x/../../../etc/passwd", ".."],
)
def test_inat_refuses_file_names_outside_the_root(tmp_path: Path, escape: str) -> None:
    root = write_inat(tmp_path / "inat")
    content = json.loads((root / "val.json").read_text())
    content["images"][1]["file_name"] = escape
    (root / "val.json").write_text(json.dumps(content))
    _one_line_layout_error(lambda: list(INat2021Source(root).records("val")), "refusing path")


def test_inat_missing_files_are_named(tmp_path: Path) -> None:
    _one_line_layout_error(lambda: INat2021Source(tmp_path), str(tmp_path / "train.json"), "COCO-like")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "not an iNat-2021 annotation file"),
        ('{"images": [], "categories": []}', "'annotations'"),
        ('{"images": [{"id": 5, "file_name": "a.jpg"}], "annotations": [], "categories": []}', "image 5"),
    ],
)
def test_inat_bad_annotation_file_is_a_layout_error(tmp_path: Path, content: str, needle: str) -> None:
    (tmp_path / "val.json").write_text(content)
    _one_line_layout_error(lambda: list(INat2021Source(tmp_path).records("val")), "val.json", needle)


# --- image folder ----------------------------------------------------------------------------------------


def test_imagefolder_without_taxonomy(tmp_path: Path) -> None:
    source = ImageFolderSource(write_imagefolder(tmp_path))
    assert source.splits() == ["train", "test"]
    concepts = source.concepts()
    assert [c.concept_id for c in concepts] == ["Golden_Retriever", "great_horned_owl", "snowy_owl"]
    assert [c.fine for c in concepts] == [["Golden Retriever"], ["great horned owl"], ["snowy owl"]]
    assert {c.superordinate for c in concepts} == {"object"}
    assert all(c.coarse == [] for c in concepts) and source.coarse_rule is HEAD_NOUN
    assert _counts(source) == {"train": 6, "test": 2}
    assert [r.image_id for r in source.records("train")][:3] == [
        "train/Golden_Retriever/f.JPG",
        "train/great_horned_owl/a.jpg",
        "train/great_horned_owl/b.png",
    ]


def test_imagefolder_taxonomy_csv_gives_upper_levels(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path)
    (root / "taxonomy.csv").write_text(
        "\ufefffine,coarse,superordinate\n"
        "great_horned_owl,Owl|Bird of prey,Bird\n"
        "snowy owl,Owl,Bird\n"
        "Golden_Retriever,,Dog\n"
        "Unused class,X,Y\n",
        encoding="utf-8",
    )
    concepts = {c.concept_id: c for c in ImageFolderSource(root).concepts()}
    assert concepts["great_horned_owl"].coarse == ["Owl", "Bird of prey"]
    assert concepts["great_horned_owl"].coarse_source == "taxonomy"
    assert concepts["snowy_owl"].superordinate == "Bird" and concepts["snowy_owl"].coarse == ["Owl"]
    assert concepts["Golden_Retriever"].superordinate == "Dog"
    assert concepts["Golden_Retriever"].coarse == [] and concepts["Golden_Retriever"].coarse_source == ""


def test_imagefolder_class_missing_from_taxonomy_is_named(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path)
    (root / "taxonomy.csv").write_text("fine,coarse,superordinate\nsnowy_owl,Owl,Bird\n")
    _one_line_layout_error(ImageFolderSource(root).concepts, "'Golden_Retriever'", "taxonomy.csv")


def test_imagefolder_wrong_root_says_what_is_expected(tmp_path: Path) -> None:
    _one_line_layout_error(lambda: ImageFolderSource(tmp_path), "no images under", "<root>/<split>/<class>/")
    jpeg(tmp_path / "owl" / "a.jpg")  # a class folder passed as if it were the root
    _one_line_layout_error(lambda: ImageFolderSource(tmp_path), f"images directly in {tmp_path / 'owl'}")


# --- registry and the build engine -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("cub200", Cub200Source),
        ("nabirds", NABirdsSource),
        ("inat2021", INat2021Source),
        ("imagefolder", ImageFolderSource),
    ],
)
def test_sources_are_registered(name: str, cls: type[Source]) -> None:
    assert get_source(name) is cls and cls.name == name


def test_each_module_holds_one_source_and_unknown_names_get_the_defaults() -> None:
    assert " ".join(SOURCES) == (
        "cub200 demo fgvc-aircraft imagefolder inat2021 nabirds stanford-cars stanford-dogs"
    )
    assert all(get_source(name).name == name and not inspect.isabstract(get_source(name)) for name in SOURCES)
    assert source_class("built-elsewhere") is Source and Source.terms is UNKNOWN_TERMS
    assert not Source.closed_levels and Source.coarse_rule is None and Source.original_dataset_name is None
    with pytest.raises(FinerError, match="unknown source 'built-elsewhere'; choose one of: cub200, demo"):
        get_source("built-elsewhere")


def test_unknown_split_is_a_one_line_error(cub: Path, tmp_path: Path) -> None:
    for source in (Cub200Source(cub), INat2021Source(write_inat(tmp_path / "i"))):
        with pytest.raises(FinerError, match="no split 'validation'"):
            next(iter(source.records("validation")))


BUILDS = {
    # source: (writer, counts after the corrupt image is skipped, skipped image id, first concept's coarse)
    "cub200": (lambda p: write_cub(p).parent, {"train": 5, "test": 3}, CUB_CORRUPT, ["Albatross"]),
    "nabirds": (write_nabirds, {"train": 7, "test": 4}, NABIRDS_CORRUPT, ["Ducks", "Geese", "Swans"]),
    "inat2021": (write_inat, {"train": 5, "val": 3}, str(INAT_CORRUPT), ["Lumbricidae"]),
    "imagefolder": (write_imagefolder, {"train": 5, "test": 2}, "/".join(IMAGEFOLDER_CORRUPT), ["Retriever"]),
}


@pytest.mark.parametrize("name", list(BUILDS))
def test_end_to_end_build(name: str, tmp_path: Path) -> None:
    writer, counts, corrupt, coarse = BUILDS[name]
    out = tmp_path / "out"
    summary = build(BuildConfig(source=name, root=writer(tmp_path / "data"), out=out, knowledge=False))
    assert summary["counts"] == counts
    assert [s["image_id"] for split in summary["skipped"].values() for s in split] == [corrupt]
    concepts = list(iter_concepts(out / "concepts.jsonl"))
    assert concepts[0].coarse == coarse
    dataset = datasets.load_from_disk(str(out))
    row = dataset[next(iter(counts))][0]
    assert row["source"] == name and row["image"].size == (8, 8)
    assert dataset[next(iter(counts))].features["label"].int2str(row["label"]) == row["fine"][0]
