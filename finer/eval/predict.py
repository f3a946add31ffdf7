"""`finer predict`: one image asked with the eval prompts through the one local generation path (greedy)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finer.errors import FinerError


@dataclass
class PredictConfig:
    """What `finer predict` asks: an `image` file, or row `index` of a built `dataset`'s `split`."""

    image: Path | None = None
    model: str | None = None  # None: the adapter's base
    adapter: str | None = None
    level: str = "fine"  # mode "direct" only
    mode: str = "direct"  # or "finer": the `finetune --format finer` conversation
    superordinate: str | None = None  # mode "finer": None takes the dataset row's
    max_new_tokens: int = 128
    dataset: str | None = None
    index: int | None = None
    split: str = "test"
    crop_to_bbox: bool = False
    box: str | None = None  # "X,Y,W,H" in pixels


@dataclass
class Prediction:
    """The answer, the turns' whole texts, and what is known of the image (its gold, from a dataset)."""

    image_id: str
    answer: str
    texts: list[str]
    truncated: bool
    gold: str | None = None
    group: str | None = None  # mode "finer": the first turn's answer
    attributes: str | None = None  # mode "finer": the second turn's list


def predict(config: PredictConfig) -> Prediction:
    """Load the model (and adapter), build the picture, ask it and read the answer(s)."""
    from finer.eval.scoring import extract_answer
    from finer.eval.tasks import EvalPlan
    from finer.models.backends import HFBackend, answer

    if config.model is None and config.adapter is None:
        raise FinerError("finer predict needs --model, --adapter, or both")
    picture, row = predict_input(
        config.image,
        config.dataset,
        config.index,
        config.split,
        crop_to_bbox=config.crop_to_bbox,
        box=config.box,
    )
    finer = config.mode == "finer"
    superordinate = config.superordinate
    if finer and superordinate is None:
        superordinate = row.get("superordinate") or None
    if finer != (superordinate is not None):
        raise FinerError('--mode finer asks about a --superordinate ("Bird"); --mode direct takes none')
    model = config.model
    if model is None:
        from finer.models.loading import adapter_base

        model = adapter_base(config.adapter)  # type: ignore[arg-type]
    backend = HFBackend(model, config.adapter, batch_size=1, max_new_tokens=config.max_new_tokens)
    asked = {"image_id": row["image_id"], "superordinate": superordinate or "", "coarse": [], "fine": []}
    plan = EvalPlan(run={"mode": config.mode, "gold_parent": False}, concepts=[], images=lambda _: picture)
    turns = answer(backend, plan.task(0, asked, "fine" if finer else config.level))
    return Prediction(
        image_id=row["image_id"],
        answer=extract_answer(turns[-1].text),
        texts=[turn.text for turn in turns],
        truncated=any(turn.truncated for turn in turns),
        gold=row["fine"][0] if row.get("fine") else None,
        group=extract_answer(turns[0].text) if finer else None,
        attributes=turns[1].text.split("Attributes:")[-1].strip() if finer else None,
    )


def _parse_box(text: str) -> list[float]:
    """`--box X,Y,W,H` as four numbers, with a positive width and height."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or values[2] <= 0 or values[3] <= 0:
        raise FinerError(
            f"--box {text}: expected X,Y,W,H in pixels with W and H above 0 (e.g. 10,20,150,120)"
        )
    return values


def predict_input(
    image: Path | None,
    dataset: str | None,
    index: int | None,
    split: str = "test",
    *,
    crop_to_bbox: bool = False,
    box: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The picture `finer predict` asks about (an image file, or a built dataset's row), cropped to `--box`
    or, with `crop_to_bbox`, to the row's box; and what is known of it (image_id, superordinate, fine)."""
    from finer.models.images import crop_box, open_image, unreadable_reason

    if (image is None) == (dataset is None) or (dataset is None) != (index is None):
        raise FinerError("finer predict asks IMAGE, or --dataset DIR with --index I (one of the two)")
    row: dict[str, Any] = {"image_id": str(image)}
    if dataset is not None:
        from finer.data.datasets_io import load_built, pick_split

        rows = pick_split(
            load_built(dataset, "--dataset", split=split), split, "--dataset", dataset, ["image"]
        )
        if index >= len(rows):  # type: ignore[operator]
            raise FinerError(f"--index {index}: --dataset {dataset} split {split!r} has {len(rows)} rows")
        try:
            row = rows[index]
        except OSError as err:
            raise FinerError(f"--dataset {dataset} row {index}: {unreadable_reason(err)}") from None
        picture = row["image"].convert("RGB")
    else:
        try:
            picture = open_image(image)
        except OSError as err:
            raise FinerError(f"{image}: cannot read the image ({unreadable_reason(err)})") from None
    if box is None and crop_to_bbox:
        if dataset is None:
            raise FinerError("--crop-to-bbox on an image file needs its box: --box X,Y,W,H")
        if not row.get("bbox"):
            raise FinerError(f"--crop-to-bbox: row {index} of {dataset} has no box; drop --crop-to-bbox")
    area = _parse_box(box) if box is not None else row.get("bbox") if crop_to_bbox else None
    if area is not None:
        x, y, w, h = area
        if x < 0 or y < 0 or x + w > picture.width + 0.5 or y + h > picture.height + 0.5:
            raise FinerError(
                f"box {x:g},{y:g},{w:g},{h:g} does not lie inside the {picture.width}x{picture.height} image"
            )
        picture = crop_box(picture, area)
    return picture, row
