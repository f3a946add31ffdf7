"""Append-only JSON Lines files that survive a kill: what `finer eval` and `finer ground` resume from.

Each finished answer is one line, flushed at once, so a crash loses at most what was in flight. A kill
can tear the last line: reading skips it, and the first append cuts it off, so the next record starts on
a fresh line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["AppendLog"]

_CHUNK = 1 << 16


class AppendLog:
    """One JSON object per line at `path`; `records()` reads back the whole lines, `write()` appends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None

    def records(self) -> Iterator[dict[str, Any]]:
        """The objects of the file's whole lines (a torn last line and unreadable lines skipped)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it; the first write opens the file, cutting a torn last line."""
        if self._fh is None:
            self._cut_torn_tail()
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _cut_torn_tail(self) -> None:
        """Truncate the file after its last newline (reading back from the end, a chunk at a time)."""
        if not self.path.exists():
            return
        with open(self.path, "r+b") as fh:
            end = fh.seek(0, 2)
            while end > 0:
                start = max(0, end - _CHUNK)
                fh.seek(start)
                newline = fh.read(end - start).rfind(b"\n")
                if newline >= 0:
                    fh.truncate(start + newline + 1)
                    return
                end = start
            fh.truncate(0)
