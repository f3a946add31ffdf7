"""`finer.run_folder`: a staged output survives a SIGKILL at every step of its swap, one writer at a time.

The kills are real: a child process runs the swap with `Path.rename` / `os.unlink` patched to SIGKILL it at
step k, and the folder is inspected as the next run would find it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from finer.errors import FinerError
from finer.run_folder import (
    OutputLock,
    lock_path,
    old_path,
    partial_path,
    recover,
    staged_output,
    staged_subfolder,
    write_split_state,
)

OLD = {"data.txt": "old data", "build.json": "old summary"}
NEW = {"data.txt": "new data", "build.json": "new summary", "concepts.jsonl": "new concepts"}

# Steps of `staged_output(..., overwrite=True)` replacing OLD by NEW: 0 the body is writing the partial
# folder; 1 before `out -> .out.old`; 2 before `.out.partial -> out`; 3 before deleting `.out.old`;
# 4 halfway through deleting it.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from finer.run_folder import staged_output

    out, step = Path(sys.argv[1]), int(sys.argv[2])
    kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
    renames, unlinks = [0], [0]
    real_rename, real_unlink = Path.rename, os.unlink

    def rename(self, target):
        renames[0] += 1
        if renames[0] == step:
            kill()
        return real_rename(self, target)

    def unlink(path, *args, **kwargs):
        unlinks[0] += 1
        if step == 3 or (step == 4 and unlinks[0] == 2):
            kill()
        return real_unlink(path, *args, **kwargs)

    Path.rename, os.unlink = rename, unlink
    with staged_output(out, overwrite=True) as staged:
        for name, text in {new}.items():
            (staged.partial / name).write_text(text)
            if step == 0:
                kill()
    """
).replace("{new}", repr(NEW))


def _write(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def _read(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir()} if folder.is_dir() else {}


@pytest.mark.parametrize("step", [0, 1, 2, 3, 4])
def test_a_kill_at_any_step_of_the_swap_leaves_the_old_or_the_new_output(tmp_path: Path, step: int) -> None:
    out = tmp_path / "out"
    _write(out, OLD)
    child = subprocess.run([sys.executable, "-c", CHILD, str(out), str(step)], capture_output=True)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    found = _read(out)
    if step == 2:  # between the two renames: the old output waits whole beside, the new one whole too
        assert found == {} and _read(old_path(out)) == OLD and _read(partial_path(out)) == NEW
    else:
        assert found in (OLD, NEW)
    # The next run, before it writes anything, finds the last complete output in place and no leftovers.
    with staged_output(out, overwrite=True) as staged:
        assert _read(out) == (NEW if step >= 3 else OLD)
        assert not old_path(out).exists() and _read(staged.partial) == {}
        _write(staged.partial / "x", {"y": "z"})
    assert _read(out / "x") == {"y": "z"} and not partial_path(out).exists() and not old_path(out).exists()


def test_recover_puts_back_or_finishes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write(old_path(out), OLD)
    recover(out)  # killed between the renames
    assert _read(out) == OLD and not old_path(out).exists()
    _write(old_path(out), {"stale": "x"})
    recover(out)  # killed while deleting the replaced output
    assert _read(out) == OLD and not old_path(out).exists()


def test_refuses_a_non_empty_folder_and_keeps_it_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write(out, OLD)
    with (
        pytest.raises(FinerError, match="is not empty; pass --overwrite") as err,
        staged_output(out, overwrite=False),
    ):
        pass
    assert "\n" not in str(err.value)
    with pytest.raises(RuntimeError), staged_output(out, overwrite=True) as staged:
        (staged.partial / "half").write_text("x")
        raise RuntimeError("the run fails")
    assert _read(out) == OLD and not partial_path(out).exists() and not lock_path(out).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FinerError, match="is a file"), staged_output(tmp_path / "file", overwrite=True):
        pass


def test_a_resumable_partial_folder_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), staged_output(out, overwrite=False, resumable=True) as staged:
        (staged.partial / "results.jsonl").write_text("done\n")
        raise KeyboardInterrupt
    assert not out.exists() and _read(partial_path(out)) == {"results.jsonl": "done\n"}
    with staged_output(out, overwrite=False, resumable=True) as staged:
        assert _read(staged.partial) == {"results.jsonl": "done\n"}
    assert _read(out) == {"results.jsonl": "done\n"}


def test_staged_subfolder_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "model"
    _write(target, OLD)
    with pytest.raises(RuntimeError), staged_subfolder(target) as partial:
        _write(partial, {"half": "x"})
        raise RuntimeError
    assert _read(target) == OLD and not partial_path(target).exists()
    with staged_subfolder(target) as partial:
        _write(partial, NEW)
    assert _read(target) == NEW


HOLDER = textwrap.dedent(
    """
    import sys
    from finer.run_folder import OutputLock

    lock = OutputLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def _holder(out: Path) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline() == "locked\n"
    return child


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = _holder(out)
    try:
        with pytest.raises(FinerError) as err, staged_output(out, overwrite=True):
            pass
        message = str(err.value)
        assert f"pid {child.pid} on {socket.gethostname()}" in message and "being written" in message
        assert "\n" not in message and not partial_path(out).exists()
    finally:
        child.communicate("")
    with OutputLock(out) as lock:  # released by its holder: free again
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = _holder(out)
    child.kill()
    child.wait()
    left = json.loads(lock_path(out).read_text())
    assert left["pid"] == child.pid and left["host"] == socket.gethostname()
    with staged_output(out, overwrite=False) as staged:
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
        (staged.partial / "f").write_text("x")
    assert _read(out) == {"f": "x"}


def test_split_state_is_what_load_from_disk_reads(tmp_path: Path) -> None:
    import datasets
    from datasets.arrow_writer import ArrowWriter

    folder = tmp_path / "train"
    folder.mkdir()
    with ArrowWriter(path=str(folder / "data-00000-of-00001.arrow")) as writer:
        writer.write({"a": 1})
        writer.finalize()
    written = datasets.Dataset.from_file(str(folder / "data-00000-of-00001.arrow"), split="train")
    written.info.write_to_directory(str(folder))
    write_split_state(folder, "data-00000-of-00001.arrow", written._fingerprint, "train")
    loaded = datasets.load_from_disk(str(folder))
    assert loaded["a"] == [1] and str(loaded.split) == "train"


@pytest.mark.parametrize(
    ("files", "code", "said"),
    [
        (["checkpoint-1/x"], 2, "runs/demo-lora is incomplete"),  # what an interrupted run used to leave
        (["adapter_config.json"], 2, "runs/demo-lora is incomplete"),
        (
            ["adapter_config.json", "adapter_model.safetensors"],
            0,
            "evaluating the demo adapter runs/demo-lora",
        ),
        (None, 0, "evaluating the untrained runs/tiny-llava"),
    ],
)
def test_make_eval_names_its_model_and_refuses_an_incomplete_adapter(
    tmp_path: Path, files: list[str] | None, code: int, said: str
) -> None:
    """`make eval` never falls back to the base model silently when runs/demo-lora is there but unusable."""
    makefile = Path(__file__).parents[1] / "Makefile"
    for folder in ("data/demo", "runs/tiny-llava"):
        (tmp_path / folder).mkdir(parents=True)
    for name in files or []:
        (tmp_path / "runs" / "demo-lora" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs" / "demo-lora" / name).write_text("x")
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "stamp").write_text("")  # newer than pyproject.toml: nothing is installed
    os.utime(tmp_path / "pyproject.toml", (0, 0))
    argv = ["make", "-s", "-f", str(makefile), "eval", f"STAMP={tmp_path / 'stamp'}", "FINER=echo finer"]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (done.returncode != 0) == (code != 0), done.stdout + done.stderr
    assert said in done.stdout + done.stderr
    if code:
        assert "finer eval" not in done.stdout and done.stderr.count("make eval:") == 1
