"""`finer probe-features`: does the projector lose fine detail the vision tower saw? (docs/design.md §1,
FINER)

FINER traces the fine-grained failure of VLMs to the modality gap: linear probes read fine labels from the
vision encoder's features better than from what the projector hands the language model. This module repeats
that measurement for any model of the family registry. Per image it takes two pooled features from the
model's own `get_image_features` (transformers 5 returns both for every registered family):

- vision: the vision tower's last hidden state (``last_hidden_state``), averaged over the patch tokens
  of the image (a CLIP class token is left out);
- projector: the projector's output (``pooler_output``), averaged over the image's tokens, i.e. the
  image as the language model receives it.

Each feature set gets a logistic-regression probe on standardised features, fit on the train split and
scored on the test split at the fine level (the ``label`` column). A projector that keeps fine detail
scores about as well as the tower; a large gap means it loses it.

Tokens are attributed to images by proportion: every registered projector maps a fixed number of vision
tokens to one output token (LLaVA 1:1, Idefics3 pixel shuffle 4:1 per tile, Qwen-VL mergers 4:1,
Gemma 3 pooling 16:1), so an image's share of the tower's tokens equals its share of the projector's.
This also covers tiles (Idefics3, LLaVA-NeXT) and Qwen-VL's flat patch sequence of mixed-size images.
LLaVA feeds its projector the penultimate layer; the vision feature here is still the last one.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import finer
from finer.errors import FinerError

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import PreTrainedModel

    from finer.models.families import Family

__all__ = [
    "FEATURES",
    "PROBE_FILE",
    "PROBE_REPORT",
    "ProbeConfig",
    "image_features",
    "probe",
    "probe_features",
]

PROBE_FILE = "probe_features.json"
PROBE_REPORT = "probe_features.md"
#: The two feature sets, in report order.
FEATURES: tuple[str, ...] = ("vision", "projector")
#: lbfgs iterations: enough for thousands of standardised 4096-d features over hundreds of classes.
MAX_ITER = 2000
# report.md is rewritten by every `finer eval`; our section is kept between these markers and replaced.
_SECTION_START = "<!-- finer probe-features -->"
_SECTION_END = "<!-- /finer probe-features -->"


@dataclass
class ProbeConfig:
    """Everything `finer probe-features` was asked to do."""

    model: str
    dataset: str
    out: Path
    adapter: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    limit_per_class: int | None = None
    batch_size: int = 16


def _family(model: str) -> Family:
    """The registry family of ``model``, read from its config before the weights are loaded."""
    from transformers import AutoConfig

    from finer.models.families import detect_family

    try:
        model_type = AutoConfig.from_pretrained(model).model_type
    except (OSError, ValueError) as err:
        raise FinerError(
            f"--model {model}: cannot read its config ({' '.join(str(err).split())[:200]})"
        ) from None
    return detect_family(model_type, model)


def _has_class_token(vision: torch.nn.Module) -> bool:
    """Whether the tower prepends a class token (CLIP) that is no patch of the image."""
    import torch

    return any(isinstance(getattr(m, "class_embedding", None), torch.nn.Parameter) for m in vision.modules())


def image_features(
    model: PreTrainedModel, family: Family, image_processor: Any, images: list[Image.Image]
) -> tuple[np.ndarray, np.ndarray]:
    """(vision, projector) features of ``images``: one float32 row per image, pooled as described above.

    ``model`` may be PEFT-wrapped (its adapter then shapes the features). Raises RuntimeError when the
    model's outputs cannot be attributed to the images (a family whose projector is not token-uniform).
    """
    import torch
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    for root in (family.vision, family.projector[0]):
        try:
            base.get_submodule(root)
        except AttributeError:
            raise FinerError(
                f"{family.name}: no module {root} in this model (did transformers move it?); "
                "fix the roots in finer/models/families.py"
            ) from None
    get_features = getattr(base, "get_image_features", None)
    if get_features is None:
        raise FinerError(f"{type(base).__name__} has no get_image_features; upgrade transformers")
    # Each image is its own sample (a nested list), so that processors that batch several images per
    # sample (Idefics3) keep the images apart.
    inputs = image_processor([[image.convert("RGB")] for image in images], return_tensors="pt")
    accepted = set(inspect.signature(get_features).parameters)
    inputs = {k: v.to(base.device) for k, v in inputs.items() if k in accepted}
    inputs["pixel_values"] = inputs["pixel_values"].to(base.dtype)
    with torch.inference_mode():
        output = get_features(**inputs)
    projected = [p.reshape(-1, p.shape[-1]) for p in output.pooler_output]
    hidden = output.last_hidden_state
    if hidden.dim() == 3:  # (images or tiles, tokens, width)
        if _has_class_token(base.get_submodule(family.vision)):
            hidden = hidden[:, 1:]
        hidden = hidden.reshape(-1, hidden.shape[-1])
    counts = [len(p) for p in projected]
    total = sum(counts)
    if len(projected) != len(images) or any(len(hidden) * c % total for c in counts):
        raise RuntimeError(
            f"{family.name}: {len(hidden)} vision tokens and {counts} projected tokens for {len(images)} "
            "images cannot be split per image"
        )
    chunks = hidden.split([len(hidden) * c // total for c in counts])
    vision = torch.stack([chunk.mean(0) for chunk in chunks])
    projector = torch.stack([p.mean(0) for p in projected])
    return vision.float().cpu().numpy(), projector.float().cpu().numpy()


def _limit(labels: list[int], per_class: int | None) -> list[int]:
    """Indices of the first ``per_class`` rows of each label (all rows when None)."""
    if per_class is None:
        return list(range(len(labels)))
    seen: dict[int, int] = {}
    kept = []
    for index, label in enumerate(labels):
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            kept.append(index)
    return kept


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> dict[str, Any]:
    """Fit a logistic-regression probe on standardised ``train_x``; its accuracies on both splits.

    Training accuracy is reported too: it tells a probe that cannot separate the classes at all from one
    that separates them but does not generalise.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = LogisticRegression(max_iter=MAX_ITER)
    model = make_pipeline(StandardScaler(), classifier)
    model.fit(train_x, train_y)
    return {
        "dim": int(train_x.shape[1]),
        "train_accuracy": round(float(model.score(train_x, train_y)), 4),
        "test_accuracy": round(float(model.score(test_x, test_y)), 4),
        "converged": bool(classifier.n_iter_.max() < MAX_ITER),
    }


def _extract(
    model: PreTrainedModel, family: Family, image_processor: Any, rows: Any, batch_size: int, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """Features of every image in ``rows`` (a Dataset with an ``image`` column), a batch at a time."""
    from tqdm.auto import tqdm

    parts: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    with tqdm(total=rows.num_rows, desc=desc, unit=" img", dynamic_ncols=True, disable=None) as bar:
        for start in range(0, rows.num_rows, batch_size):
            images = rows[start : start + batch_size]["image"]
            for part, features in zip(
                parts, image_features(model, family, image_processor, images), strict=True
            ):
                part.append(features)
            bar.update(len(images))
    return np.concatenate(parts[0]), np.concatenate(parts[1])


def _run_key(run: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two runs the same measurement (a re-run replaces the older one)."""
    return tuple(
        run[k] for k in ("model", "adapter", "dataset", "train_split", "test_split", "limit_per_class")
    )


def _table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | adapter | family | train → test (images) | classes | chance "
        "| vision tower (dim) | projector (dim) | gap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        vision, projector = (run["probes"][name] for name in FEATURES)
        adapter = f"`{run['adapter']}`" if run["adapter"] else "–"
        lines.append(
            f"| `{run['model']}` | {adapter} | {run['family']} "
            f"| {run['train_split']} ({run['train_images']}) → {run['test_split']} ({run['test_images']}) "
            f"| {run['classes']} | {run['chance']:.3f} "
            f"| {vision['test_accuracy']:.3f} ({vision['dim']}) "
            f"| {projector['test_accuracy']:.3f} ({projector['dim']}) | {run['gap']:+.3f} |"
        )
    return lines


def _markdown(runs: list[dict[str, Any]]) -> str:
    return "\n".join(
        [
            "## Linear probes: vision tower vs projector (FINER's modality gap)",
            "",
            "Fine-level test accuracy of a logistic-regression probe on each image's pooled features: "
            "the vision tower's last hidden state (patch tokens) and the projector's output (what the "
            "language model receives). gap = vision − projector; chance = the test share of its largest "
            "class.",
            "",
            *_table(runs),
            "",
        ]
    )


def _write(out: Path, run: dict[str, Any]) -> None:
    """Add ``run`` to probe_features.json (replacing an earlier run of the same measurement), and write
    the table to probe_features.md and, when the folder holds an evaluation report, into report.md."""
    from finer.eval.report import REPORT_FILE

    path = out / PROBE_FILE
    runs: list[dict[str, Any]] = []
    if path.is_file():
        try:
            runs = json.loads(path.read_text(encoding="utf-8"))["runs"]
        except (ValueError, KeyError, TypeError):
            raise FinerError(f"{path} is not a probe-features file; move it or pick another --out") from None
    runs = [r for r in runs if _run_key(r) != _run_key(run)] + [run]
    path.write_text(json.dumps({"runs": runs}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table = _markdown(runs)
    (out / PROBE_REPORT).write_text("# " + table.removeprefix("## "), encoding="utf-8")
    report = out / REPORT_FILE
    if report.is_file():
        text = report.read_text(encoding="utf-8")
        head, _, rest = text.partition(_SECTION_START)
        tail = rest.partition(_SECTION_END)[2] if rest else ""
        section = f"{_SECTION_START}\n{table}{_SECTION_END}\n"
        report.write_text(head.rstrip("\n") + "\n\n" + section + tail.lstrip("\n"), encoding="utf-8")


def probe_features(config: ProbeConfig) -> dict[str, Any]:
    """Extract both feature sets for the train and test splits, probe each, and write the results.

    Returns the run as recorded in probe_features.json. Bad input (an unregistered family, a missing
    split or column, fewer than two classes to train on) is a one-line `FinerError` before the model loads.
    """
    from finer.eval.engine import load_split
    from finer.models.loading import load_model, pick_device

    started = time.perf_counter()
    if config.batch_size < 1:
        raise FinerError("--batch-size must be at least 1")
    out = Path(config.out).expanduser()
    if out.exists() and not out.is_dir():
        raise FinerError(f"--out {out} is a file; pass a folder")
    family = _family(config.model)
    splits = {}
    for split in (config.train_split, config.test_split):
        rows, _ = load_split(config.dataset, split, ["image", "label"])
        splits[split] = rows.select(_limit(rows["label"], config.limit_per_class))
    train, test = splits[config.train_split], splits[config.test_split]
    train_y, test_y = np.asarray(train["label"]), np.asarray(test["label"])
    if len(set(train_y.tolist())) < 2:
        raise FinerError(f"--train-split {config.train_split}: a probe needs at least two classes to learn")
    if not len(test_y):
        raise FinerError(f"--test-split {config.test_split} has no rows")

    model, processor = load_model(config.model, config.adapter)
    device, dtype = pick_device()
    features = {
        split: _extract(
            model, family, processor.image_processor, rows, config.batch_size, f"features {split}"
        )
        for split, rows in splits.items()
    }
    probes = {
        name: probe(features[config.train_split][i], train_y, features[config.test_split][i], test_y)
        for i, name in enumerate(FEATURES)
    }
    run = {
        "model": config.model,
        "adapter": config.adapter,
        "family": family.name,
        "dataset": config.dataset,
        "train_split": config.train_split,
        "test_split": config.test_split,
        "limit_per_class": config.limit_per_class,
        "level": "fine",
        "classes": len(set(train_y.tolist()) | set(test_y.tolist())),
        "train_images": int(len(train_y)),
        "test_images": int(len(test_y)),
        "chance": round(float(np.bincount(test_y).max() / len(test_y)), 4),
        "probes": probes,
        "gap": round(probes["vision"]["test_accuracy"] - probes["projector"]["test_accuracy"], 4),
        "device": device,
        "dtype": dtype,
        "finer_version": finer.__version__,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    _write(out, run)
    return run
