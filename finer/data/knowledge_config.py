"""`KnowledgeOptions`, the knowledge step's config, and the choices it checks: apart from
`finer.data.knowledge` so that `finer --help` shows its defaults without importing the engine's libraries
(`openai`, `datasets`); `finer.data.knowledge` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finer.errors import FinerError
from finer.models.client_config import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S, endpoint_configured
from finer.models.images import DEFAULT_MAX_IMAGE_SIDE

__all__ = ["BACKENDS", "EXTRACTORS", "KnowledgeOptions", "default_extractor"]

EXTRACTORS = ("llm", "vlm", "rules", "cub-annotations")
BACKENDS = ("openai", "hf")


def default_extractor(base_url: str | None) -> str:
    """Pick "llm" when an endpoint is configured (argument, OPENAI_BASE_URL, OPENAI_API_KEY), else "rules".

    The caller says loudly when this falls back to "rules" and records it in build.json.
    """
    return "llm" if endpoint_configured(base_url) else "rules"


@dataclass
class KnowledgeOptions:
    """Where knowledge and attributes come from (the `finer build` options of docs/design.md §4)."""

    extractor: str | None = None  # None: "llm" when an endpoint is configured, else "rules"
    model: str | None = None
    base_url: str | None = None
    concurrency: int = 16
    wiki_api: str | None = None
    wiki_lang: str = "en"
    wiki_words: int = 256
    wiki_concurrency: int = 4
    cache: Path | None = None
    prompts_dir: Path | None = None
    #: --extractor vlm: train images shown per concept, their longer side, and who answers: an endpoint
    #: ("openai") or a local model ("hf", `model` an id or path, `concurrency` its batch size).
    exemplars: int = 3
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE
    backend: str = "openai"
    #: Fetch Wikipedia text for concepts without bundled knowledge; off for `cub-annotations` offline.
    wikipedia: bool = True
    #: Per endpoint request: seconds before it is abandoned, and retries after the first try.
    timeout: float = DEFAULT_TIMEOUT_S
    max_retries: int = DEFAULT_MAX_RETRIES
    #: Your own description per concept (JSONL of {"fine": NAME, "text": ...}), read instead of Wikipedia.
    knowledge_file: Path | None = None

    def chosen_extractor(self) -> str:
        extractor = self.extractor or default_extractor(self.base_url)
        if extractor not in EXTRACTORS:
            raise FinerError(f"unknown extractor {extractor!r}; choose one of: {', '.join(EXTRACTORS)}")
        if self.backend not in BACKENDS:
            raise FinerError(f"unknown backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")
        if self.backend == "hf" and extractor != "vlm":
            raise FinerError("--backend hf runs a local VLM for --extractor vlm only")
        if self.backend == "hf" and not self.model:
            raise FinerError("--backend hf needs --model ID|PATH (a local or cached vision-language model)")
        if self.exemplars < 0:
            raise FinerError("--exemplars must be 0 or more")
        return extractor
