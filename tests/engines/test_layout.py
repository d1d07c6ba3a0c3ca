"""engines/ import rules: no cycles (top-level or function-local imports alike), no node/ or storage/, and the
family-neutral modules (protocol, backends, imaging) import no model family."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ROOT / "engines"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> every module it imports (anywhere in the file, TYPE_CHECKING blocks excluded)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(ENGINES.rglob("*.py")):
        tree = ast.parse(path.read_text())
        type_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for stmt in block.body
            for node in ast.walk(stmt)
        }
        found: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
        graph[_module_name(path)] = found
    return graph


def _resolve(name: str, modules: set[str]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_engines_has_no_import_cycle():
    graph = _imports()
    modules = set(graph)
    edges = {
        module: {target for name in imported if (target := _resolve(name, modules)) and target != module}
        for module, imported in graph.items()
    }
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [module, target] if target in path else [module, target])
            elif target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    assert not cycles, cycles


def test_engines_imports_neither_node_nor_storage():
    offenders = {
        module: sorted(n for n in imported if n.split(".")[0] in ("node", "storage"))
        for module, imported in _imports().items()
    }
    assert not {m: n for m, n in offenders.items() if n}


def test_family_neutral_modules_import_no_family():
    neutral = ("engines.family", "engines.backends", "engines.imaging", "engines.heads", "engines.calibration")
    offenders = {
        module: sorted(n for n in imported if n.startswith("engines.mae"))
        for module, imported in _imports().items()
        if module.startswith(neutral)
    }
    assert not {m: n for m, n in offenders.items() if n}
