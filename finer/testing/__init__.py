"""Offline stand-ins for what finer talks to: tiny VLMs, and fake servers in the submodules.

The tiny-VLM names are re-exported lazily, so that importing a fake server from here does not pay for torch
and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finer.testing.tiny_parts import (
        TINY_LLMS,
        TINY_VISION,
        build_tiny_llm,
        build_tiny_vision,
        tiny_part_path,
    )
    from finer.testing.tiny_vlm import (
        CHAT_TEMPLATES,
        NEEDS_TORCHVISION,
        TINY_FAMILIES,
        TINY_FOR_FAMILY,
        build_tiny_vlm,
        tiny_image,
        tiny_vlm_path,
        unavailable_reason,
    )

__all__ = [
    "CHAT_TEMPLATES",
    "NEEDS_TORCHVISION",
    "TINY_FAMILIES",
    "TINY_FOR_FAMILY",
    "TINY_LLMS",
    "TINY_VISION",
    "build_tiny_llm",
    "build_tiny_vision",
    "build_tiny_vlm",
    "qwen2_vl_parts",
    "tiny_image",
    "tiny_part_path",
    "tiny_vlm_path",
    "unavailable_reason",
]
#: Vision encoders and language models to compose (`finer compose`), from `finer.testing.tiny_parts`.
_TINY_PART_NAMES = frozenset(
    {"TINY_LLMS", "TINY_VISION", "build_tiny_llm", "build_tiny_vision", "tiny_part_path"}
)
_TINY_VLM_NAMES = frozenset(__all__) - _TINY_PART_NAMES


def __getattr__(name: str) -> Any:
    if name in _TINY_VLM_NAMES:
        return getattr(importlib.import_module("finer.testing.tiny_vlm"), name)
    if name in _TINY_PART_NAMES:
        return getattr(importlib.import_module("finer.testing.tiny_parts"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
