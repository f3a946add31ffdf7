"""`finer ground`: which of its concept's attributes a VLM sees in each image (`attributes_visible`).

Every class shares one list of required attributes, but a given photo may hide the underparts or show a
juvenile: training the attribute turn on the list teaches the model to recite, not to look. Here a VLM sees
each image with its concept's list and answers visible / not visible / unsure per attribute (a JSON schema
where the endpoint takes one, the tolerant parser otherwise); the attributes answered "visible" become the
row's `attributes_visible`, in a new dataset (the input is never touched), with per-concept statistics in
`grounding.json`.

Same machinery as the knowledge step: the shared `ChatClient` (bounded concurrency, the `openai` client's
retries honouring `Retry-After`, the content-addressed cache, so a re-run makes no calls) or a local model
batched with left padding (`finer.models.vlm.HFChat`). Resumable after SIGKILL: each image's result is
appended and flushed to `grounding.jsonl` in the partial folder beside `--out` the moment it exists, keyed
by all it depends on; a re-run asks only for the keys missing, then writes the dataset. `--out` appears only
when finished. `--check-cub` measures the verdicts against CUB-200-2011's per-image attribute annotations.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

import finer
from finer.appendlog import AppendLog
from finer.cache import Cache, cache_key
from finer.data.attributes import cub_phrase
from finer.data.datasets_io import load_built, pick_split
from finer.data.grounding_config import GroundConfig
from finer.errors import FinerError
from finer.models.client import (
    CallFailed,
    ChatClient,
    ImagesRefused,
    MalformedJSON,
    Usage,
    ask_parsed,
    endpoint_configured,
    openai_messages,
    parse_json_object,
    public_url,
    refuses_images,
    run_sync,
    run_workers,
    workers_for,
)
from finer.models.images import (
    UNREADABLE,
    encode_image,
    open_image,
    unreadable_reason,
)
from finer.models.vlm import HFChat
from finer.prompts import render, template_sha256
from finer.records import GROUNDING_FILE, GroundingRecord, read_grounding_results
from finer.run_folder import check_out, staged_output, write_split_state

__all__ = [
    "COLUMN",
    "RESULTS_FILE",
    "VERDICTS",
    "GroundConfig",
    "check_cub",
    "ground",
    "grounding_schema",
    "parse_grounding_reply",
]

COLUMN = "attributes_visible"
RESULTS_FILE = "grounding.jsonl"
REPORT_FILE = "report.md"
BACKENDS = ("openai", "hf")
VISIBLE, NOT_VISIBLE, UNSURE = "visible", "not visible", "unsure"
VERDICTS = (VISIBLE, NOT_VISIBLE, UNSURE)
#: Columns `ground` reads; `source` too with `--check-cub`.
NEEDED = ("image", "image_id", "concept_id", "superordinate", "fine", "attributes_required")
#: Rows per Arrow batch written (images may be embedded bytes: keep a batch's memory small).
WRITE_BATCH_ROWS = 500
#: The reply's form, as the repair turn restates it (`finer.models.client.repair_request`).
MALFORMED = "reply cut off or without a verdict, also after a repair turn"
REPLY_FORM = 'each listed trait as a key and "visible", "not visible" or "unsure" as its value.'
#: `grounding_status` of a row: verdicts read, the call failed (after retries and a repair turn), or
#: the image would not open; `attributes_visible` is null (unknown) unless "ok".
STATUS_COLUMN = "grounding_status"
OK, FAILED, UNREADABLE_STATUS = "ok", "failed", "unreadable"


# --- replies ----------------------------------------------------------------------------------------


def grounding_schema(attributes: list[str]) -> dict[str, Any]:
    """The reply as a JSON schema: every listed attribute a key, its value one of the three verdicts.

    Strict-mode compatible (all keys required, no others), so a schema-following endpoint can answer
    nothing but the list.
    """
    verdict = {"type": "string", "enum": list(VERDICTS)}
    return {
        "type": "object",
        "properties": {attribute: verdict for attribute in attributes},
        "required": list(attributes),
        "additionalProperties": False,
    }


_VERDICT_WORDS = {
    VISIBLE: ("visible", "yes", "seen", "present", "true", "clearly visible", "shown"),
    NOT_VISIBLE: (
        "not visible", "notvisible", "invisible", "no", "not seen", "absent", "not present", "hidden",
        "false", "not shown",
    ),
    UNSURE: ("unsure", "not sure", "unknown", "uncertain", "unclear", "maybe", "cannot tell", "can't tell"),
}  # fmt: skip
_VERDICTS = {word: verdict for verdict, words in _VERDICT_WORDS.items() for word in words}
_LINE = re.compile(r"^(?P<name>[^:=]+?)\s*(?::|=|->|\s[-–—]\s)\s*(?P<verdict>[^:=]+?)[\s.;,]*$")
_BULLET = re.compile(r"^\s*(?:[-*•·]|\d+[.)])\s+")
_QUOTES = re.compile(r"[\"'`“”‘’*]")


def _verdict(value: object) -> str | None:
    if isinstance(value, bool):
        return VISIBLE if value else NOT_VISIBLE
    if not isinstance(value, str):
        return None
    return _VERDICTS.get(" ".join(re.sub(r"[^a-z']+", " ", value.lower().replace("_", " ")).split()))


def _name_key(name: str) -> str:
    """An attribute name as replies may spell it: any case, quoted, with stray spacing."""
    return " ".join(_QUOTES.sub("", name).casefold().split()).strip(" .")


def _pairs(text: str) -> list[tuple[str, object]]:
    """(name, verdict) pairs of a reply: a JSON object (flat, wrapped, or a list of items), else lines."""
    obj: Any = parse_json_object(text, arrays=True)
    if obj is not None:
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(inner := [*obj.values()][0], dict | list):
            obj = inner  # {"attributes": {...}} or {"answers": [...]}
        if isinstance(obj, dict):
            return [(str(name), value) for name, value in obj.items()]
        items = [item for item in obj if isinstance(item, dict)]
        return [
            (
                str(item.get("attribute") or item.get("trait") or item.get("name") or ""),
                item.get("verdict") or item.get("status") or item.get("visibility") or item.get("visible"),
            )
            for item in items
        ]
    pairs: list[tuple[str, object]] = []
    for line in text.splitlines():
        match = _LINE.match(_BULLET.sub("", line.replace("**", "")))
        if match:
            pairs.append((match.group("name"), match.group("verdict")))
    return pairs


def parse_grounding_reply(text: str, attributes: list[str]) -> tuple[dict[str, str], int] | None:
    """The verdict per listed attribute, and how many answered names are not in the list (dropped).

    Accepts a JSON object {attribute: verdict} (also wrapped in one key, or as a list of
    {"attribute", "verdict"} items) or lines "attribute: verdict"; verdicts may be spelled loosely
    ("yes", "Not visible", true). An attribute answered twice keeps its first verdict. None when the
    reply holds no verdict at all, or starts JSON that does not parse whole (a cut reply is no answer).
    """
    try:
        pairs = _pairs(text)
    except MalformedJSON:
        return None
    wanted = {_name_key(attribute): attribute for attribute in attributes}
    answers: dict[str, str] = {}
    dropped = 0
    found = False
    for name, value in pairs:
        verdict = _verdict(value)
        if verdict is None:
            continue
        found = True
        attribute = wanted.get(_name_key(name))
        if attribute is None:
            dropped += 1
        else:
            answers.setdefault(attribute, verdict)
    return (answers, dropped) if found else None


# --- the plan: one item per image -------------------------------------------------------------------


@dataclass
class _Item:
    split: str
    index: int
    image_id: str
    concept_id: str
    superordinate: str
    concept: str
    attributes: list[str]
    key: str


@dataclass
class _Run:
    """What this invocation did, besides the endpoint's usage."""

    failed: list[dict[str, str]] = field(default_factory=list)
    #: "json_schema" or "text" once the endpoint showed which it takes.
    structured_output: str | None = None


def _check(config: GroundConfig) -> None:
    if config.backend not in BACKENDS:
        raise FinerError(f"unknown backend {config.backend!r}; choose one of {', '.join(BACKENDS)}")
    if config.concurrency < 1 or config.max_new_tokens < 1:
        raise FinerError("--concurrency and --max-new-tokens must be at least 1")
    if config.max_image_side < 32:
        raise FinerError("--max-image-side must be at least 32 pixels")
    if config.limit is not None and config.limit < 1:
        raise FinerError("--limit must be at least 1")
    if config.backend == "openai" and not endpoint_configured(config.base_url):
        raise FinerError(
            "no VLM endpoint configured: set OPENAI_API_KEY (and OPENAI_BASE_URL) or pass --base-url, "
            "or ground offline with a local VLM (--backend hf --model ID|PATH)"
        )


def _prepare_out(config: GroundConfig) -> Path:
    """`--out` as an absolute path, refused when it would touch the input (a non-empty one without
    `--overwrite` is refused by `staged_output`)."""
    out = Path(config.out).expanduser().absolute()
    source = Path(config.dataset).expanduser().absolute()
    if source.exists() and (out == source or source in out.parents or out in source.parents):
        raise FinerError(f"--out {out} overlaps the input dataset {source}: the input is never modified")
    return check_out(out)


def _pick(config: GroundConfig) -> dict[str, datasets.Dataset]:
    """The splits asked for, each cut to `--limit` rows, with the columns grounding needs."""
    loaded = load_built(config.dataset, "DATASET")
    wanted = config.splits or list(loaded)
    unknown = [split for split in wanted if split not in loaded]
    if unknown:
        raise FinerError(f"DATASET has no split {', '.join(unknown)}; available: {', '.join(loaded)}")
    needed = [*NEEDED, *(["source"] if config.check_cub else [])]
    picked = {}
    for split in wanted:
        rows = pick_split(loaded, split, "DATASET", config.dataset, needed)
        if config.limit is not None and config.limit < rows.num_rows:
            rows = rows.select(range(config.limit))
        picked[split] = rows
    return picked


def _plan(
    picked: dict[str, datasets.Dataset], identity: dict[str, Any]
) -> tuple[list[_Item], dict[str, list[dict[str, Any]]]]:
    """One item per image with attributes to check, and every row's labels (no pixels read)."""
    items = []
    rows: dict[str, list[dict[str, Any]]] = {}
    for split, dataset in picked.items():
        columns = [
            *(c for c in NEEDED if c != "image"),
            *(["source"] if "source" in dataset.column_names else []),
        ]
        rows[split] = dataset.select_columns(columns).to_list()
        for index, row in enumerate(rows[split]):
            attributes = list(dict.fromkeys(row["attributes_required"] or []))
            row["attributes"] = attributes
            if attributes:
                key = cache_key(identity, split, row.get("source"), row["image_id"], attributes)
                items.append(
                    _Item(
                        split=split,
                        index=index,
                        image_id=row["image_id"],
                        concept_id=row["concept_id"],
                        superordinate=row["superordinate"],
                        concept=(row["fine"] or [row["concept_id"]])[0],
                        attributes=attributes,
                        key=key,
                    )
                )
                row["key"] = key
    return items, rows


# --- asking -----------------------------------------------------------------------------------------


def _image_url(cell: dict[str, Any], max_side: int) -> str:
    """A stored image cell ({path, bytes}) as a bounded-size data URL (runs in a worker thread)."""
    return encode_image(open_image(cell.get("path"), cell.get("bytes")), max_side)


class _Asker:
    """Grounds items with one chat client; the prompt of a concept is rendered once."""

    def __init__(self, chat: ChatClient | HFChat, config: GroundConfig, sha: str, run: _Run) -> None:
        self.chat = chat
        self.config = config
        self.sha = sha
        self.run = run
        self._prompts: dict[tuple[str, ...], list[dict]] = {}

    def _prompt(self, item: _Item) -> list[dict]:
        key = (item.superordinate, item.concept, *item.attributes)
        if key not in self._prompts:
            self._prompts[key] = render(
                "ground_attributes",
                prompts_dir=self.config.prompts_dir,
                attributes=item.attributes,
                superordinate=item.superordinate,
                concept=item.concept,
            )
        return self._prompts[key]

    async def one(self, item: _Item, cell: dict[str, Any]) -> dict[str, Any] | None:
        """The item's result record, or None when its call failed after retries, or its reply (and one
        repair turn) was cut off or held no verdict: listed in `run.failed`, asked again next run."""
        record: dict[str, Any] = {"key": item.key, "split": item.split, "image_id": item.image_id}
        try:
            url = await asyncio.to_thread(_image_url, cell, self.config.max_image_side)
        except UNREADABLE as err:
            return {**record, "status": "skipped", "reason": unreadable_reason(err)}
        messages = openai_messages(self._prompt(item), [url])
        schema = grounding_schema(item.attributes)
        try:
            parsed = await ask_parsed(
                self.chat,
                messages,
                lambda text: parse_grounding_reply(text, item.attributes),
                form=REPLY_FORM,
                template_sha256=self.sha,
                schema=schema,
            )
        except CallFailed as err:
            if refuses_images(err):
                raise ImagesRefused(
                    f"{self.chat.base_url} refused the image for model {self.chat.model!r} ({err}); "
                    "grounding needs a vision-language model"
                ) from None
            self.run.failed.append({"split": item.split, "image_id": item.image_id, "reason": str(err)})
            return None
        if parsed is None:
            self.run.failed.append({"split": item.split, "image_id": item.image_id, "reason": MALFORMED})
            return None
        answers, dropped = parsed
        return {
            **record,
            "status": "ok",
            "answers": answers,
            "visible": [a for a in item.attributes if answers.get(a) == VISIBLE],
            "dropped": dropped,
        }


def _connect(config: GroundConfig, usage: Usage) -> ChatClient | HFChat:
    if config.backend == "hf":
        return HFChat(
            config.model, usage=usage, batch_size=config.concurrency, max_new_tokens=config.max_new_tokens
        )
    return ChatClient(
        config.model,
        config.base_url,
        cache=Cache(config.cache),
        usage=usage,
        concurrency=config.concurrency,
        timeout=config.timeout,
        max_retries=config.max_retries,
    )


def _cost(usage: Usage) -> str:
    return "unknown" if usage.estimated_cost_usd is None else f"${usage.estimated_cost_usd:.4f}"


def _show(bar: tqdm, usage: Usage) -> None:
    tokens = usage.prompt_tokens + usage.completion_tokens
    bar.set_postfix_str(
        f"tokens={tokens} cost={_cost(usage)} retries={usage.retries} failed={usage.failed_calls}",
        refresh=False,
    )


async def _tick(bar: tqdm, usage: Usage) -> None:
    """Refresh the bar's counters every second, so retries show while a call hangs."""
    while True:
        await asyncio.sleep(1.0)
        _show(bar, usage)
        bar.refresh()


async def _ask_all(
    pending: list[_Item],
    cells: dict[str, datasets.Dataset],
    config: GroundConfig,
    sha: str,
    log: AppendLog,
    usage: Usage,
    run: _Run,
) -> None:
    """`concurrency` workers take the next item until none is left; each result is logged at once."""
    queue: Iterator[_Item] = iter(pending)
    with tqdm(
        total=len(pending),
        desc="ground",
        unit=" img",
        dynamic_ncols=True,
        disable=None if config.progress else True,
    ) as bar:
        async with _connect(config, usage) as chat:
            asker = _Asker(chat, config, sha, run)

            async def worker() -> None:
                for item in queue:  # one iterator shared by the workers of one event loop
                    cell = cells[item.split][item.index]["image"][0].as_py()
                    record = await asker.one(item, cell)
                    if record is not None:
                        log.write(record)
                    _show(bar, usage)
                    bar.update()

            ticker = asyncio.create_task(_tick(bar, usage))
            try:
                await run_workers(worker, workers_for(chat, len(pending), batch=config.concurrency))
            finally:
                ticker.cancel()
            run.structured_output = chat.structured_output


# --- writing ----------------------------------------------------------------------------------------


def _write_split(
    dataset: datasets.Dataset, visible: list[list[str] | None], status: list[str], folder: Path
) -> int:
    """Every row with the new columns (`visible` None where unknown), as `load_from_disk` reads a split;
    image cells are copied as stored (a file reference stays a reference), unlike `save_to_disk`, which
    embeds every file."""
    features = datasets.Features(
        {k: v for k, v in dataset.features.items() if k not in (COLUMN, STATUS_COLUMN)}
    )
    features[COLUMN] = datasets.List(datasets.Value("string"))
    features[STATUS_COLUMN] = datasets.Value("string")
    rows_in = dataset.with_format("arrow")
    folder.mkdir(parents=True)
    arrow = folder / "data-00000-of-00001.arrow"
    with ArrowWriter(features=features, path=str(arrow)) as writer:
        for start in range(0, dataset.num_rows, WRITE_BATCH_ROWS):
            batch = slice(start, start + WRITE_BATCH_ROWS)
            table = rows_in[batch]
            table = table.drop_columns([c for c in (COLUMN, STATUS_COLUMN) if c in table.column_names])
            table = table.append_column(COLUMN, pa.array(visible[batch], type=pa.list_(pa.string())))
            table = table.append_column(STATUS_COLUMN, pa.array(status[batch], type=pa.string()))
            writer.write_table(table.cast(features.arrow_schema))
        rows = writer.finalize()[0]
    written = datasets.Dataset.from_file(str(arrow), split=dataset.split)
    written.info.write_to_directory(str(folder))
    write_split_state(folder, arrow.name, written._fingerprint, str(dataset.split) if dataset.split else None)
    return rows


# --- statistics -------------------------------------------------------------------------------------


def _concept_stats(grounded: Iterable[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Per concept: images grounded, and per attribute how often each verdict came (seen_rate: visible)."""
    images: Counter[str] = Counter()
    verdicts: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    for row, record in grounded:
        images[row["concept_id"]] += 1
        for attribute in row["attributes"]:
            verdict = record["answers"].get(attribute, "unanswered")
            verdicts[row["concept_id"]][attribute][verdict.replace(" ", "_")] += 1
    return {
        concept_id: {
            "images": images[concept_id],
            "attributes": {
                attribute: {
                    "visible": counts["visible"],
                    "not_visible": counts["not_visible"],
                    "unsure": counts["unsure"],
                    "unanswered": counts["unanswered"],
                    "seen_rate": round(counts["visible"] / images[concept_id], 4),
                }
                for attribute, counts in by_attribute.items()
            },
        }
        for concept_id, by_attribute in sorted(verdicts.items())
    }


# --- CUB-200-2011 ground truth ----------------------------------------------------------------------


def _cub_files(root: Path) -> tuple[Path, Path]:
    """`attributes/image_attribute_labels.txt` and `attributes.txt` of a CUB copy (its folder or parent)."""
    root = Path(root).expanduser()
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    labels = base / "attributes" / "image_attribute_labels.txt"
    if not labels.is_file():
        raise FinerError(f"--check-cub {root}: missing {labels} (CUB-200-2011's per-image attribute labels)")
    for names in (
        base.parent / "attributes.txt",
        base / "attributes.txt",
        base / "attributes" / "attributes.txt",
    ):
        if names.is_file():
            return labels, names
    raise FinerError(f"--check-cub {root}: missing attributes.txt (beside CUB_200_2011/ or inside it)")


def _phrase_key(phrase: str) -> str:
    """Our phrases and CUB's meet here: case, hyphens, "gray"/"grey" and a plural last word fold away."""
    words = phrase.casefold().replace("-", " ").replace("_", " ").split()
    words = ["grey" if word == "gray" else word for word in words]
    if words and len(words[-1]) > 3 and words[-1].endswith("s"):
        words[-1] = words[-1][:-1]
    return " ".join(words)


def _group(name: str) -> str:
    """A CUB attribute's group in words: "has_bill_shape::cone" -> "bill shape"."""
    return name.partition("::")[0].removeprefix("has_").replace("_", " ")


def _scores(counts: Counter[str]) -> dict[str, Any]:
    tp, fp, fn, tn = counts["tp"], counts["fp"], counts["fn"], counts["tn"]
    return {
        "pairs": tp + fp + fn + tn,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "precision": round(tp / (tp + fp), 4) if tp + fp else None,
        "recall": round(tp / (tp + fn), 4) if tp + fn else None,
    }


def check_cub(root: Path, grounded: list[tuple[str, list[str], list[str]]]) -> dict[str, Any]:
    """Precision and recall of "visible" against CUB's per-image `is_present`, overall and per group.

    `grounded` holds (CUB image id, attributes asked, attributes answered visible). An attribute phrase is
    checked where it corresponds to one of CUB's 312 attribute names (`finer.data.attributes.cub_phrase`;
    exact for the `cub-annotations` extractor); a pair counts positive when the image has any of the CUB
    attributes the phrase stands for.
    """
    labels_txt, names_txt = _cub_files(root)
    names: dict[str, str] = {}
    for line in names_txt.read_text(encoding="utf-8").splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2:
            names[parts[0]] = parts[1].strip()
    ids_of: dict[str, list[str]] = defaultdict(list)
    for attribute_id, name in names.items():
        phrase = cub_phrase(name)
        if phrase is not None:
            ids_of[_phrase_key(phrase)].append(attribute_id)
    pairs = []
    mapped: set[str] = set()
    unmapped: set[str] = set()
    for image_id, asked, visible in grounded:
        for phrase in asked:
            ids = ids_of.get(_phrase_key(phrase))
            if ids is None:
                unmapped.add(phrase)
            else:
                mapped.add(phrase)
                pairs.append((image_id, ids, phrase in visible))
    images = {image_id for image_id, _, _ in pairs}
    wanted_ids = {i for _, ids, _ in pairs for i in ids}
    present: dict[tuple[str, str], bool] = {}
    with open(labels_txt, encoding="utf-8") as fh:
        for line in fh:
            fields = line.split(maxsplit=3)
            if len(fields) >= 3 and fields[0] in images and fields[1] in wanted_ids:
                present[(fields[0], fields[1])] = fields[2] == "1"
    overall: Counter[str] = Counter()
    groups: dict[str, Counter[str]] = defaultdict(Counter)
    missing = 0
    for image_id, ids, predicted in pairs:
        truths = [present[(image_id, i)] for i in ids if (image_id, i) in present]
        if not truths:
            missing += 1
            continue
        outcome = ("tp" if any(truths) else "fp") if predicted else ("fn" if any(truths) else "tn")
        overall[outcome] += 1
        groups[_group(names[ids[0]])][outcome] += 1
    return {
        "root": str(root),
        "images": len(images),
        "mapped_phrases": sorted(mapped),
        "unmapped_phrases": sorted(unmapped),
        "pairs_without_label": missing,
        "overall": _scores(overall),
        "groups": {group: _scores(counts) for group, counts in sorted(groups.items())},
    }


# --- the command ------------------------------------------------------------------------------------


def _identity(config: GroundConfig, sha: str) -> dict[str, Any]:
    """What every verdict depends on besides its image and attribute list: part of each result's key."""
    dataset = Path(config.dataset).expanduser()
    endpoint = config.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    return {
        "dataset": str(dataset.absolute()) if dataset.exists() else config.dataset,
        "backend": config.backend,
        "model": config.model,
        "endpoint": public_url(endpoint) if config.backend == "openai" else None,
        "template_sha256": sha,
        "max_image_side": config.max_image_side,
        "max_new_tokens": config.max_new_tokens if config.backend == "hf" else None,
    }


def _clear_partial(partial: Path) -> None:
    """Keep only the results file: anything else is a dataset half-written by a run killed while finishing."""
    partial.mkdir(parents=True, exist_ok=True)
    for entry in partial.iterdir():
        if entry.name == RESULTS_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def ground(config: GroundConfig) -> GroundingRecord:
    """Ground (or resume grounding) `config.dataset` into `config.out`; returns grounding.json's content.

    Raises a one-line `FinerError` for what the user can fix, `ImagesRefused` when the endpoint takes no
    images (grounding without images is meaningless), and when every call failed. The partial folder
    (`finer.run_folder`) holds the results log across runs; `--out` is replaced only when complete.
    """
    _check(config)
    with staged_output(_prepare_out(config), overwrite=config.overwrite, resumable=True) as staged:
        return _ground(config, staged.out, staged.partial)


def _ground(config: GroundConfig, out: Path, partial: Path) -> GroundingRecord:
    """`ground`'s body, writing into `partial` (its results log kept from an interrupted run)."""
    started = time.perf_counter()
    picked = _pick(config)
    if config.check_cub is not None:
        _cub_files(config.check_cub)  # a wrong root fails before any call is paid for
    sha = template_sha256("ground_attributes", config.prompts_dir)
    items, rows = _plan(picked, _identity(config, sha))
    if not items:
        raise FinerError(
            f"no row of DATASET {config.dataset} has attributes_required: nothing to ground; "
            "build it with knowledge (attributes) first"
        )
    if config.check_cub is not None and not any(
        row.get("source") == "cub200" for split_rows in rows.values() for row in split_rows
    ):
        raise FinerError(f"--check-cub: DATASET {config.dataset} has no cub200 rows to compare")
    _clear_partial(partial)
    results_path = partial / RESULTS_FILE
    log = AppendLog(results_path)
    done = read_grounding_results(results_path)
    pending = [item for item in items if item.key not in done]
    usage, run = Usage(), _Run()
    try:
        if pending:
            cells = {
                split: rows_.select_columns(["image"]).with_format("arrow") for split, rows_ in picked.items()
            }
            run_sync(_ask_all(pending, cells, config, sha, log, usage, run))
    finally:
        log.close()
    if pending and len(run.failed) == len(pending):
        raise FinerError(f"every request failed, e.g. {run.failed[0]['reason']}; nothing was written")
    results = read_grounding_results(results_path)

    counts: dict[str, int] = {}
    skipped: list[dict[str, str]] = []
    grounded: list[tuple[dict[str, Any], dict[str, Any]]] = []
    kept_records: list[dict[str, Any]] = []
    no_attributes = 0
    for split, dataset in picked.items():
        visible: list[list[str] | None] = []
        status: list[str] = []
        for row in rows[split]:
            record = results.get(row.get("key", ""))
            if not row["attributes"]:
                no_attributes += 1
                visible.append([])
                status.append(OK)
            elif record is None:  # failed this run, listed in run.failed: unknown, never "none visible"
                visible.append(None)
                status.append(FAILED)
            elif record["status"] == "skipped":
                skipped.append({"split": split, "image_id": row["image_id"], "reason": record["reason"]})
                kept_records.append(record)
                visible.append(None)
                status.append(UNREADABLE_STATUS)
            else:
                grounded.append((row, record))
                kept_records.append(record)
                visible.append(record["visible"])
                status.append(OK)
        counts[split] = _write_split(dataset, visible, status, partial / split)
    (partial / "dataset_dict.json").write_text(json.dumps({"splits": list(picked)}))
    source = Path(config.dataset).expanduser()
    for name in ("concepts.jsonl", "build.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, partial / name)

    records = [record for _, record in grounded]
    asked_pairs = sum(len(row["attributes"]) for row, _ in grounded)
    warnings = []
    if skipped:
        warnings.append(f"skipped {len(skipped)} unreadable image(s), listed in {GROUNDING_FILE}")
    if run.failed:
        first = run.failed[0]
        warnings.append(
            f"{len(run.failed)} image(s) failed (e.g. {first['image_id']}: {first['reason']}): their rows "
            f"have {STATUS_COLUMN} {FAILED!r} and {COLUMN} null; ground again with --overwrite to retry "
            "them (cached replies cost no calls)"
        )
    malformed = sum(failure["reason"] == MALFORMED for failure in run.failed)
    summary: GroundingRecord = {
        "dataset": config.dataset,
        "grounded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": {
            **_identity(config, sha),
            "concurrency": config.concurrency,
            "limit": config.limit,
            "splits": list(picked),
            "check_cub": str(config.check_cub) if config.check_cub else None,
            "prompts_dir": str(config.prompts_dir) if config.prompts_dir else None,
        },
        "versions": {"finer": finer.__version__, "datasets": datasets.__version__},
        "counts": counts,
        "images": {
            "grounded": len(grounded),
            "no_attributes": no_attributes,
            "skipped": len(skipped),
            "failed": len(run.failed),
            "malformed_replies": malformed,
        },
        "visible_rate": round(sum(len(r["visible"]) for r in records) / asked_pairs, 4)
        if asked_pairs
        else None,
        "dropped_attributes": sum(record["dropped"] for record in records),
        "unanswered_attributes": sum(
            len(row["attributes"]) - len(record["answers"]) for row, record in grounded
        ),
        # what this invocation did (a resumed run counts only the images it had left)
        "images_this_run": len(pending),
        **usage.usage_json(),
        "structured_output": run.structured_output,
        "skipped": skipped,
        "failed": run.failed,
        "concepts": _concept_stats(grounded),
        "check_cub": (
            check_cub(
                config.check_cub,
                [
                    (row["image_id"], row["attributes"], rec["visible"])
                    for row, rec in grounded
                    if row.get("source") == "cub200"
                ],
            )
            if config.check_cub is not None
            else None
        ),
        "durations": {"total_s": round(time.perf_counter() - started, 3)},
        "warnings": warnings,
    }
    (partial / GROUNDING_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (partial / REPORT_FILE).write_text(_report(summary), encoding="utf-8")
    tidy = partial / f".{RESULTS_FILE}.tmp"
    tidy.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept_records), encoding="utf-8")
    tidy.replace(results_path)  # the finished record holds this run's images only
    return summary


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _report(summary: GroundingRecord) -> str:
    """report.md: what was grounded, what it cost, and (with --check-cub) how far the verdicts hold."""
    images = summary["images"]
    options = summary["options"]
    lines = [
        f"# Attribute grounding of {summary['dataset']}",
        "",
        f"Model `{options['model']}` ({options['backend']}); {images['grounded']} images grounded, "
        f"{images['skipped']} unreadable skipped, {images['failed']} failed, "
        f"{images['no_attributes']} without attributes. {_percent(summary['visible_rate'])} of the "
        f"attributes asked were answered visible; {summary['dropped_attributes']} answered names were not "
        "in the list and were dropped.",
        "",
        f"This run: {summary['calls']} calls, {summary['cache_hits']} from cache, "
        f"{summary['prompt_tokens'] + summary['completion_tokens']} tokens, "
        f"estimated cost {summary['estimated_cost_usd']} USD.",
        "",
        "| concept | images | attributes | mean seen rate |",
        "|---|---:|---:|---:|",
    ]
    for concept_id, stats in summary["concepts"].items():
        rates = [a["seen_rate"] for a in stats["attributes"].values()]
        mean = sum(rates) / len(rates) if rates else None
        lines.append(f"| {concept_id} | {stats['images']} | {len(rates)} | {_percent(mean)} |")
    cub = summary["check_cub"]
    if cub is not None:
        lines += [
            "",
            "## Against CUB-200-2011's per-image attribute labels",
            "",
            f'Precision and recall of "visible" against `is_present`, over {cub["overall"]["pairs"]} '
            f"image-attribute pairs of {cub['images']} images; {len(cub['unmapped_phrases'])} phrases "
            "have no CUB counterpart and are not checked.",
            "",
            "| group | pairs | precision | recall |",
            "|---|---:|---:|---:|",
        ]
        for group, scores in [("overall", cub["overall"]), *cub["groups"].items()]:
            precision, recall = _percent(scores["precision"]), _percent(scores["recall"])
            lines.append(f"| {group} | {scores['pairs']} | {precision} | {recall} |")
    return "\n".join(lines) + "\n"
