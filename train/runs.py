"""Memory given back between runs (run folders themselves: `finer.run_folder`)."""

from __future__ import annotations

import gc

__all__ = ["release_memory"]


def release_memory() -> None:
    """Give a finished run's memory back before the next one loads a model."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
