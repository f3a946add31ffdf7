"""A content-addressed on-disk cache for remote calls (Wikipedia pages, LLM and VLM replies).

A key is the SHA-256 of everything that determines the answer (endpoint, model, template hash, input),
so a re-run of a finished build makes zero calls and a changed prompt never serves a stale reply. Each
entry is one JSON file written atomically (temp file + rename): a build killed with SIGKILL leaves
either a whole entry or none, and resumes from what it had.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_CACHE = Path(os.environ.get("FINER_CACHE", Path.home() / ".cache" / "finer"))


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

    def get(self, namespace: str, key: str) -> Any | None:
        """The stored value, or None (a corrupt entry counts as missing and is overwritten later)."""
        try:
            with open(self._path(namespace, key), encoding="utf-8") as fh:
                value = json.load(fh)
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, namespace: str, key: str, value: Any) -> None:
        path = self._path(namespace, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(value, fh, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
