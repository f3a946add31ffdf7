"""The one small interface every source builder implements, and the path rules they share.

A source reads one dataset's *official* on-disk layout and yields concepts and image records; the build
engine (`finer.build`) does everything else (limits, coarse labels, image checks, writing, export).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from PIL import Image

from finer.errors import FinerError
from finer.schema import Concept


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

    name: ClassVar[str]
    #: One line describing the expected layout; shown when a required file is missing.
    layout: ClassVar[str]
    #: Offline rule for coarse labels when the source's taxonomy has none ("head-noun", "car-body").
    coarse_rule: ClassVar[str | None] = None
    #: True when the source ships its own knowledge and attributes (the demo).
    bundled_knowledge: ClassVar[bool] = False
    #: True when `adjust` changes pixels (then images are re-encoded and stored as bytes).
    adjusts_pixels: ClassVar[bool] = False

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
