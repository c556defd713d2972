"""benchmarks/dense_flops.py on small models: FlopCounterMode against the closed form of dense mode."""

import importlib.util
from pathlib import Path

import pytest
import timm


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dense_flops.py"
    spec = importlib.util.spec_from_file_location("dense_flops_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kwargs", [dict(), dict(reg_tokens=4, class_token=False, global_pool="avg")])
def test_counted_flops_equal_the_closed_form_and_ffn_tokens_removed(kwargs):
    bench = _bench()
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=128, depth=2, **kwargs)
    res = bench.run(model, 128, r=4, dense_ratio=8, rounds=0)  # 64 patches, k = 32
    assert res["gflops_plain"] == res["gflops_plain_closed_form"]
    assert res["gflops_dense"] == res["gflops_dense_closed_form"]
    removed = res["gflops_plain"] - res["gflops_dense"]
    assert abs(removed / res["gflops_ffn_removed_closed_form"] - 1) < 0.02  # the matching step costs < 2 %
    assert abs(res["dense_vs_closed_form_rel"]) < 0.02
    wrong = bench.closed_form(model, 16)  # another k gives another count: the comparison can fail
    assert abs(wrong / 1e9 - res["gflops_dense"]) > 1e-4
