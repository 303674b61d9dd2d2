"""Structural checks of src/coreunits: no import cycle, no function over 100 lines.

The import graph counts every ``import`` of a coreunits module, including the
ones inside functions (a function-level import can hide a cycle, it cannot
remove it). Run as ``python scripts/check_structure.py``; exits 1 and lists
the problems when a check fails. ``tests/test_structure.py`` runs it too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

__all__ = ["MAX_FUNCTION_LINES", "find_cycles", "import_graph", "long_functions", "main"]

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "coreunits"
MAX_FUNCTION_LINES = 100


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """The coreunits modules an import statement names (``from x import y`` counts x.y when it is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    out = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
    if target in modules and len(out) < len(node.names):
        out.append(target)
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the coreunits modules it imports (anywhere in the file)."""
    files = {_module_name(p, src): p for p in (src / PACKAGE).rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(tree):
            deps.update(_imported(node, name, is_package, modules))
        # A package's own __init__ is imported by every submodule: not an edge worth counting.
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def long_functions(src: Path = SRC, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (N lines)`` for every function or method longer than ``limit`` lines."""
    out = []
    for path in sorted((src / PACKAGE).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > limit:
                    out.append(f"{path.relative_to(src)}:{node.lineno} {node.name} ({length} lines)")
    return out


def main() -> int:
    cycles = find_cycles(import_graph())
    long = long_functions()
    for comp in cycles:
        print("import cycle: " + " <-> ".join(comp))
    for entry in long:
        print(f"function over {MAX_FUNCTION_LINES} lines: {entry}")
    if not cycles and not long:
        print("ok: no import cycle, no function over", MAX_FUNCTION_LINES, "lines")
    return 1 if cycles or long else 0


if __name__ == "__main__":
    sys.exit(main())
