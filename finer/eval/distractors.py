"""Hard negatives for multiple choice, mined with a contrastive image-text encoder (CLIP, SigLIP).

The fine-grained-knowledge studies (FOCI; arXiv 2602.17871) ask k-way questions whose wrong options are the
classes an encoder finds most similar to the gold one: an easy distractor measures nothing. Every fine label
of a dataset is embedded once — the text "a photo of a {fine}, a type of {coarse}", the mean embedding of
its train images, or both — a coarse or superordinate label being the mean of its fine labels; then each
label's nearest labels by cosine similarity are found as a blocked matrix product.

Embeddings and neighbour lists are stored beside the dataset, in ``distractors/``: one JSON file per model
and settings (model id, its revision, the settings, a digest of the concepts, the neighbours) and the
embeddings in a safetensors file of the same name. A later run, or another user of the same folder, reads
them back without loading the model, so everyone gets the same questions; they are computed again only when
the model's revision, the settings or the dataset change. A dataset from the Hub keeps them in
``$FINER_CACHE/distractors/<owner>--<name>/``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finer.cache import DEFAULT_CACHE, cache_key
from finer.errors import FinerError, one_line
from finer.eval.scoring import LEVELS, parse_choice
from finer.eval.tasks import DISTRACTOR_KINDS, LabelPool, canonical_label
from finer.records import PredictionRecord

__all__ = [
    "DEFAULT_MODEL",
    "DISTRACTOR_KINDS",
    "KEEP",
    "OPTION_KINDS",
    "PROMPT",
    "SPACES",
    "Neighbours",
    "blocked_nearest",
    "check_distractors",
    "distractor_setup",
    "kind_accuracy",
    "kind_section",
    "load_encoder",
    "mine_neighbours",
    "option_kind_counts",
]

#: Why an option is there, as recorded per option: the gold, or the kind of distractor it is.
OPTION_KINDS: tuple[str, ...] = ("sibling", "random", "clip")
#: Which embeddings of a label are compared (`--distractor-space`).
SPACES: tuple[str, ...] = ("text", "image", "both")
DEFAULT_MODEL = "openai/clip-vit-large-patch14"
#: The class text embedded per fine label (CLIP's zero-shot wording, with the group as context).
PROMPT = "a photo of a {fine}, a type of {coarse}"
#: Neighbours kept per label: a 26-way question needs 25, the rest absorb ties at the boundary.
KEEP = 32
#: Train images averaged per fine label (the first in split order): enough for a stable mean, bounded time.
IMAGES_PER_LABEL = 32
STORE_DIR = "distractors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Neighbours:
    """One dataset's neighbour lists under one encoder and settings.

    ``levels[level][label.lower()]`` lists the other labels of that level, nearest first, with their cosine
    similarity (rounded to 6 places, so equal similarities tie exactly and the seed breaks the tie).
    """

    model: str
    revision: str
    space: str
    path: Path
    levels: dict[str, dict[str, list[tuple[str, float]]]]
    reused: bool
    warnings: tuple[str, ...] = ()

    def identity(self) -> dict[str, str]:
        """What the questions depend on besides the run: part of each resume key and record."""
        return {
            "distractor_model": self.model,
            "distractor_revision": self.revision,
            "distractor_space": self.space,
        }


def check_distractors(kind: str, space: str = "text") -> None:
    """A one-line `FinerError` for an unknown `--distractors` or `--distractor-space`."""
    if kind not in DISTRACTOR_KINDS:
        raise FinerError(f"--distractors {kind}: choose one of {', '.join(DISTRACTOR_KINDS)}")
    if space not in SPACES:
        raise FinerError(f"--distractor-space {space}: choose one of {', '.join(SPACES)}")


def load_encoder(model: str, device: str) -> tuple[Any, Any, Any]:
    """(model, tokenizer, image processor) of a CLIP/SigLIP checkpoint, in eval mode on ``device``."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    try:
        encoder = AutoModel.from_pretrained(model).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model)
        processor = AutoImageProcessor.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise FinerError(f"cannot load --distractor-model {model} ({one_line(err)})") from None
    if not hasattr(encoder, "get_text_features") or not hasattr(encoder, "get_image_features"):
        raise FinerError(
            f"--distractor-model {model} is a {type(encoder).__name__}, not a contrastive image-text "
            "encoder; pass a CLIP or SigLIP checkpoint"
        )
    return encoder, tokenizer, processor


def _cached_revision(model: str) -> str | None:
    """The commit of ``model`` in the Hub cache ("local" for a folder), None when it is not there yet."""
    if Path(model).expanduser().is_dir():
        return "local"
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def _store_path(dataset: str, model: str, settings: dict[str, Any]) -> Path:
    """Where the neighbours of ``dataset`` under ``model`` and ``settings`` live."""
    local = Path(dataset).expanduser()
    folder = local / STORE_DIR if local.is_dir() else DEFAULT_CACHE / STORE_DIR / dataset.replace("/", "--")
    folder_model = Path(model).expanduser()
    name = folder_model.resolve().name if folder_model.is_dir() else model.replace("/", "--")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    return folder / f"{name}-{settings['space']}-{cache_key(model, settings)[:10]}.json"


def _atomic_write(path: Path, write: Any) -> None:
    """``write(temp_path)`` beside ``path``, then rename: a reader never sees half a file, and the file
    gets the umask's permissions (others sharing the dataset read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _concepts_digest(concepts: Sequence[dict[str, Any]]) -> str:
    rows = sorted(json.dumps([c["superordinate"], c["coarse"], c["fine"]]) for c in concepts)
    return cache_key(rows)


def blocked_nearest(embeddings: Any, keep: int, block: int = 1024) -> tuple[Any, Any]:
    """(indices, cosine similarities) of each row's ``keep`` nearest other rows, nearest first.

    Rows are normalised, then compared ``block`` at a time as one matrix product: time grows with n²·d,
    memory with block·n beyond the embeddings themselves.
    """
    import torch

    vectors = torch.nn.functional.normalize(embeddings.float(), dim=1)
    n = vectors.shape[0]
    keep = min(keep, n - 1)
    indices = torch.empty(n, keep, dtype=torch.long)
    similarity = torch.empty(n, keep)
    for start in range(0, n, block):
        stop = min(start + block, n)
        scores = vectors[start:stop] @ vectors.T
        rows = torch.arange(stop - start)
        scores[rows, rows + start] = float("-inf")  # a label is not its own neighbour
        top = scores.topk(keep, dim=1)
        indices[start:stop], similarity[start:stop] = top.indices, top.values
    return indices, similarity


def _text_embeddings(encoder: Any, tokenizer: Any, texts: list[str], batch: int, device: str) -> Any:
    import torch

    padding = "max_length" if "siglip" in encoder.config.model_type else True  # SigLIP was trained padded
    parts = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            inputs = tokenizer(
                texts[start : start + batch], padding=padding, truncation=True, return_tensors="pt"
            ).to(device)
            inputs.pop("token_type_ids", None)
            parts.append(_features(encoder.get_text_features(**inputs)))
    return torch.nn.functional.normalize(torch.cat(parts).float(), dim=1)


def _features(output: Any) -> Any:
    """The projected embedding: a tensor (transformers 4) or the output's pooler_output (5)."""
    return output if hasattr(output, "shape") else output.pooler_output


def _image_embeddings(
    encoder: Any, processor: Any, rows: Any, groups: list[list[int]], batch: int, device: str
) -> tuple[list[Any], int]:
    """Per group of row indices, the normalised mean of its images' normalised embeddings (None for a group
    without a readable image), and how many images could not be read (skipped)."""
    import torch

    images = rows.select_columns(["image"])
    owner = [(g, i) for g, members in enumerate(groups) for i in members]
    sums: list[Any] = [None] * len(groups)
    broken = 0
    with torch.inference_mode():
        for start in range(0, len(owner), batch):
            pictures, owners = [], []
            for group, index in owner[start : start + batch]:
                try:
                    pictures.append(images[index]["image"].convert("RGB"))
                    owners.append(group)
                except (OSError, ValueError, SyntaxError):
                    broken += 1
            if not pictures:
                continue
            pixels = processor(images=pictures, return_tensors="pt")["pixel_values"].to(device)
            vectors = _features(encoder.get_image_features(pixel_values=pixels))
            vectors = torch.nn.functional.normalize(vectors.float(), dim=1)
            for group, vector in zip(owners, vectors.cpu(), strict=True):
                sums[group] = vector if sums[group] is None else sums[group] + vector
    means = [None if s is None else torch.nn.functional.normalize(s, dim=0) for s in sums]
    return means, broken


def _train_rows(dataset: str) -> Any:
    from finer.data.datasets_io import load_built, pick_split

    loaded = load_built(dataset, "--dataset", split="train")
    try:
        return pick_split(loaded, "train", "--dataset", dataset, ["image", "fine"])
    except FinerError as err:
        raise FinerError(f"--distractor-space image/both reads the train images: {err}") from None


def _fine_embeddings(
    concepts: Sequence[dict[str, Any]], rows: Any, model: str, space: str, device: str, batch: int
) -> tuple[Any, str, list[str], dict[str, Any]]:
    """The fine labels' embeddings (rows in `LabelPool` order), the model's revision, warnings, and what
    the train split (``rows``; None in the text space) contributed."""
    import torch

    encoder, tokenizer, processor = load_encoder(model, device)
    revision = _cached_revision(model) or "local"  # downloaded by now: the Hub cache knows the commit
    pool = LabelPool.of(list(concepts), "fine")
    first: dict[str, dict[str, Any]] = {}
    for concept in concepts:
        first.setdefault(canonical_label(concept["fine"]).lower(), concept)
    texts = []
    for label in pool.labels:
        concept = first[label.lower()]
        group = canonical_label(concept["coarse"]) or concept["superordinate"]
        texts.append(PROMPT.format(fine=label, coarse=group))
    text = _text_embeddings(encoder, tokenizer, texts, batch, device).cpu()
    warnings: list[str] = []
    source: dict[str, Any] = {}
    if space == "text":
        return text, revision, warnings, source
    position = {label.lower(): i for i, label in enumerate(pool.labels)}
    groups: list[list[int]] = [[] for _ in pool.labels]
    for index, fine in enumerate(rows.select_columns(["fine"])["fine"]):
        slot = position.get(canonical_label(fine).lower())
        if slot is not None and len(groups[slot]) < IMAGES_PER_LABEL:
            groups[slot].append(index)
    means, broken = _image_embeddings(encoder, processor, rows, groups, batch, device)
    missing = sum(mean is None for mean in means)
    if missing:
        warnings.append(f"{missing} of {len(means)} fine labels have no readable train image: text used")
    if broken:
        warnings.append(f"{broken} train images could not be read and were skipped")
    combined = []
    for t, mean in zip(text, means, strict=True):
        if mean is None:
            combined.append(t)
        else:
            combined.append(mean if space == "image" else torch.nn.functional.normalize(t + mean, dim=0))
    source = {"images": sum(map(len, groups)) - broken}
    return torch.stack(combined), revision, warnings, source


def _level_embeddings(concepts: Sequence[dict[str, Any]], fine: Any, level: str) -> tuple[list[str], Any]:
    """The labels of ``level`` and their embeddings: each the normalised mean of its fine labels'."""
    import torch

    if level == "fine":
        return LabelPool.of(list(concepts), "fine").labels, fine
    fine_labels = LabelPool.of(list(concepts), "fine").labels
    fine_row = {label.lower(): i for i, label in enumerate(fine_labels)}
    labels = LabelPool.of(list(concepts), level).labels
    slot = {label.lower(): i for i, label in enumerate(labels)}
    members: list[set[int]] = [set() for _ in labels]
    for concept in concepts:
        group, child = canonical_label(concept[level]).lower(), canonical_label(concept["fine"]).lower()
        if group in slot and child in fine_row:
            members[slot[group]].add(fine_row[child])
    means = [fine[sorted(rows)].mean(dim=0) for rows in members]
    return labels, torch.nn.functional.normalize(torch.stack(means), dim=1)


def _mine(
    concepts: Sequence[dict[str, Any]],
    train: Any,
    model: str,
    space: str,
    device: str,
    batch: int,
) -> tuple[dict[str, Any], Any]:
    """The stored record (neighbours per level) and the fine embeddings, computed with the encoder."""
    started = time.perf_counter()
    fine, revision, warnings, source = _fine_embeddings(concepts, train, model, space, device, batch)
    levels: dict[str, Any] = {}
    for level in LEVELS:
        labels, vectors = _level_embeddings(concepts, fine, level)
        if len(labels) < 2:
            continue
        indices, similarity = blocked_nearest(vectors, KEEP)
        levels[level] = {
            "labels": labels,
            "neighbours": indices.tolist(),
            "similarity": [[round(s, 6) for s in row] for row in similarity.tolist()],
        }
    record = {
        "revision": revision,
        "source": source,
        "warnings": warnings,
        "levels": levels,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return record, fine


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _still_valid(stored: dict[str, Any] | None, expected: dict[str, Any], revision: str | None) -> bool:
    """Whether a stored file answers for these settings, this dataset and the model's cached revision (a
    model not downloaded here takes the stored revision: another user's file is reused as it is)."""
    if stored is None or any(stored.get(k) != v for k, v in expected.items()):
        return False
    return revision is None or stored.get("revision") == revision


def mine_neighbours(
    dataset: str,
    concepts: Sequence[dict[str, Any]],
    *,
    model: str = DEFAULT_MODEL,
    space: str = "text",
    device: str | None = None,
    batch_size: int = 64,
) -> Neighbours:
    """The neighbour lists of ``dataset``'s labels under ``model`` in ``space``: read back from the store
    when it was mined with the same model revision, settings and concepts, else mined and stored.

    ``concepts`` are the dataset's concepts (superordinate, coarse, fine). The image spaces read the train
    split's images (at most `IMAGES_PER_LABEL` per fine label).
    """
    check_distractors("clip", space)
    if len(concepts) < 2:
        raise FinerError(f"--distractors clip: {dataset} has fewer than two concepts to choose from")
    settings = {"space": space, "prompt": PROMPT, "images_per_label": IMAGES_PER_LABEL, "keep": KEEP}
    expected: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "model": model,
        "settings": settings,
        "concepts_sha256": _concepts_digest(concepts),
    }
    train = None if space == "text" else _train_rows(dataset)
    expected["train_fingerprint"] = None if train is None else train._fingerprint  # the images are input
    path = _store_path(dataset, model, settings)
    stored = _load(path)
    reused = _still_valid(stored, expected, _cached_revision(model))
    if not reused:
        from safetensors.torch import save_file

        if device is None:
            from finer.models.loading import pick_device

            device = pick_device()[0]
        mined, fine = _mine(concepts, train, model, space, device, batch_size)
        stored = {**expected, **mined, "embeddings": path.with_suffix(".safetensors").name}
        _atomic_write(
            path.with_suffix(".safetensors"),
            lambda tmp: save_file({"fine": fine.contiguous()}, str(tmp), metadata={"model": model}),
        )
        text = json.dumps(stored, ensure_ascii=False) + "\n"
        _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    assert stored is not None
    levels = {level: _lists(entry) for level, entry in stored["levels"].items()}
    return Neighbours(
        model, stored["revision"], space, path, levels, reused, tuple(stored.get("warnings", ()))
    )


def _lists(entry: dict[str, Any]) -> dict[str, list[tuple[str, float]]]:
    """A stored level's neighbour lists by lower-cased label: (label, similarity), nearest first."""
    labels = entry["labels"]
    return {
        label.lower(): [(labels[j], s) for j, s in zip(row, sims, strict=True)]
        for label, row, sims in zip(labels, entry["neighbours"], entry["similarity"], strict=True)
    }


def distractor_setup(
    kind: str, dataset: str, concepts: Sequence[dict[str, Any]], *, model: str, space: str
) -> tuple[dict[str, Any], Neighbours | None]:
    """What `--distractors kind` adds to a run's identity, and the neighbour lists it draws from.

    Siblings add nothing (so runs from before the option keep their keys); random adds the kind; clip adds
    the encoder, its revision and the space, and mines the neighbours or reads them back.
    """
    check_distractors(kind, space)
    if kind != "clip":
        return ({"distractors": kind} if kind != "siblings" else {}), None
    neighbours = mine_neighbours(dataset, concepts, model=model, space=space)
    return {"distractors": kind, **neighbours.identity()}, neighbours


def option_kind_counts(records: Sequence[PredictionRecord]) -> dict[str, dict[str, int]]:
    """Per distractor kind: how many such options the questions offered, and how many answers chose one.

    A kind a model chooses more often per offer is the harder negative for it.
    """
    counts = {kind: {"offered": 0, "chosen": 0} for kind in OPTION_KINDS}
    for record in records:
        kinds = record.get("option_kinds")
        if not kinds:
            continue
        letter = parse_choice(record.get("prediction", ""), len(record["options"]))
        chosen = ord(letter) - ord("A") if letter else None
        for i, kind in enumerate(kinds):
            if kind in counts:
                counts[kind]["offered"] += 1
                counts[kind]["chosen"] += i == chosen
    return {kind: c for kind, c in counts.items() if c["offered"]}


def kind_section(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The report's multiple-choice section: per run and level, the accuracy and, per kind of distractor,
    how often a wrong answer chose one of that kind out of how many were offered; empty without choice runs.
    """
    rows = []
    for run in runs:
        for level, entry in run["levels"].items():
            counts = entry.get("distractor_kinds")
            if not counts:
                continue
            cells = [
                f"{counts[k]['chosen']}/{counts[k]['offered']}" if k in counts else "–" for k in OPTION_KINDS
            ]
            kind = run["run"].get("distractors") or "siblings"
            rows.append(
                f"| {run['label']} | {level} | {kind} | {entry['em']:.3f} | " + " | ".join(cells) + " |"
            )
    if not rows:
        return []
    return [
        "",
        "## multiple choice: distractors chosen",
        "",
        "Options of each kind a wrong answer chose / options of that kind offered (sibling: shares the "
        "gold's parent label; clip: a nearest neighbour by the encoder).",
        "",
        "| run | level | distractors | accuracy | " + " | ".join(OPTION_KINDS) + " |",
        "|" + "---|" * (4 + len(OPTION_KINDS)),
        *rows,
    ]


def kind_accuracy(runs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    """Markdown table of multiple-choice accuracy with each kind of distractors, one row per model, question
    settings and level, for `finer compare`; empty unless one of them was run with two kinds.

    ``runs`` are the (run, levels) of the compared runs (`compute_metrics`).
    """
    distractor_fields = {"distractors", "distractor_model", "distractor_revision", "distractor_space"}
    table: dict[tuple[str, str], dict[str, list[str]]] = {}
    for run, levels in runs:
        if run.get("mode") != "choice":
            continue
        rest = json.dumps({k: v for k, v in run.items() if k not in distractor_fields}, sort_keys=True)
        kind = run.get("distractors") or "siblings"
        for level in LEVELS:
            if level in levels:
                cell = f"{levels[level]['em']:.3f} (n={levels[level]['count']})"
                table.setdefault((rest, level), {}).setdefault(kind, []).append(cell)
    rows = []
    for (rest, level), by_kind in table.items():
        if len(by_kind) < 2:
            continue
        run = json.loads(rest)
        who = Path(run["model"]).name + (f" + {Path(run['adapter']).name}" if run.get("adapter") else "")
        cells = [", ".join(by_kind.get(kind, ["–"])) for kind in DISTRACTOR_KINDS]
        rows.append(f"| {who} | {run.get('choices')} | {level} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    header = "| model | options | level | " + " | ".join(DISTRACTOR_KINDS) + " |"
    return [header, "|" + "---|" * (3 + len(DISTRACTOR_KINDS)), *rows]
