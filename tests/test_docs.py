"""The design notes live in the repository (docs/): every reference to them names a section that exists,
nothing points at the old design file, and no help text or message points at files a pip user does not
have (docstrings and comments, read in a checkout, may)."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
import typer

from finer.cli import app, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Folders that are not the project's own text.
SKIPPED = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}
SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".jinja", ".cfg", ".txt"}
#: A reference: "docs/design.md §3", "docs/design.md §1, §3", "docs/design.md §1.6".
REFERENCE = re.compile(r"docs/design\.md (§\d+(?:\.\d+)?(?:(?:, | and )§\d+(?:\.\d+)?)*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)")
#: What a user's help text must never name: the repository's own folders and the design notes.
CHECKOUT_ONLY = re.compile(r"docs/|DESIGN|§|prompts/|tests/|bench/")


def _project_files() -> list[Path]:
    """The project's text files, without walking into virtual environments or build outputs."""
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED and not d.endswith(".egg-info")]
        if Path(folder) == ROOT:
            subfolders[:] = [d for d in subfolders if d != "data"]  # built datasets, not the package's
        found += [Path(folder, f) for f in files if Path(f).suffix in SUFFIXES or f == "Makefile"]
    return found


def _design_sections() -> set[str]:
    """Section numbers of the design notes: "7" for "## 7. Run folders", "7.1" for "### 7.1 What …"."""
    text = (DOCS / "design.md").read_text(encoding="utf-8")
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.MULTILINE))


def test_design_notes_have_the_numbered_sections_code_refers_to() -> None:
    assert {"1", "2", "3", "4", "5", "6", "7", "8"} <= _design_sections()
    assert (DOCS / "contributing.md").is_file()


def test_every_reference_to_the_design_notes_names_a_section_that_exists() -> None:
    sections = _design_sections()
    missing = []
    for path in _project_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        cited = [s for ref in REFERENCE.findall(text) for s in SECTION.findall(ref)]
        if path.parent == DOCS:  # the notes refer to their own sections as "§n"
            cited += SECTION.findall(text)
        missing += [f"{path.relative_to(ROOT)}: §{s}" for s in cited if s not in sections and s != "n"]
    assert not missing, f"references to sections docs/design.md does not have: {missing}"


def test_nothing_points_at_the_old_design_file() -> None:
    stale = [
        str(path.relative_to(ROOT))
        for path in _project_files()
        if path.parent != DOCS
        and path != Path(__file__).resolve()
        and re.search(r"DESIGN(?: §|\.md)", path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert not stale, f"these point at a design file outside the repository: {stale}"


COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_points_at_nothing_a_pip_user_lacks(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([*([command] if command else []), "--help"])
    out = capsys.readouterr().out
    assert out.strip() and not CHECKOUT_ONLY.search(out), out


def _messages(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module that are not docstrings: messages, help texts, report text."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_no_message_names_a_checkout_only_path() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text[:80]!r}"
        for folder in ("finer", "builders", "train")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, text in _messages(path)
        if CHECKOUT_ONLY.search(text)
    ]
    assert not found, f"messages naming files a pip user does not have: {found}"
