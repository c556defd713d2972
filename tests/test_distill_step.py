"""benchmarks/distill_step.py: its measuring functions run on a CPU and return what the report reads."""

from __future__ import annotations

import pytest


def _distill_step_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "distill_step.py"
    spec = importlib.util.spec_from_file_location("distill_step_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_benchmark_functions_run_on_cpu_and_return_their_keys():
    bench = _distill_step_module()
    tiny = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
    res = bench.step_rates(
        "vit_tiny_patch16_224",
        model_kwargs=tiny,
        batch_size=4,
        rounds=2,
        warmup=1,
        r_max=2,
        device="cpu",
        breakdown=True,
    )
    for part in ("full_ft", "distill"):
        assert res[part]["ms"] > 0 and res[part]["img_per_s"] > 0
    assert res["ratio"] > 0 and len(res["distill_ms"]) == 2 and len(res["pairs"]) == 2
    assert all(m != n for m, n in res["pairs"])
    assert res["trainable_backbone_parameters"] == 0  # the frozen backbone gets no weight gradients
    assert set(res["distill_parts_ms"]) == {"teacher_forward", "student_forward", "backward", "optimizer"}

    lr = bench.loader_rate(img_size=32, batch_size=8, num_workers=0, batches=2, device="cpu")
    assert lr["batches"] == 2 and lr["img_per_s"] > 0 and lr["uint8_batches"]

    e2e = bench.end_to_end(
        steps=3, batch_size=8, num_workers=0, cpu=True, raw_img_per_s=res["distill"]["img_per_s"], timeout=300
    )
    assert e2e["steps"] == 3 and e2e["images_per_second"] > 0
    assert e2e["ratio_to_step_rate"] == pytest.approx(e2e["images_per_second"] / res["distill"]["img_per_s"])
    assert e2e["metrics"]["throughput_images_per_second"] == e2e["images_per_second"]
