"""The import graph of tocom_hub/ and training/ (installed as tocom_hub.training), read from the source with
``ast``: :data:`MODULES` (module name -> file), :data:`GRAPH` (module -> the modules of ours it imports, at the
top or inside functions), :func:`reachable` and :func:`circles`. Used by the architecture and Hub-layer tests."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterable, List, Set

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> Dict[str, Path]:
    mods = {}
    for path in sorted((ROOT / "tocom_hub").rglob("*.py")):
        if "training" in path.relative_to(ROOT / "tocom_hub").parts:  # the symlink some checkouts have
            continue
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    for path in sorted((ROOT / "training").glob("*.py")):
        name = "tocom_hub.training" + ("" if path.stem == "__init__" else f".{path.stem}")
        mods[name] = path
    return mods


MODULES = _modules()


def imports(name: str, path: Path) -> Set[str]:
    """Every module of ours that ``name`` imports, at module level or inside functions."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # `from pkg import name`: the module pkg (or pkg.name if a module)
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def reachable(start: str) -> Set[str]:
    """``start`` and every module of ours it imports, directly or transitively."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(GRAPH[name])
    return seen


def circles(nodes: Iterable[str], skip: Iterable[str] = ("tocom_hub",)) -> List[List[str]]:
    """Import circles among ``nodes`` (Tarjan's strongly connected components of more than one module);
    edges into ``skip`` are ignored (the root package resolves its lazy public names from every layer)."""
    nodes, skip = set(nodes), set(skip)
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w in skip or w not in nodes:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return found
