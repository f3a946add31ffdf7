"""A content-addressed on-disk cache for remote calls (Wikipedia pages, LLM and VLM replies).

A key is the SHA-256 of everything that determines the answer (endpoint, model, template hash, input),
so a re-run of a finished build makes zero calls and a changed prompt never serves a stale reply. Each
entry is one JSON file written atomically (temp file + rename): a build killed with SIGKILL leaves
either a whole entry or none, and resumes from what it had.

Entries carry the cache's schema version: an entry written by a finer with another layout (or one a
caller's `valid` check rejects) is a miss that the next `put` overwrites, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_CACHE = Path(os.environ.get("FINER_CACHE", Path.home() / ".cache" / "finer"))
#: The layout of entries; raise it whenever a stored value's shape changes.
SCHEMA_VERSION = 2


def cache_key(*parts: Any) -> str:
    """SHA-256 of the parts, serialised canonically (dicts sorted, so key order never matters)."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class Cache:
    """JSON values under `root/<namespace>/<key[:2]>/<key>.json`."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else DEFAULT_CACHE
        self.hits = 0
        self.misses = 0

    def _path(self, namespace: str, key: str) -> Path:
        return self.root / namespace / key[:2] / f"{key}.json"

    def get(self, namespace: str, key: str, valid: Callable[[Any], bool] | None = None) -> Any | None:
        """The stored value, or None: missing, corrupt, of another schema version, or not `valid`."""
        try:
            with open(self._path(namespace, key), encoding="utf-8") as fh:
                entry = json.load(fh)
        except (OSError, ValueError):  # missing, unreadable, not JSON, not UTF-8
            entry = None
        fits = isinstance(entry, dict) and entry.get("finer_cache") == SCHEMA_VERSION and "value" in entry
        if not fits or (valid is not None and not valid(entry["value"])):
            self.misses += 1
            return None
        self.hits += 1
        return entry["value"]

    def put(self, namespace: str, key: str, value: Any) -> None:
        path = self._path(namespace, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"finer_cache": SCHEMA_VERSION, "value": value}, fh, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
