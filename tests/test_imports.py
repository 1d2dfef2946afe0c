"""The import graph: no circle among phimm's modules, and dependencies point one way
(`demo` -> `phimm` -> (`routers`, `adapters`)): `adapters` and `routers` import nothing of `phimm` or of each
other, and `phimm` imports nothing of `demo`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("phimm", "adapters", "routers", "demo")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(top_level_only: bool) -> dict[str, set[str]]:
    """module -> the project modules it imports (at import time only, or anywhere in its code). `__import__` /
    `importlib.import_module` calls with a literal name count too."""
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        found = set()
        for node in nodes:
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)  # `from base import x`: x is a module, or a name in base
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif (not top_level_only and isinstance(node, ast.Call) and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                  and getattr(node.func, "id", getattr(node.func, "attr", "")) in ("__import__", "import_module")):
                targets = [node.args[0].value]
            for t in targets:
                if t in modules and t != name:
                    found.add(t)
        graph[name] = found
    return graph


def test_no_import_circle_inside_phimm():
    graph = {k: {t for t in v if t.startswith("phimm")} for k, v in imports(top_level_only=False).items()
             if k.startswith("phimm")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert len(graph) > 30  # the scan found phimm's modules
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_dependencies_point_one_way():
    graph = imports(top_level_only=False)
    bad = []
    for mod, targets in graph.items():
        top = mod.split(".")[0]
        for t in targets:
            other = t.split(".")[0]
            if top in ("adapters", "routers") and other not in (top,):
                bad.append(f"{mod} imports {t}")
            if top == "phimm" and other == "demo":
                bad.append(f"{mod} imports {t}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(bad))
