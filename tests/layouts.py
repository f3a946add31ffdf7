"""Tiny synthetic copies of the bird, iNat and image-folder datasets, each in its official on-disk layout.

Every writer makes several classes over two splits with 8x8 images, one of them corrupt (garbage bytes
behind a .jpg name), and boxes where the real dataset has a box file. The constants say what was written,
so tests compare against them rather than against numbers repeated by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

GARBAGE = b"\x00garbage, not a JPEG\xff" * 4

# --- CUB-200-2011 ------------------------------------------------------------------------------------
CUB_CLASSES = {"1": "001.Black_footed_Albatross", "2": "002.Laysan_Albatross", "3": "003.Pine_Grosbeak"}
#: image id -> (class id, is_training_image); two train and one test image per class.
CUB_IMAGES = {str(n): (str((n - 1) // 3 + 1), "0" if n % 3 == 0 else "1") for n in range(1, 10)}
CUB_CORRUPT = "2"
CUB_ATTRIBUTES = ["has_bill_shape::hooked_seabird", "has_wing_color::brown", "has_size::small_(5_-_9_in)"]
CUB_SCORES = {"1": [80.5, 60.0, 0.0], "2": [90.0, 5.25, 0.0], "3": [0.0, 0.0, 100.0]}


def cub_box(image_id: str) -> list[float]:
    n = int(image_id)
    return [float(n), n + 0.5, 4.0, 3.0 + n]


def jpeg(path: Path, colour: tuple[int, int, int] = (200, 30, 30), fmt: str = "JPEG") -> Path:
    """An 8x8 image (JPEG unless `fmt` says otherwise), parents created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format=fmt)
    return path


def _lines(path: Path, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{row}\n" for row in rows), encoding="utf-8")


def write_cub(parent: Path) -> Path:
    """`parent/CUB_200_2011/…` and `parent/attributes.txt` as in CUB_200_2011.tgz; returns the CUB folder."""
    base = parent / "CUB_200_2011"
    files = {}
    for image_id, (class_id, _) in CUB_IMAGES.items():
        folder = CUB_CLASSES[class_id]
        files[image_id] = f"{folder}/{folder[4:]}_{int(image_id):04d}_{image_id}.jpg"
        image = jpeg(base / "images" / files[image_id], colour=(int(class_id) * 60, 90, 20))
        if image_id == CUB_CORRUPT:
            image.write_bytes(GARBAGE)
    _lines(base / "images.txt", [f"{i} {f}" for i, f in files.items()])
    _lines(base / "classes.txt", [f"{i} {name}" for i, name in CUB_CLASSES.items()])
    _lines(base / "image_class_labels.txt", [f"{i} {c}" for i, (c, _) in CUB_IMAGES.items()])
    _lines(base / "train_test_split.txt", [f"{i} {t}" for i, (_, t) in CUB_IMAGES.items()])
    _lines(base / "bounding_boxes.txt", [f"{i} {' '.join(map(str, cub_box(i)))}" for i in CUB_IMAGES])
    _lines(parent / "attributes.txt", [f"{n} {name}" for n, name in enumerate(CUB_ATTRIBUTES, 1)])
    _lines(
        base / "attributes" / "class_attribute_labels_continuous.txt",
        [" ".join(f"{v:.10f}" for v in CUB_SCORES[c]) for c in CUB_CLASSES],
    )
    return base


# --- NABirds -------------------------------------------------------------------------------------------
NABIRDS_CLASSES = {
    "0": "Birds",
    "1": "Perching Birds",
    "2": "Ducks, Geese, and Swans",
    "3": "Herons and Egrets",
    "10": "Common Eider",
    "11": "Common Eider (Adult male)",
    "12": "Common Eider (Female/Eclipse male)",
    "20": "Great Blue Heron (Blue form)",
    "30": "Wrens",
    "31": "Bewick's Wren",
    "32": "Marsh Wren",
}
NABIRDS_PARENTS = {"1": "0", "2": "0", "3": "0", "10": "2", "11": "10", "12": "10", "20": "3"}
NABIRDS_PARENTS |= {"30": "1", "31": "30", "32": "30"}
#: Leaf classes with images (32 "Marsh Wren" is a leaf without any, so not a concept).
NABIRDS_LABELLED = ["11", "12", "20", "31"]
#: image id -> (class id, is_training_image); two train and one test image per labelled class.
NABIRDS_IMAGES = {
    f"{n:08x}-21dc-4d0c-bfe1-4cae3c85c829": (NABIRDS_LABELLED[n // 3], "0" if n % 3 == 2 else "1")
    for n in range(3 * len(NABIRDS_LABELLED))
}
NABIRDS_CORRUPT = next(iter(NABIRDS_IMAGES))


def nabirds_box(image_id: str) -> list[float]:
    n = int(image_id[:8], 16)
    return [float(n), 2.0, 5.0, float(n + 1)]


def write_nabirds(parent: Path) -> Path:
    """`parent/nabirds/…` as in nabirds.tar.gz; returns the nabirds folder."""
    base = parent / "nabirds"
    files = {}
    for image_id, (class_id, _) in NABIRDS_IMAGES.items():
        files[image_id] = f"{int(class_id):04d}/{image_id.replace('-', '')}.jpg"
        image = jpeg(base / "images" / files[image_id], colour=(int(class_id) * 7, 40, 90))
        if image_id == NABIRDS_CORRUPT:
            image.write_bytes(GARBAGE)
    _lines(base / "images.txt", [f"{i} {f}" for i, f in files.items()])
    _lines(base / "classes.txt", [f"{i} {name}" for i, name in NABIRDS_CLASSES.items()])
    _lines(base / "hierarchy.txt", [f"{c} {p}" for c, p in NABIRDS_PARENTS.items()])
    _lines(base / "image_class_labels.txt", [f"{i} {c}" for i, (c, _) in NABIRDS_IMAGES.items()])
    _lines(base / "train_test_split.txt", [f"{i} {t}" for i, (_, t) in NABIRDS_IMAGES.items()])
    _lines(
        base / "bounding_boxes.txt",
        [f"{i} {' '.join(str(int(v)) for v in nabirds_box(i))}" for i in NABIRDS_IMAGES],
    )
    return base


# --- iNaturalist 2021 ----------------------------------------------------------------------------------
INAT_RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "specific_epithet")
INAT_CATEGORIES = [
    ("Animalia", "Animalia", "Annelida", "Clitellata", "Crassiclitellata", "Lumbricidae", "Lumbricus",
     "terrestris", "Common Earthworm"),
    ("Birds", "Animalia", "Chordata", "Aves", "Strigiformes", "Strigidae", "Bubo", "virginianus",
     "Great Horned Owl"),
    ("Fungi", "Fungi", "Basidiomycota", "Agaricomycetes", "Agaricales", "Amanitaceae", "Amanita", "muscaria",
     "Fly Agaric"),
]  # fmt: skip
#: Images per category in each split file.
INAT_PER_CATEGORY = {"train": 2, "val": 1, "train_mini": 1}
INAT_CORRUPT = 1  # the first training image


def inat_category(index: int) -> dict[str, object]:
    supercategory, *ranks, common = INAT_CATEGORIES[index]
    dir_name = "_".join([f"{index:05d}", *ranks])
    return {
        "id": index,
        "name": f"{ranks[-2]} {ranks[-1]}",
        "common_name": common,
        "supercategory": supercategory,
        **dict(zip(INAT_RANKS, ranks, strict=True)),
        "image_dir_name": dir_name,
    }


def write_inat(root: Path, mini: bool = False) -> Path:
    """`root/{train,val}.json` (+ `train_mini.json`) and the image folders they name; returns `root`."""
    categories = [inat_category(i) for i in range(len(INAT_CATEGORIES))]
    next_id = 1
    for split, per_category in INAT_PER_CATEGORY.items():
        if split == "train_mini" and not mini:
            continue
        images, annotations = [], []
        for category in categories:
            for _ in range(per_category):
                file_name = f"{split}/{category['image_dir_name']}/{next_id:06d}-uuid.jpg"
                image = jpeg(root / file_name, colour=(category["id"] * 80, 120, 60))
                if next_id == INAT_CORRUPT:
                    image.write_bytes(GARBAGE)
                images.append({"id": next_id, "width": 8, "height": 8, "file_name": file_name, "license": 0})
                annotations.append({"id": next_id, "image_id": next_id, "category_id": category["id"]})
                next_id += 1
        content = {
            "info": {"year": 2021},
            "images": images,
            "categories": categories,
            "annotations": annotations,
            "licenses": [{"id": 0, "name": "CC BY"}],
        }
        (root / f"{split}.json").write_text(json.dumps(content), encoding="utf-8")
    return root


# --- image folder -------------------------------------------------------------------------------------
#: split -> class folder -> file names (a .png, a .webp and a .jpeg among them; one corrupt .jpg).
IMAGEFOLDER_FILES = {
    "train": {
        "great_horned_owl": ["a.jpg", "b.png", "c.jpeg"],
        "snowy_owl": ["d.webp", "e.jpg"],
        "Golden_Retriever": ["f.JPG"],
    },
    "test": {"great_horned_owl": ["g.jpg"], "snowy_owl": ["h.jpg"]},
}
IMAGEFOLDER_CORRUPT = ("train", "snowy_owl", "e.jpg")
_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}


def write_imagefolder(root: Path) -> Path:
    """`root/<split>/<class>/<image>` plus files a real folder has that are not images; returns `root`."""
    for split, classes in IMAGEFOLDER_FILES.items():
        for folder, files in classes.items():
            for name in files:
                jpeg(root / split / folder / name, fmt=_FORMATS[Path(name).suffix.lower()])
            (root / split / folder / "notes.txt").write_text("not an image")
            (root / split / folder / "._a.jpg").write_bytes(GARBAGE)  # macOS resource fork
    (root / ".cache" / "x" / "y.jpg").parent.mkdir(parents=True)
    jpeg(root / ".cache" / "x" / "y.jpg")
    (root.joinpath(*IMAGEFOLDER_CORRUPT)).write_bytes(GARBAGE)
    return root
