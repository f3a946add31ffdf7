"""A newcomer's first hour (issue 17): fast one-line failures, complete help, and the demo's helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: A mistake must be told in seconds: before torch and transformers load (they took 30-50 s here).
FAST_S = 15
#: Runs `finer` and then says on stdout whether torch was imported.
_RUN_AND_REPORT = """
import sys
from finer.cli import main
try:
    main(sys.argv[1:])
finally:
    print("torch loaded:", "torch" in sys.modules)
"""


def _finer(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`finer ARGS` in a fresh interpreter, offline, killed after FAST_S seconds."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    return subprocess.run(
        [sys.executable, "-c", _RUN_AND_REPORT, *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=FAST_S,
    )


def _one_error_line(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 2 with one line naming the problem, told before torch was imported."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "torch loaded: False" in result.stdout


def test_bare_finetune_says_no_output_folder_in_seconds(tmp_path: Path) -> None:
    _one_error_line(_finer(["finetune"], tmp_path), "no output folder")


def test_uncached_hub_id_offline_is_one_line_in_seconds(tmp_path: Path) -> None:
    args = ["finetune", "--output-dir", "o", "--model", "nobody/no-such-model", "--dataset", "d"]
    _one_error_line(_finer(args, tmp_path), "not in the Hugging Face cache, and HF_HUB_OFFLINE is set")
    assert not (tmp_path / "o").exists()


def test_unknown_local_family_is_one_line_in_seconds(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    args = ["finetune", "--output-dir", "o", "--model", "m", "--dataset", "d"]
    _one_error_line(_finer(args, tmp_path), "model_type 'bert', which is not in finer's family registry")


def test_no_network_is_told_without_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode but no route to the Hub: one probe, then the same one line (not a minute of retries)."""
    from finer.errors import FinerError
    from finer.models import hub_access

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # refused at once
    hub_access.hub_reachable.cache_clear()
    try:
        with pytest.raises(FinerError, match=r"the Hub is not reachable \(no network\?\)"):
            hub_access.require_obtainable("nobody/no-such-model")
    finally:
        hub_access.hub_reachable.cache_clear()
