"""Running the `finer` command line inside a test, as a user's shell would see it."""

from __future__ import annotations

from pathlib import Path

import pytest

from finer.cli import main


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `finer ARGV`; `main` always exits."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def eval_argv(dataset: Path, out: Path, base_url: str, *extra: str, model: str = "gpt-4o-mini") -> list[str]:
    """`finer eval` of `dataset` into `out` at an OpenAI-compatible endpoint (a priced model by default,
    so costs and batch prices are numbers)."""
    return [
        *("eval", "--dataset", str(dataset), "--out", str(out), "--backend", "openai"),
        *("--model", model, "--base-url", base_url, *extra),
    ]
