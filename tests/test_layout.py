"""The package layout: module paths of earlier releases resolve to the moved modules (the same objects)."""

import importlib

import pytest

import tocom_hub

OLD_TO_NEW = {
    "merge": "core.merge",
    "prune": "core.prune",
    "patch": "core.patch",
    "bank": "core.bank",
    "compensate": "core.compensate",
    "evaluation": "tools.evaluation",
    "benchmark": "tools.benchmark",
    "latency": "tools.latency",
    "visualize": "tools.visualize",
    "tune": "tools.tune",
    "convert": "tools.convert",
    "data": "demo.data",
    "models": "demo.models",
    "adaptformer": "demo.adaptformer",
}


@pytest.mark.parametrize("old,new", sorted(OLD_TO_NEW.items()))
def test_old_module_paths_are_the_moved_modules(old, new):
    moved = importlib.import_module(f"tocom_hub.{new}")
    assert importlib.import_module(f"tocom_hub.{old}") is moved
    assert moved.__spec__.name == f"tocom_hub.{new}"  # the alias does not rename the real module
    if old != "patch":  # tocom_hub.patch is the function (the module is tocom_hub.core.patch)
        assert getattr(tocom_hub, old) is moved


def test_patch_stays_the_function_after_importing_the_old_module_path():
    import tocom_hub.patch  # noqa: F401

    assert callable(tocom_hub.patch) and tocom_hub.patch.__module__ == "tocom_hub.core.patch"
    from tocom_hub.bank import ToComBank

    assert ToComBank is tocom_hub.ToComBank


def test_unknown_names_still_fail():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("tocom_hub.no_such_module")
    with pytest.raises(AttributeError):
        tocom_hub.no_such_name  # noqa: B018


def test_names_that_moved_between_layers_keep_their_old_import_paths():
    from tocom_hub.demo.data import build_eval_dataset
    from tocom_hub.evaluation import build_eval_dataset as old

    assert old is build_eval_dataset
    from tocom_hub.hub import PathLike  # noqa: F401
