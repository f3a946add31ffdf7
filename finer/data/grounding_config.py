"""`GroundConfig`, what `finer ground` was asked to do: apart from `finer.data.grounding` so that
`finer --help` shows its defaults without importing the engine's libraries (`datasets`, `openai`);
`finer.data.grounding` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finer.models.client_config import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S
from finer.models.images import DEFAULT_MAX_IMAGE_SIDE

__all__ = ["GroundConfig"]


@dataclass
class GroundConfig:
    """Everything `finer ground` was asked to do (docs/design.md §4); recorded in grounding.json."""

    dataset: str
    out: Path
    model: str
    backend: str = "openai"
    base_url: str | None = None
    #: Calls in flight (openai) or the batch size (hf).
    concurrency: int = 16
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE
    limit: int | None = None
    splits: list[str] | None = None
    check_cub: Path | None = None
    cache: Path | None = None
    prompts_dir: Path | None = None
    overwrite: bool = False
    max_new_tokens: int = 256
    progress: bool = True
    timeout: float = DEFAULT_TIMEOUT_S
    max_retries: int = DEFAULT_MAX_RETRIES
