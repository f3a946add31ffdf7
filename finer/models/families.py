"""The model-family registry: where each VLM keeps its parts, which chat template trains it, and how the
`--train-llm / --train-vision / --train-projector` policies become a PEFT configuration.

PEFT's `target_modules="all-linear"` and suffix lists (`q_proj`, `fc1`, ...) also hit the vision tower, whose
attention and MLP layers share those names. So LoRA targets here are one regular expression anchored on each
trained part's module root: LoRA on the language model can only touch modules under the language model's
root. The roots below were read from the installed transformers (5.23) modeling files and checked by
instantiating each family; a later transformers may move them, and `plan_training` then says which root is
missing instead of training the wrong modules.

To add a family: append a `Family` to `FAMILIES` with the `model_type`s of its configs, the dotted paths of
its vision tower, projector and language model in `AutoModelForImageTextToText`, and its training chat
template (TRL's, if `trl/chat_templates/` has one, else a marked one of ours in `prompts/chat_templates/`).
"""

from __future__ import annotations

import importlib.resources
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from finer.errors import FinerError

if TYPE_CHECKING:  # torch and PEFT load when a model is planned: the configs that name policies stay light
    import torch
    from peft import LoraConfig

__all__ = [
    "FAMILIES",
    "PARTS",
    "Family",
    "TrainPlan",
    "check_trainable",
    "detect_family",
    "part_of",
    "plan_training",
    "resolve_chat_template",
    "trainable_by_part",
]

logger = logging.getLogger(__name__)

LlmPolicy = Literal["lora", "full", "frozen"]
VisionPolicy = Literal["frozen", "lora", "full"]
ProjectorPolicy = Literal["frozen", "full"]
Part = Literal["vision", "projector", "llm"]
PARTS: tuple[Part, ...] = ("vision", "projector", "llm")
PART_NAMES: dict[Part, str] = {"vision": "vision tower", "projector": "projector", "llm": "language model"}

#: Prefix of our own templates in `Family.template`; anything else names a template in TRL's chat_templates/.
OURS = "finer:"


@dataclass(frozen=True)
class Family:
    """One VLM family: its config `model_type`s, module roots and training chat template.

    `projector` paths may lie inside the vision root (Qwen's merger lives in `model.visual`); they are then
    carved out of the vision tower. `llm` lists the language model's roots, the output head included.
    `template` is `finer:<file>` for a template we ship, else the name of TRL's training template, which
    TRL swaps in itself when it recognises the model's own template. `turn_end` is the text that closes an
    assistant turn in that template; it is trained with the answer.
    """

    name: str
    model_types: tuple[str, ...]
    vision: str
    projector: tuple[str, ...]
    llm: tuple[str, ...]
    template: str
    turn_end: str

    def roots(self, part: Part) -> tuple[str, ...]:
        return {"vision": (self.vision,), "projector": self.projector, "llm": self.llm}[part]


FAMILIES: tuple[Family, ...] = (
    Family(
        name="llava-1.5",
        model_types=("llava",),
        vision="model.vision_tower",
        projector=("model.multi_modal_projector",),
        llm=("model.language_model", "lm_head"),
        template=OURS + "llava_1_5_training.jinja",
        turn_end="</s>",
    ),
    Family(
        name="llava-next",
        model_types=("llava_next",),
        vision="model.vision_tower",
        projector=("model.multi_modal_projector",),
        llm=("model.language_model", "lm_head"),
        template="llava_next_training.jinja",
        turn_end="</s>",
    ),
    Family(
        name="qwen2-vl",
        model_types=("qwen2_vl",),
        vision="model.visual",
        projector=("model.visual.merger",),
        llm=("model.language_model", "lm_head"),
        template="qwen2_5_vl_training.jinja",  # Qwen2-VL ships Qwen2.5-VL's template byte for byte
        turn_end="<|im_end|>\n",
    ),
    Family(
        name="qwen2.5-vl",
        model_types=("qwen2_5_vl",),
        vision="model.visual",
        projector=("model.visual.merger",),
        llm=("model.language_model", "lm_head"),
        template="qwen2_5_vl_training.jinja",
        turn_end="<|im_end|>\n",
    ),
    Family(
        name="qwen3-vl",
        model_types=("qwen3_vl",),
        vision="model.visual",
        # DeepStack: besides the final merger, per-layer mergers feed vision features into the LLM.
        projector=("model.visual.merger", "model.visual.deepstack_merger_list"),
        llm=("model.language_model", "lm_head"),
        template="qwen3_vl_training.jinja",
        turn_end="<|im_end|>\n",
    ),
    Family(
        name="idefics3",
        model_types=("idefics3", "smolvlm"),
        vision="model.vision_model",
        projector=("model.connector",),
        llm=("model.text_model", "lm_head"),
        template="smolvlm_training.jinja",  # Idefics3-8B's own template maps to idefics3_training.jinja
        turn_end="<end_of_utterance>\n",
    ),
    Family(
        name="gemma3",
        model_types=("gemma3",),
        vision="model.vision_tower",
        projector=("model.multi_modal_projector",),
        llm=("model.language_model", "lm_head"),
        template="gemma3_training.jinja",
        turn_end="<end_of_turn>\n",
    ),
)


def detect_family(model_type: str, model: str = "") -> Family:
    """The family whose configs carry `model_type`; else a one-line `FinerError` listing the known ones."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    where = f"model {model!r} has " if model else ""
    raise FinerError(
        f"{where}model_type {model_type!r}, which is not in finer's family registry (known: {known}). "
        "To add one, append a Family (module roots of its vision tower, projector and language model, "
        "and its training chat template) to FAMILIES in finer/models/families.py"
    )


@dataclass(frozen=True)
class TrainPlan:
    """What each part's policy became: one LoRA target regex, the modules PEFT trains in full and saves."""

    family: Family
    policies: dict[Part, str]
    target_modules: str | None
    modules_to_save: tuple[str, ...]
    #: The output head shares the input embeddings' weight and both are trained in full (kept tied).
    tied_embeddings: bool = False

    def lora_config(self, r: int, alpha: int, dropout: float) -> LoraConfig:
        """PEFT config; with no LoRA part, PEFT's dummy target keeps an adapter holding only full modules."""
        from peft import LoraConfig
        from peft.utils.constants import DUMMY_TARGET_MODULES

        return LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=self.target_modules or DUMMY_TARGET_MODULES,
            modules_to_save=list(self.modules_to_save) or None,
            ensure_weight_tying=self.tied_embeddings,  # a tied head stays tied when trained in full
            task_type="CAUSAL_LM",
        )

    def describe(self) -> str:
        return ", ".join(f"{PART_NAMES[p]} {self.policies[p]}" for p in PARTS)


def _inside(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def _lora_regex(model: torch.nn.Module, family: Family, part: Part) -> str:
    """`root.(anything.)leaf` per root of `part`, leaves = names of the part's linear layers.

    A root that is itself a linear layer (the output head) gets no LoRA; projector paths nested in the vision
    tower are excluded from it by a lookahead.
    """
    import torch

    modules = dict(model.named_modules())
    roots = [r for r in family.roots(part) if not isinstance(modules[r], torch.nn.Linear)]
    carved = [c for c in family.projector if part == "vision" and _inside(c, family.vision)]
    leaves = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in modules.items()
            if isinstance(module, torch.nn.Linear)
            and any(_inside(name, root) for root in roots)
            and not any(_inside(name, c) for c in carved)
        }
    )
    exclude = "".join(f"(?!{re.escape(c[len(family.vision) + 1 :])}\\.)" for c in carved)
    alternatives = "|".join(re.escape(leaf) for leaf in leaves)
    return "|".join(f"{re.escape(root)}\\.{exclude}(?:.*\\.)?(?:{alternatives})" for root in roots)


def _full_modules(model: torch.nn.Module, family: Family, part: Part) -> list[str]:
    """Modules PEFT should train in full (`modules_to_save`) for `part`.

    PEFT wraps each in a trained copy that only its own forward uses. A whole model (the LLM, the vision
    tower) is also reached through attributes (`get_input_embeddings()` returns the frozen original's), and
    PEFT cannot wrap a ModuleList; so those are split into their children, as is a vision tower holding the
    projector, whose children other than the projector are listed.
    """
    import torch
    from transformers import PreTrainedModel

    carved = family.projector if part == "vision" else ()

    def expand(path: str) -> list[str]:
        module = model.get_submodule(path)
        if path in carved or not any(True for _ in module.parameters()):
            return []
        containers = torch.nn.ModuleList | torch.nn.ModuleDict | PreTrainedModel
        split = isinstance(module, containers) or any(_inside(c, path) for c in carved)
        if not split:
            return [path]
        if any(True for _ in module.parameters(recurse=False)):
            raise FinerError(
                f"{family.name}: {path} holds parameters of its own; it cannot be split for PEFT"
            )
        return [m for name, _ in module.named_children() for m in expand(f"{path}.{name}")]

    return [m for root in family.roots(part) for m in expand(root)]


def plan_training(
    model: torch.nn.Module,
    family: Family,
    *,
    llm: LlmPolicy = "lora",
    vision: VisionPolicy = "frozen",
    projector: ProjectorPolicy = "frozen",
) -> TrainPlan:
    """Turn the three part policies into a LoRA target regex and `modules_to_save` for this model."""
    names = {n for n, _ in model.named_modules()}
    for part in PARTS:
        missing = [r for r in family.roots(part) if r not in names]
        if missing:
            raise FinerError(
                f"{family.name}: the {PART_NAMES[part]} should live at {', '.join(missing)} but the model "
                "has no such module (did transformers move it?); fix the roots in finer/models/families.py"
            )
    policies: dict[Part, str] = {"vision": vision, "projector": projector, "llm": llm}
    if all(p == "frozen" for p in policies.values()):
        raise FinerError("nothing to train: --train-llm, --train-vision and --train-projector are all frozen")
    lora = [_lora_regex(model, family, p) for p in PARTS if policies[p] == "lora"]
    full = [m for p in PARTS if policies[p] == "full" for m in _full_modules(model, family, p)]
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    return TrainPlan(
        family=family,
        policies=policies,
        target_modules="|".join(f"(?:{r})" for r in lora) or None,
        modules_to_save=tuple(full),
        # PEFT ties the trained copies only of modules it saves in full; a LoRA-trained LM leaves both alone
        tied_embeddings=llm == "full" and head is not None and head.weight is embeddings.weight,
    )


def part_of(name: str, family: Family) -> Part | None:
    """Which part a parameter or module of the (possibly PEFT-wrapped) model belongs to."""
    name = name.removeprefix("base_model.model.")
    if any(_inside(name, root) for root in family.projector):
        return "projector"
    if _inside(name, family.vision):
        return "vision"
    if any(_inside(name, root) for root in family.llm):
        return "llm"
    return None


def trainable_by_part(model: torch.nn.Module, family: Family) -> dict[str, tuple[int, int]]:
    """(trainable, base) parameter counts per part; base counts leave out LoRA and PEFT's trained copies."""
    counts: dict[str, list[int]] = {p: [0, 0] for p in (*PARTS, "other")}
    for name, param in model.named_parameters():
        part = part_of(name, family) or "other"
        if param.requires_grad:
            counts[part][0] += param.numel()
        if "lora_" not in name and ".modules_to_save." not in name:
            counts[part][1] += param.numel()
    return {p: (t, b) for p, (t, b) in counts.items() if b or t}


def check_trainable(model: torch.nn.Module, plan: TrainPlan) -> dict[str, tuple[int, int]]:
    """Log trainable parameters per part, and refuse a model whose trainable parts differ from the plan."""
    counts = trainable_by_part(model, plan.family)
    logger.info("trainable parameters (%s):", plan.describe())
    for part, (trainable, base) in counts.items():
        label = PART_NAMES.get(part, part)  # type: ignore[call-overload]
        logger.info("  %-15s %14s trainable of %14s", label, f"{trainable:,}", f"{base:,}")
    for part in PARTS:
        trained = counts.get(part, (0, 0))[0] > 0
        if trained != (plan.policies[part] != "frozen"):
            raise RuntimeError(
                f"{PART_NAMES[part]} is {plan.policies[part]} but has {counts[part][0]} trainable"
            )
    if counts.get("other", (0, 0))[0]:
        raise RuntimeError(f"{counts['other'][0]} trainable parameters outside the family's parts")
    return counts


def _ours(file: str) -> str:
    return (importlib.resources.files("finer.prompt_templates") / "chat_templates" / file).read_text("utf-8")


def resolve_chat_template(family: Family, processor: object, override: str | Path | None = None) -> str:
    """Make `processor` train with a marked template; returns where the template came from (for the log).

    Our templates and a user's `override` are set on the processor (saved with the adapter, so inference
    renders the same text). For the other families TRL swaps its own training template in when the model's
    template is the one it knows; we ask TRL up front so that an unknown template fails here, in one line.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if override is not None:
        text = Path(override).read_text(encoding="utf-8")
        if not has_generation_markers(text):
            raise FinerError(
                f"chat template {override}: no {{% generation %}} markers around assistant turns"
            )
        processor.chat_template = text  # type: ignore[attr-defined]
        return f"user template {override}"
    if family.template.startswith(OURS):
        current = getattr(processor, "chat_template", None) or ""
        if "ASSISTANT" not in current:
            logger.warning(
                "this %s checkpoint's chat template is not LLaVA-1.5's USER/ASSISTANT format; "
                "pass --chat-template FILE.jinja if it uses another",
                family.name,
            )
        file = family.template.removeprefix(OURS)
        processor.chat_template = _ours(file)  # type: ignore[attr-defined]
        return f"finer's chat_templates/{file}"
    try:
        swapped = get_training_chat_template(processor)
    except ValueError:
        raise FinerError(
            f"the model's chat template has no {{% generation %}} markers and TRL has no training template "
            f"for it (expected the one {family.template} patches); pass --chat-template FILE.jinja (marked), "
            "like finer's own marked example, chat_templates/llava_1_5_training.jinja in the "
            "finer.prompt_templates package"
        ) from None
    if swapped is None:
        return "the model's own template (already marked)"
    import trl

    for path in sorted((Path(trl.__file__).parent / "chat_templates").glob("*_training.jinja")):
        if path.read_text(encoding="utf-8") == swapped:
            return f"TRL chat_templates/{path.name}"
    return "TRL's training template"
