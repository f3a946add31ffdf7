"""Tiny copies of Stanford Dogs, Stanford Cars and FGVC-Aircraft in their official on-disk layouts.

The MATLAB files are written with `scipy.io.savemat` in the shapes the real files have: Dogs lists are
N×1 cell arrays of strings plus an N×1 label column; Cars annotations are 1×N struct arrays whose fields
are 1×1 matrices (and 1-element strings); Cars class names a 1×C cell array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

SIZE = (16, 40)  # width, height
BODY = (0, 0, 255)
BANNER = (255, 0, 0)

DOG_FOLDERS = ("n02085620-Chihuahua", "n02086240-Shih-Tzu", "n02099429-curly-coated_retriever")
CAR_CLASSES = (
    "AM General Hummer SUV 2000",
    "Chrysler 300 SRT-8 2010",
    "Ford F-150 Regular Cab 2012",
    "Ram C/V Cargo Van Minivan 2012",
)
#: (variant, family, manufacturer): names with spaces, a family shared by two variants, equal names.
AIRCRAFT = (
    ("707-320", "Boeing 707", "Boeing"),
    ("DHC-8-100", "DHC-8", "de Havilland"),
    ("DHC-8-300", "DHC-8", "de Havilland"),
    ("Falcon 2000", "Falcon 2000", "Dassault Aviation"),
)
AIRCRAFT_SIZE = (16, 36)  # 16 rows of aircraft above the 20-row banner: block-aligned for JPEG


def write_image(path: Path, size: tuple[int, int] = SIZE, banner: int = 0) -> Path:
    """A small JPEG in the body colour, its bottom `banner` rows in the banner colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, BODY)
    if banner:
        image.paste(BANNER, (0, size[1] - banner, size[0], size[1]))
    image.save(path, format="JPEG", quality=95, subsampling=0)  # 4:4:4 keeps the colour edge sharp
    return path


def write_garbage(path: Path) -> Path:
    """A file named like an image that is not one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00garbage, not a JPEG")
    return path


def _cells(strings: list[str]) -> np.ndarray:
    """An N×1 cell array of strings, as MATLAB stores `file_list`."""
    cells = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cells[i, 0] = s
    return cells


def write_dogs_list(path: Path, files: list[str], labels: list[int]) -> None:
    """One Stanford Dogs list (`file_list`, `annotation_list`, 1-based `labels`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(
        path,
        {
            "file_list": _cells(files),
            "annotation_list": _cells([f.removesuffix(".jpg") for f in files]),
            "labels": np.array(labels, dtype=np.float64).reshape(-1, 1),
        },
    )


def _voc(boxes: list[tuple[int, int, int, int]]) -> str:
    objects = "".join(
        f"<object><name>dog</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
        f"<ymax>{y2}</ymax></bndbox></object>"
        for x1, y1, x2, y2 in boxes
    )
    return f"<annotation><size><width>16</width><height>40</height></size>{objects}</annotation>"


def write_stanford_dogs(
    root: Path, per_split: dict[str, int] | None = None, lists_folder: bool = True, annotations: bool = True
) -> Path:
    """Three breeds; per class 3 train and 2 test images by default; the first train image is garbage.

    Image k of a class has the box (1+k, 2, 11, 30); its annotation lists a second object after it.
    """
    per_split = per_split or {"train": 3, "test": 2}
    lists = root / "lists" if lists_folder else root
    everything: tuple[list[str], list[int]] = ([], [])
    for split, n in per_split.items():
        files, labels = [], []
        for label, folder in enumerate(DOG_FOLDERS, start=1):
            wnid = folder.partition("-")[0]
            for k in range(n):
                stem = f"{wnid}_{split}{k}"
                files.append(f"{folder}/{stem}.jpg")
                labels.append(label)
                write_image(root / "Images" / folder / f"{stem}.jpg")
                if annotations:
                    xml = root / "Annotation" / folder / stem
                    xml.parent.mkdir(parents=True, exist_ok=True)
                    xml.write_text(_voc([(1 + k, 2, 11, 30), (0, 0, 5, 5)]))
        write_dogs_list(lists / f"{split}_list.mat", files, labels)
        everything[0].extend(files)
        everything[1].extend(labels)
    write_garbage(root / "Images" / everything[0][0])
    write_dogs_list(lists / "file_list.mat", *everything)
    return root


def write_cars_annotations(path: Path, rows: list[tuple[int, int, int, int, int, str]]) -> None:
    """A 1×N `annotations` struct array of (bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname)."""
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    annotations = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, (*numbers, fname) in enumerate(rows):
        annotations[0, i] = (*(np.array([[n]], dtype=np.uint16) for n in numbers), np.array([fname]))
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"annotations": annotations})


def _car_images(per_split: dict[str, int]) -> dict[str, list[tuple[str, int]]]:
    """(file name, 1-based class) per split, numbered across classes in turn as the real files are."""
    images: dict[str, list[tuple[str, int]]] = {}
    for split, n in per_split.items():
        order = [(k, label) for k in range(n) for label in range(1, len(CAR_CLASSES) + 1)]
        images[split] = [(f"{i:05d}.jpg", label) for i, (_, label) in enumerate(order, start=1)]
    return images


def write_stanford_cars_devkit(
    root: Path, per_split: dict[str, int] | None = None, test_labels_in: str | None = "root"
) -> Path:
    """The devkit layout; the test labels sit in the root, in devkit/ or nowhere (`test_labels_in`).

    Box of image i (1-based number within its split): x1=i, y1=2, x2=i+10, y2=30; the first train
    image is garbage.
    """
    images = _car_images(per_split or {"train": 2, "test": 1})
    names = np.empty((1, len(CAR_CLASSES)), dtype=object)
    for i, name in enumerate(CAR_CLASSES):
        names[0, i] = np.array([name])
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    for split, files in images.items():
        for fname, _ in files:
            write_image(root / f"cars_{split}" / fname)
        rows = [(i, 2, i + 10, 30, label, fname) for i, (fname, label) in enumerate(files, start=1)]
        if split == "train":
            write_cars_annotations(root / "devkit" / "cars_train_annos.mat", rows)
        elif test_labels_in is not None:
            base = root / "devkit" if test_labels_in == "devkit" else root
            write_cars_annotations(base / "cars_test_annos_withlabels.mat", rows)
    write_garbage(root / "cars_train" / images["train"][0][0])
    return root


def write_stanford_cars_folders(root: Path, per_split: dict[str, int] | None = None) -> Path:
    """The class-folder copy of the same images ("/" in a class name becomes "-" in its folder)."""
    for split, files in _car_images(per_split or {"train": 2, "test": 1}).items():
        for fname, label in files:
            write_image(root / split / CAR_CLASSES[label - 1].replace("/", "-") / fname)
    return root


def write_aircraft_labels(data: Path, split: str, rows: list[tuple[str, str, str, str]]) -> None:
    """The three label files of a split from (image id, variant, family, manufacturer) rows."""
    for level, column in (("variant", 1), ("family", 2), ("manufacturer", 3)):
        lines = "".join(f"{row[0]} {row[column]}\n" for row in rows)
        (data / f"images_{level}_{split}.txt").write_text(lines)


def write_fgvc_aircraft(root: Path, per_split: dict[str, int] | None = None) -> Path:
    """`root/fgvc-aircraft-2013b/data` with train, val, test and trainval; returns the data folder.

    Every image has the 20-row banner; image ids keep leading zeros; boxes are 1-based and the last
    one of each split reaches into the banner. The first train image is garbage.
    """
    per_split = per_split or {"train": 2, "val": 1, "test": 1}
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    for name, column in (("variants", 0), ("families", 1), ("manufacturers", 2)):
        names = dict.fromkeys(row[column] for row in AIRCRAFT)
        (data / f"{name}.txt").write_text("".join(f"{n}\n" for n in names))
    boxes, number, by_split = [], 0, {}
    for split, n in per_split.items():
        rows = []
        for k in range(n):
            for variant, family, maker in AIRCRAFT:
                number += 1
                image_id = f"{number:07d}"
                rows.append((image_id, variant, family, maker))
                write_image(data / "images" / f"{image_id}.jpg", AIRCRAFT_SIZE, banner=20)
                boxes.append(f"{image_id} 2 3 12 {14 if k < n - 1 else 36}\n")
        write_aircraft_labels(data, split, rows)
        by_split[split] = rows
    write_aircraft_labels(data, "trainval", by_split["train"] + by_split["val"])
    (data / "images_box.txt").write_text("".join(boxes))
    write_garbage(data / "images" / f"{by_split['train'][0][0]}.jpg")
    return data
