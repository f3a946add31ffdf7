"""Output folders written whole or not at all, by one run at a time (docs/design.md, run folders).

Every command that writes a folder (`finer build`, `ground`, `finetune`, `grpo`, `compose`, `curriculum`,
`ablate`) writes it through `staged_output`: the new content goes to the hidden sibling `.NAME.partial`,
and only when complete replaces `NAME` by `swap_in`, which renames the old output aside (`.NAME.old`),
renames the new one in, then deletes the old. Killed at any instant, `NAME` is the complete old output or
the complete new one, or missing while `.NAME.old` holds the old one; `recover`, run first by the next
writer, puts that back (or finishes deleting an old output already replaced).

`OutputLock` keeps a second writer out for the whole run: a `flock` on `.NAME.lock` (the kernel releases
it when its holder dies, so a lock left by a killed run is taken over), holding the holder's pid and host
for the one-line refusal. `finer eval`, which appends to its `--out` rather than replacing it, takes only
the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from finer.errors import FinerError

__all__ = [
    "RUN_FILE",
    "OutputLock",
    "Staged",
    "carry_progress",
    "check_out",
    "lock_path",
    "old_path",
    "partial_path",
    "recover",
    "staged_output",
    "staged_subfolder",
    "swap_in",
    "write_json",
    "write_split_state",
]

#: Written last into a training run's folder (`finer finetune`, `finer grpo`): what makes a run finished.
RUN_FILE = "finer_run.json"
#: What a run resumes from in its own folder (eval's answers; build and ground resume from the cache alone).
RESUME_FILES = ("predictions.jsonl",)


def carry_progress(out: Path, scratch: Path) -> None:
    """Copy what `out` has already answered into a scratch run folder (a dry run, a batch's collecting
    pass), so that those questions are neither projected nor collected again."""
    for name in RESUME_FILES:
        if (done := out / name).is_file():
            scratch.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(done, scratch / name)


def _sibling(out: Path, suffix: str) -> Path:
    return out.with_name(f".{out.name}.{suffix}")


def partial_path(out: Path) -> Path:
    """Where the new output is written before it replaces `out`."""
    return _sibling(out, "partial")


def old_path(out: Path) -> Path:
    """Where the old output waits, during a swap, until the new one is in."""
    return _sibling(out, "old")


def lock_path(out: Path) -> Path:
    """The lock file of `out`: beside it, so that it survives the swap."""
    return _sibling(out, "lock")


def write_json(path: Path, value: Any) -> None:
    """Write beside, then rename: a reader never sees half a file, and a crash leaves the old one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.replace(path)


def write_split_state(folder: Path, arrow_file: str, fingerprint: str, split: str | None) -> None:
    """The `state.json` that `datasets.load_from_disk` reads beside a split's single Arrow file (the
    splits are written with `ArrowWriter`, not `save_to_disk`, so that image files are not embedded)."""
    state = {
        "_data_files": [{"filename": arrow_file}],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": split,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def recover(out: Path) -> None:
    """Undo or finish a swap that a crash cut short: `out` missing with `.NAME.old` beside it means the
    crash came between the two renames (the old output goes back); both present means the new output was
    in and the old one was being deleted (finish deleting it)."""
    old = old_path(out)
    if not (old.exists() or old.is_symlink()):
        return
    if out.exists() or out.is_symlink():
        _remove(old)
    else:
        old.rename(out)


def swap_in(partial: Path, out: Path) -> None:
    """Replace `out` by the complete `partial` so that at every instant `out` is the complete old output
    or the complete new one (or, between the two renames, missing with the old one in `.NAME.old`, which
    `recover` puts back)."""
    old = old_path(out)
    recover(out)
    if out.exists() or out.is_symlink():
        out.rename(old)
    partial.rename(out)
    _remove(old)


def _holder(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class OutputLock:
    """One writer per output folder, for a whole run (`with OutputLock(out): ...`)."""

    def __init__(self, out: str | Path, option: str = "--out") -> None:
        self.out = Path(out).expanduser().absolute()
        self.path = lock_path(self.out)
        self.option = option
        self._fd: int | None = None

    def acquire(self) -> Self:
        """Take the lock, or raise a one-line `FinerError` naming the run that holds it."""
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise FinerError(
                f"{self.option} {self.out}: cannot create its parent folder ({err.strerror})"
            ) from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise FinerError(
                    f"{self.option} {self.out}: cannot create {self.path.name} ({err.strerror}); "
                    "choose a folder you can write to"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FinerError(self._refusal()) from None
            if self._still_at_path(fd):
                break
            os.close(fd)  # released and removed between our open and flock: lock the file there now
        os.ftruncate(fd, 0)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.write(fd, json.dumps(holder).encode("utf-8"))
        self._fd = fd
        return self

    def _still_at_path(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _refusal(self) -> str:
        holder = _holder(self.path)
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"
        return (
            f"{self.option} {self.out} is being written by another run ({who}); "
            "wait for it to finish or choose another folder"
        )

    def release(self) -> None:
        """Remove the lock file, then let go (a waiting writer re-checks that it locked the live file)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class Staged:
    """The output folder and the hidden sibling its new content is written to."""

    out: Path
    partial: Path


def check_out(out: str | Path, option: str = "--out") -> Path:
    """`out` as an absolute path, refused in one line when it is a file or its parent is not writable."""
    path = Path(out).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise FinerError(f"{option} {path} is a file; pass a folder path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FinerError(f"{option} {path}: cannot create its parent folder ({err.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise FinerError(f"{option} {path}: {path.parent} is not writable; choose a folder you can write to")
    return path


@contextmanager
def staged_output(
    out: str | Path,
    *,
    overwrite: bool,
    option: str = "--out",
    resumable: bool = False,
    check: Callable[[Path], None] | None = None,
) -> Iterator[Staged]:
    """Lock `out`, recover an interrupted swap, refuse a non-empty `out` unless `overwrite` (and then
    `check(out)`, which may refuse what is there), and yield where to write; leaving the block normally
    swaps the new content in, an exception leaves `out` as it was.

    `resumable`: the partial folder is the run's resume state (grounding's results log, training
    checkpoints), kept across runs and failures; otherwise a stale one is cleared first and a failed
    run's is removed.
    """
    path = check_out(out, option)
    partial = partial_path(path)
    with OutputLock(path, option):
        recover(path)
        if not resumable:
            _remove(partial)  # a stale one: what a killed run left
        if path.is_dir() and any(path.iterdir()):
            if not overwrite:
                raise FinerError(
                    f"{option} {path} is not empty; pass --overwrite to replace it or choose another folder"
                )
            if check is not None:
                check(path)
        partial.mkdir(parents=True, exist_ok=True)
        try:
            yield Staged(path, partial)
        except BaseException:
            if not resumable or not any(partial.iterdir()):
                shutil.rmtree(partial, ignore_errors=True)
            raise
        swap_in(partial, path)


@contextmanager
def staged_subfolder(target: Path) -> Iterator[Path]:
    """A folder a run writes inside its own (locked) output, such as a merged model: written to
    `.NAME.partial`, swapped in whole, a stale or failed partial removed."""
    partial = partial_path(target)
    recover(target)
    _remove(partial)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    swap_in(partial, target)
