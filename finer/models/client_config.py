"""The client layer's defaults, apart from `finer.models.client` so that the configs that default to them
(and `finer --help`, which shows them) need not import `openai`; `finer.models.client` re-exports them.
"""

from __future__ import annotations

import os

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_MODEL",
    "DEFAULT_TIMEOUT_S",
    "endpoint_configured",
]

DEFAULT_MODEL = "gpt-4o-mini"
#: Seconds one request may take before it is abandoned (and retried): long enough for a slow local VLM
#: reading images, short enough that a hanging endpoint shows within minutes (`--timeout`).
DEFAULT_TIMEOUT_S = 120.0
#: Retries after the first try (`--max-retries`): the client's backoff rides out a hosted API's rate limits.
DEFAULT_MAX_RETRIES = 3
DEFAULT_CONCURRENCY = 16


def endpoint_configured(base_url: str | None) -> bool:
    """Whether the user pointed us at an LLM endpoint (argument, OPENAI_BASE_URL or OPENAI_API_KEY)."""
    return bool(base_url or os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_KEY"))
