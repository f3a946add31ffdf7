"""`BuildConfig`, what `finer build` was asked to do: apart from `finer.data.build` so that `finer --help`
shows its defaults without importing the engine's libraries (`datasets`, `openai`); `finer.data.build`
re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from finer.data.knowledge_config import KnowledgeOptions

__all__ = ["BuildConfig"]


@dataclass
class BuildConfig:
    """Everything `finer build` was asked to do; recorded in build.json."""

    source: str
    out: Path
    root: Path | None = None
    splits: list[str] | None = None
    limit_classes: int | None = None
    limit_per_class: int | None = None
    knowledge: bool | None = None  # None: on when the source has no bundled knowledge
    embed_images: bool = False
    crop_to_bbox: bool = False
    check_images: bool = True
    overwrite: bool = False
    export_finer: Path | None = None
    knowledge_options: KnowledgeOptions = field(default_factory=KnowledgeOptions)
    test_fraction: float | None = None  # imagefolder's <root>/<class>/* layout: the test share per class
