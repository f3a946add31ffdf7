"""Scoring rules (docs/design.md §1): our modified EM, FINER's original rules, hierarchical credit, choice
letters."""

from __future__ import annotations

import pytest

from finer import schema
from finer.eval import scoring
from finer.eval.scoring import (
    Score,
    accepted_labels,
    extract_answer,
    modified_em,
    normalize_original,
    normalize_variants,
    parse_choice,
    score,
    score_choice,
    strict_em,
    token_f1,
)

# --- answer extraction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "finer_original", "expected"),
    [
        ("Great Horned Owl", False, "Great Horned Owl"),  # no marker: the whole text
        ("  Great Horned Owl \n", False, "Great Horned Owl"),
        ("Attributes: ear tufts. Answer: Great Horned Owl", False, "Great Horned Owl"),
        ("answer: Owl", False, "Owl"),  # any case
        ("ANSWER: Owl", False, "Owl"),
        ("Answer: Owl? No. Answer: Barn Owl", False, "Barn Owl"),  # the last marker wins
        ("Answer: Owl\nOn reflection:\nAnswer: Barn Owl", False, "Barn Owl"),  # across lines
        ("Answer: Owl? No. Answer: Barn Owl", True, "Owl? No. Answer: Barn Owl"),  # the first, originally
        ("answer: Owl</s>", True, "answer: Owl"),  # the original marker is case-sensitive
        ("Answer: Barn Owl</s>", True, "Barn Owl"),
        ("Barn Owl", True, "Barn Owl"),
    ],
)
def test_extract_answer(text: str, finer_original: bool, expected: str) -> None:
    assert extract_answer(text, finer_original=finer_original) == expected


# --- normalisation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Bewick's Wren", ("bewick wren", "bewick wren", "bewicks wren", "bewicks wren")),
        ("Black-footed Albatross", ("black footed albatross", "blackfooted albatross") * 2),
        ("737-800", ("737 800", "737800") * 2),
        ("Boeing 737–800", ("boeing 737 800", "boeing 737800") * 2),  # en dash
        ("F/A-18", ("f a 18", "fa18") * 2),  # the "A" is no article
        ("An-12", ("an 12", "an12") * 2),
        ("The Great Horned Owl.", ("great horned owl",) * 4),
        ("Pokémon", ("pokemon",) * 4),
        (
            "Chuck-will’s-widow",
            ("chuck will widow", "chuckwillwidow", "chuck wills widow", "chuckwillswidow"),
        ),
        ("Barn_Owl(adult)!", ("barn owl adult", "barnowl adult") * 2),
        ("Type-A", ("type a", "typea") * 2),  # an "A" glued to a hyphen stays
        ("O'Sullivan's Fox", ("osullivan fox", "osullivan fox", "osullivans fox", "osullivans fox")),
        ("", ("",) * 4),
    ],
)
def test_normalize_variants(text: str, expected: tuple[str, ...]) -> None:
    assert normalize_variants(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Black-footed Albatross.", "blackfooted albatross"),  # ASCII punctuation deleted
        ("Bewick’s Wren", "bewick’s wren"),  # a curly apostrophe is kept
        ("Boeing 737–800", "boeing 737–800"),  # so is an en dash
        ("An-12", "an12"),
        ("an animal", "animal"),
    ],
)
def test_normalize_original(text: str, expected: str) -> None:
    assert normalize_original(text) == expected


# --- modified EM, strict EM, token F1 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "golds", "expected"),
    [
        ("Great Horned Owl", ["Great Horned Owl"], 1.0),
        ("It is a great horned owl.", ["Great Horned Owl"], 1.0),  # case, article, punctuation
        ("GREAT HORNED OWL", ["great horned owl"], 1.0),
        ("Bewick’s Wren", ["Bewick's Wren"], 1.0),  # curly vs straight apostrophe
        ("Bewick Wren", ["Bewick’s Wren"], 1.0),  # possessive dropped
        ("Bewicks Wren", ["Bewick's Wren"], 1.0),  # apostrophe deleted
        ("Bewick`s Wren", ["Bewick's Wren"], 1.0),  # a backtick as apostrophe
        ("Black footed Albatross", ["Black-footed Albatross"], 1.0),
        ("Blackfooted Albatross", ["Black-footed Albatross"], 1.0),
        ("Black-footed Albatross", ["Black footed Albatross"], 1.0),
        ("Boeing 737 800", ["737-800"], 1.0),
        ("Boeing 737800", ["737-800"], 1.0),
        ("Boeing 737–800", ["737800"], 1.0),  # en dash in the answer
        ("Boeing 737 - 800", ["737 800"], 1.0),  # a free-standing dash leaves no gap
        ("Shih-Tzu", ["ShihTzu"], 1.0),
        ("Antonov An-12", ["An-12"], 1.0),
        ("McDonnell Douglas F/A-18", ["F/A-18"], 1.0),
        ("Pokémon", ["Pokemon"], 1.0),  # accents stripped on both sides
        ("Pokemon", ["Pokémon"], 1.0),
        ("an animal", ["Ani"], 0.0),  # whole words only
        ("Western Gull", ["Tern"], 0.0),
        ("Cardinals", ["Cardinal"], 0.0),
        ("Great Horned Owl", ["Barn Owl"], 0.0),
        ("Horned Great Owl", ["Great Horned Owl"], 0.0),  # a contiguous run, in order
        ("Northern Cardinal", ["Blue Jay", "Cardinal"], 1.0),  # several accepted labels: any one
        ("Northern Cardinal", ["Blue Jay", "Robin"], 0.0),
        ("Northern Cardinal", "Cardinal", 1.0),  # a bare string is one label
        (" ".join(["word"] * 20) + " Barn Owl", ["Barn Owl"], 0.0),  # after word 20
        (" ".join(["word"] * 18) + " Barn Owl", ["Barn Owl"], 1.0),  # words 19 and 20
        ("", ["Barn Owl"], 0.0),  # empty answer
        ("Barn Owl", [""], 0.0),  # empty gold
        ("the", ["The"], 0.0),  # a gold that normalises to nothing
        ("Barn Owl", [], 0.0),
    ],
)
def test_modified_em_ours(answer: str, golds: list[str] | str, expected: float) -> None:
    assert modified_em(answer, golds) == expected


@pytest.mark.parametrize(
    ("answer", "golds", "expected"),
    [
        ("an animal", ["Ani"], 1.0),  # a character substring
        ("Western Gull", ["Tern"], 1.0),
        ("Cardinals", ["Cardinal"], 1.0),
        ("It is a Great Horned Owl.", ["Great Horned Owl"], 1.0),
        ("Black footed Albatross", ["Black-footed Albatross"], 0.0),  # punctuation deleted, not spaced
        ("Bewick’s Wren", ["Bewick's Wren"], 0.0),  # curly quotes kept
        ("Pokémon", ["Pokemon"], 0.0),  # no accent folding
        (" ".join(["word"] * 20) + " Barn Owl", ["Barn Owl"], 0.0),
        ("", ["Barn Owl"], 0.0),
        ("Barn Owl", [""], 1.0),  # an empty gold is in every answer
        ("Barn Owl", ["The"], 1.0),
        ("Barn Owl", [], 0.0),
    ],
)
def test_modified_em_original(answer: str, golds: list[str], expected: float) -> None:
    assert modified_em(answer, golds, finer_original=True) == expected


@pytest.mark.parametrize(
    ("answer", "golds", "finer_original", "expected"),
    [
        ("The Great Horned Owl.", ["Great Horned Owl"], False, 1.0),
        ("Great Horned Owl", ["Barn Owl", "Great Horned Owl"], False, 1.0),
        ("It is a Great Horned Owl", ["Great Horned Owl"], False, 0.0),  # extra words
        ("Blackfooted Albatross", ["Black-footed Albatross"], False, 1.0),
        ("‘The Bald Eagle’", ["Bald Eagle"], False, 1.0),  # quote marks are no apostrophes
        ("", [""], False, 0.0),  # empty never matches, ours
        ("", [""], True, 1.0),  # original: plain equality
        ("Black footed Albatross", ["Black-footed Albatross"], True, 0.0),
        ("Great Horned Owl", ["great horned owl"], True, 1.0),
    ],
)
def test_strict_em(answer: str, golds: list[str], finer_original: bool, expected: float) -> None:
    assert strict_em(answer, golds, finer_original=finer_original) == expected


@pytest.mark.parametrize(
    ("answer", "golds", "finer_original", "expected"),
    [
        ("Great Horned Owl", ["Great Horned Owl"], False, 1.0),
        ("Great Owl", ["Great Horned Owl"], False, 0.8),  # p = 1, r = 2/3
        ("It is a Great Horned Owl", ["Great Horned Owl"], False, 0.75),  # p = 3/5, r = 1
        ("Barn Owl", ["Great Horned Owl", "Barn Owl"], False, 1.0),  # best label
        ("Black footed Albatross", ["Black-footed Albatross"], False, 1.0),
        ("Black footed Albatross", ["Black-footed Albatross"], True, 0.4),  # only "albatross" is shared
        ("Owl", ["one two three four five six seven eight nine ten Owl"], False, 0.0),  # gold cut to 10
        ("ten", ["one two three four five six seven eight nine ten Owl"], False, 2 / 11),
        ("ten", ["one two three four five six seven eight nine ten Owl"], True, 2 / 11),
        ("", ["Barn Owl"], False, 0.0),
        ("Barn Owl", [""], False, 0.0),
        ("Barn Owl", [""], True, 0.0),
        ("Sparrow", ["Barn Owl"], False, 0.0),
        ("Owl owl", ["Owl"], False, 2 / 3),  # a repeated word counts once per occurrence in the gold
    ],
)
def test_token_f1(answer: str, golds: list[str], finer_original: bool, expected: float) -> None:
    assert token_f1(answer, golds, finer_original=finer_original) == pytest.approx(expected)


# --- hierarchical credit ----------------------------------------------------------------------------

ROW = {
    "superordinate": "Bird",
    "coarse": ["Owl", "Strigidae"],
    "fine": ["Great Horned Owl", "Bubo virginianus"],
}


@pytest.mark.parametrize(
    ("prediction", "level", "expected_em"),
    [
        ("Answer: a bird", "superordinate", 1.0),
        ("Answer: an owl", "superordinate", 1.0),  # coarse counts at superordinate
        ("Answer: Bubo virginianus", "superordinate", 1.0),  # fine counts at superordinate
        ("Answer: a mammal", "superordinate", 0.0),
        ("Answer: a bird", "coarse", 0.0),  # superordinate does not count at coarse
        ("Answer: Strigidae", "coarse", 1.0),
        ("Answer: Great Horned Owl", "coarse", 1.0),  # fine counts at coarse
        ("Answer: a bird", "fine", 0.0),
        ("Answer: an owl", "fine", 0.0),  # coarse does not count at fine
        ("Answer: Great Horned Owl", "fine", 1.0),
        ("Answer: bubo virginianus", "fine", 1.0),
    ],
)
def test_hierarchical_credit(prediction: str, level: str, expected_em: float) -> None:
    assert score(prediction, level, **ROW).em == expected_em
    assert score(prediction, level, **ROW, finer_original=True).em == expected_em


def test_accepted_labels_per_level() -> None:
    assert accepted_labels("superordinate", "Bird", ["Owl"], ["Barn Owl"]) == ["Bird", "Owl", "Barn Owl"]
    assert accepted_labels("coarse", "Bird", ["Owl"], ["Barn Owl"]) == ["Owl", "Barn Owl"]
    assert accepted_labels("fine", "Bird", ["Owl"], ["Barn Owl"]) == ["Barn Owl"]
    assert accepted_labels("fine", "Bird", "Owl", "Barn Owl") == ["Barn Owl"]  # a bare string is one label


def test_unknown_level_raises() -> None:
    with pytest.raises(ValueError, match="unknown level"):
        score("Answer: Owl", "species", **ROW)


def test_levels_match_schema() -> None:
    assert scoring.LEVELS == schema.LEVELS


def test_score_fields_ours() -> None:
    result = score("Attributes: ear tufts. Answer: It is a Great Horned Owl.", "fine", **ROW)
    assert result == Score(em=1.0, strict_em=0.0, f1=pytest.approx(0.75), answer="It is a Great Horned Owl.")


def test_score_markers_differ_between_rule_sets() -> None:
    prediction = "Answer: Barn Owl? On reflection, Answer: Great Horned Owl"
    assert score(prediction, "fine", **ROW).em == 1.0
    assert score(prediction, "fine", **ROW).strict_em == 1.0
    original = score(prediction, "fine", **ROW, finer_original=True)
    assert original.answer == "Barn Owl? On reflection, Answer: Great Horned Owl"
    assert original.strict_em == 0.0
    # The gold lies within the first 20 words, so the original still gives EM.
    assert original.em == 1.0


def test_score_original_substring_rule() -> None:
    row = {"superordinate": "Bird", "coarse": ["Ani"], "fine": ["Groove-billed Ani"]}
    assert score("Answer: an animal", "coarse", **row).em == 0.0
    assert score("Answer: an animal", "coarse", **row, finer_original=True).em == 1.0


def test_score_is_frozen() -> None:
    result = score("Answer: Owl", "coarse", **ROW)
    with pytest.raises(AttributeError):
        result.em = 0.0  # type: ignore[misc]


# --- choice letters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "k", "expected"),
    [
        ("(B)", 5, "B"),
        ("[b]", 5, "B"),
        ("Answer: (C) Northern Cardinal", 5, "C"),
        ("B.", 5, "B"),
        ("b)", 5, "B"),
        ("D: Barn Owl", 5, "D"),
        ("E", 5, "E"),
        ("B\nIt has ear tufts.", 5, "B"),  # a letter alone on the first line
        ("Answer: a", 5, "A"),
        ("A.", 5, "A"),
        ("The answer is B", 5, "B"),
        ("I think the answer is: c.", 5, "C"),
        ("Option C", 5, "C"),
        ("I pick choice d, the owl", 5, "D"),
        ("Option A is the owl", 5, "A"),
        ("Of the options, (B) fits best", 5, "B"),  # the plural "options" names no option S
        ("(A) Robin (B) Owl. Answer: (B)", 5, "B"),  # after the last marker
        ("Answer: B. The answer is B", 5, "B"),  # the same letter twice is no hedge
        ("A bird", 5, None),  # the article, not option A
        ("a bird with ear tufts", 5, None),
        ("The answer is a bird", 5, None),
        ("The answer is A bird", 5, None),
        ("A or B", 5, None),  # a hedge
        ("Answer: (B) or (C)", 5, None),
        ("Option B or C", 5, None),
        ("The answer is B and a red crest", 5, "B"),  # "a red crest" is no second letter
        ("F", 5, None),  # outside the five choices
        ("(E)", 4, None),
        ("Great Horned Owl", 5, None),
        ("bird(s)", 5, None),  # a plural in brackets is no option S
        ("Answer: (B) the bird(s) with tufts", 5, "B"),
        ("The answer is A.", 5, "A"),
        ("Answer: (B) or (A) bird", 5, None),  # a bracketed "A" is a letter, even before a word
        ("", 5, None),
    ],
)
def test_parse_choice(text: str, k: int, expected: str | None) -> None:
    assert parse_choice(text, k) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("**D**", "D"),
        ("Answer: **D**", "D"),
        ("**(D)**", "D"),
        ("__D__", "D"),
        ("*D*", "D"),
        ("_D_", "D"),
        ("**D.** Barn Owl", "D"),
        ("**Answer:** B", "B"),
        ("The answer is **C**.", "C"),
        ("**Option C**", "C"),
        ("**B** or **C**", None),  # still a hedge
        ("**(B)** and **(C)**", None),
        ("**A bird**", None),  # still the article
        ("**F**", None),  # still outside the choices
    ],
)
def test_parse_choice_reads_markdown_emphasis(text: str, expected: str | None) -> None:
    """Chat models bold their letter; the emphasis must neither hide a letter nor turn a hedge into one."""
    assert parse_choice(text, 5) == expected


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [("Answer: (B)", "B", 1.0), ("Answer: (B)", "b", 1.0), ("Answer: (C)", "B", 0.0), ("A or B", "A", 0.0)],
)
def test_score_choice(prediction: str, gold: str, expected: float) -> None:
    assert score_choice(prediction, gold, 5) == expected


@pytest.mark.parametrize(("gold", "k"), [("F", 5), ("AB", 5), ("", 5)])
def test_score_choice_rejects_bad_gold(gold: str, k: int) -> None:
    with pytest.raises(ValueError, match="gold"):
        score_choice("Answer: A", gold, k)


@pytest.mark.parametrize("k", [0, 27])
def test_parse_choice_rejects_bad_k(k: int) -> None:
    with pytest.raises(ValueError, match="k must be"):
        parse_choice("A", k)
