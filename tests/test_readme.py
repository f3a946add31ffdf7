"""The README's commands run as written, so it cannot drift from the code.

Every ```bash block of README.md carries a marker comment on the line before it:
`<!-- ci: run -->` (this test runs it) or `<!-- ci: skip: why -->` (a real dataset, a GPU, an API key, or
minutes of CPU that other tests cover with fewer steps). The blocks marked `run` are run in README order, as
a newcomer would after the set-up commands, in a copy of the repository that shares this checkout's `.venv`.
The set-up block's `make test` line is this suite itself and is not run again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!-- ci: (run|skip)(?:: ([^>]*?))? -->\s*$")
#: Per block; the slowest (make finetune) takes about 2.5 min on a busy two-core machine.
BLOCK_TIMEOUT_S = 900


def _blocks() -> list[tuple[str, str, str]]:
    """(kind, reason, text) of every bash block, the kind read from the line before the fence."""
    blocks = []
    for match in FENCE.finditer(README):
        before = README[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        kind, reason = (marker.group(1), marker.group(2) or "") if marker else ("", "")
        blocks.append((kind, reason, match.group(1)))
    return blocks


BLOCKS = _blocks()


def test_every_block_says_whether_ci_runs_it() -> None:
    assert BLOCKS, "no bash blocks found in README.md"
    unmarked = [text.splitlines()[0] for kind, _, text in BLOCKS if not kind]
    assert not unmarked, (
        f"bash blocks without a '<!-- ci: run -->' or '<!-- ci: skip: why -->' line: {unmarked}"
    )
    assert all(reason.strip() for kind, reason, _ in BLOCKS if kind == "skip"), "a skipped block says why"
    assert sum(kind == "run" for kind, _, _ in BLOCKS) >= 3


def _copy_checkout(dest: Path) -> None:
    """The tracked files (modification times kept, so make sees the installed stamp as current)."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
    ).stdout.split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / ".venv").symlink_to(ROOT / ".venv")


def _installed() -> bool:
    """`make install` ran since pyproject.toml last changed: make will not reinstall from the copy (which
    would point the shared editable install at it)."""
    stamp = ROOT / ".venv" / ".installed"
    return stamp.is_file() and stamp.stat().st_mtime >= (ROOT / "pyproject.toml").stat().st_mtime


@pytest.mark.slow
@pytest.mark.skipif(
    not _installed(), reason="needs the .venv that make install made, current with pyproject.toml"
)
@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout to copy")
def test_the_demo_blocks_run_as_written(tmp_path: Path) -> None:
    repo = tmp_path / "finer"
    _copy_checkout(repo)
    env = {
        **os.environ,
        "PATH": f"{repo / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",  # as `source .venv/bin/activate`
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("PYTEST_XDIST_WORKER", None)
    for kind, _, text in BLOCKS:
        if kind != "run":
            continue
        script = "\n".join(line for line in text.splitlines() if not line.startswith("make test"))
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
        )
        assert done.returncode == 0, (
            f"README block failed (exit {done.returncode}):\n{script}\n--- output (tail) ---\n"
            f"{(done.stdout + done.stderr)[-3000:]}"
        )
