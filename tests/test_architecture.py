"""The architecture the package promises (docs/ARCHITECTURE.md), checked on the source: layers import only
downwards, no import circle, no oversized module, every sub-package installed."""

from __future__ import annotations

import ast
import configparser
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer of each top-level part, lowest first; a module may import its own layer and the layers below
LAYERS = ["tocom_hub.core", "tocom_hub.hub", "tocom_hub.tools", "tocom_hub.demo", "tocom_hub.cli", "tocom_hub.training"]
MAX_LINES = 440  # "no library module over ~400 lines"


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


def _imports(name: str, path: Path) -> Set[str]:
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


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    if name == "tocom_hub.__main__":  # `python -m tocom_hub` is the CLI
        name = "tocom_hub.cli"
    for i, prefix in enumerate(LAYERS):
        if name == prefix or name.startswith(prefix + "."):
            return i
    return -1  # the root package (lazy public names, version): importable from everywhere


def test_the_source_tree_was_found():
    assert {"tocom_hub.core.merge", "tocom_hub.core.bank", "tocom_hub.hub", "tocom_hub.training.distill"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_layers_import_only_downwards(name):
    if name == "tocom_hub":
        return  # resolves its lazy public names from every layer
    upward = sorted(t for t in GRAPH[name] if _layer(t) > _layer(name))
    assert not upward, f"{name} (layer {LAYERS[_layer(name)]}) imports from higher layers: {upward}"


def test_no_import_circle():
    # Tarjan's strongly connected components over our import graph (the root package's lazy map excluded)
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    circles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w == "tocom_hub":
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
                circles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_oversized(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {n} lines; split it by concept"


def test_every_sub_package_is_installed():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    packages = {n for n, p in MODULES.items() if p.name == "__init__.py"}
    assert packages == listed, (
        f"setup.cfg [options] packages differs: missing {packages - listed}, extra {listed - packages}"
    )
