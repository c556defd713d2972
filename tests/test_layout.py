"""The package namespace: one meaning per name, no import hook, ``dir(tocom_hub)`` is the public API."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import tocom_hub

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_hook_in_the_package():
    code = (
        "import sys; before = list(sys.meta_path); import tocom_hub, tocom_hub.core.patch, tocom_hub.tools; "
        "assert sys.meta_path == before, sys.meta_path"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for path in (ROOT / "tocom_hub").rglob("*.py"):
        assert "meta_path" not in path.read_text(), path


@pytest.mark.parametrize("old", ["merge", "prune", "bank", "evaluation", "benchmark", "models", "data"])
def test_module_paths_of_the_flat_layout_are_gone(old):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"tocom_hub.{old}")


def test_patch_has_one_meaning():
    import tocom_hub.core.patch as patch_module

    assert callable(tocom_hub.patch) and tocom_hub.patch is patch_module.patch
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("tocom_hub.patch")
    assert tocom_hub.patch is patch_module.patch  # a failed import does not rebind it


def test_dir_lists_the_public_api_only():
    names = dir(tocom_hub)
    assert set(tocom_hub.__all__) <= set(names)
    sub_packages = {"core", "hub", "tools", "demo", "serving", "cli", "training"}
    extra = set(names) - set(tocom_hub.__all__) - sub_packages
    assert not extra, f"dir(tocom_hub) lists non-API names: {sorted(extra)}"
    for private in ("sys", "types", "Any", "importlib", "Optional"):
        assert private not in names


def test_unknown_names_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("tocom_hub.no_such_module")
    with pytest.raises(AttributeError):
        tocom_hub.no_such_name  # noqa: B018
