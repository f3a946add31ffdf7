"""Built datasets → TRL conversational vision-language rows, with every sample accounted for.

A training row is `messages` (from the `train_direct` / `train_finer` / `train_caption` templates) and
`image`, the built dataset's own image column: TRL's vision collator takes a single `image` as
`images=[image]`, and keeping the column as it is avoids decoding or rewriting any pixels here. The labels
the collator needs are inside the conversation; `source` rides along for the counts, and `bbox` for
`crop_to_boxes`, which crops when a row is read. The trainer runs with `remove_unused_columns=False`: TRL's
column pruning would drop `bbox` before the crop reads it, and the collator ignores the keys it does not use.

Nothing is truncated: TRL would cut a long conversation at `max_length` wherever it falls, image tokens
included. Instead `drop_too_long` measures each conversation with the trainer's own collator and drops the
ones that do not fit, counting them per source.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets

from finer.data.datasets_io import load_built, pick_split
from finer.errors import FinerError
from finer.models.images import crop_box
from finer.prompts import render

__all__ = [
    "Mixture",
    "attribute_column",
    "conversations",
    "crop_to_boxes",
    "drop_too_long",
    "load_mixture",
    "load_split",
]

logger = logging.getLogger(__name__)

Format = Literal["direct", "finer", "caption"]
AttributeMode = Literal["auto", "visible", "required"]

#: How to fill each attribute column when a dataset lacks it (named in the error).
FILLED_BY = {
    "attributes_required": "`finer build` it with attributes, from an LLM endpoint (--base-url or "
    "OPENAI_API_KEY), Wikipedia or a mirror (--wiki-api) read by the rules extractor, CUB's annotations "
    "(--extractor cub-annotations, offline), or your own text per concept (--knowledge-file concepts.jsonl, "
    "offline)",
    "attributes_visible": "ground it first (`finer ground DATASET --out DIR`), or pass --attributes required",
}
_LABELS = ("superordinate", "coarse", "fine")


@dataclass
class Mixture:
    """The training rows and, per source, how many rows came in and where each one went."""

    dataset: datasets.Dataset
    counts: dict[str, Counter[str]] = field(default_factory=dict)
    attributes: str | None = None

    def summary(self) -> dict[str, dict[str, int]]:
        """Per source: rows read, held out, too long, trained (and, for instruction data, the rows skipped
        as unusable and not sampled); the parts add up to `rows`."""
        keys = ("rows", "held_out", "too_long", "trained")
        extra = ("skipped", "not_sampled")
        return {
            source: {k: count[k] for k in keys} | {k: count[k] for k in extra if k in count}
            for source, count in sorted(self.counts.items())
        }


def load_split(spec: str, split: str) -> datasets.Dataset:
    """One split of a `finer build` folder (or any `save_to_disk` folder, a lone split whatever its name),
    else of a Hub dataset repo."""
    return pick_split(load_built(spec, "dataset", split=split, one_split=True), split, "dataset", spec)


def attribute_column(ds: datasets.Dataset, mode: AttributeMode, name: str = "dataset") -> str:
    """The column `--format finer` reads attributes from; a one-line error when the dataset has none.

    `auto` prefers the per-image grounded `attributes_visible` where the dataset has it. A column whose rows
    are all empty (a labels-only build) counts as missing: training on "none" teaches nothing.
    """
    wanted = {"auto": ("attributes_visible", "attributes_required"), "visible": ("attributes_visible",)}
    candidates = wanted.get(mode, ("attributes_required",))
    present = [c for c in candidates if c in ds.column_names]
    for column in present:
        if any(ds[column]):
            return column
    column = present[0] if present else candidates[-1]
    state = "every row is empty" if present else "no such column"
    raise FinerError(f"{name} has no {column} ({state}), which --format finer needs: {FILLED_BY[column]}")


def crop_to_boxes(batch: dict[str, list]) -> dict[str, list]:
    """Dataset transform: each image cropped to its `bbox` (x, y, w, h) where it has one, when read.

    A query for other columns passes through untouched.
    """
    if "image" in batch and "bbox" in batch:
        pairs = zip(batch["image"], batch["bbox"], strict=True)
        batch["image"] = [crop_box(image, box) for image, box in pairs]
    return batch


def conversations(
    ds: datasets.Dataset,
    fmt: Format,
    attributes: str | None = None,
    prompts_dir: str | Path | None = None,
    crop: bool = False,
) -> datasets.Dataset:
    """`ds` as training rows `image`, `messages`, `source` (and `bbox` to `crop` to); conversations from the
    training templates.

    Only the label columns are read (images stay undecoded); rows of one concept share one rendering.
    """
    columns = [*_LABELS, *([attributes] if attributes else [])]
    if fmt == "caption" and "caption" in ds.column_names:  # a dataset's own captions, where it has them
        columns.append("caption")
    values = ds.select_columns(columns).to_dict()
    cache: dict[tuple, list[dict]] = {}
    messages = []
    for i in range(len(ds)):
        row = {c: values[c][i] for c in columns}
        key = tuple(tuple(v) if isinstance(v, list) else v for v in row.values())
        if key not in cache:
            cache[key] = _render(row, fmt, attributes, prompts_dir)
        messages.append(cache[key])
    return ds.select_columns(["image", "source", *(["bbox"] if crop else [])]).add_column(
        "messages", messages
    )


def _render(row: dict[str, Any], fmt: Format, attributes: str | None, prompts_dir: str | Path | None) -> list:
    labels = {"superordinate": row["superordinate"], "coarse": row["coarse"][0], "fine": row["fine"][0]}
    if fmt == "finer":
        return render("train_finer", prompts_dir=prompts_dir, attributes=row[attributes], **labels)
    if fmt == "caption":
        return render("train_caption", prompts_dir=prompts_dir, caption=row.get("caption"), **labels)
    return render("train_direct", prompts_dir=prompts_dir, **labels)


def load_mixture(
    specs: Sequence[str],
    *,
    fmt: Format,
    split: str = "train",
    attributes: AttributeMode = "auto",
    hold_out: str | None = None,
    prompts_dir: str | Path | None = None,
    crop: bool = False,
) -> Mixture:
    """All of `specs`' `split` rows as one training set, minus the `hold_out` source, counted per source.

    With `crop`, images are cropped to their boxes when read (`crop_to_boxes`), nothing is rewritten.
    """
    if not specs:
        raise FinerError("no dataset to train on: pass --dataset DIR (repeat it to mix several)")
    parts, counts, columns = [], {}, set()
    for spec in specs:
        ds = load_split(spec, split)
        missing = [
            c for c in ("image", "source", *_LABELS, *(["bbox"] if crop else [])) if c not in ds.column_names
        ]
        if missing:
            raise FinerError(f"dataset {spec!r} lacks {', '.join(missing)}: is it a `finer build` output?")
        column = attribute_column(ds, attributes, f"dataset {spec!r}") if fmt == "finer" else None
        columns.add(column)
        sources = list(ds["source"])
        for source, n in Counter(sources).items():
            counts.setdefault(source, Counter())["rows"] += n
            if source == hold_out:
                counts[source]["held_out"] += n
        if hold_out in sources:
            ds = ds.select([i for i, source in enumerate(sources) if source != hold_out])
        parts.append(conversations(ds, fmt, column, prompts_dir, crop))
    if hold_out is not None and hold_out not in counts:
        raise FinerError(
            f"--hold-out {hold_out!r} matches no source; the datasets hold {', '.join(sorted(counts))}"
        )
    dataset = datasets.concatenate_datasets(parts)
    if crop:
        dataset = dataset.with_transform(crop_to_boxes)
    mixture = Mixture(dataset, counts, " + ".join(sorted(filter(None, columns))))
    if not len(mixture.dataset):
        raise FinerError(f"nothing left to train on after holding out {hold_out!r}")
    return mixture


def drop_too_long(mixture: Mixture, measure: Callable[[dict], int], max_length: int | None) -> None:
    """Drop (never cut) rows longer than `max_length` tokens as `measure` tokenizes them; count the rest."""
    ds = mixture.dataset
    keep, too_long = [], Counter()
    longest = shortest = 0
    if max_length is None:
        keep = list(range(len(ds)))
    else:
        for i, row in enumerate(ds):
            n = measure(row)
            longest, shortest = max(longest, n), min(shortest or n, n)
            if n <= max_length:
                keep.append(i)
            else:
                too_long[row["source"]] += 1
    for source, count in mixture.counts.items():
        count["too_long"] = too_long[source]
        unused = count["held_out"] + count["too_long"] + count["skipped"] + count["not_sampled"]
        count["trained"] = count["rows"] - unused
    if too_long:
        logger.warning(
            "dropped %d conversation(s) longer than --max-length %d tokens (longest %d): %s",
            sum(too_long.values()),
            max_length,
            longest,
            ", ".join(f"{s} {n}" for s, n in sorted(too_long.items())),
        )
    if not keep:
        raise FinerError(
            f"every conversation is longer than --max-length {max_length} (shortest: {shortest})"
        )
    if len(keep) < len(ds):
        mixture.dataset = ds.select(keep)
