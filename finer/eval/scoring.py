"""Scoring of free-text and multiple-choice answers (docs/design.md §1, "Scoring").

Two rule sets share one API. Ours (the default) compares whole words under four normalisations, so that
spelling variants of a label match ("Bewick’s Wren" ≡ "Bewicks Wren", "737-800" ≡ "737800") while pieces
of other words do not ("Tern" is not in "Western Gull"). ``finer_original=True`` reproduces the rules of
FINER's ``eval_fgvc.py`` exactly, so that published numbers can be recomputed. Both apply the same
hierarchical credit: a more specific correct answer also counts at a coarser level.

Everything here is plain Python with precompiled patterns and cached label normalisation, because an
evaluation scores every prediction against the same few hundred labels.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finer.schema import Level

__all__ = [
    "LEVELS",
    "MAX_ANSWER_WORDS",
    "MAX_GOLD_WORDS",
    "Score",
    "accepted_labels",
    "extract_answer",
    "modified_em",
    "normalize_original",
    "normalize_variants",
    "parse_choice",
    "score",
    "score_choice",
    "strict_em",
    "token_f1",
]

#: The label levels, coarsest first (the same tuple as `finer.schema.LEVELS`; kept here so that scoring
#: does not import `datasets`).
LEVELS: tuple[str, ...] = ("superordinate", "coarse", "fine")
#: Modified EM looks for the gold only this far into the answer, so a long list of guesses gets no credit.
MAX_ANSWER_WORDS = 20
#: Token F1 cuts the gold to this many words (FINER's guard against over-generation).
MAX_GOLD_WORDS = 10

# --- answer extraction ------------------------------------------------------------------------------

# Greedy `.*` so that the match ends after the *last* marker.
_LAST_MARKER_RE = re.compile(r".*answer:", re.IGNORECASE | re.DOTALL)
_ORIGINAL_MARKER = "Answer:"


def extract_answer(text: str, *, finer_original: bool = False) -> str:
    """The answer part of a generation: after the last "Answer:" (any case), else the whole text.

    The last marker wins because reasoning before it may quote the marker. With ``finer_original`` the
    original rule applies instead: after the first case-sensitive "Answer:", with "</s>" removed.
    """
    if finer_original:
        start = text.find(_ORIGINAL_MARKER)
        start = 0 if start == -1 else start + len(_ORIGINAL_MARKER)
        return text[start:].strip().replace("</s>", "")
    match = _LAST_MARKER_RE.match(text)
    return (text[match.end() :] if match else text).strip()


# --- normalisation, ours ----------------------------------------------------------------------------

_QUOTE_FOLD = str.maketrans(
    {
        "\u2018": "'",  # ‘
        "\u2019": "'",  # ’
        "\u201a": "'",  # ‚
        "\u201b": "'",  # ‛
        "\u2032": "'",  # ′
        "\u02bc": "'",  # ʼ
        "\u00b4": "'",  # ´
        "`": "'",
        "\u201c": '"',  # “
        "\u201d": '"',  # ”
        "\u201e": '"',  # „
        "\u201f": '"',  # ‟
        "\u2033": '"',  # ″
    }
)
# Hyphens, dashes, slashes and underscores: they join the parts of one name ("737-800", "F/A-18").
_JOINERS = re.escape("-/\\_\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u2043\u2044\u2215")
_JOINER_RE = re.compile(f"[{_JOINERS}]")
# Every other punctuation mark becomes a space, and so does an apostrophe that is a quote mark rather
# than part of a word ("'the owl'"); an apostrophe inside a word ("bewick's") stays for the variants.
_PUNCT_RE = re.compile(rf"[^\w\s'{_JOINERS}]|'(?!\w)|(?<!\w)'")
# Articles are dropped only as whole words, so "an-12" and "f/a-18" keep their letters.
_ARTICLES = frozenset({"a", "an", "the"})
_POSSESSIVE_RE = re.compile(r"'s(?![^\W_])")


def _fold(text: str) -> str:
    """Lower-case, straight quotes, no accents: the spellings a model and a label may disagree on."""
    if text.isascii():
        return text.replace("`", "'").lower()
    text = text.translate(_QUOTE_FOLD).lower()
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def _joiner_forms(text: str) -> tuple[str, str]:
    """``text`` with joiners as a space and as nothing."""
    if not _JOINER_RE.search(text):
        return text, text
    return " ".join(_JOINER_RE.sub(" ", text).split()), " ".join(_JOINER_RE.sub("", text).split())


def normalize_variants(text: str) -> tuple[str, ...]:
    """The four normalised forms of ``text`` (ours), as single-space-joined words.

    Folded, punctuation spaced, articles dropped; then the possessive "'s" dropped or the apostrophe
    merely deleted, times joiners as a space or as nothing. Both sides of a comparison are normalised
    this way and form *i* of one is compared with form *i* of the other, so "Bewick’s Wren", "Bewick
    Wren" and "Bewicks Wren" meet in some form, as do "737-800", "737 800" and "737800".
    """
    base = " ".join(word for word in _PUNCT_RE.sub(" ", _fold(text)).split() if word not in _ARTICLES)
    if "'" not in base:
        return _joiner_forms(base) * 2
    # Apostrophes left are inside words, so deleting them empties no word.
    return _joiner_forms(_POSSESSIVE_RE.sub("", base).replace("'", "")) + _joiner_forms(base.replace("'", ""))


# Labels repeat across an evaluation (a few hundred classes, thousands of predictions): normalise once.
_label_variants = lru_cache(maxsize=1 << 16)(normalize_variants)

# --- normalisation, the original --------------------------------------------------------------------

_ORIGINAL_PUNCT_RE = re.compile(f"[{re.escape(string.punctuation)}]")
_ORIGINAL_ARTICLE_RE = re.compile(r"\b(a|an|the)\b")


def normalize_original(text: str) -> str:
    """FINER's ``normalize_answer``: lower-case, ASCII punctuation deleted, articles removed, spaces fixed.

    Deleting (not spacing) punctuation is why "Black-footed" never equals "black footed" there.
    """
    return " ".join(_ORIGINAL_ARTICLE_RE.sub(" ", _ORIGINAL_PUNCT_RE.sub("", text.lower())).split())


_label_original = lru_cache(maxsize=1 << 16)(normalize_original)

# --- metrics ----------------------------------------------------------------------------------------


def _labels(golds: str | Iterable[str]) -> list[str]:
    """Accept one label or many; a bare string must not be iterated character by character."""
    return [golds] if isinstance(golds, str) else list(golds)


def _first_words(normalised: str, n: int) -> str:
    return " ".join(normalised.split(" ", n)[:n])


def _counts(normalised: str) -> tuple[Counter[str], int]:
    tokens = normalised.split()
    return Counter(tokens), len(tokens)


@lru_cache(maxsize=1 << 16)
def _gold_counts(gold_form: str) -> tuple[Counter[str], int]:
    """A normalised gold's tokens, cut to `MAX_GOLD_WORDS` words, counted once per evaluation."""
    return _counts(" ".join(gold_form.split()[:MAX_GOLD_WORDS]))


def _f1(answer_counts: Counter[str], answer_len: int, gold_form: str) -> float:
    """Token F1 of an answer against one normalised gold; walks the gold's few tokens, not the answer's."""
    gold_counts, gold_len = _gold_counts(gold_form)
    if answer_counts.keys().isdisjoint(gold_counts):  # most labels share no word with the answer
        return 0.0
    same = sum([min(n, answer_counts.get(token, 0)) for token, n in gold_counts.items()])
    precision, recall = same / answer_len, same / gold_len
    return 2 * precision * recall / (precision + recall)


def _em_ours(answer_forms: tuple[str, ...], golds: list[str]) -> float:
    heads = {form: f" {_first_words(form, MAX_ANSWER_WORDS)} " for form in set(answer_forms)}
    for gold in golds:
        for form, gold_form in zip(answer_forms, _label_variants(gold), strict=True):
            # An empty gold would be "in" anything; it never matches.
            if gold_form and f" {gold_form} " in heads[form]:
                return 1.0
    return 0.0


def _em_original(answer: str, golds: list[str]) -> float:
    head = " ".join(answer.split()[:MAX_ANSWER_WORDS])
    for gold in golds:
        gold_form = _label_original(gold)
        # A character substring ("ani" in "animal"); an empty gold is in every answer, so it scores 1.
        if gold_form in head or answer == gold_form:
            return 1.0
    return 0.0


def _strict_ours(answer_forms: tuple[str, ...], golds: list[str]) -> float:
    for gold in golds:
        for form, gold_form in zip(answer_forms, _label_variants(gold), strict=True):
            if gold_form and form == gold_form:
                return 1.0
    return 0.0


def _strict_original(answer: str, golds: list[str]) -> float:
    return float(any(answer == _label_original(gold) for gold in golds))


def _f1_ours(answer_forms: tuple[str, ...], golds: list[str]) -> float:
    counted = {form: _counts(form) for form in set(answer_forms)}
    # The four forms often coincide; score each distinct pair once.
    pairs = {pair for gold in golds for pair in zip(answer_forms, _label_variants(gold), strict=True)}
    return max((_f1(*counted[form], gold_form) for form, gold_form in pairs), default=0.0)


def _f1_original(answer: str, golds: list[str]) -> float:
    counts = _counts(answer)
    return max((_f1(*counts, _label_original(gold)) for gold in golds), default=0.0)


def modified_em(answer: str, golds: str | Iterable[str], *, finer_original: bool = False) -> float:
    """1.0 if some gold occurs in the first `MAX_ANSWER_WORDS` words of the extracted ``answer``.

    Ours: as a contiguous run of whole words under one of the four normalisations; an empty answer or
    gold never matches. Original: as a character substring, else by full equality.
    """
    golds = _labels(golds)
    if finer_original:
        return _em_original(normalize_original(answer), golds)
    return _em_ours(normalize_variants(answer), golds)


def strict_em(answer: str, golds: str | Iterable[str], *, finer_original: bool = False) -> float:
    """1.0 if the whole extracted ``answer`` equals some gold once both are normalised."""
    golds = _labels(golds)
    if finer_original:
        return _strict_original(normalize_original(answer), golds)
    return _strict_ours(normalize_variants(answer), golds)


def token_f1(answer: str, golds: str | Iterable[str], *, finer_original: bool = False) -> float:
    """Best token F1 of the extracted ``answer`` over the golds, each cut to `MAX_GOLD_WORDS` words.

    Partial credit for "Great Owl" against "Great Horned Owl"; ours takes the best normalisation.
    """
    golds = _labels(golds)
    if finer_original:
        return _f1_original(normalize_original(answer), golds)
    return _f1_ours(normalize_variants(answer), golds)


# --- hierarchical credit ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Score:
    """Scores of one prediction at one level; ``answer`` is the extracted text, kept for error analysis."""

    em: float
    strict_em: float
    f1: float
    answer: str


def accepted_labels(
    level: Level | str, superordinate: str, coarse: str | Iterable[str], fine: str | Iterable[str]
) -> list[str]:
    """The labels that count as correct at ``level``: that level's and every more specific one.

    Naming the species when asked "what kind of animal?" is right, only more precise.
    """
    if level == "superordinate":
        return [superordinate, *_labels(coarse), *_labels(fine)]
    if level == "coarse":
        return [*_labels(coarse), *_labels(fine)]
    if level == "fine":
        return _labels(fine)
    raise ValueError(f"unknown level {level!r}; expected one of {', '.join(LEVELS)}")


def score(
    prediction: str,
    level: Level | str,
    superordinate: str,
    coarse: str | Iterable[str],
    fine: str | Iterable[str],
    *,
    finer_original: bool = False,
) -> Score:
    """Score a raw generation at ``level`` against one image row's labels (hierarchical credit).

    Takes a row's ``superordinate``, ``coarse`` and ``fine`` columns as they are; the answer is extracted
    and normalised once for all three metrics.
    """
    golds = accepted_labels(level, superordinate, coarse, fine)
    answer = extract_answer(prediction, finer_original=finer_original)
    if finer_original:
        normalised = normalize_original(answer)
        return Score(
            em=_em_original(normalised, golds),
            strict_em=_strict_original(normalised, golds),
            f1=_f1_original(normalised, golds),
            answer=answer,
        )
    forms = normalize_variants(answer)
    return Score(
        em=_em_ours(forms, golds),
        strict_em=_strict_ours(forms, golds),
        f1=_f1_ours(forms, golds),
        answer=answer,
    )


# --- choice letters ---------------------------------------------------------------------------------

# A letter in brackets, not glued to a word ("bird(s)" is no option S).
_BRACKET_RE = re.compile(r"(?<!\w)[(\[]\s*([a-z])\s*[)\]]", re.IGNORECASE)
# The answer opens with a letter followed by ")", ".", ":" or nothing (end of line or text).
_LEADING_RE = re.compile(r"\s*([a-z])(?:\s*[).:]|[^\S\n]*(?:\n|\Z))", re.IGNORECASE)
# "answer is B": "is" may be followed by the article ("the answer is a bird"); "is (B)" is left to the
# bracket rule.
_IS_RE = re.compile(r"\b(?:answer|option|choice)\s+is\s*:?\s*([a-z])(?![\w'-])", re.IGNORECASE)
# "Option C", "choice: b": an article cannot follow these nouns, so no article check.
_NAMED_RE = re.compile(r"\b(?:option|choice)\b\s*:?\s*[(\[]?\s*([a-z])(?![\w'-])", re.IGNORECASE)
# A hedge between two letters: "A or B", "(B) and (C)", "B/C".
_HEDGE_RE = re.compile(
    r"(?<![\w'])[(\[]?([a-z])[)\]]?\s*,?\s*(?:or|and|/)\s*[(\[]?([a-z])(?![\w'-])", re.IGNORECASE
)
_WORD_AFTER_RE = re.compile(r"\s+[^\W\d_]")
# Markdown emphasis ("**D**", "__D__", "*D*", "**Answer:** B"): asterisks anywhere, underscores only at the
# edge of a word (so "snake_case" keeps its underscore).
_EMPHASIS_RE = re.compile(r"\*+|(?<![^\W_])_+|_+(?![^\W_])")


def _is_article(text: str, letter: str, end: int) -> bool:
    """An "a" followed by a word is the article ("A bird"), not option A; "(A) bird" has a bracket."""
    return letter in "aA" and _WORD_AFTER_RE.match(text, end) is not None


def parse_choice(text: str, k: int) -> str | None:
    """The option letter ("A" … k-th letter) a generation picks, or None when it picks none or several.

    Read from the text after the last "Answer:", markdown emphasis removed ("**D**" is D): a bracketed
    letter, a leading letter followed by ")", ".", ":" or nothing, or a letter after "answer is" / "option"
    / "choice". Two different letters (a hedge, "**B** or **C**") or a letter outside the k choices count
    as no answer, so hedging never earns credit.
    """
    if not 1 <= k <= 26:
        raise ValueError(f"k must be between 1 and 26, got {k}")
    answer = _EMPHASIS_RE.sub("", extract_answer(text))
    letters = set(_BRACKET_RE.findall(answer))
    letters.update(_NAMED_RE.findall(answer))
    if leading := _LEADING_RE.match(answer):
        letters.add(leading[1])
    for match in _IS_RE.finditer(answer):
        if not _is_article(answer, match[1], match.end()):
            letters.add(match[1])
    for match in _HEDGE_RE.finditer(answer):
        letters.add(match[1])
        if not _is_article(answer, match[2], match.end()):
            letters.add(match[2])
    letters = {letter.upper() for letter in letters}
    if len(letters) != 1:
        return None
    (letter,) = letters
    return letter if ord(letter) - ord("A") < k else None


def score_choice(prediction: str, gold: str, k: int) -> float:
    """1.0 if the letter parsed from ``prediction`` is the gold letter of a k-way question."""
    gold = gold.strip().upper()
    if len(gold) != 1 or not "A" <= gold < chr(ord("A") + k):
        raise ValueError(f"gold must be one of the first {k} letters, got {gold!r}")
    return float(parse_choice(prediction, k) == gold)
