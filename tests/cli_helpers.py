"""Running the `finer` command line inside a test, as a user's shell would see it."""

from __future__ import annotations

import pytest

from finer.cli import main


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `finer ARGV`; `main` always exits."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err
