"""Run configs filled from layered mappings (a recipe, then the command line), TRL style.

A config is a dataclass whose field names are the recipe keys (and, dashed, the CLI options). Recipes are
hand-written YAML, so a misspelt key or a value of the wrong type must fail in one line naming the key and
the mapping it came from, before anything is loaded or written.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from finer.errors import FinerError
from finer.models.families import LlmPolicy, ProjectorPolicy, VisionPolicy

__all__ = ["SourcedConfig", "TrainerConfig"]

#: What `_fit` returns for a value that does not fit a type (None is a legitimate value).
_MISMATCH = object()


class SourcedConfig:
    """Base of the training configs (`FinetuneConfig`, `GrpoConfig`, `CurriculumConfig`): `from_sources`."""

    @classmethod
    def field_names(cls) -> list[str]:
        """The field names, in declaration order: the keys a recipe may set."""
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_sources(cls, *sources: dict[str, Any], origin: tuple[str, ...] = ()) -> Self:
        """Defaults, then each mapping in turn (a recipe, then the command line); keys and types checked.

        `origin[i]` names `sources[i]` in errors ("recipe x.yaml", "command line"); dashes in keys are
        read as underscores.
        """
        values: dict[str, Any] = {}
        set_in: dict[str, int] = {}
        hints = typing.get_type_hints(cls)
        for i, source in enumerate(sources):
            where = origin[i] if i < len(origin) else "config"
            for key, value in source.items():
                name = key.replace("-", "_")
                if name not in hints:
                    raise FinerError(
                        f"{where}: unknown key {key!r}; known keys: {', '.join(cls.field_names())}"
                    )
                values[name] = _checked(where, name, hints[name], value)
                set_in[name] = i
                bad = _out_of_range(name, values[name])
                if bad:
                    raise FinerError(f"{where}: {bad}")
        if values.get("resume") and values.get("overwrite"):
            _resume_or_overwrite(values, set_in, origin)
        return cls(**values)

    def __post_init__(self) -> None:
        """The same range checks for a config built directly (a script, a test), not from mappings."""
        for name in RANGES:
            bad = _out_of_range(name, getattr(self, name, None))
            if bad:
                raise FinerError(bad)


#: Field -> (lowest allowed, True when the lowest is allowed, highest or None, the range in words). Typer
#: checks the CLI options, but a recipe or `--set` reaches the config without it; `None` (where the type
#: allows it) means "not set" and is not checked.
RANGES: dict[str, tuple[float, bool, float | None, str]] = {
    "lora_r": (1, True, None, "an integer >= 1"),
    "lora_alpha": (1, True, None, "an integer >= 1"),
    "lora_dropout": (0, True, 1, "a number from 0 up to (not including) 1"),
    "learning_rate": (0, False, None, "a number > 0"),
    "epochs": (0, False, None, "a number > 0"),
    "max_steps": (1, True, None, "an integer >= 1, or absent to train for epochs"),
    "batch_size": (1, True, None, "an integer >= 1"),
    "grad_accum": (1, True, None, "an integer >= 1"),
    "logging_steps": (1, True, None, "an integer >= 1"),
    "save_steps": (1, True, None, "an integer >= 1"),
    "save_total_limit": (1, True, None, "an integer >= 1, or absent to keep every checkpoint"),
    "seed": (0, True, None, "an integer >= 0"),
}


def _out_of_range(name: str, value: Any) -> str | None:
    """One line naming `name` and its allowed range when `value` lies outside it; None when it fits."""
    if name not in RANGES or value is None:
        return None
    low, low_allowed, high, words = RANGES[name]
    fits = (value >= low if low_allowed else value > low) and (high is None or value < high)
    return None if fits else f"{name} must be {words}, not {value!r}"


def _resume_or_overwrite(values: dict[str, Any], set_in: dict[str, int], origin: tuple[str, ...]) -> None:
    """`resume` continues the run in the output folder, `overwrite` starts it over. Set in one mapping they
    contradict each other (refused); from two, the later wins, so `--resume` keeps the checkpoints that a
    recipe's `overwrite: true` would clear."""
    resume_at, overwrite_at = set_in["resume"], set_in["overwrite"]
    if resume_at == overwrite_at:
        where = origin[resume_at] if resume_at < len(origin) else "config"
        raise FinerError(
            f"{where}: resume and overwrite together: --resume continues the run in the output folder, "
            "--overwrite starts it over; pass one"
        )
    values["overwrite" if resume_at > overwrite_at else "resume"] = False


@dataclass
class TrainerConfig(SourcedConfig):
    """What every training run sets (`FinetuneConfig`, `GrpoConfig` add their own): model, data, output
    folder, trained parts and LoRA, optimisation, checkpoints and logging. The defaults are SFT's (the FINER
    paper's LoRA recipe); `GrpoConfig` lowers the LoRA rank and learning rate.

    `None` means "decide from the machine": bf16 where the CUDA GPU supports it, gradient checkpointing on
    a CUDA GPU, TensorBoard logging when installed. `max_steps` `None` trains for `epochs`;
    `save_total_limit` `None` keeps every checkpoint. `crop_to_bbox` trains (and evaluates) on each image's
    annotated box, cropped when read (what `finer build --crop-to-bbox` would store). `tiny_model` names a
    `finer.testing` family to build at `model` when that folder is missing (the demo recipes).
    """

    model: str | None = None
    datasets: list[str] = field(default_factory=list)
    output_dir: str | None = None
    split: str = "train"
    prompts_dir: str | None = None
    crop_to_bbox: bool = False
    train_llm: LlmPolicy = "lora"
    train_vision: VisionPolicy = "frozen"
    train_projector: ProjectorPolicy = "frozen"
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    seed: int = 42
    bf16: bool | None = None
    gradient_checkpointing: bool | None = None
    report_to: str | None = None
    resume: bool = False
    overwrite: bool = False
    tiny_model: str | None = None


def _checked(where: str, name: str, hint: Any, value: Any) -> Any:
    """`value` if it fits the field's type (an int where a float goes is widened), else a one-line error."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        fitted = _fit(option, value)
        if fitted is not _MISMATCH:
            return fitted
    expected = " or ".join(_type_name(o) for o in options)
    raise FinerError(f"{where}: {name} must be {expected}, not {value!r}")


def _fit(option: Any, value: Any) -> Any:
    """`value` as a value of type `option` (recursing into lists and mappings), or `_MISMATCH`."""
    origin, args = typing.get_origin(option), typing.get_args(option)
    if option is Any:
        return value
    if option is type(None):
        return None if value is None else _MISMATCH
    if origin is Literal:
        return value if value in args else _MISMATCH
    if origin is list and isinstance(value, list):
        items = [_fit(args[0], item) for item in value]
        return _MISMATCH if any(item is _MISMATCH for item in items) else items
    if origin is dict and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        fitted = {k: _fit(args[1], v) for k, v in value.items()}
        return _MISMATCH if any(v is _MISMATCH for v in fitted.values()) else fitted
    if option is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if option in (int, str, bool) and type(value) is option:
        return value
    return _MISMATCH


def _type_name(option: Any) -> str:
    origin, args = typing.get_origin(option), typing.get_args(option)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return f"a mapping of names to {_plural(args[1])}"
    return "null" if option is type(None) else getattr(option, "__name__", str(option))


def _plural(option: Any) -> str:
    if option is Any:
        return "values"
    if typing.get_origin(option) is dict:
        return "mappings"
    return {str: "strings", float: "numbers", int: "integers", bool: "booleans"}.get(option, "values")
