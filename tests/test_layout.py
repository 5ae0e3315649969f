"""The package's shape (issue "a layout that shows the architecture"): no import cycles between modules, the
model package independent of training, and modules small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nvila_ft"
MAX_LINES = 520
SCHEMA_ONLY = {"train/recipe.py"}  # field declarations may run longer


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """nvila_ft modules imported at module level (imports inside functions are deliberate late imports)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name.startswith("nvila_ft"):
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {m: top_level_imports(p, modules) - {m} for m, p in files.items()}


def test_no_import_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_model_package_imports_nothing_from_training_data_or_tools():
    edges = graph()
    for m, targets in edges.items():
        if m == "nvila_ft.model" or m.startswith("nvila_ft.model."):
            outside = {t for t in targets if t != "nvila_ft.model" and not t.startswith("nvila_ft.model.")}
            outside -= {"nvila_ft.demo"}  # demo:<name> addresses resolve like hub ids (its __init__ imports no nvila_ft)
            assert not outside, (m, outside)


def test_modules_stay_readable():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES and str(p.relative_to(PACKAGE)) not in SCHEMA_ONLY}
    assert not long, long
