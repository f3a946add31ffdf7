"""Stanford Dogs, Stanford Cars and FGVC-Aircraft sources on tiny official layouts, and the FINER export."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

from finer.builders import LayoutError, get_source
from finer.builders.fgvc_aircraft import FGVCAircraftSource
from finer.builders.stanford_cars import StanfordCarsSource, car_body_type
from finer.builders.stanford_dogs import StanfordDogsSource, breed_name
from finer.data.build import BuildConfig, build
from finer.data.coarse import RuleCoarseLabeller
from finer.data.export import attribute_rows, export_finer
from finer.schema import Attributes, Concept, image_features
from tests.layouts_vehicles_dogs import (
    AIRCRAFT_SIZE,
    BANNER,
    BODY,
    write_aircraft_labels,
    write_cars_annotations,
    write_dogs_list,
    write_fgvc_aircraft,
    write_image,
    write_stanford_cars_devkit,
    write_stanford_cars_folders,
    write_stanford_dogs,
)


def _near(pixel: tuple[int, ...], colour: tuple[int, int, int], tolerance: int = 24) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=True))


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
    except OSError:
        return False
    return True


def _layout_error(source: type, root: Path) -> str:
    with pytest.raises(LayoutError) as caught:
        source(root)
    message = str(caught.value)
    assert "\n" not in message
    return message


# Stanford Dogs


@pytest.mark.parametrize(
    ("folder", "breed"),
    [
        ("n02085620-Chihuahua", "Chihuahua"),
        ("n02099429-curly-coated_retriever", "curly-coated retriever"),
        ("n02086240-Shih-Tzu", "Shih-Tzu"),
        ("n02106662-German_shepherd", "German shepherd"),
    ],
)
def test_breed_is_everything_after_the_first_hyphen(folder: str, breed: str) -> None:
    assert breed_name(folder) == breed


def test_breed_name_refuses_a_folder_without_wnid() -> None:
    with pytest.raises(LayoutError, match="<wnid>-<Breed>"):
        breed_name("Chihuahua")


def test_dogs_concepts_have_three_levels(tmp_path: Path) -> None:
    source = StanfordDogsSource(write_stanford_dogs(tmp_path))
    concepts = source.concepts()
    assert [c.concept_id for c in concepts] == ["n02085620", "n02086240", "n02099429"]
    assert [c.fine for c in concepts] == [["Chihuahua"], ["Shih-Tzu"], ["curly-coated retriever"]]
    assert {c.superordinate for c in concepts} == {"Dog"}
    assert all(c.coarse == [] for c in concepts)  # left to the labeller
    RuleCoarseLabeller().label(concepts, source.coarse_rule)
    assert [c.coarse for c in concepts] == [["Chihuahua"], ["Shih-Tzu"], ["Retriever"]]


def test_dogs_records_follow_the_lists_with_first_object_boxes(tmp_path: Path) -> None:
    source = StanfordDogsSource(write_stanford_dogs(tmp_path))
    assert source.splits() == ["train", "test"]
    train, test = list(source.records("train")), list(source.records("test"))
    assert (len(train), len(test)) == (9, 6)
    assert [r.image_id for r in test[:3]] == ["n02085620_test0", "n02085620_test1", "n02086240_test0"]
    assert [r.concept_id for r in test] == ["n02085620"] * 2 + ["n02086240"] * 2 + ["n02099429"] * 2
    assert test[1].path == tmp_path / "Images" / "n02085620-Chihuahua" / "n02085620_test1.jpg"
    assert test[1].bbox == [2.0, 2.0, 9.0, 28.0]  # (xmin 2, ymin 2, xmax 11, ymax 30), not the 2nd object
    assert train[0].path.is_file() and not _readable(train[0].path)  # the engine's check drops it
    assert all(_readable(r.path) for r in train[1:] + test)


def test_dogs_accept_loose_lists_and_missing_annotations(tmp_path: Path) -> None:
    source = StanfordDogsSource(write_stanford_dogs(tmp_path, lists_folder=False, annotations=False))
    records = list(source.records("train"))
    assert len(records) == 9 and all(r.bbox is None for r in records)


def test_dogs_refuse_list_paths_outside_the_root(tmp_path: Path) -> None:
    root = write_stanford_dogs(tmp_path / "dogs")
    (tmp_path / "etc").mkdir()
    write_image(tmp_path / "etc" / "passwd.jpg")
    write_dogs_list(root / "lists" / "train_list.mat", ["../../etc/passwd.jpg"], [1])
    with pytest.raises(LayoutError, match="outside the dataset root"):
        list(StanfordDogsSource(root).records("train"))


def test_dogs_refuse_a_label_that_contradicts_the_folder(tmp_path: Path) -> None:
    root = write_stanford_dogs(tmp_path)
    write_dogs_list(root / "lists" / "test_list.mat", ["n02085620-Chihuahua/n02085620_test0.jpg"], [2])
    with pytest.raises(LayoutError, match="label 2"):
        list(StanfordDogsSource(root).records("test"))


def test_dogs_wrong_root_names_the_missing_file(tmp_path: Path) -> None:
    message = _layout_error(StanfordDogsSource, tmp_path)
    assert str(tmp_path / "lists" / "file_list.mat") in message and "Images/<wnid>-<Breed>" in message


# Stanford Cars


@pytest.mark.parametrize("test_labels_in", ["root", "devkit"])
def test_cars_devkit_layout(tmp_path: Path, test_labels_in: str) -> None:
    source = StanfordCarsSource(write_stanford_cars_devkit(tmp_path, test_labels_in=test_labels_in))
    assert source.splits() == ["train", "test"]
    concepts = source.concepts()
    assert concepts[2].fine == ["Ford F-150 Regular Cab 2012"] and concepts[2].superordinate == "Car"
    assert [c.concept_id for c in concepts][2:] == [
        "ford-f-150-regular-cab-2012",
        "ram-c-v-cargo-van-minivan-2012",
    ]
    train, test = list(source.records("train")), list(source.records("test"))
    assert (len(train), len(test)) == (8, 4)
    third = train[2]  # image 3 is of class 3 (classes take turns)
    assert third.image_id == "train/00003" and third.path == tmp_path / "cars_train" / "00003.jpg"
    assert third.concept_id == "ford-f-150-regular-cab-2012"
    assert third.bbox == [3.0, 2.0, 10.0, 28.0]
    assert test[3].concept_id == "ram-c-v-cargo-van-minivan-2012" and test[3].image_id == "test/00004"
    assert not _readable(train[0].path) and all(_readable(r.path) for r in train[1:] + test)


def test_cars_without_test_labels_offer_train_only(tmp_path: Path) -> None:
    assert StanfordCarsSource(write_stanford_cars_devkit(tmp_path, test_labels_in=None)).splits() == ["train"]


def test_cars_class_folders_give_the_same_ids_as_the_devkit(tmp_path: Path) -> None:
    devkit = StanfordCarsSource(write_stanford_cars_devkit(tmp_path / "devkit"))
    folders = StanfordCarsSource(write_stanford_cars_folders(tmp_path / "folders"))
    assert folders.splits() == ["train", "test"]
    assert {c.concept_id for c in folders.concepts()} == {c.concept_id for c in devkit.concepts()}
    assert "Ram C-V Cargo Van Minivan 2012" in {c.name for c in folders.concepts()}
    for split in ("train", "test"):
        from_folders = list(folders.records(split))
        assert all(r.bbox is None for r in from_folders)
        pairs = sorted((r.image_id, r.concept_id) for r in from_folders)
        assert pairs == sorted((r.image_id, r.concept_id) for r in devkit.records(split))
    assert len(pairs) == 4


def test_cars_coarse_body_types(tmp_path: Path) -> None:
    source = StanfordCarsSource(write_stanford_cars_devkit(tmp_path))
    concepts = source.concepts()
    RuleCoarseLabeller().label(concepts, source.coarse_rule)
    assert [c.coarse[0] for c in concepts] == ["SUV", "sedan", "pickup", "van"]


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("Acura TL Type-S 2008", "sedan"),
        ("Buick Regal GS 2012", "sedan"),
        ("Chevrolet HHR SS 2010", "wagon"),
        ("Chevrolet TrailBlazer SS 2009", "SUV"),
        ("Dodge Challenger SRT8 2011", "coupe"),
        ("Dodge Charger SRT-8 2009", "sedan"),
        ("Ford Ranger SuperCab 2011", "pickup"),
        ("Jaguar XK XKR 2012", "coupe"),
        ("Lamborghini Gallardo LP 570-4 Superleggera 2012", "coupe"),
    ],
)
def test_car_classes_without_a_body_keyword(name: str, body: str) -> None:
    assert car_body_type(name) == body


def test_cars_refuse_annotation_paths_outside_the_root(tmp_path: Path) -> None:
    root = write_stanford_cars_devkit(tmp_path)
    write_cars_annotations(root / "devkit" / "cars_train_annos.mat", [(1, 2, 3, 4, 1, "../../etc/passwd")])
    with pytest.raises(LayoutError, match="outside the dataset root"):
        list(StanfordCarsSource(root).records("train"))


def test_cars_refuse_a_class_outside_the_meta(tmp_path: Path) -> None:
    root = write_stanford_cars_devkit(tmp_path)
    write_cars_annotations(root / "devkit" / "cars_train_annos.mat", [(1, 2, 3, 4, 5, "00001.jpg")])
    with pytest.raises(LayoutError, match="class 5"):
        list(StanfordCarsSource(root).records("train"))


def test_cars_wrong_root_names_the_missing_file_and_both_layouts(tmp_path: Path) -> None:
    message = _layout_error(StanfordCarsSource, tmp_path)
    assert str(tmp_path / "devkit" / "cars_meta.mat") in message and "train/<Class Name>" in message


# FGVC-Aircraft


@pytest.mark.parametrize("relative", [".", "fgvc-aircraft-2013b", "fgvc-aircraft-2013b/data"])
def test_aircraft_accepts_the_parent_the_archive_or_its_data_folder(tmp_path: Path, relative: str) -> None:
    data = write_fgvc_aircraft(tmp_path)
    source = FGVCAircraftSource(tmp_path / relative)
    assert source.data == data
    assert source.splits() == ["train", "val", "test"]  # trainval is their union, not a split


def test_aircraft_levels_come_from_the_taxonomy(tmp_path: Path) -> None:
    write_fgvc_aircraft(tmp_path)
    concepts = FGVCAircraftSource(tmp_path).concepts()
    assert [c.concept_id for c in concepts] == ["707-320", "dhc-8-100", "dhc-8-300", "falcon-2000"]
    assert [c.fine for c in concepts] == [
        ["707-320", "Boeing 707"],
        ["DHC-8-100", "DHC-8"],
        ["DHC-8-300", "DHC-8"],
        ["Falcon 2000"],  # variant and family are the same name
    ]
    assert [c.coarse for c in concepts] == [
        ["Boeing"],
        ["de Havilland"],
        ["de Havilland"],
        ["Dassault Aviation"],
    ]
    assert {c.coarse_source for c in concepts} == {"taxonomy"}
    assert {c.superordinate for c in concepts} == {"Airplane"}
    assert concepts[1].taxonomy == {"manufacturer": "de Havilland", "family": "DHC-8", "variant": "DHC-8-100"}


def test_aircraft_records_and_boxes(tmp_path: Path) -> None:
    data = write_fgvc_aircraft(tmp_path)
    source = FGVCAircraftSource(tmp_path)
    records = {split: list(source.records(split)) for split in source.splits()}
    assert {split: len(r) for split, r in records.items()} == {"train": 8, "val": 4, "test": 4}
    assert [r.image_id for r in records["train"][:2]] == ["0000001", "0000002"]
    assert records["val"][3].concept_id == "falcon-2000"
    assert records["val"][3].path == data / "images" / "0000012.jpg"
    # "2 3 12 14" (1-based, inclusive) -> x 1, y 2, w 11, h 12.
    assert records["train"][1].bbox == [1.0, 2.0, 11.0, 12.0]
    # "2 3 12 36" reaches into the banner: clipped to the 16 rows left after the crop.
    assert records["train"][5].bbox == [1.0, 2.0, 11.0, 14.0]
    assert not _readable(records["train"][0].path)


def test_aircraft_adjust_removes_the_banner(tmp_path: Path) -> None:
    write_fgvc_aircraft(tmp_path)
    source = FGVCAircraftSource(tmp_path)
    assert source.adjusts_pixels
    record = list(source.records("test"))[0]
    with Image.open(record.path) as image:
        original = image.convert("RGB")
    assert original.size == AIRCRAFT_SIZE and _near(original.getpixel((8, 35)), BANNER)
    cropped = source.adjust(original)
    assert cropped.size == (AIRCRAFT_SIZE[0], AIRCRAFT_SIZE[1] - 20)
    assert all(_near(pixel, BODY) for pixel in cropped.get_flattened_data())


def test_aircraft_refuse_ids_outside_the_root(tmp_path: Path) -> None:
    data = write_fgvc_aircraft(tmp_path)
    write_aircraft_labels(data, "test", [("../../../etc/passwd", "707-320", "Boeing 707", "Boeing")])
    with pytest.raises(LayoutError, match="outside the dataset root"):
        list(FGVCAircraftSource(tmp_path).records("test"))


def test_aircraft_refuse_a_variant_missing_from_the_list(tmp_path: Path) -> None:
    data = write_fgvc_aircraft(tmp_path)
    write_aircraft_labels(data, "test", [("0000001", "747-400", "Boeing 747", "Boeing")])
    with pytest.raises(LayoutError, match="747-400"):
        list(FGVCAircraftSource(tmp_path).records("test"))


def test_aircraft_wrong_root_names_the_missing_file(tmp_path: Path) -> None:
    message = _layout_error(FGVCAircraftSource, tmp_path)
    assert str(tmp_path / "fgvc-aircraft-2013b" / "data" / "variants.txt") in message
    assert "images_box.txt" in message


# The three sources through the build engine


def test_sources_are_registered() -> None:
    assert get_source("stanford-dogs") is StanfordDogsSource
    assert get_source("stanford-cars") is StanfordCarsSource
    assert get_source("fgvc-aircraft") is FGVCAircraftSource


E2E = {
    "stanford-dogs": (write_stanford_dogs, {"train": 8, "test": 6}, "n02085620_train0"),
    "stanford-cars": (write_stanford_cars_devkit, {"train": 7, "test": 4}, "train/00001"),
    "fgvc-aircraft": (write_fgvc_aircraft, {"train": 7, "val": 4, "test": 4}, "0000001"),
}


@pytest.mark.parametrize(
    ("source", "fine", "coarse"),
    [
        ("stanford-dogs", "curly-coated retriever", "Retriever"),
        ("stanford-cars", "Ford F-150 Regular Cab 2012", "pickup"),
        ("fgvc-aircraft", "DHC-8-300", "de Havilland"),
    ],
)
def test_build_end_to_end(tmp_path: Path, source: str, fine: str, coarse: str) -> None:
    write, counts, garbage = E2E[source]
    write(tmp_path / "raw")
    out, finer_dir = tmp_path / "out", tmp_path / "finer"
    config = BuildConfig(
        source=source, root=tmp_path / "raw", out=out, knowledge=False, export_finer=finer_dir
    )
    summary = build(config)
    assert summary["counts"] == counts
    assert [s["image_id"] for s in summary["skipped"]["train"]] == [garbage]  # the engine's image check
    dataset = datasets.load_from_disk(str(out))
    rows = [row for row in dataset["test"] if row["fine"][0] == fine]
    assert rows and rows[0]["coarse"][0] == coarse and rows[0]["source"] == source
    exported = [json.loads(line) for line in (finer_dir / f"unified-{source}-test-combined.jsonl").open()]
    assert len(exported) == counts["test"] and all(Path(row["img_path"]).is_file() for row in exported)
    if source == "fgvc-aircraft":
        assert {row["image"].size for row in dataset["test"]} == {(AIRCRAFT_SIZE[0], AIRCRAFT_SIZE[1] - 20)}
        assert all(_near(p, BODY) for p in rows[0]["image"].convert("RGB").get_flattened_data())
        assert [row["bbox"] for row in dataset["test"]][:2] == [[1.0, 2.0, 11.0, 14.0]] * 2
        # Re-encoded (banner-free) images are exported as files of their own.
        assert all(Path(row["img_path"]).parent == finer_dir / "images" / "test" for row in exported)
    else:
        assert all(Path(row["img_path"]).is_relative_to(tmp_path / "raw") for row in exported)


# FINER export


def _aircraft_concepts() -> list[Concept]:
    def concept(variant: str, family: str, required: list[str]) -> Concept:
        return Concept(
            concept_id=variant.lower(),
            fine=[variant, family],
            superordinate="Airplane",
            coarse=["de Havilland"],
            attributes=Attributes(required=required, likely=["propellers"], extractor="llm:gpt-4o"),
        )

    return [
        concept("DHC-8-300", "DHC-8", ["high wing", "stretched fuselage"]),
        concept("DHC-8-100", "DHC-8", ["high wing", "short fuselage"]),
    ]


def _png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_attribute_rows_cover_every_fine_label_with_ids_as_positions() -> None:
    rows = attribute_rows(_aircraft_concepts())
    assert [(r["id"], r["name"]) for r in rows] == [(0, "DHC-8-100"), (1, "DHC-8-300"), (2, "DHC-8")]
    assert rows[0]["attr_binomial"] == {"required": ["high wing", "short fuselage"], "likely": ["propellers"]}
    # The family row carries what its variants share.
    assert rows[2]["attr_binomial"] == {"required": ["high wing"], "likely": ["propellers"]}


def test_export_finer_writes_the_original_files(tmp_path: Path) -> None:
    concepts = _aircraft_concepts()
    features = image_features(sorted(c.name for c in concepts))
    on_disk = write_image(tmp_path / "raw" / "0001.jpg")

    def rows(images: list[dict], ids: list[str]) -> dict:
        picked = [concepts[i % 2] for i in range(len(ids))]
        return {
            "image": images,
            "image_id": ids,
            "source": ["fgvc-aircraft"] * len(ids),
            "concept_id": [c.concept_id for c in picked],
            "superordinate": [c.superordinate for c in picked],
            "coarse": [c.coarse for c in picked],
            "fine": [c.fine for c in picked],
            "label": [features["label"].str2int(c.name) for c in picked],
            "attributes_required": [c.attributes.required for c in picked],
            "attributes_likely": [c.attributes.likely for c in picked],
            "bbox": [None] * len(ids),
        }

    dataset_dict = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                rows([{"path": str(on_disk), "bytes": None}], ["0001"]), features
            ),
            "test": datasets.Dataset.from_dict(
                rows(
                    [{"path": None, "bytes": _png("red")}, {"path": "x.jpg", "bytes": _png("blue")}],
                    ["a/1", "a/2"],
                ),
                features,
            ),
        }
    )
    out = tmp_path / "finer"
    written = export_finer(dataset_dict, concepts, out, "fgvc-aircraft", "llm:gpt-4o")
    assert [p.name for p in written] == [
        "unified-fgvc-aircraft-train-combined.jsonl",
        "unified-fgvc-aircraft-test-combined.jsonl",
        "parsed-fgvc-aircraft-2013b-gpt-4o-wiki-text-combined.json",
    ]
    train = [json.loads(line) for line in written[0].read_text().splitlines()]
    assert train == [
        {
            "idx": 0,
            "basic-level-lbl": "Airplane",
            "coarse-level-lbl": ["de Havilland"],
            "fine-level-lbl": ["DHC-8-300", "DHC-8"],
            "img_path": str(on_disk),
            "metadata": {"image_id": "0001", "concept_id": "dhc-8-300", "source": "fgvc-aircraft"},
        }
    ]
    test = [json.loads(line) for line in written[1].read_text().splitlines()]
    assert [row["idx"] for row in test] == [0, 1]
    paths = [Path(row["img_path"]) for row in test]
    assert paths == [out / "images" / "test" / "000000-a_1.png", out / "images" / "test" / "000001-a_2.png"]
    assert paths[1].read_bytes() == _png("blue")
    # The original reads attributes as attr_dict[fine2cidx[label]] for every gold fine label.
    attr_dict = json.loads(written[2].read_text())
    fine2cidx = {d["name"]: d["id"] for d in attr_dict}
    for row in train + test:
        for label in row["fine-level-lbl"]:
            assert attr_dict[fine2cidx[label]]["name"] == label


def test_export_finer_names_files_as_the_original_code(tmp_path: Path) -> None:
    concepts = [Concept(concept_id="c", fine=["Chihuahua"], superordinate="Dog", coarse=["Chihuahua"])]
    features = image_features(["Chihuahua"])
    empty = datasets.DatasetDict({"test": datasets.Dataset.from_dict({k: [] for k in features}, features)})
    names = [p.name for p in export_finer(empty, concepts, tmp_path, "stanford-dogs", "Qwen/Qwen2.5-7B")]
    assert names == [
        "unified-stanford-dogs-test-combined.jsonl",
        "parsed-stanford_dogs-Qwen_Qwen2.5-7B-wiki-text-combined.json",
    ]
