"""The command line: help, version, one-line errors with exit status 2, and the packaging layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import pytest

import finer
from finer.cli import main
from finer.records import read_build_file


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("build", "finetune", "eval", "predict", "ground", "info"):
        assert command in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"finer {finer.__version__}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["build", "no-such-source", "--out", "{tmp}/o"], "unknown source 'no-such-source'; choose one of:"),
        (["build", "cub200", "--out", "{tmp}/o"], "cub200: --root is required; expected layout:"),
        (["build", "cub200", "--root", "{tmp}/missing", "--out", "{tmp}/o"], "is not a folder"),
        (["build", "demo", "--out", "/proc/finer-cannot-write/o"], "--out /proc/finer-cannot-write/o"),
        (["build", "demo", "--out", "{tmp}/o", "--extractor", "cub-annotations"], "demo has none"),
        (["build", "demo", "--out", "{tmp}/o", "--extractor", "vlm"], "--extractor vlm needs an endpoint"),
        (["build", "demo", "--out", "{tmp}/o", "--no-knowledge", "--model", "x"], "drop --no-knowledge"),
        (["eval", "--dataset", "{tmp}/d", "--out", "{tmp}/o", "--model", "m"], "no such folder"),
        (["finetune", "--dataset", "d", "--output-dir", "o", "--model", "m"], "cannot read the config"),
    ],
)
def test_bad_input_is_one_line_and_status_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_build_demo_and_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    code, stdout, _ = run(["build", "demo", "--out", str(out), "--limit-per-class", "2"], capsys)
    assert code == 0 and "wrote" in stdout
    ds = datasets.load_from_disk(str(out))
    assert {"train", "test"} <= set(ds) and ds["test"].num_rows == 16
    summary = read_build_file(out)
    assert summary == json.loads((out / "build.json").read_text())
    assert summary["knowledge"]["status"] == {"bundled": 8}
    code, stdout, _ = run(["info", str(out)], capsys)
    assert code == 0 and "Warbler" in stdout
    code, _, err = run(["info", str(tmp_path)], capsys)
    assert code == 2 and "not a finished `finer build` output" in err


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (
            lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "concepts"}),
            "lacks `concepts`",
        ),
        (
            lambda text: json.dumps({**json.loads(text), "knowledge": {"enabled": False}}),
            "lacks `knowledge.status`, `knowledge.extractors`, `knowledge.calls`, `knowledge.cache_hits`",
        ),
    ],
)
def test_info_names_a_damaged_build_file_and_the_fix(
    damage: Any, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert (
        run(["build", "demo", "--out", str(out), "--limit-per-class", "1", "--splits", "test"], capsys)[0]
        == 0
    )
    path = out / "build.json"
    path.write_text(damage(path.read_text()))
    code, _, err = run(["info", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {path}: {problem}")
    assert lines[0].endswith("; run its `finer build` again with --overwrite")


def test_no_top_level_builders_or_train_module(tmp_path: Path) -> None:
    """builders/ and train/ install only as finer.builders and finer.train (docs/design.md §2)."""
    code = (
        "import importlib.util as u, finer.builders, finer.train;"
        "print(u.find_spec('builders') is None, u.find_spec('train') is None)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.stdout.split() == ["True", "True"], result.stderr


def _commands() -> dict:
    import typer.main

    from finer.cli import app

    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("command", "config"),
    [
        ("eval", "finer.eval.engine:EvalConfig"),
        ("ground", "finer.data.grounding:GroundConfig"),
        ("build", "finer.data.knowledge:KnowledgeOptions"),
        ("export-lmms-eval", "finer.eval.lmms_eval:ExportConfig"),
        ("probe-features", "finer.eval.probes:ProbeConfig"),
        ("predict", "finer.eval.predict:PredictConfig"),
        ("compose", "finer.train.compose:ComposeConfig"),
    ],
)
def test_option_defaults_are_the_engines(command: str, config: str) -> None:
    """An option of a config field's name defaults to that field's default (the CLI copies none)."""
    import dataclasses
    import importlib

    module, name = config.split(":")
    fields = dataclasses.fields(getattr(importlib.import_module(module), name))
    engine = {f.name: f.default for f in fields if f.default not in (dataclasses.MISSING, None)}
    shown = {p.name: p.default for p in _commands()[command].params if p.name in engine}
    assert shown and not {k: (v, engine[k]) for k, v in shown.items() if str(v) != str(engine[k])}


def test_every_command_that_writes_a_folder_takes_out() -> None:
    """`--out` everywhere; the training commands keep `--output-dir` as its other spelling."""
    commands = _commands()
    writers = {n: c for n, c in commands.items() if any(p.name in ("out", "output_dir") for p in c.params)}
    assert {"build", "eval", "ground", "finetune", "grpo", "curriculum", "merge", "compose"} <= set(writers)
    for name, command in writers.items():
        opts = next(p.opts for p in command.params if p.name in ("out", "output_dir"))
        assert "--out" in opts, name
        assert name not in ("finetune", "grpo", "curriculum") or "--output-dir" in opts, name
