"""Where coarse labels come from when a source's taxonomy has none.

Sources with a real hierarchy (NABirds, FGVC-Aircraft, iNat) fill `Concept.coarse` themselves with
`coarse_source="taxonomy"`. For the rest the build engine hands the unlabelled concepts to a
`CoarseLabeller` together with the source's `CoarseRule` (its `coarse_rule` class attribute): the offline
`RuleCoarseLabeller` here applies the rule, an LLM labeller (`finer.data.attributes.LlmCoarseLabeller`)
asks a model and falls back on the rule. The rules are objects, not names: `HEAD_NOUN` here serves birds,
dogs and image folders; a source with its own vocabulary defines its rule in its own module (Stanford
Cars' body types live in `finer.builders.stanford_cars`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from finer.schema import Concept


def _superordinate(concept: Concept) -> str:
    return concept.superordinate


@dataclass(frozen=True)
class CoarseRule:
    """An offline rule that names a concept's coarse group from its fine name.

    `group` returns None where the rule cannot tell; such a concept gets `fallback` and the source
    "rules:fallback". A `decisive` rule knows a closed set of groups (car body types): an LLM labeller asks
    only about the names it cannot tell and maps each reply onto its groups. A rule that is not decisive
    (the head noun) is only a guess: the LLM is asked about every concept and the rule stands in when a
    call fails.
    """

    name: str
    group: Callable[[str], str | None]
    fallback: Callable[[Concept], str] = _superordinate
    decisive: bool = False

    def apply(self, concept: Concept) -> None:
        """Label `concept` offline: its group (source "rules"), else the fallback ("rules:fallback")."""
        group = self.group(concept.name)
        if group is None:
            concept.coarse, concept.coarse_source = [self.fallback(concept)], "rules:fallback"
        else:
            concept.coarse, concept.coarse_source = [group], "rules"

    def decided(self, name: str) -> str | None:
        """The group when the rule is decisive and knows `name`: no model needs asking."""
        return self.group(name) if self.decisive else None

    def canonical(self, reply: str) -> str:
        """A model's group name mapped onto the rule's own groups where the rule is decisive."""
        return self.decided(reply) or reply


def head_noun(name: str) -> str:
    """The last word of a common name, capitalised: "Curly coated Retriever" -> "Retriever".

    Hyphenated words stay whole ("Shih-Tzu" -> "Shih-Tzu"), unlike a cut at the last hyphen.
    """
    last = re.split(r"[\s_]+", name.strip())[-1]
    return last[:1].upper() + last[1:]


#: The last word of the fine name ("Pine Grosbeak" -> "Grosbeak"): CUB, Stanford Dogs, image folders.
HEAD_NOUN = CoarseRule("head-noun", head_noun)
#: For a source without a rule: the superordinate stands in for the coarse label.
NO_RULE = CoarseRule("none", lambda name: None)


class CoarseLabeller(Protocol):
    """Fills `coarse` and `coarse_source` of concepts whose taxonomy gives no coarse label."""

    def label(self, concepts: list[Concept], rule: CoarseRule | None) -> None: ...


class RuleCoarseLabeller:
    """The offline labeller: deterministic, no endpoint needed."""

    def label(self, concepts: list[Concept], rule: CoarseRule | None) -> None:
        for concept in concepts:
            (rule or NO_RULE).apply(concept)
