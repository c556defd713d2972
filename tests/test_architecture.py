"""The architecture the package promises (docs/ARCHITECTURE.md), checked on the source: layers import only
downwards, no import circle, no oversized module, every sub-package installed."""

from __future__ import annotations

import configparser

import pytest
from import_graph import GRAPH, MODULES, ROOT, circles

# layer of each top-level part, lowest first; a module may import its own layer and the layers below
LAYERS = [
    "tocom_hub.core",
    "tocom_hub.hub",
    "tocom_hub.tools",
    "tocom_hub.demo",
    "tocom_hub.serving",
    "tocom_hub.cli",
    "tocom_hub.training",
]
MAX_LINES = 440  # "no library module over ~400 lines"


def _layer(name: str) -> int:
    if name == "tocom_hub.__main__":  # `python -m tocom_hub` is the CLI
        name = "tocom_hub.cli"
    for i, prefix in enumerate(LAYERS):
        if name == prefix or name.startswith(prefix + "."):
            return i
    return -1  # the root package (lazy public names, version): importable from everywhere


def test_the_source_tree_was_found():
    assert {"tocom_hub.core.merge", "tocom_hub.core.bank.module", "tocom_hub.hub", "tocom_hub.training.distill"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_layers_import_only_downwards(name):
    if name == "tocom_hub":
        return  # resolves its lazy public names from every layer
    upward = sorted(t for t in GRAPH[name] if _layer(t) > _layer(name))
    assert not upward, f"{name} (layer {LAYERS[_layer(name)]}) imports from higher layers: {upward}"


def test_no_import_circle():
    found = circles(GRAPH)
    assert not found, f"import circles: {found}"


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
