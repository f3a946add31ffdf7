"""Where coarse labels come from when a source's taxonomy has none.

Sources with a real hierarchy (NABirds, FGVC-Aircraft, iNat) fill `Concept.coarse` themselves with
`coarse_source="taxonomy"`. For the rest the build engine hands the unlabelled concepts to a
`CoarseLabeller`: the offline `RuleCoarseLabeller` here (head noun for birds and dogs, body-type keywords
for cars), or an LLM labeller that implements the same protocol.
"""

from __future__ import annotations

import re
from typing import Protocol

from finer.schema import Concept


class CoarseLabeller(Protocol):
    """Fills `coarse` and `coarse_source` of concepts whose taxonomy gives no coarse label."""

    def label(self, concepts: list[Concept], rule: str | None) -> None: ...


#: Body-type keywords in Stanford Cars class names, checked in order (the first hit wins).
CAR_BODY_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("convertible", "convertible"),
    ("minivan", "van"),
    ("van", "van"),
    ("cab", "pickup"),
    ("pickup", "pickup"),
    ("suv", "SUV"),
    ("hatchback", "hatchback"),
    ("wagon", "wagon"),
    ("coupe", "coupe"),
    ("sedan", "sedan"),
)
#: Stanford Cars classes whose names carry no body-type keyword (checked against the 196 class names).
CAR_BODY_EXCEPTIONS: dict[str, str] = {
    "acura integra type r": "coupe",
    "chevrolet corvette ron fellows edition z06": "coupe",
    "chevrolet corvette zr1": "coupe",
    "chevrolet cobalt ss": "coupe",
    "fiat 500 abarth": "hatchback",
    "acura tl type-s": "sedan",
    "buick regal gs": "sedan",
    "chevrolet hhr ss": "wagon",
    "chevrolet trailblazer ss": "SUV",
    "chrysler 300 srt-8": "sedan",
    "dodge challenger srt8": "coupe",
    "dodge charger srt-8": "sedan",
    "ford ranger supercab": "pickup",
    "jaguar xk xkr": "coupe",
    "lamborghini gallardo lp 570-4 superleggera": "coupe",
}
CAR_FALLBACK = "car"

_YEAR = re.compile(r"\s+\d{4}$")


def head_noun(name: str) -> str:
    """The last word of a common name, capitalised: "Curly coated Retriever" -> "Retriever".

    Hyphenated words stay whole ("Shih-Tzu" -> "Shih-Tzu"), unlike a cut at the last hyphen.
    """
    last = re.split(r"[\s_]+", name.strip())[-1]
    return last[:1].upper() + last[1:]


def car_body_type(name: str) -> str | None:
    """The body type named in a Stanford Cars class name, or None when no keyword matches."""
    lowered = _YEAR.sub("", name.lower())
    words = set(re.split(r"[^a-z0-9]+", lowered))
    for keyword, body in CAR_BODY_KEYWORDS:
        if keyword in words:
            return body
    return CAR_BODY_EXCEPTIONS.get(lowered)


class RuleCoarseLabeller:
    """The offline labeller: deterministic, no endpoint needed."""

    def label(self, concepts: list[Concept], rule: str | None) -> None:
        for concept in concepts:
            if rule == "car-body":
                body = car_body_type(concept.name)
                concept.coarse = [body or CAR_FALLBACK]
                concept.coarse_source = "rules" if body else "rules:fallback"
            elif rule == "head-noun":
                concept.coarse = [head_noun(concept.name)]
                concept.coarse_source = "rules"
            else:
                concept.coarse = [concept.superordinate]
                concept.coarse_source = "rules:fallback"
