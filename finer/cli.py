"""`finer` command line (DESIGN §4): thin wrappers that parse options and call the engines.

Every user-fixable problem is a `FinerError`: `main()` prints its one line and exits with status 2.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer

import finer
from finer.errors import FinerError

app = typer.Typer(
    name="finer",
    help="Attribute-grounded fine-grained recognition with vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Extractor(StrEnum):
    llm = "llm"
    vlm = "vlm"
    rules = "rules"
    cub_annotations = "cub-annotations"


class Format(StrEnum):
    direct = "direct"
    finer = "finer"


class Mode(StrEnum):
    direct = "direct"
    attrseek = "attrseek"
    probe = "probe"
    choice = "choice"


class Level(StrEnum):
    superordinate = "superordinate"
    coarse = "coarse"
    fine = "fine"
    all = "all"


class Backend(StrEnum):
    hf = "hf"
    openai = "openai"


class LlmPolicy(StrEnum):
    lora = "lora"
    full = "full"
    frozen = "frozen"


class VisionPolicy(StrEnum):
    frozen = "frozen"
    lora = "lora"
    full = "full"


class ProjectorPolicy(StrEnum):
    frozen = "frozen"
    full = "full"


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


def _not_yet(command: str, what: str) -> NoReturn:
    raise FinerError(f"finer {command} is not available yet: {what} lands in a later release")


def _split_list(values: list[str] | None) -> list[str] | None:
    """`--splits train,test` and `--splits train --splits test` both work."""
    if not values:
        return None
    return [s.strip() for v in values for s in v.split(",") if s.strip()]


@app.command()
def build(
    source: Annotated[str, typer.Argument(help="demo, cub200, nabirds, stanford-dogs, stanford-cars, …")],
    out: Annotated[Path, typer.Option(help="Folder to write the dataset into.")],
    root: Annotated[Path | None, typer.Option(help="The dataset as extracted from its archive.")] = None,
    splits: Annotated[list[str] | None, typer.Option(help="Official splits to build (default: all).")] = None,
    limit_classes: Annotated[int | None, typer.Option(min=1, help="Keep N classes (spread evenly).")] = None,
    limit_per_class: Annotated[int | None, typer.Option(min=1, help="Keep N images per class.")] = None,
    knowledge: Annotated[
        bool | None,
        typer.Option(
            "--knowledge/--no-knowledge",
            help="Fetch Wikipedia and extract attributes (default: when not bundled).",
        ),
    ] = None,
    extractor: Annotated[Extractor | None, typer.Option(help="Attribute extractor.")] = None,
    exemplars: Annotated[int, typer.Option(min=0, help="Exemplar images per concept (--extractor vlm).")] = 3,
    model: Annotated[str | None, typer.Option(help="LLM/VLM name at the endpoint.")] = None,
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible endpoint (else OPENAI_BASE_URL).")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Concurrent LLM calls.")] = 16,
    wiki_api: Annotated[str | None, typer.Option(help="MediaWiki API URL of a Wikipedia mirror.")] = None,
    wiki_lang: Annotated[str, typer.Option(help="Wikipedia language.")] = "en",
    cache: Annotated[
        Path | None, typer.Option(help="Cache folder for Wikipedia pages and LLM replies.")
    ] = None,
    embed_images: Annotated[bool, typer.Option(help="Store image bytes instead of file references.")] = False,
    crop_to_bbox: Annotated[bool, typer.Option(help="Crop images to their bounding box.")] = False,
    check_images: Annotated[
        bool, typer.Option("--check-images/--no-check-images", help="Open every image and skip broken ones.")
    ] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    export_finer: Annotated[
        Path | None, typer.Option(help="Also write the original FINER files here.")
    ] = None,
    push_to_hub: Annotated[str | None, typer.Option(help="Publish to this Hub dataset repo.")] = None,
    private: Annotated[bool, typer.Option(help="Make the Hub repo private.")] = False,
) -> None:
    """Turn a fine-grained dataset on disk into image-attribute-label rows (DESIGN §3)."""
    from finer.build import BuildConfig
    from finer.build import build as run_build

    if extractor is not None or model or base_url or wiki_api or cache:
        if knowledge is False:
            raise FinerError("--extractor/--model/--base-url/--wiki-api/--cache need --knowledge")
        _not_yet("build --knowledge", "the Wikipedia and attribute-extraction step")
    if push_to_hub:
        _not_yet("build --push-to-hub", "publishing to the Hub")
    summary = run_build(
        BuildConfig(
            source=source,
            out=out,
            root=root,
            splits=_split_list(splits),
            limit_classes=limit_classes,
            limit_per_class=limit_per_class,
            knowledge=knowledge,
            embed_images=embed_images,
            crop_to_bbox=crop_to_bbox,
            check_images=check_images,
            overwrite=overwrite,
            export_finer=export_finer,
        )
    )
    counts = ", ".join(f"{split} {n}" for split, n in summary["counts"].items())
    typer.echo(
        f"wrote {out}: {summary['concepts']} concepts; rows: {counts} ({summary['durations']['total_s']} s)"
    )
    for warning in summary["warnings"]:
        typer.echo(f"warning: {warning}", err=True)


@app.command()
def info(
    dataset: Annotated[Path, typer.Argument(help="A folder written by `finer build`.")],
) -> None:
    """Summarise a built dataset: rows per split and each concept's three levels."""
    from rich.console import Console
    from rich.table import Table

    from finer.build import BUILD_FILE, CONCEPTS_FILE, iter_concepts

    if not (dataset / BUILD_FILE).is_file() or not (dataset / CONCEPTS_FILE).is_file():
        raise FinerError(
            f"{dataset} is not a finished `finer build` output (no {BUILD_FILE} / {CONCEPTS_FILE})"
        )
    summary = json.loads((dataset / BUILD_FILE).read_text())
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


@app.command()
def finetune(
    model: Annotated[str, typer.Option(help="Base model id or path.")],
    dataset: Annotated[str, typer.Option(help="Built dataset folder or Hub repo.")],
    output_dir: Annotated[Path, typer.Option(help="Where checkpoints and the adapter go.")],
    config: Annotated[Path | None, typer.Option(help="Recipe YAML (train/recipes/*.yaml).")] = None,
    format: Annotated[
        Format, typer.Option(help="direct: question -> name; finer: three assistant turns.")
    ] = (Format.finer),
    train_llm: Annotated[LlmPolicy, typer.Option(help="Language model policy.")] = LlmPolicy.lora,
    train_vision: Annotated[VisionPolicy, typer.Option(help="Vision tower policy.")] = VisionPolicy.frozen,
    train_projector: Annotated[
        ProjectorPolicy, typer.Option(help="Projector policy.")
    ] = ProjectorPolicy.frozen,
    lora_r: Annotated[int, typer.Option(min=1)] = 128,
    lora_alpha: Annotated[int, typer.Option(min=1)] = 256,
    max_steps: Annotated[int | None, typer.Option(min=1)] = None,
    epochs: Annotated[float, typer.Option(min=0)] = 1.0,
    push_to_hub: Annotated[str | None, typer.Option(help="Publish the adapter to this Hub repo.")] = None,
) -> None:
    """Fine-tune a VLM with LoRA on a built dataset (TRL SFTTrainer + PEFT)."""
    _not_yet("finetune", "the TRL + PEFT fine-tuning engine")


@app.command("eval")
def evaluate(
    dataset: Annotated[str, typer.Option(help="Built dataset folder or Hub repo.")],
    out: Annotated[Path, typer.Option(help="Folder for predictions, metrics and the report.")],
    model: Annotated[str, typer.Option(help="Model id or path (hf) or model name (openai).")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    mode: Annotated[Mode, typer.Option(help="Prompt protocol.")] = Mode.direct,
    level: Annotated[Level, typer.Option(help="Label level to ask for.")] = Level.all,
    backend: Annotated[Backend, typer.Option(help="Local transformers or an OpenAI-compatible endpoint.")] = (
        Backend.hf
    ),
    adapter: Annotated[str | None, typer.Option(help="PEFT adapter id or path.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint.")] = None,
    concurrency: Annotated[int, typer.Option(min=1)] = 16,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate the first N images.")] = None,
) -> None:
    """Evaluate a model at superordinate, coarse and fine granularity."""
    _not_yet("eval", "the evaluation harness")


@app.command()
def predict(
    image: Annotated[Path, typer.Argument(help="An image file.")],
    model: Annotated[str, typer.Option(help="Model id or path.")],
    adapter: Annotated[str | None, typer.Option(help="PEFT adapter id or path.")] = None,
) -> None:
    """Name the object in one image."""
    _not_yet("predict", "single-image prediction")


@app.command()
def ground(
    dataset: Annotated[str, typer.Argument(help="Built dataset folder or Hub repo.")],
    out: Annotated[Path, typer.Option(help="Folder for the grounded dataset.")],
    model: Annotated[str, typer.Option(help="VLM id, path or endpoint model name.")],
    backend: Annotated[Backend, typer.Option(help="Local transformers or an OpenAI-compatible endpoint.")] = (
        Backend.openai
    ),
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint.")] = None,
    check_cub: Annotated[
        Path | None, typer.Option(help="CUB root, to measure against its annotations.")
    ] = None,
) -> None:
    """Mark which of each concept's attributes a VLM sees in each image."""
    _not_yet("ground", "per-image attribute grounding")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning `FinerError` into one line on stderr and exit status 2."""
    try:
        app(args=argv, prog_name="finer", standalone_mode=True)
    except FinerError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
