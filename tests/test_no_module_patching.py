"""No benchmark or test changes the library by assigning to a ``tocom_hub`` module's attributes.

Read with ``ast`` from the source of ``benchmarks/`` and ``tests/``: a name bound to one of our modules
(``import tocom_hub.core.patch as p``, ``from tocom_hub.core import merge``, ``importlib.import_module(
"tocom_hub...")``) or a dotted ``tocom_hub.x.y`` chain must never be the object of ``X.attr = ...``,
``X.attr += ...``, ``del X.attr``, ``setattr(X, ...)``, ``delattr(X, ...)``, ``monkeypatch.setattr(X, ...)``,
``mock.patch.object(X, ...)``, nor a ``"tocom_hub.…"`` string target of ``monkeypatch.setattr`` /
``mock.patch``. Behaviour is changed through the arguments and objects the library offers.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional

from import_graph import MODULES, ROOT

SCANNED = ("benchmarks", "tests")
SETTERS = {"setattr", "delattr", "object"}  # setattr(X, ..), monkeypatch.setattr(X, ..), mock.patch.object(X, ..)
STRING_SETTERS = {"setattr", "patch", "delattr"}  # monkeypatch.setattr("tocom_hub.x.NAME", ..), mock.patch("...")


def _dotted(node: ast.AST) -> Optional[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _module_names(tree: ast.AST) -> Dict[str, str]:
    """Local names bound to one of our modules in this file (any scope), name -> module."""
    bound: Dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "tocom_hub":
                    bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else "tocom_hub"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tocom_hub"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in MODULES:
                    bound[a.asname or a.name] = full
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = _dotted(node.value.func) or ""
            args = node.value.args
            if func.endswith("import_module") and args and isinstance(args[0], ast.Constant):
                if str(args[0].value).startswith("tocom_hub"):
                    for t in node.targets:
                        if isinstance(t, ast.Name):
                            bound[t.id] = str(args[0].value)
    return bound


def _module_of(node: ast.AST, bound: Dict[str, str]) -> Optional[str]:
    """The module of ours ``node`` denotes (a bound name or a dotted chain through one), else ``None``."""
    dotted = _dotted(node)
    if dotted is None:
        return None
    head, _, rest = dotted.partition(".")
    if head not in bound:
        return None
    full = bound[head] + (f".{rest}" if rest else "")
    return full if full in MODULES else None


def violations(path: Path, root: Path = ROOT) -> List[str]:
    """``"file:line: what"`` for every assignment to a module of ours in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    bound = _module_names(tree)
    rel = path.relative_to(root).as_posix()
    found = []

    def hit(node: ast.AST, what: str) -> None:
        found.append(f"{rel}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        targets: List[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = [t for tgt in node.targets for t in (tgt.elts if isinstance(tgt, ast.Tuple) else [tgt])]
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        for t in targets:
            if isinstance(t, ast.Attribute) and _module_of(t.value, bound):
                hit(node, f"{_module_of(t.value, bound)}.{t.attr} assigned")
        if isinstance(node, ast.Call) and node.args:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            first = node.args[0]
            if name in SETTERS and _module_of(first, bound):
                hit(node, f"{name}() on {_module_of(first, bound)}")
            elif name in STRING_SETTERS and isinstance(first, ast.Constant) and isinstance(first.value, str):
                if first.value.startswith("tocom_hub."):
                    hit(node, f"{name}() on {first.value!r}")
    return found


def _scan() -> List[str]:
    out = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            out += violations(path)
    return out


def test_no_assignment_to_tocom_hub_module_attributes():
    found = _scan()
    assert not found, "assignments to tocom_hub module attributes:\n" + "\n".join(found)


def test_the_scan_sees_every_form(tmp_path):
    """A deliberately wrong file: every form is reported, legitimate uses are not."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import importlib\n"
        "import tocom_hub\n"
        "import tocom_hub.core.patch as p\n"
        "from tocom_hub.core import merge\n"
        "from tocom_hub.core.merge import max_merge\n"
        "m = importlib.import_module('tocom_hub.core.attention')\n"
        "p.FOO = 1\n"
        "tocom_hub.core.merge.X = 2\n"
        "merge.Y += 1\n"
        "m.FOLD_BIAS_DEVICES, q = (), 1\n"
        "del merge.Z\n"
        "setattr(merge, 'A', 1)\n"
        "def t(monkeypatch, mock):\n"
        "    monkeypatch.setattr(p, 'B', 1)\n"
        "    monkeypatch.setattr('tocom_hub.core.patch.C', 1)\n"
        "    mock.patch.object(merge, 'D', 1)\n"
        "    model = object()\n"
        "    model.r = 3\n"  # not a module: fine
        "    max_merge.__doc__\n"
        "    monkeypatch.setattr(model, 'r', 1)\n"  # fine
        "    monkeypatch.setenv('X', '1')\n",  # fine
        encoding="utf-8",
    )
    got = [line.split(": ", 1)[1] for line in violations(bad, root=tmp_path)]
    assert got == [
        "tocom_hub.core.patch.FOO assigned",
        "tocom_hub.core.merge.X assigned",
        "tocom_hub.core.merge.Y assigned",
        "tocom_hub.core.attention.FOLD_BIAS_DEVICES assigned",
        "tocom_hub.core.merge.Z assigned",
        "setattr() on tocom_hub.core.merge",
        "setattr() on tocom_hub.core.patch",
        "setattr() on 'tocom_hub.core.patch.C'",
        "object() on tocom_hub.core.merge",
    ], got
