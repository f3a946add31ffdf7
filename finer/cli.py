"""`finer` command line (docs/design.md §4): thin wrappers that parse options and call the engines.

Every user-fixable problem is a `FinerError`: `main()` prints its one line and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer

import finer
from finer.builders.imagefolder import DEFAULT_TEST_FRACTION
from finer.data.build_config import BuildConfig
from finer.data.grounding_config import GroundConfig
from finer.data.knowledge_config import EXTRACTORS, KnowledgeOptions
from finer.errors import FinerError
from finer.eval.distractors import SPACES
from finer.eval.engine import BACKENDS, BATCH_CACHE, EvalConfig
from finer.eval.lmms_eval import ExportConfig
from finer.eval.predict import PredictConfig
from finer.eval.probes import ProbeConfig
from finer.eval.tasks import DISTRACTOR_KINDS, MODES
from finer.models.client_config import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S
from finer.models.images import DEFAULT_MAX_IMAGE_SIDE
from finer.schema import LEVELS
from finer.train.compose import DTYPES, ComposeConfig

app = typer.Typer(
    name="finer",
    help="Attribute-grounded fine-grained recognition with vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _choices(name: str, values: Iterable[str]) -> Any:
    """The values an engine accepts, as the choices of an option (the engine's tuple, not a copy)."""
    return StrEnum(name, {value.replace("-", "_"): value for value in values})


Extractor = _choices("Extractor", EXTRACTORS)
Mode = _choices("Mode", MODES)
Level = _choices("Level", (*LEVELS, "all"))
LabelLevel = _choices("LabelLevel", LEVELS)
BackendName = _choices("BackendName", BACKENDS)
Distractors = _choices("Distractors", DISTRACTOR_KINDS)
DistractorSpace = _choices("DistractorSpace", SPACES)
Format = _choices("Format", ("direct", "finer", "caption"))
LlmPolicy = _choices("LlmPolicy", ("lora", "full", "frozen"))
VisionPolicy = _choices("VisionPolicy", ("frozen", "lora", "full"))
ProjectorPolicy = _choices("ProjectorPolicy", ("frozen", "full"))
AttributeSource = _choices("AttributeSource", ("auto", "visible", "required"))
BatchRetry = _choices("BatchRetry", ("sync", "batch"))
PredictMode = _choices("PredictMode", ("direct", "finer"))
ExportMode = _choices("ExportMode", ("direct", "choice"))


_DISTRACTORS_HELP = (
    "Wrong options (--mode choice): siblings sharing the coarse label, then random; random; "
    "or clip, the labels nearest the gold by --distractor-model (mined once, stored beside the dataset)."
)


#: The default `finetune` and `grpo` show for an option a recipe may set (`--config`; else the config's own).
FROM_RECIPE = "from the recipe"
#: Options `finetune` and `grpo` cannot run without: given here or set by the recipe.
_NEEDED = " Required, here or in the recipe."

TIMEOUT_HELP = "Seconds an endpoint request may take before it is retried (raise it for a slow local VLM)."
RETRIES_HELP = "Retries of a failed or timed-out request (backoff; Retry-After honoured)."


BaseUrls = Annotated[
    list[str] | None,
    typer.Option(
        "--base-url",
        help="OpenAI-compatible endpoint (else OPENAI_BASE_URL); repeat it or give a comma list to spread "
        "the calls over replicas, --concurrency each.",
    ),
]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Count the calls, tokens and USD the run would spend; send nothing.")
]
Prices = Annotated[
    Path | None,
    typer.Option(help="YAML of model: {input, output} USD per million tokens (and batch_discount)."),
]
MaxCost = Annotated[
    float | None, typer.Option(min=0, help="Start no call that would take the spend past this many USD.")
]
Rpm = Annotated[float | None, typer.Option(min=1, help="Requests per minute, held by all workers together.")]
Tpm = Annotated[float | None, typer.Option(min=1, help="Tokens per minute, held by all workers together.")]
Timeout = Annotated[float, typer.Option(min=1, help=TIMEOUT_HELP)]
MaxRetries = Annotated[int, typer.Option(min=0, help=RETRIES_HELP)]
Concurrency = Annotated[int, typer.Option(min=1, help="Concurrent endpoint calls (openai, per endpoint).")]
PromptsDir = Annotated[Path | None, typer.Option(help="Your copies of the prompt templates (by file name).")]
Cache = Annotated[Path | None, typer.Option(help="Cache folder for Wikipedia pages and model replies.")]
Overwrite = Annotated[bool, typer.Option(help="Replace a non-empty --out.")]
Adapter = Annotated[str | None, typer.Option(help="PEFT adapter id or path.")]
DatasetOption = Annotated[str, typer.Option(help="Built dataset folder or Hub repo.")]
Choices = Annotated[int, typer.Option(min=2, max=26, help="Options per question (--mode choice).")]
MaxNewTokens = Annotated[int, typer.Option(min=1, help="Answer length limit (openai: max_tokens).")]
DistractorsOption = Annotated[Distractors, typer.Option(help=_DISTRACTORS_HELP)]
DistractorModel = Annotated[str, typer.Option(help="CLIP/SigLIP model for --distractors clip.")]
DistractorSpaceOption = Annotated[
    DistractorSpace, typer.Option(help="--distractors clip compares class texts, mean train images, or both.")
]


Batch = Annotated[
    bool,
    typer.Option("--batch", help="Send the calls through the OpenAI Batch API (half price, within 24 h)."),
]
BatchRetries = Annotated[
    BatchRetry, typer.Option(help="--batch: retry failed or expired calls synchronously or in a new batch.")
]
#: Exit status of a run stopped by --max-cost (2 is bad input, 1 a run with failed items).
OVER_BUDGET_EXIT = 3


def _urls(base_url: list[str] | None) -> str | None:
    """Repeated `--base-url` options as the one comma list the client takes."""
    return ",".join(base_url) if base_url else None


def _defaults(config: type) -> SimpleNamespace:
    """The engine's defaults, field by field: an option shows and uses them, never a copy."""
    return SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(config)})


BUILD, KNOWLEDGE, GROUND = _defaults(BuildConfig), _defaults(KnowledgeOptions), _defaults(GroundConfig)
EVAL, PROBE, EXPORT = _defaults(EvalConfig), _defaults(ProbeConfig), _defaults(ExportConfig)
PREDICT, COMPOSE = _defaults(PredictConfig), _defaults(ComposeConfig)


def _config(config: type, options: dict[str, Any], **values: Any) -> Any:
    """`config` from a command's options of the same names (enums as their values), then `values`."""
    names = {f.name for f in dataclasses.fields(config)}
    given = {k: (v.value if isinstance(v, StrEnum) else v) for k, v in options.items() if k in names}
    if isinstance(given.get("base_url"), list):
        given["base_url"] = _urls(given["base_url"])
    if isinstance(given.get("splits"), list):
        given["splits"] = _split_list(given["splits"])
    return config(**{**given, **values})


#: The options of a paid run (`_paid_run`).
_POLICY_OPTIONS = ("prices", "max_cost", "rpm", "tpm")
#: The options every command that calls an endpoint takes (build, ground, eval): name -> (type, default).
ENDPOINT_OPTIONS: dict[str, tuple[Any, Any]] = {
    "base_url": (BaseUrls, None),
    "timeout": (Timeout, DEFAULT_TIMEOUT_S),
    "max_retries": (MaxRetries, DEFAULT_MAX_RETRIES),
    "dry_run": (DryRun, False),
    "prices": (Prices, None),
    "max_cost": (MaxCost, None),
    "rpm": (Rpm, None),
    "tpm": (Tpm, None),
}
#: `--batch` and its retry rule (build, ground, eval).
BATCH_OPTIONS: dict[str, tuple[Any, Any]] = {
    "batch": (Batch, False),
    "batch_retry": (BatchRetries, BatchRetry.sync),
}


def _shared_options(
    *groups: dict[str, tuple[Any, Any]], head: dict[str, tuple[Any, Any]] | None = None
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Add the options of `groups` (after the command's own; `head`'s before them), declared once, to a
    command that takes them as `**shared`."""

    def options(group: dict[str, tuple[Any, Any]]) -> list[inspect.Parameter]:
        keyword = inspect.Parameter.KEYWORD_ONLY
        return [inspect.Parameter(n, keyword, annotation=kind, default=d) for n, (kind, d) in group.items()]

    def add(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        own = [
            p.replace(kind=p.KEYWORD_ONLY) for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD
        ]
        added = options(head or {}) + [p for group in groups for p in options(group)]
        first = len(head or {})
        command.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=added[:first] + own + added[first:]
        )
        command.__annotations__ = {**command.__annotations__, **{p.name: p.annotation for p in added}}
        return command

    return add


def _options(params: dict[str, Any]) -> dict[str, Any]:
    """A command's own options and its `**shared` ones, in one mapping."""
    return {**{k: v for k, v in params.items() if k != "shared"}, **params.get("shared", {})}


@contextmanager
def _paid_run(options: dict[str, Any]) -> Iterator[tuple[Path, Any]]:
    """The run's policy (`--prices`, `--max-cost`, `--rpm`, `--tpm`) active for every client it opens, and
    the folder it writes. `--dry-run` writes into a scratch folder, prints the projection and exits 0;
    a step that stops because no call was answered (every one was counted instead) ends the dry run there."""
    from finer.models.policy import RunPolicy, use_policy
    from finer.run_folder import carry_progress

    out = options["out"]
    limits = {name: options[name] for name in _POLICY_OPTIONS}
    policy = RunPolicy.from_options(dry_run=options["dry_run"], **limits)
    stopped: FinerError | None = None
    with use_policy(policy):
        if policy.projection is None:
            try:
                yield out, policy
            except FinerError:
                _stop_if_over_budget(policy)  # a step with every call refused by --max-cost
                raise
            return
        with tempfile.TemporaryDirectory(prefix="finer-dry-run-") as scratch:
            carry_progress(out, Path(scratch) / "out")  # what --out has answered is not projected again
            try:
                yield Path(scratch) / "out", policy
            except FinerError as err:
                if not policy.projection.steps:
                    raise
                stopped = err
    _print_projection(policy.projection.to_json(policy.prices))
    if stopped is not None and "--dry-run" not in str(stopped):
        typer.echo(f"note: the dry run stopped early ({stopped}); later steps are not projected")
    raise typer.Exit(0)


def _print_projection(projected: dict[str, Any]) -> None:
    """The dry run's projection, one line per step (template @ model) and the total."""
    typer.echo(f"dry run: nothing was sent (prices: {projected['prices']})")
    for name, step in projected["steps"].items():
        estimate = "" if step["text_tokens_counted"] == "tokenizer" else "*"
        typer.echo(
            f"  {name}: {step['calls']} calls ({step['cached_calls']} cached, free); input "
            f"{step['input_text_tokens']}{estimate} text + {step['input_image_tokens']} image tokens; output "
            f"{step['output_tokens']} tokens ({step['output_tokens_from']}); {step['usd']} USD"
        )
    typer.echo(
        f"total: {projected['calls']} calls ({projected['cached_calls']} cached), "
        f"{projected['tokens']} tokens, {projected['usd']} USD"
    )
    if any(step["text_tokens_counted"] != "tokenizer" for step in projected["steps"].values()):
        typer.echo("* estimated at 4 characters a token (no tokenizer for the model here).")
    typer.echo("Repair turns, and follow-up turns that depend on a reply, are not projected.")


def _endpoint_only(options: dict[str, Any]) -> None:
    """`--dry-run`, `--max-cost` and `--batch` are about endpoint calls: a local model (--backend hf) makes
    none."""
    if options["backend"] == BackendName.openai:
        return
    if options["dry_run"] or options["max_cost"] is not None:
        raise FinerError("--dry-run and --max-cost price endpoint calls; they need --backend openai")
    if options.get("batch"):
        raise FinerError("--batch sends endpoint calls to the OpenAI Batch API; it needs --backend openai")


def _batched(policy: Any, options: dict[str, Any], run: Any, config: Any) -> Any:
    """`run(config)`; with `--batch`, through `finer.models.batch.run_config_batched`, saying what the
    batches did."""
    if not options["batch"]:
        return run(config)
    from finer.models.batch import run_config_batched

    result, report = run_config_batched(run, config, policy, retry=options["batch_retry"].value)
    counts = report.to_json()
    typer.echo(
        f"batch: {counts['completed']} of {counts['requests']} calls answered ({counts['failed']} failed, "
        f"{counts['expired']} expired, {counts['retried_sync']} retried synchronously); "
        f"{counts['cost_usd_at_batch_price']} USD at batch price"
    )
    return result


def _stop_if_over_budget(policy: Any) -> None:
    """Exit non-zero with one line when `--max-cost` stopped the run (what was done is written)."""
    if policy.budget is not None and policy.budget.refused:
        typer.echo(f"error: {policy.budget.message()}", err=True)
        raise typer.Exit(OVER_BUDGET_EXIT)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"finer {finer.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Build image-attribute-label datasets, fine-tune VLMs with LoRA, evaluate at three granularities."""


def _source_names() -> list[str]:
    """The builders' source names without importing them (that loads `datasets`): `finer.builders.SOURCES`."""
    import importlib.util
    import pkgutil

    spec = importlib.util.find_spec("finer.builders")
    modules = pkgutil.iter_modules(spec.submodule_search_locations if spec else [])
    return sorted(
        m.name.replace("_", "-") for m in modules if m.name != "base" and not m.name.startswith("_")
    )


def _split_list(values: list[str] | None) -> list[str] | None:
    """`--splits train,test` and `--splits train --splits test` both work."""
    if not values:
        return None
    return [s.strip() for v in values for s in v.split(",") if s.strip()]


@app.command()
@_shared_options(ENDPOINT_OPTIONS, BATCH_OPTIONS)
def build(
    source: Annotated[str, typer.Argument(help=f"One of: {', '.join(_source_names())}.")],
    out: Annotated[Path, typer.Option(help="Folder to write the dataset into.")],
    root: Annotated[Path | None, typer.Option(help="The dataset as extracted from its archive.")] = None,
    splits: Annotated[list[str] | None, typer.Option(help="Official splits to build (default: all).")] = None,
    limit_classes: Annotated[int | None, typer.Option(min=1, help="Keep N classes (spread evenly).")] = None,
    limit_per_class: Annotated[int | None, typer.Option(min=1, help="Keep N images per class.")] = None,
    test_fraction: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=1,
            help="imagefolder's <root>/<class>/* layout (no split folders): each class's share of test "
            "images, drawn with a fixed seed.",
            show_default=str(DEFAULT_TEST_FRACTION),
        ),
    ] = None,
    knowledge: Annotated[
        bool | None,
        typer.Option(
            "--knowledge/--no-knowledge",
            help="Fetch Wikipedia and extract attributes (default: when not bundled).",
        ),
    ] = None,
    extractor: Annotated[
        Extractor | None,
        typer.Option(
            help="Attribute extractor: llm (an endpoint), vlm (with images), rules (offline, over the text), "
            "cub-annotations (CUB's own labels, offline).",
            show_default="llm with an endpoint, else rules",
        ),
    ] = None,
    knowledge_file: Annotated[
        Path | None,
        typer.Option(
            help='Your own text per concept instead of Wikipedia: JSONL of {"fine": NAME, "text": ...} '
            "(offline with the rules extractor)."
        ),
    ] = None,
    exemplars: Annotated[
        int, typer.Option(min=0, help="Exemplar images per concept (--extractor vlm).")
    ] = KNOWLEDGE.exemplars,
    max_image_side: Annotated[
        int, typer.Option(min=32, help="Longer side of exemplar images sent (--extractor vlm).")
    ] = DEFAULT_MAX_IMAGE_SIDE,
    backend: Annotated[
        BackendName, typer.Option(help="--extractor vlm: an OpenAI-compatible endpoint or a local model.")
    ] = KNOWLEDGE.backend,
    model: Annotated[str | None, typer.Option(help="LLM/VLM name at the endpoint.")] = None,
    concurrency: Concurrency = KNOWLEDGE.concurrency,
    wiki_api: Annotated[str | None, typer.Option(help="MediaWiki API URL of a Wikipedia mirror.")] = None,
    wiki_lang: Annotated[str, typer.Option(help="Wikipedia language.")] = KNOWLEDGE.wiki_lang,
    wiki_words: Annotated[
        int, typer.Option(min=16, help="Words of Wikipedia text kept per concept.")
    ] = KNOWLEDGE.wiki_words,
    prompts_dir: PromptsDir = None,
    cache: Cache = None,
    embed_images: Annotated[bool, typer.Option(help="Store image bytes instead of file references.")] = False,
    crop_to_bbox: Annotated[bool, typer.Option(help="Crop images to their bounding box.")] = False,
    check_images: Annotated[
        bool, typer.Option("--check-images/--no-check-images", help="Open every image and skip broken ones.")
    ] = BUILD.check_images,
    overwrite: Overwrite = False,
    export_finer: Annotated[
        Path | None, typer.Option(help="Also write the original FINER files here.")
    ] = None,
    push_to_hub: Annotated[str | None, typer.Option(help="Publish to this Hub dataset repo.")] = None,
    private: Annotated[bool, typer.Option(help="Make the Hub repo private.")] = False,
    **shared: Any,
) -> None:
    """Turn a fine-grained dataset on disk into image-attribute-label rows."""
    options = _options(locals())
    from finer.data.build import build as run_build
    from finer.data.knowledge import resolve_knowledge

    shaping = [name for name in ("model", "wiki_api", "knowledge_file") if options[name]]
    knowledge, wikipedia = resolve_knowledge(
        knowledge, extractor.value if extractor else None, [f"--{n.replace('_', '-')}" for n in shaping]
    )
    if extractor == Extractor.vlm:  # the only build step a local model (--backend hf) can take
        _endpoint_only(options)
    with _paid_run(options) as (folder, policy):
        settings = _config(
            BuildConfig,
            options,
            out=folder,
            knowledge=knowledge,
            export_finer=None if options["dry_run"] else export_finer,
            knowledge_options=_config(KnowledgeOptions, options, wikipedia=wikipedia),
        )
        summary = _batched(policy, options, run_build, settings)
    counts = ", ".join(f"{split} {n}" for split, n in summary["counts"].items())
    typer.echo(
        f"wrote {out}: {summary['concepts']} concepts; rows: {counts} ({summary['durations']['total_s']} s)"
    )
    for warning in summary["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    _stop_if_over_budget(policy)
    if push_to_hub:
        from finer.hub.datasets import push_dataset

        typer.echo(f"published {push_dataset(out, push_to_hub, private=private)}")


@app.command()
def info(
    dataset: Annotated[Path, typer.Argument(help="A folder written by `finer build`.")],
) -> None:
    """Summarise a built dataset: rows per split and each concept's three levels."""
    from rich.console import Console
    from rich.table import Table

    from finer.data.build import CONCEPTS_FILE, iter_concepts
    from finer.records import BUILD_FILE, read_build_file

    if not (dataset / BUILD_FILE).is_file() or not (dataset / CONCEPTS_FILE).is_file():
        raise FinerError(
            f"{dataset} is not a finished `finer build` output (no {BUILD_FILE} / {CONCEPTS_FILE})"
        )
    summary = read_build_file(dataset)
    table = Table(title=f"{summary['source']}: {summary['concepts']} concepts, rows {summary['counts']}")
    for column in ("concept", "superordinate", "coarse", "fine", "attributes (required)"):
        table.add_column(column)
    for concept in iter_concepts(dataset / CONCEPTS_FILE):
        table.add_row(
            concept.concept_id,
            concept.superordinate,
            " | ".join(concept.coarse),
            " | ".join(concept.fine),
            "; ".join(concept.attributes.required),
        )
    Console().print(table)


def _log_progress() -> None:
    """Training commands print the trainers' progress lines (the `finer` loggers) on stderr."""
    import logging

    log = logging.getLogger("finer")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


#: A training command's options that are not config keys.
_NOT_CONFIG = ("config", "set_", "push_to_hub", "private", "dataset")


def _trainer_settings(kind: Any, options: dict[str, Any]) -> Any:
    """A trainer config (`kind`): the `--config` recipe's values, then the options given (`None` and an
    unset flag are not given; `--dataset` fills `datasets`), then `--set` ones, checked."""
    from finer.train.sft import load_recipe

    values = {k: v for k, v in options.items() if k not in _NOT_CONFIG}
    values |= {"datasets": options["dataset"], "resume": options["resume"] or None}
    values |= {
        "overwrite": options["overwrite"] or None,
        "output_dir": options["output_dir"] and str(options["output_dir"]),
    }
    given = {k: (str(v) if isinstance(v, StrEnum) else v) for k, v in values.items() if v is not None}
    if options.get("model") is not None:
        given["tiny_model"] = None  # a recipe's tiny model is built only at the recipe's own model path
    given.update(_set_values(options["set_"]))
    recipe = options["config"]
    return kind.from_sources(
        load_recipe(recipe) if recipe else {}, given, origin=(f"recipe {recipe}", "command line")
    )


def _set_values(items: list[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` options as config values (each VALUE read as YAML: 3, 1e-4, true, [a, b])."""
    import yaml

    values: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise FinerError(f"--set {item!r}: expected KEY=VALUE")
        values[key.strip()] = yaml.safe_load(value)
    return values


def _recipe(help: str, **limits: Any) -> Any:
    """An option a recipe may set: `None` means not given, and help shows the default as the recipe's."""
    return typer.Option(help=help, show_default=FROM_RECIPE, **limits)


RecipeModel = Annotated[str | None, _recipe("Base model id or path." + _NEEDED)]
RecipeOut = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "--output-dir",
        help="Where checkpoints and the adapter go." + _NEEDED,
        show_default=FROM_RECIPE,
    ),
]
RecipeDatasets = Annotated[
    list[str] | None, _recipe("Built dataset folder or Hub repo; repeat to mix several." + _NEEDED)
]
RecipeSplit = Annotated[str | None, _recipe("Split to train on.")]
TrainLlm = Annotated[LlmPolicy | None, _recipe("Language model policy.")]
TrainVision = Annotated[VisionPolicy | None, _recipe("Vision tower policy.")]
TrainProjector = Annotated[ProjectorPolicy | None, _recipe("Projector policy.")]
LoraR = Annotated[int | None, _recipe("LoRA rank.", min=1)]
LoraAlpha = Annotated[int | None, _recipe("LoRA scaling (alpha).", min=1)]
LearningRate = Annotated[float | None, _recipe("Peak learning rate.", min=0)]
Epochs = Annotated[float | None, _recipe("Passes over the data (unless --max-steps).", min=0)]
MaxSteps = Annotated[int | None, _recipe("Stop after N optimizer steps (overrides --epochs).", min=1)]
GradAccum = Annotated[int | None, _recipe("Gradient accumulation steps.", min=1)]
TrainSeed = Annotated[int | None, _recipe("Seed of data order, LoRA initialisation and sampling.")]
RecipePromptsDir = Annotated[str | None, _recipe("Folder overriding the prompt templates.")]
Resume = Annotated[bool, typer.Option(help="Continue from the output folder's last checkpoint.")]
TrainOverwrite = Annotated[bool, typer.Option(help="Replace an earlier run in --out.")]
SetValues = Annotated[
    list[str] | None, typer.Option("--set", help="Any other config field: KEY=VALUE (YAML value).")
]


#: The options `finetune` and `grpo` both take: what to train, and where (first in help) ...
RECIPE_HEAD: dict[str, tuple[Any, Any]] = {
    "model": (RecipeModel, None),
    "dataset": (RecipeDatasets, None),
    "output_dir": (RecipeOut, None),
}
#: ... and how.
RECIPE_TRAINING: dict[str, tuple[Any, Any]] = {
    "split": (RecipeSplit, None),
    "train_llm": (TrainLlm, None),
    "train_vision": (TrainVision, None),
    "train_projector": (TrainProjector, None),
    "lora_r": (LoraR, None),
    "lora_alpha": (LoraAlpha, None),
    "learning_rate": (LearningRate, None),
    "epochs": (Epochs, None),
    "max_steps": (MaxSteps, None),
    "grad_accum": (GradAccum, None),
    "seed": (TrainSeed, None),
    "prompts_dir": (RecipePromptsDir, None),
    "resume": (Resume, False),
    "overwrite": (TrainOverwrite, False),
    "set_": (SetValues, None),
}


@app.command()
@_shared_options(RECIPE_TRAINING, head=RECIPE_HEAD)
def finetune(
    config: Annotated[
        str | None, typer.Option(help="Recipe: a YAML file or a shipped name (demo-tiny, llava-1.5-7b, ...).")
    ] = None,
    format: Annotated[
        Format | None,
        _recipe(
            "direct: question -> name; finer: three assistant turns; caption: describe -> caption "
            "(pretraining, recipe `pretrain`)."
        ),
    ] = None,
    attributes: Annotated[
        AttributeSource | None,
        _recipe("--format finer: attributes_visible (grounded), attributes_required, or auto."),
    ] = None,
    hold_out: Annotated[str | None, _recipe("Leave this source out (leave-one-dataset-out).")] = None,
    instruction_data: Annotated[
        str | None, _recipe("General instruction data to mix in: a LLaVA-style JSON with images.")
    ] = None,
    instruction_images: Annotated[
        str | None, _recipe("Folder the instruction data's image paths are relative to.")
    ] = None,
    instruction_ratio: Annotated[
        float | None, _recipe("Instruction conversations per fine-grained row (0.5).", min=0)
    ] = None,
    lora_dropout: Annotated[float | None, _recipe("Dropout on the LoRA layers.", min=0, max=1)] = None,
    batch_size: Annotated[int | None, _recipe("Per-device batch size.", min=1)] = None,
    max_length: Annotated[
        int | None, _recipe("Longer conversations are dropped (and counted), never cut.", min=1)
    ] = None,
    chat_template: Annotated[
        str | None, _recipe("A .jinja chat template with {% generation %} markers to train with.")
    ] = None,
    eval_split: Annotated[
        str | None, _recipe("After training, score fine-level generations on this split.")
    ] = None,
    push_to_hub: Annotated[str | None, typer.Option(help="Publish the adapter to this Hub repo.")] = None,
    private: Annotated[bool, typer.Option(help="With --push-to-hub: create a private repo.")] = False,
    **shared: Any,
) -> None:
    """Fine-tune a VLM with LoRA on built datasets (TRL SFTTrainer + PEFT); recipe values, then options."""
    options = _options(locals())
    from finer.train.sft import FinetuneConfig, describe_loss, run_finetune

    if push_to_hub:
        from huggingface_hub import get_token

        if not get_token():  # before training, not after
            raise FinerError("--push-to-hub: no Hugging Face token; set HF_TOKEN or run `hf auth login`")
    _log_progress()
    settings = _trainer_settings(FinetuneConfig, options)
    summary = run_finetune(settings)
    if os.environ.get("RANK", "0") != "0":  # a multi-process launch: the first process reports
        return
    trained = sum(count["trained"] for count in summary["samples"].values())
    typer.echo(
        f"wrote {settings.output_dir}: {summary['global_step']} steps on {trained} conversations "
        f"({describe_loss(summary)}, {summary['duration_s']} s)"
    )
    if push_to_hub:
        from finer.hub.model_cards import push_adapter

        typer.echo(f"published {push_adapter(settings.output_dir, push_to_hub, private)}")


@app.command("eval")
@_shared_options(ENDPOINT_OPTIONS, BATCH_OPTIONS)
def evaluate(
    dataset: DatasetOption,
    out: Annotated[Path, typer.Option(help="Folder for predictions, metrics and the report.")],
    model: Annotated[str, typer.Option(help="Model id or path (hf) or model name (openai).")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = EVAL.split,
    mode: Annotated[
        Mode, typer.Option(help="Prompt protocol; finer replays the `finetune --format finer` conversation.")
    ] = EVAL.mode,
    level: Annotated[Level, typer.Option(help="Label level to ask for.")] = EVAL.level,
    backend: Annotated[
        BackendName, typer.Option(help="Local transformers or an OpenAI-compatible endpoint.")
    ] = EVAL.backend,
    adapter: Adapter = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images per generation batch (--backend hf).")
    ] = EVAL.batch_size,
    concurrency: Concurrency = EVAL.concurrency,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate the first N images.")] = None,
    gold_parent: Annotated[
        bool, typer.Option(help='Name the gold label one level up in the question ("Which Owl …?").')
    ] = False,
    choices: Choices = EVAL.choices,
    temperature: Annotated[float, typer.Option(min=0, help="0 is greedy.")] = EVAL.temperature,
    max_new_tokens: MaxNewTokens = EVAL.max_new_tokens,
    prompts_dir: PromptsDir = None,
    finer_original: Annotated[
        bool, typer.Option(help="Score with the original FINER rules (to reproduce published numbers).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the choice distractors and of sampling.")] = EVAL.seed,
    crop_to_bbox: Annotated[
        bool, typer.Option(help="Show each image cropped to its box (as a `crop_to_bbox` recipe trained).")
    ] = False,
    distractors: DistractorsOption = EVAL.distractors,
    distractor_model: DistractorModel = EVAL.distractor_model,
    distractor_space: DistractorSpaceOption = EVAL.distractor_space,
    cache: Annotated[
        Path | None,
        typer.Option(
            help=f"Keep the endpoint's replies here, a folder per run (--batch: else OUT/{BATCH_CACHE})."
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Delete --out's earlier predictions and start afresh (needed for another dataset)."
        ),
    ] = False,
    **shared: Any,
) -> None:
    """Evaluate a model at superordinate, coarse and fine granularity (resumable; writes a report)."""
    options = _options(locals())
    from finer.eval.engine import evaluate as run_eval

    _endpoint_only(options)
    replies = cache or (out / BATCH_CACHE if options["batch"] else None)
    with _paid_run(options) as (folder, policy):
        result = _batched(policy, options, run_eval, _config(EvalConfig, options, out=folder, cache=replies))
    for run in result["runs"]:
        levels = " · ".join(f"{lv} {v['em']:.3f} (n={v['count']})" for lv, v in run["levels"].items())
        this = "  <- this run" if run["label"] == result["current"] and len(result["runs"]) > 1 else ""
        typer.echo(f"{run['label']}: modified EM {levels}{this}")
    skipped = f", skipped {result['skipped']} (unreadable image)" if result["skipped"] else ""
    done = f"asked {result['asked']}, answered {result['answered']}{skipped}"
    typer.echo(f"{done}; wrote {out}/report.md and cliff.png")
    if usage := result["usage"]:
        tokens = usage["prompt_tokens"] + usage["completion_tokens"]
        typer.echo(
            f"endpoint: {usage['calls']} calls, {tokens} tokens, est. {usage['estimated_cost_usd']} USD"
        )
    for warning in result["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    _stop_if_over_budget(policy)


@app.command()
def compare(
    dirs: Annotated[list[Path], typer.Argument(help="Folders written by `finer eval`.")],
    out: Annotated[Path | None, typer.Option(help="Also write the table (markdown) to this file.")] = None,
) -> None:
    """Put the runs of several evaluation folders side by side (direct vs attrseek, base vs adapter)."""
    from finer.eval.report import compare as compare_runs

    table = compare_runs(dirs)
    typer.echo(table, nl=False)
    if out is not None:
        out.write_text(table, encoding="utf-8")


@app.command()
def predict(
    image: Annotated[Path | None, typer.Argument(help="An image file (or --dataset DIR --index I).")] = None,
    model: Annotated[
        str | None, typer.Option(help="Model id or path (default with --adapter: the adapter's base).")
    ] = None,
    adapter: Adapter = None,
    level: Annotated[
        LabelLevel, typer.Option(help="Label level to ask for (--mode direct).")
    ] = PREDICT.level,
    mode: Annotated[
        PredictMode, typer.Option(help="direct: one question; finer: the `--format finer` conversation.")
    ] = PREDICT.mode,
    superordinate: Annotated[
        str | None, typer.Option(help='--mode finer: what the image shows in general ("Bird").')
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Answer length limit.")] = PREDICT.max_new_tokens,
    raw: Annotated[bool, typer.Option(help="Also print the whole generated text.")] = False,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="A built dataset: ask its row --index (image, box, superordinate) instead of IMAGE."
        ),
    ] = None,
    index: Annotated[int | None, typer.Option(min=0, help="Row of --dataset's --split to ask.")] = None,
    split: Annotated[str, typer.Option(help="Split of --dataset.")] = PREDICT.split,
    crop_to_bbox: Annotated[
        bool,
        typer.Option(help="Crop to the row's box (--dataset) or --box, as a `crop_to_bbox` recipe trained."),
    ] = False,
    box: Annotated[str | None, typer.Option(help="Crop to this box: X,Y,W,H in pixels.")] = None,
) -> None:
    """Name the object in one image (greedy): prints the answer after "Answer:" (finer: group, attributes,
    name)."""
    options = dict(locals())
    from finer.eval.predict import predict as run_predict

    result = run_predict(_config(PredictConfig, options))
    if result.gold is not None:
        typer.echo(f"{result.image_id}: gold {result.gold}", err=True)
    if result.group is not None:
        typer.echo(f"group: {result.group}")
        typer.echo(f"attributes: {result.attributes}")
    typer.echo(result.answer)
    if raw:
        for text in result.texts:
            typer.echo(f"raw: {text}")
    if result.truncated:
        typer.echo(f"warning: stopped at --max-new-tokens {max_new_tokens}", err=True)


@app.command()
@_shared_options(ENDPOINT_OPTIONS, BATCH_OPTIONS)
def ground(
    dataset: Annotated[str, typer.Argument(help="Built dataset folder or Hub repo.")],
    out: Annotated[Path, typer.Option(help="Folder for the grounded dataset (the input is never modified).")],
    model: Annotated[str, typer.Option(help="VLM name at the endpoint (openai), or id/path (hf).")],
    backend: Annotated[BackendName, typer.Option(help="An OpenAI-compatible endpoint or a local model.")] = (
        GROUND.backend
    ),
    concurrency: Annotated[
        int, typer.Option(min=1, help="Concurrent calls (openai, per endpoint) or batch size (hf).")
    ] = GROUND.concurrency,
    max_image_side: Annotated[
        int, typer.Option(min=32, help="Longer side of the images sent.")
    ] = GROUND.max_image_side,
    limit: Annotated[int | None, typer.Option(min=1, help="Ground the first N rows of each split.")] = None,
    splits: Annotated[list[str] | None, typer.Option(help="Splits to ground (default: all).")] = None,
    check_cub: Annotated[
        Path | None, typer.Option(help="CUB-200-2011 root: precision/recall against its image labels.")
    ] = None,
    cache: Cache = None,
    prompts_dir: PromptsDir = None,
    overwrite: Overwrite = False,
    allow_failures: Annotated[
        bool, typer.Option(help="Exit 0 although some images failed (their rows are marked 'failed').")
    ] = False,
    **shared: Any,
) -> None:
    """Mark which of each concept's attributes a VLM sees in each image (column attributes_visible)."""
    options = _options(locals())
    from finer.data.grounding import ground as run_ground

    _endpoint_only(options)
    with _paid_run(options) as (folder, policy):
        summary = _batched(policy, options, run_ground, _config(GroundConfig, options, out=folder))
    images = summary["images"]
    counts = ", ".join(f"{split} {n}" for split, n in summary["counts"].items())
    rate = summary["visible_rate"]
    typer.echo(
        f"wrote {out}: rows {counts}; {images['grounded']} images grounded, "
        f"{'no' if rate is None else f'{100 * rate:.1f}%'} of attributes visible; {summary['calls']} calls "
        f"({summary['cache_hits']} cached), {summary['prompt_tokens'] + summary['completion_tokens']} "
        f"tokens, est. {summary['estimated_cost_usd']} USD"
    )
    if (cub := summary["check_cub"]) is not None:
        scores = cub["overall"]
        typer.echo(
            f"against CUB labels: precision {scores['precision']}, recall {scores['recall']} "
            f"({scores['pairs']} image-attribute pairs); per group in {out}/report.md"
        )
    for warning in summary["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    _stop_if_over_budget(policy)
    if images["failed"] and not allow_failures:
        typer.echo(
            f"error: {images['failed']} image(s) failed; run again to retry them, or pass --allow-failures",
            err=True,
        )
        raise typer.Exit(1)


@app.command("probe-features")
def probe_features(
    model: Annotated[str, typer.Option(help="Model id or path (any family in the registry).")],
    dataset: DatasetOption,
    out: Annotated[Path, typer.Option(help="Folder for probe_features.json (an eval folder is fine).")],
    adapter: Adapter = None,
    train_split: Annotated[str, typer.Option(help="Split the probes learn from.")] = PROBE.train_split,
    test_split: Annotated[str, typer.Option(help="Split the probes are scored on.")] = PROBE.test_split,
    limit_per_class: Annotated[
        int | None, typer.Option(min=1, help="Use N images per class and split.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = PROBE.batch_size,
) -> None:
    """Linear probes on vision-tower vs post-projector features: does the projector lose fine detail?"""
    options = dict(locals())
    from finer.eval.probes import FEATURES
    from finer.eval.probes import probe_features as run_probes

    run = run_probes(_config(ProbeConfig, options))
    scores = " · ".join(
        f"{name} (dim {run['probes'][name]['dim']}) {run['probes'][name]['test_accuracy']:.3f}"
        for name in FEATURES
    )
    typer.echo(f"fine-level probe accuracy on {test_split}: {scores} · chance {run['chance']:.3f}")
    typer.echo(f"wrote {out}/probe_features.json")


@app.command("export-lmms-eval")
def export_lmms_eval(
    dataset: DatasetOption,
    out: Annotated[Path, typer.Option(help="Folder for the task (YAML, hooks module, settings).")],
    mode: Annotated[ExportMode, typer.Option(help="Free answer (direct) or k-way multiple choice.")] = (
        EXPORT.mode
    ),
    level: Annotated[LabelLevel, typer.Option(help="Label level the task asks for.")] = EXPORT.level,
    split: Annotated[str, typer.Option(help="Split lmms-eval evaluates.")] = EXPORT.split,
    task: Annotated[str | None, typer.Option(help="Task name (default finer_<dataset>_<level>).")] = None,
    choices: Choices = EXPORT.choices,
    seed: Annotated[int, typer.Option(help="Seed of the choice distractors.")] = EXPORT.seed,
    max_new_tokens: MaxNewTokens = EXPORT.max_new_tokens,
    distractors: DistractorsOption = EXPORT.distractors,
    distractor_model: DistractorModel = EXPORT.distractor_model,
    distractor_space: DistractorSpaceOption = EXPORT.distractor_space,
) -> None:
    """Write an lmms-eval task that asks our prompts and scores with our scorer."""
    options = dict(locals())
    from finer.eval.lmms_eval import export_lmms_eval as run_export
    from finer.eval.lmms_eval import run_hint

    paths = run_export(_config(ExportConfig, options))
    typer.echo(f"wrote {paths['yaml']}, {paths['hooks'].name} and {paths['settings'].name}")
    typer.echo(f"run on a CPU: {run_hint(paths['yaml'].stem, out)}")
    typer.echo(
        "  (--model: lmms-eval's class for your model's family; on a GPU leave out device=…,device_map=…)"
    )


@app.command()
def merge(
    adapter: Annotated[str, typer.Option(help="PEFT adapter id or path.")],
    out: Annotated[Path, typer.Option(help="New folder for the merged model and its processor.")],
    model: Annotated[
        str | None, typer.Option(help="Base model id or path (default: the adapter's base).")
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="Weights dtype: auto (the base checkpoint's), bfloat16, float16, float32.")
    ] = DTYPES[0],
) -> None:
    """Merge an adapter into its base model (safetensors + processor), e.g. for serving with vLLM."""
    from finer.models.loading import merge_adapter

    if dtype not in DTYPES:
        raise FinerError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if model is not None:
        from finer.models.loading import check_adapter_base

        check_adapter_base(model, adapter)
    typer.echo(f"wrote merged model to {merge_adapter(adapter, out, dtype=dtype, base_model=model)}")


@app.command()
@_shared_options(RECIPE_TRAINING, head=RECIPE_HEAD)
def grpo(
    config: Annotated[
        str | None, typer.Option(help="Recipe: a YAML file of GrpoConfig keys; options override it.")
    ] = None,
    format: Annotated[
        str | None, _recipe("open (default): the direct question at --level; choice: a --choices-way one.")
    ] = None,
    level: Annotated[str | None, _recipe("Level asked: superordinate, coarse or fine.")] = None,
    choices: Annotated[int | None, _recipe("Options per question (--format choice).", min=2, max=26)] = None,
    distractors: Annotated[
        Distractors | None, _recipe("Wrong options (--format choice); default siblings.")
    ] = None,
    distractor_model: Annotated[
        str | None, _recipe("CLIP/SigLIP model id or path for --distractors clip.")
    ] = None,
    distractor_space: Annotated[
        DistractorSpace | None, _recipe("--distractors clip: text, image or both (default text).")
    ] = None,
    reward_weights: Annotated[
        str | None, _recipe("Rewards and weights (default accuracy=0.9,format=0.1[,grounding=W]).")
    ] = None,
    num_generations: Annotated[int | None, _recipe("Completions sampled per prompt.", min=2)] = None,
    batch_size: Annotated[
        int | None, _recipe("Completions per device step; a multiple of --num-generations.", min=1)
    ] = None,
    max_completion_length: Annotated[int | None, _recipe("Tokens generated per completion.", min=1)] = None,
    report_to: Annotated[str | None, _recipe("Trainer logging: none, tensorboard, ...")] = None,
    crop_to_bbox: Annotated[bool | None, _recipe("Show each image cropped to its box (default: no).")] = None,
    **shared: Any,
) -> None:
    """GRPO with verifiable rewards (TRL GRPOTrainer + PEFT): modified EM or option letter, plus format."""
    options = _options(locals())
    from finer.train.grpo import GrpoConfig, run_grpo
    from finer.train.rewards import parse_reward_weights

    if reward_weights is not None:
        options["reward_weights"] = parse_reward_weights(reward_weights)
    settings = _trainer_settings(GrpoConfig, options)
    summary = run_grpo(settings)
    rewards = summary["rewards"]
    last = f"{rewards[-1]:.3f}" if rewards else "n/a"
    typer.echo(
        f"wrote adapter to {settings.output_dir} ({summary['global_step']} steps, last mean reward {last})"
    )


@app.command()
def curriculum(
    recipe: Annotated[
        str, typer.Argument(help="A YAML file or a shipped curriculum (demo-tiny, qwen2.5-vl-7b).")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "--output-dir", help="Output folder (default: the recipe's output_dir)."),
    ] = None,
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            help="Replace the recipe's top-level `datasets`: the data of every stage that sets none itself "
            "(nor under `defaults`), and the evaluation data unless `eval_datasets` is set; repeat."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Re-run the stages whose settings changed since they ran, and those after.")
    ] = False,
) -> None:
    """Staged post-training: SFT / GRPO stages in order, each from the last one's weights, each evaluated."""
    from finer.records import CURRICULUM_FILE
    from finer.train import curriculum as staged
    from finer.train.sft import load_recipe

    given: dict[str, object] = {"output_dir": str(out) if out else None, "datasets": dataset}
    given = {key: value for key, value in given.items() if value is not None}
    if overwrite:
        given["overwrite"] = True
    where = f"recipe {recipe}"
    recipe_map = load_recipe(recipe, staged.CURRICULA)
    settings = staged.CurriculumConfig.from_sources(recipe_map, given, origin=(where, "command line"))
    _log_progress()
    summary = staged.run_curriculum(settings, where)
    typer.echo(staged.format_table(summary), nl=False)
    typer.echo(
        f"wrote {Path(summary['output_dir']) / CURRICULUM_FILE}; final model: {summary['final_model']}"
    )


@app.command()
def compose(
    vision: Annotated[str, typer.Option(help="CLIP / SigLIP / DINOv2 vision encoder: Hub id or folder.")],
    llm: Annotated[str, typer.Option(help="Causal language model: Hub id or folder.")],
    out: Annotated[Path, typer.Option(help="New folder for the composed model and its processor.")],
    vision_feature_layer: Annotated[
        int, typer.Option(help="Hidden layer of the tower fed to the projector (-2: LLaVA's penultimate).")
    ] = COMPOSE.vision_feature_layer,
    dtype: Annotated[
        str, typer.Option(help="auto (the LLM checkpoint's), bfloat16, float16 or float32.")
    ] = COMPOSE.dtype,
    seed: Annotated[int, typer.Option(help="Seed of the new projector's initialisation.")] = COMPOSE.seed,
    overwrite: Annotated[bool, typer.Option(help="Replace a model already in --out.")] = False,
) -> None:
    """A LLaVA-style VLM from any vision encoder and causal LM, with a new two-layer MLP projector."""
    options = dict(locals())
    from finer.train.compose import compose as run_compose

    summary = run_compose(_config(ComposeConfig, options, out=str(out)))
    height, width = summary["image_size"]
    typer.echo(
        f"wrote {summary['out']}: {summary['encoder']} tower ({summary['vision_feature_select_strategy']}, "
        f"{summary['image_tokens']} image tokens at {height}x{width}) + new projector + {llm}, "
        f"{summary['dtype']}; pretrain it with `finer finetune --config pretrain --model {out}`"
    )


@app.command()
def ablate(
    grid: Annotated[Path, typer.Argument(help="Grid YAML: vision, llm, pretrain, format axes and settings.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: the grid's `out`).")] = None,
) -> None:
    """Compose, pretrain, fine-tune and evaluate every vision x LLM x pretraining x format cell."""
    from finer.train.ablate import load_grid, run_grid

    settings = load_grid(grid, out)
    _log_progress()
    result = run_grid(settings)
    typer.echo(Path(result["files"]["md"]).read_text(encoding="utf-8"), nl=False)
    typer.echo(f"wrote {result['out']}/results.md, .csv, .json and .png")
    if result["failed"]:
        typer.echo(
            f"{result['failed']} of {len(result['cells'])} cells failed (tracebacks in their error.log); "
            "run the same command again to retry them",
            err=True,
        )
        raise typer.Exit(1)


def _wide_help() -> None:
    """Lay help out at least 120 columns wide (typer's rich help reads TERMINAL_WIDTH): at 80, the option
    column was cut ("--limit-per-cl…")."""
    os.environ.setdefault("TERMINAL_WIDTH", str(max(shutil.get_terminal_size((120, 24)).columns, 120)))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning `FinerError` into one line on stderr and exit status 2."""
    _wide_help()
    try:
        app(args=argv, prog_name="finer", standalone_mode=True)
    except FinerError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except OSError as err:
        if not _out_of_space(err):
            raise
        where = err.filename or _option_value(sys.argv[1:] if argv is None else argv, "--out") or "the disk"
        typer.echo(f"error: no space left writing {where}: free space or choose another --out", err=True)
        sys.exit(2)


#: What pyarrow says for ENOSPC/EDQUOT: its OSError carries the message, not always the errno.
_FULL_DISK_WORDS = ("No space left on device", "Disk quota exceeded")


def _out_of_space(err: OSError) -> bool:
    """A full disk or an exhausted quota: the user's to fix, told in one line rather than a traceback."""
    return err.errno in (errno.ENOSPC, errno.EDQUOT) or any(words in str(err) for words in _FULL_DISK_WORDS)


def _option_value(argv: list[str], name: str) -> str | None:
    """The value given to option `name` (`--out X` or `--out=X`), for naming the folder in an error."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None
