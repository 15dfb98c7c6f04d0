"""The package layering of docs/architecture.md holds in the code: imports only point down, no circles.

Every ``import`` of every module counts, including lazy ones inside functions and those under
``TYPE_CHECKING``: a lazy upward import is still a dependency on the layer above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import evolsplat_ns

PACKAGE = Path(evolsplat_ns.__file__).parent

RANK = {
    "geometry": 0, "registry": 0, "utils": 0, "_compat": 0, "presets": 0,
    "data": 1,
    "model": 2,
    "engine": 3,
    "viewer": 4, "export": 4, "inference": 4,
    "cli": 5, "method_configs": 5,
}
"""Room of each top-level module/package; a module may import only from lower ranks or its own room."""


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The evolsplat_ns modules ``path`` imports (anywhere in the file). ``from pkg import mod``
    depends on ``pkg.mod`` (not on ``pkg``'s own ``__init__``); ``from mod import name`` on ``mod``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            for alias in node.names:
                found.add(f"{name}.{alias.name}" if f"{name}.{alias.name}" in modules else name)
    return {n for n in found if n in modules and n != module}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, name, set(paths)) for name, path in paths.items()}


def _room(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_imports_only_point_down():
    graph = _graph()
    assert len(graph) > 50
    unknown = sorted({_room(m) for m in graph if m != "evolsplat_ns"} - RANK.keys())
    assert not unknown, f"top-level modules without a layer in RANK: {unknown}"
    upward = [f"{a} -> {b}" for a, deps in graph.items() if a != "evolsplat_ns" for b in deps
              if _room(a) != _room(b) and RANK[_room(b)] >= RANK[_room(a)]]
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
