"""The one small interface every source builder implements, and the path rules they share.

A source reads one dataset's *official* on-disk layout and yields concepts and image records; the build
engine (`finer.data.build`) does everything else (limits, coarse labels, image checks, writing, export).
Everything else finer knows about a source is a class attribute of its `Source` class, read by name
through `finer.builders.source_class`: its terms of use and citation (the Hub card), its coarse rule (the
build), the levels asked as a closed list (evaluation) and its names in the original FINER files (export).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

from PIL import Image

from finer.data.coarse import CoarseRule
from finer.errors import FinerError
from finer.schema import Concept


@dataclass(frozen=True)
class SourceTerms:
    """What a source's terms allow, where they are written, how sure we are of them, how to cite it."""

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


#: For `imagefolder` and any name finer does not know: finer cannot know where the images came from.
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


@dataclass
class ImageRecord:
    """One image of one concept: a file under the dataset root, or encoded bytes for rendered sources."""

    image_id: str
    concept_id: str
    path: Path | None = None
    data: bytes | None = None
    bbox: list[float] | None = None  # x, y, w, h in pixels of the image as stored


class Source(ABC):
    """A fine-grained dataset read from its official layout.

    Subclasses set the class attributes and implement `splits`, `concepts` and `records`. `root` is the
    folder the user passed with `--root`; constructors resolve it (accepting a parent folder where the
    official archive nests one) and raise `LayoutError` when a required file is missing.
    """

    #: The `finer build` name; the module `builders/<name with "_" for "-">.py` holds the class.
    name: ClassVar[str]
    #: One line describing the expected layout; shown when a required file is missing.
    layout: ClassVar[str]
    #: Terms of use and citation, shown on the Hub dataset card (`finer.hub.cards`).
    terms: ClassVar[SourceTerms] = UNKNOWN_TERMS
    #: Offline rule for coarse labels when the source's taxonomy has none (`finer.data.coarse`).
    coarse_rule: ClassVar[CoarseRule | None] = None
    #: Levels the evaluation asks as a closed list of the dataset's own labels (`finer.eval.tasks`).
    closed_levels: ClassVar[frozenset[str]] = frozenset()
    #: The original FINER code's names for the dataset, used by `--export-finer` (`finer.data.export`):
    #: its `--dataset-name` (label files) and its data folder (attribute files); None means `name`.
    original_dataset_name: ClassVar[str | None] = None
    original_data_folder: ClassVar[str | None] = None
    #: True when the source ships its own knowledge and attributes (the demo).
    bundled_knowledge: ClassVar[bool] = False
    #: True when `adjust` changes pixels (then images are re-encoded and stored as bytes).
    adjusts_pixels: ClassVar[bool] = False
    #: What reading the layout passed over, one line each (build.json `warnings`, printed by the CLI);
    #: a source that skips something sets its own list.
    notes: Sequence[str] = ()

    def __init__(self, root: Path | None) -> None:
        if root is None:
            raise FinerError(f"{self.name}: --root is required; expected layout: {self.layout}")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FinerError(f"{self.name}: --root {root} is not a folder; expected layout: {self.layout}")
        self.root = root.resolve()

    @abstractmethod
    def splits(self) -> list[str]:
        """The official splits this copy of the dataset has, in their usual order."""

    @abstractmethod
    def concepts(self) -> list[Concept]:
        """Every fine concept, with superordinate, fine and (where the taxonomy has it) coarse labels."""

    @abstractmethod
    def records(self, split: str) -> Iterator[ImageRecord]:
        """Image records of one split, streamed in the source's own order."""

    def adjust(self, image: Image.Image) -> Image.Image:
        """Pixel changes the dataset's authors ask for (e.g. FGVC-Aircraft's copyright banner)."""
        return image

    # Helpers shared by the file-based sources.

    def file(self, *parts: str, base: Path | None = None) -> Path:
        """A required file of the layout, or a `LayoutError` naming it and the expected layout."""
        path = inside(base or self.root, Path(*parts))
        if not path.exists():
            raise LayoutError(f"{self.name}: missing {path}; expected layout: {self.layout}")
        return path


class LayoutError(FinerError):
    """The dataset on disk does not have the official layout (or a list file points outside it)."""


def inside(root: Path, relative: str | Path) -> Path:
    """`root / relative`, refusing paths from list files that escape the dataset root.

    The check is lexical (absolute paths and ".." that climb out are refused): it costs no file-system
    call per image, and a copy whose sub-folders are symlinks to another disk still works.
    """
    base = os.path.abspath(root)
    path = os.path.normpath(os.path.join(base, relative))
    if path != base and not path.startswith(base.rstrip(os.sep) + os.sep):
        raise LayoutError(f"refusing path {str(relative)!r}: it points outside the dataset root {base}")
    return Path(path)


def check_split(source: Source, split: str) -> None:
    """A one-line error for a split the source does not have (the engine passes user input through)."""
    if split not in source.splits():
        raise FinerError(f"{source.name} has no split {split!r}; choose from {', '.join(source.splits())}")


# The list-file layout of CUB-200-2011, which NABirds reuses: `<id> <value…>` per line.

#: `train_test_split.txt` flag -> split name (1 = train).
SPLIT_FLAGS: dict[str, str] = {"1": "train", "0": "test"}


def read_text(path: Path) -> str:
    """A list file's text; one line naming the file when it is not UTF-8 (a re-save fixes it)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LayoutError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None


def read_list(path: Path, columns: int) -> Iterator[list[str]]:
    """Rows of a CUB-style list file; the last column takes the rest of the line (names with spaces).

    The first column is an id: an id listed twice is refused, since every reader keys on it and would
    otherwise keep one of the two lines (or, for images.txt, yield the image twice) without a word.
    """
    first_seen: dict[str, int] = {}
    for number, line in enumerate(read_text(path).split("\n"), 1):
        row = line.strip().split(maxsplit=columns - 1)
        if not row:
            continue
        if len(row) != columns:
            raise LayoutError(f"{path}:{number}: expected {columns} fields, found {line.strip()!r}")
        if row[0] in first_seen:
            raise LayoutError(
                f"{path}:{number}: id {row[0]} is listed again (first on line {first_seen[row[0]]}); "
                "keep one line per id"
            )
        first_seen[row[0]] = number
        yield row


def class_id(raw: str, width: int, path: Path) -> str:
    """A class id zero-padded as the dataset numbers its folders ("1" -> "001"), so ids sort numerically."""
    if not raw.isdigit():
        raise LayoutError(f"{path}: class id {raw!r} is not a number")
    return raw.zfill(width)


def read_boxes(path: Path) -> dict[str, list[float]]:
    """`<image id> <x> <y> <width> <height>` per line -> image id -> [x, y, w, h]."""
    boxes = {}
    for image_id, values in read_list(path, 2):
        try:
            box = [float(v) for v in values.split()]
        except ValueError:
            box = []
        if len(box) != 4:
            raise LayoutError(f"{path}: image {image_id}: box {values!r} is not four numbers (x y w h)")
        boxes[image_id] = box
    return boxes


class ListFileSource(Source):
    """A source in the CUB list-file layout: `folder/` (or `--root` itself) holding images.txt,
    classes.txt, image_class_labels.txt, train_test_split.txt, an optional bounding_boxes.txt and images/.

    Subclasses set `folder` and `id_width` (the digits of the class folders) and say which class ids are
    concepts (`_concept_ids`); the train/test records, labels and boxes are read here.
    """

    folder: ClassVar[str]
    id_width: ClassVar[int]

    def __init__(self, root: Path | None) -> None:
        super().__init__(root)
        nested = self.root / self.folder
        self.base = nested if nested.is_dir() else self.root
        self.images_txt = self.file("images.txt", base=self.base)
        self.classes_txt = self.file("classes.txt", base=self.base)
        self.labels_txt = self.file("image_class_labels.txt", base=self.base)
        self.split_txt = self.file("train_test_split.txt", base=self.base)
        self.images_dir = self.file("images", base=self.base)

    def splits(self) -> list[str]:
        return ["train", "test"]

    def _class_id(self, raw: str, path: Path) -> str:
        return class_id(raw, self.id_width, path)

    @cached_property
    def _labels(self) -> dict[str, str]:
        """Image id -> class id."""
        return {image: self._class_id(raw, self.labels_txt) for image, raw in read_list(self.labels_txt, 2)}

    @abstractmethod
    def _concept_ids(self) -> Collection[str]:
        """The class ids that are concepts (an image labelled with another is a layout error)."""

    def records(self, split: str) -> Iterator[ImageRecord]:
        check_split(self, split)
        concepts = self._concept_ids()
        flags = dict(read_list(self.split_txt, 2))
        boxes_txt = self.base / "bounding_boxes.txt"
        boxes = read_boxes(boxes_txt) if boxes_txt.exists() else {}
        for image_id, relative in read_list(self.images_txt, 2):
            flag = flags.get(image_id)
            if flag not in SPLIT_FLAGS:
                raise LayoutError(f"{self.split_txt}: image {image_id} has no 0/1 train flag")
            if SPLIT_FLAGS[flag] != split:
                continue
            label = self._labels.get(image_id)
            if label not in concepts:
                raise LayoutError(f"{self.labels_txt}: image {image_id} has no class listed in classes.txt")
            yield ImageRecord(
                image_id=image_id,
                concept_id=label,
                path=inside(self.images_dir, relative),
                bbox=boxes.get(image_id),
            )
