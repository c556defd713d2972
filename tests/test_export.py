"""``tools.export``: a patched model with its bank merged at a fixed (source r, target r), exported to ONNX
(dynamo exporter, run by onnxruntime) and to a ``torch.export`` program, matches the eager model; one file
per r; the model is left as it was; bad arguments change nothing. A new ViT family is one entry in
:data:`FAMILIES` (the other families: ``test_export_families.py``). Each family is exported in half of the
(method, r, exporter) cases (:func:`_exporter`), so every family still meets both exporters, both methods and both r."""

from __future__ import annotations

import pytest
import torch
from bank_helpers import random_groups, state_hash
from tiny_models import make_eva, make_timm

import tocom_hub
from tocom_hub import ToComBank
from tocom_hub.tools.export import export_model, export_paths, read_recipe, run_exported

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py: one torch thread for the module

R_MAX = 8
# family -> a tiny timm model (pretrained=False, 64 px, patch 8: 64 patches, depth 2, random non-trivial weights)
FAMILIES = {
    "vit_class_token": lambda: make_timm("vit_tiny_patch16_224", depth=2, patch_size=8),
    "deit_distilled": lambda: make_timm("deit_tiny_distilled_patch16_224", depth=2, patch_size=8),
    "vit_registers": lambda: make_timm("vit_tiny_patch16_224", depth=2, patch_size=8, reg_tokens=4),
    "vit_avg_pool_no_class_token": lambda: make_timm(
        "vit_tiny_patch16_224", depth=2, patch_size=8, class_token=False, global_pool="avg"
    ),
    # the Eva family (RoPE rows follow the merged tokens; separate q/k/v projections take the bank on q_proj/v_proj)
    "eva_rope_cat": lambda: make_eva("rope_cat_cls"),
    "eva_rope_separate_qkv": lambda: make_eva("rope_cat_separate_qkv"),
}
TOL = 1e-4


def _with_bank(family: str, method: str):
    model = FAMILIES[family]()
    bank = ToComBank.for_model(model, r_max=R_MAX, rank=2, method=method, scale=0.5)
    random_groups(bank, seed=3)  # every group's factors non-zero: the merged update changes the weights
    return model, bank


def _eager(model, bank, source_r, target_r, x):
    tocom_hub.apply(model, source_r, target_r, bank=bank)
    with torch.inference_mode():
        out = model(x)
    tocom_hub.remove(model)
    return out


def _exporter(family: str, method: str, target_r: int) -> str:
    """Half of the (method, r, exporter) cases, alternating: every family gets both exporters, both methods and
    both r, and which (method, r) goes to ONNX alternates from one family to the next."""
    i = sorted(FAMILIES).index(family) + (method == "evit") + (target_r > 0)
    return ("onnx", "torch")[i % 2]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tome", "evit"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exported_files_match_eager(family, method, tmp_path):
    """r = 0 (bank merged at 8 -> 0) and r = 8 (0 -> 8): onnxruntime or the loaded program (:func:`_exporter`)
    equals eager."""
    model, bank = _with_bank(family, method)
    before = state_hash(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for target_r, source_r in ((0, R_MAX), (R_MAX, 0)):
        ref = _eager(model, bank, source_r, target_r, x)
        with torch.inference_mode():
            plain = model(x)
        assert (ref - plain).abs().max() > 1e-3  # the bank (and at r = 8 the merging) changes the output
        for fmt in [_exporter(family, method, target_r)]:
            path = tmp_path / f"{fmt}-r{target_r}"
            (written,) = export_model(
                model, path, source_r, target_r, bank=bank, format=fmt, batch_size=2, method=method
            )
            assert written.path.suffix == {"onnx": ".onnx", "torch": ".pt2"}[fmt] and written.path.is_file()
            assert written.max_abs_diff is not None and written.max_abs_diff <= TOL
            out = run_exported(written.path, x)
            err = float((out - ref).abs().max())
            assert err <= TOL, f"{family} {method} {fmt} r={target_r}: max |exported - eager| = {err:.2e}"
            recipe = read_recipe(written.path)
            assert recipe["method"] == method and (recipe["source_r"], recipe["target_r"]) == (source_r, target_r)
            assert recipe["input_shape"] == [2, 3, 64, 64]
    assert state_hash(model) == before and not tocom_hub.is_patched(model)


def test_a_wrong_graph_would_be_caught(tmp_path):
    """The comparison can fail: the file exported at r = 8 does not match eager at r = 0."""
    model, bank = _with_bank("vit_class_token", "tome")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    (written,) = export_model(model, tmp_path / "m.pt2", 0, R_MAX, bank=bank, format="torch")
    assert written.max_abs_diff <= TOL
    assert (run_exported(written.path, x) - _eager(model, bank, 0, 0, x)).abs().max() > 1e-3


def test_one_file_per_r_and_the_model_left_patched_as_it_was(tmp_path):
    model, bank = _with_bank("vit_class_token", "tome")
    tocom_hub.patch(model, method="tome")
    tocom_hub.set_r(model, 3)
    written = export_model(model, tmp_path / "m.pt2", 0, [0, 4, 8], bank=bank, format="torch", verify=False)
    assert [w.path.name for w in written] == ["m-r0.pt2", "m-r4.pt2", "m-r8.pt2"]
    assert [w.target_r for w in written] == [0, 4, 8] and all(w.max_abs_diff is None for w in written)
    assert tocom_hub.get_r(model) == 3 and tocom_hub.compensate.get_compensation(model) is None
    assert export_paths(tmp_path / "x-{r}.onnx", [1, 2], "onnx")[1].name == "x-2.onnx"
    assert export_paths(tmp_path / "x", [5], "onnx")[0].name == "x.onnx"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(format="tflite"), "format must be one of"),
        (dict(target_r=[0, 9]), "outside the bank's range"),
        (dict(target_r=[2, 2]), "twice"),
        (dict(target_r=-1), "non-negative int"),
        (dict(batch_size=0), "batch_size"),
        (dict(method="evit"), "trained for method 'tome'"),
    ],
)
def test_bad_arguments_write_nothing_and_change_nothing(kwargs, match, tmp_path):
    model, bank = _with_bank("vit_class_token", "tome")
    before = state_hash(model)
    args = dict(source_r=0, target_r=[0, 8], bank=bank, format="torch")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        export_model(model, tmp_path / "m", **args)
    assert state_hash(model) == before and not tocom_hub.is_patched(model)
    assert not list(tmp_path.iterdir())


def test_a_model_with_more_r_than_it_has_tokens_is_refused_before_writing(tmp_path):
    model = make_timm("vit_tiny_patch16_224", depth=2, patch_size=16)  # 16 patches: ToMe can merge at most 8
    with pytest.raises(ValueError):
        export_model(model, tmp_path / "m.pt2", target_r=[4, 9], format="torch")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_cli_export_writes_one_checked_file_per_r_and_format(files, tmp_path, capsys):
    from tool_helpers import run

    argv = ["export", "--model", files / "model", "--bank", files / "bank", "--target-r", "0,8"]
    code, out, err = run([*argv, "--format", "onnx,torch", "-o", tmp_path / "out" / "m"], capsys)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["m-r0.onnx", "m-r0.pt2", "m-r8.onnx", "m-r8.pt2"]
    assert out.count("max |exported - eager|") == 4 and "bank 0 -> 8" in out
    code, out, err = run([*argv, "--format", "tflite", "-o", tmp_path / "x"], capsys)
    assert code == 1 and err.count("\n") == 1 and "--format takes onnx, torch" in err
