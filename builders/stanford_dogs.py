"""Stanford Dogs (Khosla et al. 2011) read from its official layout.

The three official archives unpack to `Images/<wnid>-<Breed>/<file>.jpg`, `Annotation/<wnid>-<Breed>/<file>`
(Pascal-VOC XML without an extension) and the MATLAB lists `file_list.mat`, `train_list.mat`, `test_list.mat`
(in `lists/` or loose in the root). Each list holds `file_list` and `annotation_list` (cell arrays of
1-element strings) and `labels` (1-based class indices).
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.io

from finer.data.coarse import HEAD_NOUN
from finer.schema import Concept

from .base import ImageRecord, LayoutError, Source, SourceTerms, inside

SPLITS = ("train", "test")


def breed_name(folder: str) -> str:
    """The breed in a WordNet folder name: everything after the *first* hyphen, "_" read as a space.

    "n02099429-curly-coated_retriever" -> "curly-coated retriever"; cutting at the last hyphen (as the
    original FINER code did) would give "coated retriever" and "Tzu" for "n02086240-Shih-Tzu".
    """
    _, sep, breed = folder.partition("-")
    if not sep or not breed:
        raise LayoutError(f"stanford-dogs: image folder {folder!r} is not named '<wnid>-<Breed>'")
    return breed.replace("_", " ")


def _load_list(path: Path) -> tuple[list[str], list[str], list[int]]:
    """(files, annotations, 1-based labels) of one list; `squeeze_me` unwraps the 1-element cells."""
    mat = scipy.io.loadmat(path, squeeze_me=True)
    try:
        files = [str(f) for f in np.atleast_1d(mat["file_list"])]
        annotations = [str(a) for a in np.atleast_1d(mat["annotation_list"])]
        labels = [int(label) for label in np.atleast_1d(mat["labels"])]
    except KeyError as missing:
        raise LayoutError(f"stanford-dogs: {path} has no {missing} variable") from None
    if not len(files) == len(annotations) == len(labels):
        raise LayoutError(f"stanford-dogs: the lists in {path} differ in length")
    return files, annotations, labels


def _first_box(path: Path) -> list[float] | None:
    """The first object's `bndbox` of a VOC annotation as [x, y, w, h]; None without a complete box."""
    try:
        box = ElementTree.parse(path).find("object/bndbox")
    except ElementTree.ParseError as error:
        raise LayoutError(f"stanford-dogs: annotation {path} is not valid XML ({error})") from None
    corners = [None if box is None else box.findtext(tag) for tag in ("xmin", "ymin", "xmax", "ymax")]
    if None in corners:
        return None
    x1, y1, x2, y2 = (float(c) for c in corners)
    return [x1, y1, x2 - x1, y2 - y1]


class StanfordDogsSource(Source):
    """120 dog breeds; coarse labels come from the labeller (head noun offline), as in FINER."""

    name = "stanford-dogs"
    layout = (
        "Images/<wnid>-<Breed>/*.jpg, Annotation/<wnid>-<Breed>/* (optional), "
        "lists/file_list.mat, lists/train_list.mat, lists/test_list.mat (lists/ may be left out)"
    )
    coarse_rule = HEAD_NOUN
    original_dataset_name = "stanford-dogs"
    original_data_folder = "stanford_dogs"
    terms = SourceTerms(
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
    )

    def __init__(self, root: Path | None) -> None:
        super().__init__(root)
        loose = (self.root / "file_list.mat").exists()
        self.lists = self.root if loose else self.root / "lists"
        files, _, labels = _load_list(self.file("file_list.mat", base=self.lists))
        self.images = self.file("Images")
        self.annotations = self.root / "Annotation"
        # Class k (1-based) is the folder its images sit in; the folder names the breed.
        self.classes: dict[int, str] = {}
        for file, label in zip(files, labels, strict=True):
            self.classes.setdefault(label, Path(file).parts[0])

    def splits(self) -> list[str]:
        found = [split for split in SPLITS if (self.lists / f"{split}_list.mat").exists()]
        if not found:
            self.file("train_list.mat", base=self.lists)  # raises, naming the file and the layout
        return found

    def concepts(self) -> list[Concept]:
        return [
            Concept(
                concept_id=_wnid(folder),
                fine=[breed_name(folder)],
                superordinate="Dog",
                taxonomy={"wnid": _wnid(folder)},
            )
            for _, folder in sorted(self.classes.items())
        ]

    def records(self, split: str) -> Iterator[ImageRecord]:
        files, annotations, labels = _load_list(self.file(f"{split}_list.mat", base=self.lists))
        for file, annotation, label in zip(files, annotations, labels, strict=True):
            path = inside(self.images, file)
            folder = Path(file).parts[0]
            if self.classes.get(label) != folder:
                raise LayoutError(
                    f"stanford-dogs: {split}_list.mat gives {file} label {label}, "
                    f"which file_list.mat assigns to {self.classes.get(label)!r}"
                )
            xml = inside(self.annotations, annotation)
            yield ImageRecord(
                image_id=path.stem,
                concept_id=_wnid(folder),
                path=path,
                bbox=_first_box(xml) if xml.is_file() else None,
            )


def _wnid(folder: str) -> str:
    """The WordNet id that starts a folder name: the stable concept id."""
    return folder.partition("-")[0]
