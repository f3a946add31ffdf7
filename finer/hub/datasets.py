"""Publishing a built dataset on the Hugging Face Hub (`finer build … --push-to-hub REPO_ID`).

One repository gets three commits: the dataset card first (so the licence is on the repository before any
image is), then the image rows as the `default` config with every image embedded as bytes, then the
concept table as the `concepts` config. Each `push_to_hub` reads the card back and adds its own
`dataset_info` and `configs` entries to it, so the final card holds our text and the library's metadata.

The token (argument, else `HF_TOKEN` or the stored login) is handed to `huggingface_hub` and nowhere else:
it is never printed, written or put in a card, and errors are re-raised as one-line `FinerError`s with
any token-like text masked and no chained traceback that could carry a server's echo of it.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

import datasets
from huggingface_hub import HfApi, RepoUrl, get_token
from huggingface_hub.errors import HfHubHTTPError

from finer.data.build import BUILD_FILE, CONCEPTS_FILE, iter_concepts
from finer.errors import FinerError
from finer.hub.cards import CONCEPTS_CONFIG, CONCEPTS_SPLIT, dataset_card, terms_for
from finer.records import BuildRecord, read_build_file
from finer.schema import Concept

__all__ = ["concept_dataset", "push_dataset"]

#: Hub tokens and bearer headers, masked in any message even when they are not the token in use.
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{6,}|(?<=Bearer )\S+")
_HINTS = {
    401: "the Hub refused the token: set HF_TOKEN to a valid token or run `hf auth login`",
    403: "the token may not write there: use a write token with access to that namespace",
}


def require_token(token: str | None) -> str:
    """The given token, else HF_TOKEN / the stored login; checked before any work that needs it."""
    token = token or get_token()
    if not token:
        raise FinerError("no Hugging Face token: set HF_TOKEN to a write token or run `hf auth login`")
    return token


def open_repo(token: str, repo_id: str, repo_type: str, private: bool) -> tuple[HfApi, RepoUrl]:
    """Create the repository (or reuse it), refusing to publish into a public one when asked for private."""
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    if private and not api.repo_info(repo_url.repo_id, repo_type=repo_type).private:
        raise FinerError(
            f"{repo_url.repo_id} already exists and is public; --private does not change an existing "
            "repository: make it private on the Hub or choose another name"
        )
    return api, repo_url


def push_dataset(dataset_dir: Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Publish a finished build as a Hub dataset repository; returns the repository's URL."""
    folder = Path(dataset_dir).expanduser()
    build = _read_build(folder)
    concepts = list(iter_concepts(folder / CONCEPTS_FILE))
    images = datasets.load_from_disk(str(folder))
    missing = _first_missing_image(images)
    if missing:
        raise FinerError(
            f"{folder}: image file {missing} is missing; the images of a build stay where the source "
            "dataset is, so restore it (or rebuild) before pushing"
        )
    source = build["source"]
    if not terms_for(source).images_redistributable and not private:
        raise FinerError(
            f"{source}: its terms forbid distributing the dataset images; push with --private "
            "to keep a copy for your own research"
        )
    token = require_token(token)
    concept_table = concept_dataset(concepts)
    try:
        api, repo_url = open_repo(token, repo_id, "dataset", private)
        repo_id = repo_url.repo_id
        card = dataset_card(
            repo_id=repo_id,
            build=build,
            built_on=(
                datetime.fromisoformat(build["built_at"])
                if "built_at" in build
                else datetime.fromtimestamp((folder / BUILD_FILE).stat().st_mtime, UTC)
            ),
            concepts=concepts,
            image_features=images[next(iter(images))].features,
            concept_features=concept_table.features,
        )
        api.upload_file(
            path_or_fileobj=card.encode("utf-8"),
            path_in_repo="README.md",
            repo_id=repo_id,
            repo_type="dataset",
            commit_message=f"finer: dataset card ({source})",
        )
        images.push_to_hub(
            repo_id,
            token=token,
            embed_external_files=True,
            commit_message=f"finer: {source} images ({sum(build['counts'].values())} rows)",
        )
        concept_table.push_to_hub(
            repo_id,
            config_name=CONCEPTS_CONFIG,
            split=CONCEPTS_SPLIT,
            token=token,
            commit_message=f"finer: {source} concepts ({len(concepts)})",
        )
    except FinerError:
        raise
    except Exception as err:  # every failure: one line, the token masked, nothing chained
        raise FinerError(_scrub(f"pushing {folder} to {repo_id} failed: {_reason(err)}", token)) from None
    return str(repo_url)


def concept_dataset(concepts: list[Concept]) -> datasets.Dataset:
    """The concept table as a Dataset with nested features (knowledge and attributes as structs).

    `taxonomy` becomes a struct over the ranks any concept has (missing ones null); a source whose
    concepts have no taxonomy at all gets no `taxonomy` column, since Parquet cannot store an empty struct.
    """
    strings = datasets.List(datasets.Value("string"))
    text = datasets.Value("string")
    ranks = list(dict.fromkeys(rank for concept in concepts for rank in concept.taxonomy))
    features = datasets.Features(
        {
            "concept_id": text,
            "fine": strings,
            "superordinate": text,
            "coarse": strings,
            "coarse_source": text,
            **({"taxonomy": {rank: text for rank in ranks}} if ranks else {}),
            "knowledge": {
                "text": text,
                "status": text,
                "title": text,
                "url": text,
                "revision_id": datasets.Value("int64"),
                "section": text,
            },
            "attributes": {"required": strings, "likely": strings, "extractor": text, "prompt_sha256": text},
        }
    )
    rows = [concept.to_json() for concept in concepts]
    return datasets.Dataset.from_list(
        [{name: row[name] for name in features} for row in rows], features=features
    )


def _read_build(folder: Path) -> BuildRecord:
    """build.json of a finished build, or a one-line error saying what is missing."""
    if not folder.is_dir():
        raise FinerError(f"{folder} is not a folder; pass the --out folder of a `finer build`")
    for name in (BUILD_FILE, CONCEPTS_FILE, "dataset_dict.json"):
        if not (folder / name).is_file():
            raise FinerError(f"{folder} is not a finished `finer build` output (no {name}); build it first")
    return read_build_file(folder)


def _first_missing_image(images: datasets.DatasetDict) -> str | None:
    """The first image stored as a file reference whose file is gone, checked before anything is sent."""
    for split in images.values():
        for chunk in split.data.column("image").chunks:
            stored = chunk.field("bytes").is_null().to_pylist()
            for path, by_reference in zip(chunk.field("path").to_pylist(), stored, strict=True):
                if by_reference and path is not None and not os.path.isfile(path):
                    return path
    return None


def _reason(err: BaseException) -> str:
    """The first line of an error, with a hint for the Hub's refusals."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status in _HINTS:
        reason += f"; {_HINTS[status]}"
    return reason


def _scrub(text: str, token: str | None) -> str:
    """`text` with the token and anything token-like masked."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("***", text)
