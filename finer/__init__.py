"""finer: attribute-grounded fine-grained recognition with vision-language models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finer.models.loading import load_adapter

__version__ = "0.1.0"
__all__ = ["__version__", "load_adapter"]


def __getattr__(name: str) -> Any:
    """`finer.load_adapter` imports torch, transformers and peft only when first used."""
    if name == "load_adapter":
        from finer.models.loading import load_adapter

        return load_adapter
    raise AttributeError(f"module 'finer' has no attribute {name!r}")
