"""What to ask about each image in each evaluation mode (docs/design.md §1, "Prompts"), and how it is keyed.

`EvalPlan` turns one image row and one label level into a `Task`: the rendered first turn, the later
turns built from the model's own earlier answers (attribute seeking; the `finer` replay of the training
conversation), the image to show, and the record to save beside the answer.
Every choice a prompt depends on is recorded in the task's key, so a
resumed run never reuses an answer to a different question. Multiple-choice options are seeded per image
and level, not per run, so that `--limit`, resumes and batch order never change which options an image gets.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from finer.builders import source_class
from finer.cache import cache_key
from finer.errors import FinerError
from finer.eval.scoring import LEVELS, extract_answer, strict_em
from finer.prompts import render
from finer.records import PredictionRecord

__all__ = [
    "DISTRACTOR_KINDS",
    "FINER_LEVELS",
    "MODES",
    "MODE_TEMPLATES",
    "Choice",
    "EvalPlan",
    "LabelPool",
    "Task",
    "canonical_label",
    "choice_options",
    "choice_question",
    "closed_list",
]

MODES: tuple[str, ...] = ("direct", "attrseek", "probe", "choice", "finer")
#: The template each mode renders, where it is not the mode's own name.
MODE_TEMPLATES: dict[str, str] = {"finer": "train_finer"}
#: Levels the `finer` replay asks: its first question names the superordinate.
FINER_LEVELS: tuple[str, ...] = ("coarse", "fine")
#: How the wrong options of a choice question are drawn (`--distractors`; `finer.eval.distractors`).
DISTRACTOR_KINDS: tuple[str, ...] = ("siblings", "random", "clip")


@dataclass
class Task:
    """One question about one image at one level, ready for a backend.

    ``followups`` build each later turn's messages from the model's answers so far (attrseek: one; the
    `finer` replay at the fine level: two). ``attributes_turn`` is the index of the answer that lists
    attributes, saved beside the prediction. ``image`` loads the pixels only when the backend gets to it.
    """

    key: str
    record: PredictionRecord
    first: list[dict]
    image: Callable[[], Image.Image] | None
    followups: tuple[Callable[[list[str]], list[dict]], ...] = ()
    attributes_turn: int | None = None


def canonical_label(labels: str | list[str]) -> str:
    """The canonical label of a column that holds one string (superordinate) or a list (coarse, fine)."""
    if isinstance(labels, str):
        return labels
    return labels[0] if labels else ""


@dataclass(frozen=True)
class LabelPool:
    """The distinct canonical labels of one level, indexed by what they share with a row, so that a
    question draws its hard negatives without scanning every label (iNat has 10,000)."""

    labels: list[str]
    by_superordinate: dict[str, list[str]]
    by_coarse: dict[tuple[str, str], list[str]]

    @classmethod
    def of(cls, concepts: list[dict[str, Any]], level: str) -> LabelPool:
        seen: dict[str, tuple[str, str, str]] = {}
        for concept in concepts:
            label = canonical_label(concept[level])
            if label and label.lower() not in seen:
                coarse = canonical_label(concept["coarse"]).lower()
                seen[label.lower()] = (label, concept["superordinate"], coarse)
        by_superordinate: dict[str, list[str]] = defaultdict(list)
        by_coarse: dict[tuple[str, str], list[str]] = defaultdict(list)
        for _, (label, superordinate, coarse) in sorted(seen.items()):
            by_superordinate[superordinate].append(label)
            by_coarse[superordinate, coarse].append(label)
        return cls([entry[0] for _, entry in sorted(seen.items())], dict(by_superordinate), dict(by_coarse))


@dataclass(frozen=True)
class Choice:
    """A k-way question's options, the gold letter, and why each option is there: ``kinds[i]`` is "gold",
    "sibling" (shares the gold's parent label), "random" or "clip" (a nearest neighbour by the encoder, its
    cosine similarity to the gold in ``similarity[i]``)."""

    options: list[str]
    answer: str
    kinds: list[str]
    similarity: list[float | None]


def _nearest_first(neighbours: Sequence[tuple[str, float]], rng: random.Random) -> list[tuple[str, float]]:
    """The neighbours by decreasing similarity, equal similarities in an order drawn from ``rng``."""
    return sorted(neighbours, key=lambda entry: (-entry[1], rng.random()))


def choice_question(
    row: dict[str, Any],
    level: str,
    pool: LabelPool | list[dict[str, Any]],
    k: int,
    seed: int,
    *,
    distractors: str = "siblings",
    neighbours: Mapping[str, Sequence[tuple[str, float]]] | None = None,
) -> Choice:
    """The k-way question about ``row`` at ``level``: options, gold letter and each option's kind.

    ``pool`` is the level's `LabelPool`, or the dataset's concepts to build it from. ``distractors``:
    "siblings" draws hard negatives first — at the fine level labels sharing the row's canonical coarse label,
    then those sharing its superordinate, then any other; at the coarse level groups sharing the
    superordinate, then any other —; "random" draws from every label; "clip" takes the labels nearest the
    gold in ``neighbours`` (the level's lists of `finer.eval.distractors.Neighbours`), ties in an order drawn
    from the seed, and fills up at random when they run out. A label the row accepts at that level is never a
    distractor. Fewer options come back when the dataset has fewer labels. Seeded by (seed, source, image
    id, level).
    """
    if distractors not in DISTRACTOR_KINDS:
        raise FinerError(f"--distractors {distractors}: choose one of {', '.join(DISTRACTOR_KINDS)}")
    if not isinstance(pool, LabelPool):
        pool = LabelPool.of(pool, level)
    rng = random.Random(cache_key(seed, row.get("source", ""), row["image_id"], level))
    golds = [row[level]] if isinstance(row[level], str) else list(row[level])
    gold = canonical_label(row[level])
    superordinate, coarse = row["superordinate"], canonical_label(row["coarse"]).lower()
    chosen: list[str] = []
    kinds: dict[str, str] = {}
    similarity: dict[str, float] = {}
    if distractors == "clip":
        if neighbours is None:
            raise FinerError("--distractors clip needs the mined neighbours of the dataset")
        for label, score in _nearest_first(neighbours.get(gold.lower(), []), rng):
            if len(chosen) == k - 1:
                break
            if label.lower() not in {c.lower() for c in chosen} and not strict_em(label, golds):
                chosen.append(label)
                kinds[label], similarity[label] = "clip", score
    tiers: list[tuple[list[str], str]] = [(pool.labels, "random")]
    if distractors == "siblings" and level != "superordinate":
        sharing = pool.by_superordinate.get(superordinate, [])
        tiers.insert(0, (sharing, "sibling" if level == "coarse" else "random"))
    if distractors == "siblings" and level == "fine" and coarse:
        tiers.insert(0, (pool.by_coarse.get((superordinate, coarse), []), "sibling"))
    for tier, kind in tiers:
        need = k - 1 - len(chosen)
        if need <= 0:
            break
        taken = {label.lower() for label in chosen}

        def fresh(labels: list[str], taken: set[str] = taken) -> list[str]:
            return [label for label in labels if label.lower() not in taken and not strict_em(label, golds)]

        # A tier holds the tiers before it, which are used up: at most len(chosen) repeats, plus the golds.
        drawn = rng.sample(tier, min(len(tier), need + len(chosen) + len(golds)))
        picked = fresh(drawn)
        if len(picked) < need and len(drawn) < len(tier):  # labels that only normalise like a gold
            picked = fresh(rng.sample(tier, len(tier)))
        kinds.update(dict.fromkeys(picked[:need], kind))
        chosen += picked[:need]
    options = [gold, *chosen]
    rng.shuffle(options)
    return Choice(
        options,
        chr(ord("A") + options.index(gold)),
        ["gold" if option == gold else kinds[option] for option in options],
        [similarity.get(option) for option in options],
    )


def choice_options(
    row: dict[str, Any], level: str, pool: LabelPool | list[dict[str, Any]], k: int, seed: int
) -> tuple[list[str], str]:
    """The options and gold letter of `choice_question` with sibling distractors (the default)."""
    question = choice_question(row, level, pool, k, seed)
    return question.options, question.answer


def closed_list(source: str, level: str, concepts: list[dict[str, Any]]) -> list[str] | None:
    """The labels to choose from where the protocol asks a closed question (docs/design.md §1: the source
    class's `closed_levels`, the coarse level of aircraft and cars: the dataset's own manufacturers and body
    types), else None."""
    if level not in source_class(source).closed_levels:
        return None
    return LabelPool.of(concepts, level).labels


class EvalPlan:
    """The questions of one run: a mode, its options, and the dataset's concepts (for distractors)."""

    def __init__(
        self,
        *,
        run: dict[str, Any],
        concepts: list[dict[str, Any]],
        images: Callable[[int], Image.Image] | None,
        prompts_dir: Path | str | None = None,
        neighbours: Mapping[str, Mapping[str, Sequence[tuple[str, float]]]] | None = None,
    ) -> None:
        """``run`` identifies the run in every record (model, adapter, mode, options, template hash);
        ``neighbours`` are the mined lists per level that ``run["distractors"] == "clip"`` draws from."""
        self.run = run
        self.neighbours = neighbours or {}
        self.mode: str = run["mode"]
        self.concepts = concepts
        self.images = images
        self.prompts_dir = prompts_dir
        self.pools = {level: LabelPool.of(concepts, level) for level in LEVELS}
        self._closed: dict[tuple[str, str], list[str] | None] = {}

    def levels(self, wanted: str) -> list[str]:
        """The levels to ask: one, or all three; a multiple-choice level needs two labels to choose from."""
        if wanted not in (*LEVELS, "all"):
            raise FinerError(f"unknown level {wanted!r}; choose superordinate, coarse, fine or all")
        levels = list(LEVELS) if wanted == "all" else [wanted]
        if self.mode == "finer":
            if wanted == "superordinate":
                raise FinerError(
                    "--mode finer names the superordinate in its first question; ask coarse or fine"
                )
            return [level for level in levels if level in FINER_LEVELS]
        if self.mode != "choice":
            return levels
        askable = [level for level in levels if len(self.pools[level].labels) >= 2]
        if not askable:
            raise FinerError(
                f"--mode choice --level {wanted}: the dataset has a single {levels[0]} label, "
                "so there is nothing to choose from"
            )
        return askable

    def key(self, row: dict[str, Any], level: str) -> str:
        """The resume key: everything the answer depends on (run, level, image)."""
        return cache_key(self.run, level, row.get("source", ""), row["image_id"])

    def askable(self, row: dict[str, Any], level: str) -> bool:
        """Whether the row can be asked at ``level``: a multiple-choice question needs a gold option."""
        return self.mode != "choice" or bool(canonical_label(row[level]))

    def task(self, index: int, row: dict[str, Any], level: str) -> Task:
        """Render the question about row ``index`` (its labels in ``row``) at ``level``."""
        record: PredictionRecord = {
            "key": self.key(row, level),
            "run": self.run,
            "level": level,
            "image_id": row["image_id"],
            "source": row.get("source", ""),
            "concept_id": row.get("concept_id", ""),
            "superordinate": row["superordinate"],
            "coarse": list(row["coarse"]),
            "fine": list(row["fine"]),
        }
        parent = None
        if self.run["gold_parent"] and level != "superordinate":
            parent = row["superordinate"] if level == "coarse" else canonical_label(row["coarse"]) or None
        image = None if self.images is None else (lambda: self.images(index))  # type: ignore[misc]
        dir_ = self.prompts_dir
        if self.mode == "probe":
            first = render(
                "probe",
                prompts_dir=dir_,
                level=level,
                attributes=list(row.get("attributes_required") or []),
                superordinate=row["superordinate"],
                coarse=canonical_label(row["coarse"]),
            )
            return Task(record["key"], record, first, None)
        if self.mode == "finer":
            return self._finer(record, row, level, image)
        if self.mode == "choice":
            kind = self.run.get("distractors") or "siblings"
            question = choice_question(
                row,
                level,
                self.pools[level],
                self.run["choices"],
                self.run["seed"],
                distractors=kind,
                neighbours=self.neighbours.get(level),
            )
            record.update(options=question.options, answer=question.answer, option_kinds=question.kinds)
            if kind == "clip":
                record["option_similarity"] = question.similarity
            first = render("choice", prompts_dir=dir_, choices=question.options, parent=parent)
            return Task(record["key"], record, first, image)
        closed = (record["source"], level)
        if closed not in self._closed:
            self._closed[closed] = closed_list(*closed, self.concepts)
        choices = self._closed[closed]
        if self.mode == "direct":
            first = render("direct", prompts_dir=dir_, level=level, parent=parent, choices=choices)
            return Task(record["key"], record, first, image)
        if self.mode != "attrseek":
            raise FinerError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")

        def turn(answer: str | None) -> list[dict]:
            return render(
                "attrseek",
                prompts_dir=dir_,
                level=level,
                attributes_answer=answer,
                parent=parent,
                choices=choices,
            )

        return Task(record["key"], record, turn(None), image, (lambda said: turn(said[0]),), 0)

    def _finer(
        self,
        record: PredictionRecord,
        row: dict[str, Any],
        level: str,
        image: Callable[[], Image.Image] | None,
    ) -> Task:
        """The conversation of `finer finetune --format finer` (the `train_finer` template), replayed. Its
        first question names the superordinate and asks the group (the coarse answer); at the fine level the
        attribute and name questions follow about the model's own group (the gold group with `gold_parent`),
        the model's earlier answers being the assistant turns. No gold fine label reaches the prompt."""
        gold_group = canonical_label(row["coarse"]) if self.run["gold_parent"] else None

        def users(group: str) -> list[dict]:
            messages = render(
                "train_finer",
                prompts_dir=self.prompts_dir,
                superordinate=row["superordinate"],
                coarse=group,
                fine="",
                attributes=[],
            )
            return [m for m in messages if m["role"] == "user"]

        def turn(said: list[str]) -> list[dict]:
            questions = users(gold_group or extract_answer(said[0]) or row["superordinate"])
            conversation = [questions[0]]
            for answer, question in zip(said, questions[1:], strict=False):
                said_block = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
                conversation += [said_block, question]
            return conversation

        first = users(row["superordinate"])[:1]
        if level == "coarse":
            return Task(record["key"], record, first, image)
        return Task(record["key"], record, first, image, (turn, turn), 1)
