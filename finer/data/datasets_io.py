"""Reading a built dataset back: a `finer build` folder or a Hub repo id, one split of it, its concepts.

`finer eval`, `finer ground` and the trainers all take a dataset the same way; the errors are one line and
name the option the user passed it with (``--dataset``, ``DATASET``, …), which each caller hands in.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from finer.errors import FinerError, one_line

__all__ = ["REPO_ID", "load_built", "load_concepts", "pick_split"]

#: A Hub dataset repo id, ``owner/name``; a path that exists on disk wins over it.
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _is_repo_id(dataset: str) -> bool:
    return bool(REPO_ID.fullmatch(dataset)) and not Path(dataset).expanduser().exists()


def load_built(
    dataset: str, option: str, *, split: str | None = None, one_split: bool = False
) -> datasets.DatasetDict | datasets.Dataset:
    """`dataset` as `datasets.load_from_disk` (a folder) or `datasets.load_dataset` (a Hub repo id) reads it.

    With `split`, a Hub repo downloads that split only (a folder is memory-mapped, so it is read whole).
    A folder saved from a single split is refused ("save a DatasetDict") unless `one_split` allows it.
    Raises a one-line `FinerError` naming `option` and `dataset` ("cannot load --dataset x: no such
    folder …") when it cannot be read.
    """
    path = Path(dataset).expanduser()
    if not path.is_dir() and not _is_repo_id(dataset):
        reason = "no such folder (nor a Hub repo id like owner/name)"
        raise FinerError(f"cannot load {option} {dataset}: {reason}")
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(dataset, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise FinerError(f"cannot load {option} {dataset} ({one_line(err)})") from None
    if path.is_dir() and not one_split and not isinstance(loaded, datasets.DatasetDict):
        raise FinerError(f"{option} {dataset}: holds one split without a name; save a DatasetDict")
    return loaded


def pick_split(
    loaded: datasets.DatasetDict | datasets.Dataset,
    split: str,
    option: str,
    dataset: str,
    columns: Sequence[str] = (),
) -> datasets.Dataset:
    """The `split` of `loaded` (a lone split is taken whatever its name), with every one of `columns`."""
    if isinstance(loaded, datasets.Dataset):
        rows = loaded
    elif split in loaded:
        rows = loaded[split]
    else:
        available = ", ".join(loaded) or "none"
        raise FinerError(f"{option} {dataset} has no split {split!r}; available: {available}")
    missing = [column for column in columns if column not in rows.column_names]
    if missing:
        raise FinerError(
            f"{option} {dataset} split {split!r} lacks column(s) {', '.join(missing)}; "
            "build it with `finer build`"
        )
    return rows


def load_concepts(dataset: str, fields: Sequence[str]) -> list[dict[str, Any]] | None:
    """The `fields` of every concept of a built dataset, or None where it has no concept table.

    A folder keeps them in concepts.jsonl; a Hub repo pushed by `finer build --push-to-hub` in its
    `concepts` config.
    """
    from finer.data.build import CONCEPTS_FILE, iter_concepts
    from finer.hub.cards import CONCEPTS_CONFIG, CONCEPTS_SPLIT

    concepts_file = Path(dataset).expanduser() / CONCEPTS_FILE
    if concepts_file.is_file():
        return [{field: getattr(c, field) for field in fields} for c in iter_concepts(concepts_file)]
    if _is_repo_id(dataset):
        with contextlib.suppress(ValueError, OSError):
            table = datasets.load_dataset(dataset, CONCEPTS_CONFIG, split=CONCEPTS_SPLIT)
            return table.select_columns(list(fields)).to_list()
    return None
