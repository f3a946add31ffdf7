"""Imports flow one way: `finer.train` may use the core, the core never uses `finer.train`, and no module
imports itself back through others (function-level imports count: a cycle hidden in a function is still one).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Where each installed package's modules live (pyproject's package-dir).
PACKAGE_DIRS = {"finer": ROOT / "finer", "finer.builders": ROOT / "builders", "finer.train": ROOT / "train"}
#: The command line wires every layer together; it alone may import the trainers.
ENTRY_POINTS = {"finer.cli", "finer.__main__"}
#: Libraries only the engines need: `finer --help` and a mistyped option must not wait seconds for them.
HEAVY = ("datasets", "openai", "torch", "transformers", "trl", "peft", "pandas", "pyarrow")


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "finer" and parts[0] in {"builders", "train"}:
                continue
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every finer module `name` imports, at any depth of the file (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    # `import finer` reads the version; the package's lazy `load_adapter` re-export is not a dependency.
    return {t for t in targets if t in MODULES and t not in {name, "finer"}}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_walk_finds_the_layers() -> None:
    assert {"finer.cli", "finer.models.families", "finer.train.sft", "finer.builders.cub200"} <= set(MODULES)
    assert "finer.models.families" in GRAPH["finer.train.sft"] or any(
        "finer.models" in target for target in GRAPH["finer.train.sft"]
    )


@pytest.mark.parametrize(
    "name", sorted(n for n in MODULES if not n.startswith("finer.train") and n not in ENTRY_POINTS)
)
def test_core_never_imports_the_trainers(name: str) -> None:
    trainers = sorted(t for t in GRAPH[name] if t == "finer.train" or t.startswith("finer.train."))
    assert not trainers, f"{name} imports {trainers}: move what it needs into the core"


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over the import graph: every component must be one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert not cycles, f"import cycles: {cycles}"


def test_the_command_line_loads_no_engine_library() -> None:
    """`import finer.cli` (every `finer --help`, every CLI mistake) imports none of `HEAVY`: the CLI takes
    its defaults from the light config modules, and the engines import the libraries when they run."""
    code = f"import sys, finer.cli; print(*[m for m in {HEAVY!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert not result.stdout.split(), f"import finer.cli loads {result.stdout.split()}"
