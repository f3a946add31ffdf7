"""The knowledge step of `finer build`: Wikipedia text, then attributes, and the coarse labeller to use.

Order per docs/design.md §1: each concept's description comes from Wikipedia (or is bundled with the source),
then an extractor reads the visible attributes from it. Which extractor runs, and which coarse labeller
fills the concepts the taxonomy leaves unlabelled, is decided here and in `KnowledgeOptions.chosen_extractor`
(`finer.data.knowledge_config`: the options, which the CLI imports without this module), nowhere else.

`--extractor vlm` also shows the model up to `--exemplars` train images per concept, which only the source
can supply before any row is written: `Exemplars` finds them in one pass over the train records.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from finer.builders import ImageRecord, Source
from finer.cache import Cache
from finer.data.attributes import ExtractionStats, LlmCoarseLabeller, extract_attributes
from finer.data.coarse import CoarseLabeller, RuleCoarseLabeller
from finer.data.knowledge_config import KnowledgeOptions
from finer.data.wiki import fetch_knowledge
from finer.errors import FinerError
from finer.models.client import ImagesRefused, endpoint_configured
from finer.models.images import UNREADABLE, encode_image, open_image
from finer.models.vlm import HFChat
from finer.schema import Concept, Knowledge


def resolve_knowledge(
    knowledge: bool | None, extractor: str | None, shaping: list[str]
) -> tuple[bool | None, bool]:
    """`finer build`'s --knowledge/--no-knowledge with the options that shape the knowledge step
    (`extractor`, and the names of the other such options given, e.g. "--model"): (knowledge, wikipedia).

    Naming an extractor asks for knowledge, even on a source that bundles it. CUB's own annotations need
    no text: `--extractor cub-annotations --no-knowledge` extracts them without fetching Wikipedia.
    """
    if knowledge is False and extractor == "cub-annotations" and not shaping:
        return True, False
    if knowledge is False and (extractor is not None or shaping):
        given = ", ".join([*(["--extractor " + extractor] if extractor else []), *shaping])
        raise FinerError(
            f"{given} shape(s) the knowledge step: drop --no-knowledge (without Wikipedia, "
            "--extractor cub-annotations needs no text and --knowledge-file brings its own)"
        )
    if knowledge is None and (extractor is not None or shaping):
        return True, True
    return knowledge, True


class Exemplars:
    """Up to `k` train images per concept, spread evenly over the class, as data URLs: `exemplars(cid)`.

    One pass over the records with bounded memory whatever the class size: each concept keeps every
    `stride`-th record and, once 2k are kept, drops every other one and doubles its stride. The k picked
    are the centres of k equal stretches of what is kept; an unreadable pick gives way to another kept
    record. Deterministic: the same source gives the same images, so the same cache keys.
    """

    def __init__(self, source: Source, concepts: list[Concept], k: int, max_side: int) -> None:
        splits = source.splits()
        self.source = source
        self.split = "train" if "train" in splits else splits[0]
        self.k = k
        self.max_side = max_side
        #: concept id -> image ids of the exemplars sent; image ids that would not open.
        self.chosen: dict[str, list[str]] = {}
        self.unreadable: list[str] = []
        self._candidates = self._collect({c.concept_id for c in concepts}) if k else {}

    def _collect(self, wanted: set[str]) -> dict[str, list[ImageRecord]]:
        capacity = 2 * self.k
        kept: dict[str, list[ImageRecord]] = {}
        stride: dict[str, int] = {}
        seen: Counter[str] = Counter()
        for record in self.source.records(self.split):
            concept_id = record.concept_id
            if concept_id not in wanted:
                continue
            position = seen[concept_id]
            seen[concept_id] += 1
            if position % stride.setdefault(concept_id, 1):
                continue
            bucket = kept.setdefault(concept_id, [])
            bucket.append(record)
            if len(bucket) == capacity:
                bucket[:] = bucket[::2]
                stride[concept_id] *= 2
        return kept

    def __call__(self, concept_id: str) -> list[str]:
        """The concept's exemplars as data URLs, decoded and resized now (at most a few concepts at once),
        in class order."""
        bucket = self._candidates.get(concept_id, [])
        centres = [(2 * i + 1) * len(bucket) // (2 * self.k) for i in range(self.k)]
        order = centres if len(bucket) > self.k else list(range(len(bucket)))
        order += [i for i in range(len(bucket)) if i not in order]
        picked: dict[int, str] = {}
        for i in order:
            if len(picked) == self.k:
                break
            try:
                image = self.source.adjust(open_image(bucket[i].path, bucket[i].data))
            except UNREADABLE:
                self.unreadable.append(bucket[i].image_id)
                continue
            picked[i] = encode_image(image, self.max_side)
        self.chosen[concept_id] = [bucket[i].image_id for i in sorted(picked)]
        return [picked[i] for i in sorted(picked)]

    def to_json(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "per_concept": self.k,
            "max_image_side": self.max_side,
            "images": self.chosen,
            "unreadable": self.unreadable,
        }


def coarse_labeller(options: KnowledgeOptions, knowledge: bool) -> CoarseLabeller:
    """The LLM labeller when the build talks to an LLM anyway, else the offline rules."""
    if knowledge and options.chosen_extractor() in ("llm", "vlm") and options.backend == "openai":
        return LlmCoarseLabeller(
            options.model,
            options.base_url,
            cache=Cache(options.cache),
            concurrency=options.concurrency,
            prompts_dir=options.prompts_dir,
            timeout=options.timeout,
            max_retries=options.max_retries,
        )
    return RuleCoarseLabeller()


def add_coarse_report(report: dict[str, Any], labeller: CoarseLabeller) -> None:
    """Fold an LLM coarse labeller's calls, failures and warnings into the knowledge report (build.json)."""
    if not isinstance(labeller, LlmCoarseLabeller):
        return
    stats = labeller.stats
    report["coarse_llm"] = stats.to_json()
    for counter in ("calls", "cache_hits", "failed_calls"):
        report[counter] = report.get(counter, 0) + getattr(stats, counter)
    if stats.failures:
        first = stats.failures[0]
        report.setdefault("warnings", []).append(
            f"coarse labels: {len(stats.failures)} concept(s) got the offline rule's label instead of the "
            f"LLM's (e.g. {first['concept_id']}: {first['reason']}); listed in knowledge.coarse_llm.failures"
        )


def add_knowledge(source: Source, concepts: list[Concept], options: KnowledgeOptions) -> dict[str, Any]:
    """Fetch missing descriptions, extract attributes; returns the `knowledge` section of build.json."""
    extractor = options.chosen_extractor()
    if extractor == "vlm" and options.backend == "openai" and not endpoint_configured(options.base_url):
        raise FinerError(
            "--extractor vlm needs an endpoint that takes images (--base-url, OPENAI_BASE_URL or "
            "OPENAI_API_KEY) or a local model (--backend hf --model ID|PATH)"
        )
    annotations = None
    if extractor == "cub-annotations":
        if not hasattr(source, "class_attributes"):
            raise FinerError(
                f"--extractor cub-annotations reads CUB-200-2011's attribute files; {source.name} has none"
            )
        annotations = source.class_attributes()
    warnings = []
    if extractor == "rules":
        warnings.append(
            "no LLM endpoint configured (--base-url, OPENAI_BASE_URL or OPENAI_API_KEY): attributes come "
            "from the offline rules extractor, which reads colour/pattern/part phrases only"
        )
        tqdm.write(f"WARNING: {warnings[-1]}", file=sys.stderr)
    cache = Cache(options.cache)
    if options.knowledge_file is not None:
        read_knowledge_file(options.knowledge_file, concepts)
    missing = [c for c in concepts if c.knowledge is None] if options.wikipedia else []
    wiki = None
    if not options.wikipedia:
        warnings.append("no Wikipedia text (--no-knowledge): attributes come from CUB's annotations alone")
    if missing:
        try:
            wiki = fetch_knowledge(
                missing,
                api_url=options.wiki_api,
                lang=options.wiki_lang,
                words=options.wiki_words,
                concurrency=options.wiki_concurrency,
                cache=cache,
            )
        except FinerError as err:
            if extractor != "cub-annotations":
                raise
            # the annotations need no text: Wikipedia is optional for them
            warnings.append(f"{err}; attributes come from CUB's annotations alone")
            tqdm.write(f"WARNING: {warnings[-1]}", file=sys.stderr)
        if wiki is not None and wiki.failures:
            warnings.append(f"wikipedia: {len(wiki.failures)} concept(s) failed after retries, see knowledge")
    extract = partial(
        extract_attributes,
        concepts,
        model=options.model,
        base_url=options.base_url,
        concurrency=options.concurrency,
        cache=cache,
        prompts_dir=options.prompts_dir,
        annotations=annotations,
        timeout=options.timeout,
        max_retries=options.max_retries,
    )
    exemplars = fallback = None
    if extractor == "vlm":
        exemplars = Exemplars(source, concepts, options.exemplars, options.max_image_side)
        connect = None
        if options.backend == "hf":
            connect = partial(_local_vlm, str(options.model), batch_size=options.concurrency)
        try:
            stats = extract(extractor="vlm", exemplars=exemplars, connect=connect)
        except ImagesRefused as err:
            # A text-only model: reading the text alone still gives attributes, for every concept alike.
            warnings.append(f"{err}: attributes come from the text extractor (llm) for the whole build")
            tqdm.write(f"WARNING: {warnings[-1]}", file=sys.stderr)
            fallback = {"requested": "vlm", "used": "llm", "reason": str(err)}
            extractor = "llm"
    if extractor != "vlm":
        stats = extract(extractor=extractor)
    if stats.failures:
        first = stats.failures[0]
        warnings.append(
            f"attributes: {len(stats.failures)} concept(s) kept with empty attributes (e.g. "
            f"{first['concept_id']}: {first['reason']}); listed in knowledge.attributes.failures"
        )
    if stats.failed_calls:
        warnings.append(f"attributes: {stats.failed_calls} request(s) failed after retries")
    warnings += _untrusted_warnings(stats)
    attributes = stats.to_json()
    if exemplars is not None and fallback is None:
        attributes["exemplars"] = exemplars.to_json()
    if fallback is not None:
        attributes["fallback"] = fallback
    return {
        "extractor": extractor,
        "wikipedia": asdict(wiki) if wiki else None,
        "attributes": attributes,
        "calls": (wiki.requests if wiki else 0) + stats.calls,
        "cache_hits": (wiki.cache_hits if wiki else 0) + stats.cache_hits,
        "failed_calls": len(wiki.failures if wiki else []) + stats.failed_calls,
        "warnings": warnings,
    }


def read_knowledge_file(path: Path, concepts: list[Concept]) -> int:
    """`--knowledge-file`: each concept's description from a JSONL of {"fine": NAME, "text": DESCRIPTION}
    (NAME one of the concept's fine labels or its id, any case); those concepts need no Wikipedia, so the
    rules extractor builds attributes offline. A NAME that is no concept is refused (a typo would silently
    leave its concept without text). Returns how many concepts got text."""
    by_name = {name.casefold(): c for c in concepts for name in (*c.fine, c.concept_id)}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FinerError(f"--knowledge-file {path}: cannot read it ({err})") from None
    given = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--knowledge-file {path} line {number}"
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("fine"), str)
            and isinstance(entry.get("text"), str)
        ):
            raise FinerError(f'{where}: expected {{"fine": NAME, "text": DESCRIPTION}} on one line')
        concept = by_name.get(entry["fine"].strip().casefold())
        if concept is None:
            raise FinerError(
                f"{where}: {entry['fine']!r} is no concept of this dataset "
                f"(its names: {', '.join(c.fine[0] for c in concepts[:3])}, …)"
            )
        if entry["text"].strip():
            concept.knowledge = Knowledge(
                text=entry["text"].strip(), status="bundled", title=entry["fine"].strip()
            )
            given += 1
    return given


#: Removed sentences quoted in build.json's warnings; all of them are in knowledge.attributes.
QUOTED = 5


def _untrusted_warnings(stats: ExtractionStats) -> list[str]:
    """What the defences against the untrusted text did, for build.json's warnings."""
    warnings = []
    removed = stats.instructions_removed
    if removed:
        quoted = "; ".join(f"{r['concept_id']}: {r['sentence']!r}" for r in removed[:QUOTED])
        more = f"; and {len(removed) - QUOTED} more" if len(removed) > QUOTED else ""
        warnings.append(
            f"removed {len(removed)} instruction-like sentence(s) from the knowledge text before prompting "
            f"({quoted}{more}); all in knowledge.attributes.instructions_removed"
        )
    if stats.unsupported:
        warnings.append(
            f"dropped {len(stats.unsupported)} attribute(s) the text sent does not support (words the page "
            "never used); listed in knowledge.attributes.unsupported_phrases"
        )
    return warnings


def _local_vlm(model: str, stats: ExtractionStats, *, batch_size: int) -> HFChat:
    """The local model behind `--extractor vlm --backend hf`, filling the extraction's stats."""
    return HFChat(model, usage=stats, batch_size=batch_size)
