"""Any dataset laid out as `<root>/<split>/<class>/<image>`, for data that has no builder of its own.

torchvision's `ImageFolder` layout, `<root>/<class>/<image>` with no split folders, is read too: each class's
images are split into train and test, `test_fraction` of them (rounded, at least one when the class has
two or more) to test, drawn with a fixed seed so that every build of the same folder splits it the same way.

Upper levels come from an optional `<root>/taxonomy.csv` with columns `fine,coarse,superordinate`:
`fine` names a class folder (as written, or with "_" read as a space), `coarse` may list several accepted
labels separated by "|". Without the file, or where a row leaves a column empty, the superordinate is
"object" and the engine's coarse labeller applies the head-noun rule ("Great Horned Owl" -> "Owl").
When the file exists every class folder needs a row, so that a typo is an error, not a silent fallback.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Iterator
from pathlib import Path

from finer.data.coarse import HEAD_NOUN
from finer.errors import FinerError
from finer.schema import Concept

from .base import ImageRecord, LayoutError, Source

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
#: Split folders in this order first, any others after them alphabetically.
USUAL_SPLITS: tuple[str, ...] = ("train", "validation", "val", "test")
DEFAULT_SUPERORDINATE = "object"
#: The `<root>/<class>/*` layout: the share of each class's images that goes to the test split, and the seed.
DEFAULT_TEST_FRACTION = 0.2
SPLIT_SEED = 0


def _hidden(name: str) -> bool:
    """Folders a tool or an archiver leaves (`.cache`, `__MACOSX`), never read as splits or classes."""
    return name.startswith((".", "__"))


def _folders(path: Path) -> list[str]:
    """Visible sub-folders, sorted (hidden ones left out; `ImageFolderSource` counts them)."""
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not _hidden(entry.name))


def _hidden_folders(path: Path) -> list[Path]:
    """The hidden sub-folders of `path`, sorted."""
    return sorted(Path(entry.path) for entry in os.scandir(path) if entry.is_dir() and _hidden(entry.name))


def _images(path: Path) -> list[str]:
    """Image files directly in a folder, sorted; AppleDouble `._x.jpg` files left out."""
    return sorted(
        entry.name
        for entry in os.scandir(path)
        if entry.is_file()
        and not entry.name.startswith(".")
        and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES
    )


def _readable(folder: str) -> str:
    """A folder name as a label: "great_horned_owl" -> "great horned owl"."""
    return " ".join(folder.replace("_", " ").split())


class ImageFolderSource(Source):
    """Class folders per split; concept ids are the class folder names."""

    name = "imagefolder"
    layout = (
        "<root>/<split>/<class>/*.jpg|jpeg|png|webp (or <root>/<class>/*, split by --test-fraction), "
        "with an optional <root>/taxonomy.csv (fine,coarse,superordinate)"
    )
    coarse_rule = HEAD_NOUN

    def __init__(self, root: Path | None, test_fraction: float = DEFAULT_TEST_FRACTION) -> None:
        super().__init__(root)
        if not 0 < test_fraction < 1:
            raise FinerError(f"{self.name}: --test-fraction must lie between 0 and 1, not {test_fraction}")
        self.test_fraction = test_fraction
        #: split -> class folder -> image file names; one directory walk, reused by every call.
        self.tree: dict[str, dict[str, list[str]]] = {}
        #: Where a split's class folders are: the split folder, or the root itself (the flat layout).
        self.split_dirs: dict[str, Path] = {}
        top = {name: _images(self.root / name) for name in _folders(self.root)}
        flat = [name for name, files in top.items() if files]
        if flat and len(flat) < len(top):
            raise LayoutError(
                f"{self.name}: {self.root} mixes class folders with images ({', '.join(flat[:3])}) and "
                f"folders without ({', '.join(sorted(set(top) - set(flat))[:3])}); expected layout: "
                f"{self.layout}"
            )
        if flat:
            self._check_flat(flat)
            self._split_flat(top)
        else:
            self._read_splits()
        if not self.tree:
            raise LayoutError(
                f"{self.name}: no images under {self.root}/<split>/<class>/ or {self.root}/<class>/; "
                f"expected layout: {self.layout}"
            )
        self._note_hidden(flat)

    def _note_hidden(self, flat: list[str]) -> None:
        """One note naming the hidden folders passed over where splits or classes are read, so that a
        class folder named `..x` or `__x` by mistake is not lost without a word."""
        parents = [self.root] if flat else [self.root, *(self.root / split for split in self.tree)]
        hidden = [path.relative_to(self.root).as_posix() for p in parents for path in _hidden_folders(p)]
        if hidden:
            self.notes = [
                f"{self.name}: skipped {len(hidden)} folder(s) whose name starts with '.' or '__' "
                f"({', '.join(hidden[:5])}{', …' if len(hidden) > 5 else ''}); "
                "rename one to read it as a class"
            ]

    def _read_splits(self) -> None:
        """`<root>/<split>/<class>/*`: the splits are the folders'."""
        for split in _folders(self.root):
            classes = {name: _images(self.root / split / name) for name in _folders(self.root / split)}
            if any(classes.values()):
                self.tree[split] = {name: files for name, files in classes.items() if files}
                self.split_dirs[split] = self.root / split

    def _check_flat(self, classes: list[str]) -> None:
        """Images right under split folders, or one class folder alone, are a mistake, not classes."""
        if set(classes) <= set(USUAL_SPLITS):
            raise LayoutError(
                f"{self.name}: images directly in {self.root / classes[0]}, a split folder; "
                f"expected layout: {self.layout}"
            )
        if len(classes) == 1:
            raise LayoutError(
                f"{self.name}: images directly in {self.root / classes[0]}, the only folder under "
                f"{self.root}: a class folder needs others beside it; expected layout: {self.layout}"
            )

    def _split_flat(self, classes: dict[str, list[str]]) -> None:
        """`<root>/<class>/*`: each class's images drawn into train and test with the fixed seed."""
        rng = random.Random(SPLIT_SEED)
        self.tree = {"train": {}, "test": {}}
        for folder, files in classes.items():
            shuffled = rng.sample(files, len(files))
            n_test = max(1, round(self.test_fraction * len(files))) if len(files) > 1 else 0
            self.tree["test"][folder] = sorted(shuffled[:n_test])
            self.tree["train"][folder] = sorted(shuffled[n_test:])
        self.tree = {split: {c: f for c, f in folders.items() if f} for split, folders in self.tree.items()}
        self.split_dirs = {"train": self.root, "test": self.root}

    def splits(self) -> list[str]:
        usual = [split for split in USUAL_SPLITS if split in self.tree]
        return usual + sorted(set(self.tree) - set(usual))

    def concepts(self) -> list[Concept]:
        rows = self._taxonomy()
        concepts = []
        for folder in sorted({name for classes in self.tree.values() for name in classes}):
            fine = _readable(folder)
            row = rows.get(folder, rows.get(fine)) if rows else {}
            if row is None:
                raise LayoutError(f"{self.name}: class {folder!r} has no row in {self.root / 'taxonomy.csv'}")
            coarse = [label.strip() for label in (row.get("coarse") or "").split("|") if label.strip()]
            concepts.append(
                Concept(
                    concept_id=folder,
                    fine=[fine],
                    superordinate=(row.get("superordinate") or "").strip() or DEFAULT_SUPERORDINATE,
                    coarse=coarse,
                    coarse_source="taxonomy" if coarse else "",
                )
            )
        return concepts

    def _taxonomy(self) -> dict[str, dict[str, str]]:
        """Rows of `taxonomy.csv` by their `fine` value; empty when the file is absent."""
        path = self.root / "taxonomy.csv"
        if not path.is_file():
            return {}
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            if "fine" not in (reader.fieldnames or []):
                raise LayoutError(f"{path}: the header must name the columns fine,coarse,superordinate")
            return {row["fine"].strip(): row for row in reader if (row["fine"] or "").strip()}

    def records(self, split: str) -> Iterator[ImageRecord]:
        if split not in self.tree:
            raise FinerError(f"{self.name} has no split {split!r}; choose from {', '.join(self.splits())}")
        base = self.split_dirs[split]
        for folder, files in self.tree[split].items():
            for file in files:
                yield ImageRecord(
                    image_id=(base / folder / file).relative_to(self.root).as_posix(),
                    concept_id=folder,
                    path=base / folder / file,
                )
