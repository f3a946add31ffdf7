"""What every run folder writer needs: JSON written whole or not at all, memory given back between runs."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

__all__ = ["release_memory", "write_json"]


def write_json(path: Path, value: Any) -> None:
    """Write beside, then rename: a reader never sees half a file, and a crash leaves the old one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.rename(path)


def release_memory() -> None:
    """Give a finished run's memory back before the next one loads a model."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
