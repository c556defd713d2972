"""The scripts in ``benchmarks/`` on tiny models (their numbers come from the real runs, not from here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from library_attrs import changed_since, library_attrs
from tool_helpers import DEPTH, NAME, PATCHES, TINY

import tocom_hub

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py: one torch thread for the module


def _throughput_bench():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("throughput_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_throughput_benchmark_ceiling_rows_and_restores_the_merge_step():
    bench = _throughput_bench()
    before = library_attrs()

    model = timm.create_model(NAME, pretrained=False, **TINY).eval()
    configs = [("plain", 0), ("tome", 4), ("tome-ceiling", 4)]
    rows = bench.run(model, 1, configs, rounds=1, iters=1, img_size=64)
    assert [(row["method"], row["r"]) for row in rows] == configs
    assert all(row["ms_per_batch"] > 0 for row in rows)
    assert not changed_since(before)  # the ceiling is a reducer passed to patch(), no library global
    assert not tocom_hub.is_patched(model)

    # the ceiling keeps ToMe's token counts (truncation instead of merging)
    bench._configure(model, ("tome-ceiling", 4))
    try:
        seen = []
        hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for b in model.blocks]
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
        for h in hooks:
            h.remove()
    finally:
        bench._configure(model, ("plain", 0))
    assert seen == [PATCHES + 1 - 4 * (i + 1) for i in range(DEPTH)]
    assert not changed_since(before)


def test_throughput_benchmark_compiled_copies_run_their_own_configuration():
    """``--compile``: one compiled copy per configuration; each gives its eager configuration's outputs
    (the ceiling copy truncates, the ToMe copy merges) whatever ran before it, and the model passed in
    stays unpatched and no library attribute changes."""
    bench = _throughput_bench()
    before = library_attrs()
    torch._dynamo.reset()
    model = timm.create_model(NAME, pretrained=False, **TINY).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    configs = [("plain", 0), ("tome", 4), ("tome-ceiling", 4), ("evit", 4)]
    eager = {}
    with torch.no_grad():
        for cfg in configs:
            bench._configure(model, cfg)
            eager[cfg] = model(x)
        bench._configure(model, ("plain", 0))
        assert not torch.allclose(eager[("tome", 4)], eager[("tome-ceiling", 4)], atol=1e-3)
        compiled, seconds = bench._compile_each(model, configs, x, backend="eager")
        assert set(seconds) == set(configs) and all(s > 0 for s in seconds.values())
        for cfg in configs[::-1] + configs:
            assert torch.allclose(compiled[cfg](x), eager[cfg], atol=1e-5), cfg
    assert not tocom_hub.is_patched(model)

    rows = bench.run(model, 1, configs, rounds=2, iters=1, img_size=64, compile=True, backend="eager")
    assert [(row["method"], row["r"]) for row in rows] == configs
    assert all(row["compiled"] and row["compile_s"] > 0 for row in rows)
    tome = rows[1]
    assert tome["of_ceiling"] > 0 and "of_ceiling" not in rows[3]
    assert not changed_since(before)
    assert not tocom_hub.is_patched(model)
    torch._dynamo.reset()
