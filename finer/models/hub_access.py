"""Whether a model id can be had at all, answered in a second, before torch or transformers load.

A Hub id that is neither a local folder nor in the Hugging Face cache must be downloaded. Offline
(`HF_HUB_OFFLINE=1`, or no network) transformers spends a minute and more retrying before it gives up; here
that is one line at once. The network is probed once per process, with one short request to the Hub.
"""

from __future__ import annotations

import functools
from pathlib import Path

from finer.errors import FinerError

__all__ = ["hub_reachable", "require_obtainable"]

#: Seconds the one probe of the Hub may take.
PROBE_TIMEOUT_S = 5.0


@functools.cache
def hub_reachable() -> bool:
    """One HEAD request to the Hub endpoint (proxies honoured); any HTTP answer means the network is there."""
    import httpx
    from huggingface_hub.constants import ENDPOINT

    try:
        httpx.head(ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError:
        return False
    return True


def _cached(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except ValueError:  # not a valid repo id: the loader's own error names it
        return True


def require_obtainable(model: str, what: str = "model") -> None:
    """Nothing for a local path, a cached Hub id or a reachable Hub; else a one-line `FinerError`."""
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if Path(model).expanduser().exists() or _cached(model):
        return
    if HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        reason = "the Hub is not reachable (no network?)"
    else:
        return
    raise FinerError(
        f"cannot read the config of {what} {model!r}: not a local folder, not in the Hugging Face cache, "
        f"and {reason}; download it once online (`hf download {model}`), or pass a local folder"
    )
