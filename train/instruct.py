"""General instruction data (LLaVA-style JSON with images) mixed into a fine-grained training set at a ratio.

Fine-tuning on fine-grained labels alone can wear down a VLM's general abilities; LLaVA-style recipes mix in
general visual instruction data. The file is LLaVA's own format, a JSON list (or JSON Lines) of

    {"id": "...", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the bus?"},
                       {"from": "gpt", "value": "The bus is red."}, ...]}

`image` is relative to `--instruction-images` (default: the JSON file's folder) and may not leave it. Each
conversation becomes a training row like the fine-grained ones (`messages` with one image slot where
`<image>` stood, `image`, `source` = "instruction"), so TRL masks it the same way: loss on the answers only.

`--instruction-ratio R` draws round(R x fine-grained rows) conversations, seeded, without replacement (all of
them, with a warning, when the file holds fewer); only the drawn images are opened. Every conversation is
accounted for in the run summary: `rows` read, `not_sampled`, `skipped` (no image, a missing or unreadable
image file among those drawn, no `<image>` slot or several, a turn that is not human/gpt in turn),
`too_long`, `trained`.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
from PIL import Image, UnidentifiedImageError

from finer.builders.base import LayoutError, inside
from finer.errors import FinerError

from .data import Mixture

__all__ = ["INSTRUCTION_SOURCE", "load_instructions", "mix_instructions"]

logger = logging.getLogger(__name__)

INSTRUCTION_SOURCE = "instruction"
_ROLES = {"human": "user", "gpt": "assistant"}


def _records(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise FinerError(f"--instruction-data {path}: cannot read it ({err.strerror})") from None
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise FinerError(f"--instruction-data {path}: not valid JSON ({err})") from None
    if not isinstance(records, list):
        raise FinerError(f"--instruction-data {path}: expected a JSON list of LLaVA-style conversations")
    return records


def _messages(record: Any) -> list[dict] | None:
    """The conversation as chat messages with the image slot in place, or None when it is not well-formed."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
        return None
    messages, slots = [], 0
    for i, turn in enumerate(turns):
        role = _ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if role != ("user" if i % 2 == 0 else "assistant") or not isinstance(value, str):
            return None
        slots += value.count("<image>")
        blocks: list[dict] = []
        for j, text in enumerate(value.split("<image>")):
            if j:
                blocks.append({"type": "image"})
            if text.strip():
                blocks.append({"type": "text", "text": text.strip()})
        messages.append({"role": role, "content": blocks})
    return messages if slots == 1 else None


def _inside(root: Path, relative: str) -> Path | None:
    try:
        return inside(root, relative)
    except LayoutError:
        return None


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError):
        return False
    return True


def load_instructions(
    path: str | Path, wanted: int, images: str | Path | None = None, seed: int = 0
) -> tuple[list[dict], Counter[str]]:
    """`wanted` usable conversations of a LLaVA-style file, drawn at random (`seed`), as rows (`messages`,
    image path), and the counts of what was read, skipped and not sampled.

    Every record's shape and image path are checked; only the drawn images are opened (a 665k-record file
    mixed in at a few thousand rows opens a few thousand), and one that fails is replaced by the next draw.
    """
    path = Path(path).expanduser()
    root = Path(images).expanduser() if images else path.parent
    counts: Counter[str] = Counter()
    candidates, reasons = [], Counter()
    for record in _records(path):
        counts["rows"] += 1
        messages = _messages(record)
        image = record.get("image") if isinstance(record, dict) else None
        if not isinstance(image, str) or not image:
            reasons["no image"] += 1
        elif messages is None:
            reasons["malformed conversation"] += 1
        elif (file := _inside(root, image)) is None:
            reasons["image path outside --instruction-images"] += 1
        else:
            candidates.append({"messages": messages, "image": str(file)})
    random.Random(seed).shuffle(candidates)
    rows, drawn = [], 0
    for row in candidates:
        if len(rows) == wanted:
            break
        drawn += 1
        if _readable(Path(row["image"])):
            rows.append(row)
        else:
            reasons["missing or unreadable image"] += 1
    counts["skipped"] = sum(reasons.values())
    counts["not_sampled"] = len(candidates) - drawn
    if reasons:
        logger.warning(
            "instruction data: skipped %d of %d conversations (%s)",
            counts["skipped"],
            counts["rows"],
            ", ".join(f"{n} {why}" for why, n in reasons.most_common()),
        )
    return rows, counts


def mix_instructions(
    mixture: Mixture, path: str | Path, ratio: float, *, images: str | Path | None = None, seed: int = 0
) -> None:
    """Add round(`ratio` x the mixture's rows) instruction conversations to `mixture`, counted per row."""
    if ratio <= 0:
        raise FinerError(f"--instruction-ratio must be above 0, not {ratio}")
    wanted = round(ratio * len(mixture.dataset))
    chosen, counts = load_instructions(path, wanted, images, seed)
    if not chosen:
        raise FinerError(f"--instruction-data {path}: no usable conversation (see the warning above)")
    if len(chosen) < wanted:
        logger.warning(
            "instruction data: ratio %.2f asks for %d conversations, %s holds %d usable; taking them all",
            ratio,
            wanted,
            path,
            len(chosen),
        )
    part = datasets.Dataset.from_list([{**row, "source": INSTRUCTION_SOURCE} for row in chosen])
    part = part.cast_column("image", datasets.Image())
    if "bbox" in mixture.dataset.column_names:
        part = part.add_column("bbox", [None] * len(part))
    ours = mixture.dataset.with_format(None)
    part = part.select_columns(ours.column_names).cast(ours.features)
    transform = mixture.dataset.format.get("format_kwargs", {}).get("transform")
    mixed = datasets.concatenate_datasets([ours, part])
    mixture.dataset = mixed.with_transform(transform) if transform else mixed
    mixture.counts[INSTRUCTION_SOURCE] = counts
    logger.info(
        "instruction data: %d conversations mixed in (ratio %.2f of %d fine-grained rows)",
        len(chosen),
        ratio,
        len(ours),
    )
