"""benchmarks/gpu.py runs on the CPU at small sizes and writes valid JSON + markdown (no timing asserts)."""

import importlib.util
import json
from pathlib import Path

import torch
from library_attrs import changed_since, library_attrs

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_gpu_benchmark_small_cpu_run_writes_json_and_markdown(tmp_path):
    bench = _load()
    before = library_attrs()
    out, md = tmp_path / "gpu.json", tmp_path / "gpu.md"
    try:
        bench.main(
            [
                "--small",
                "--device",
                "cpu",
                "--compile-backend",
                "eager",
                "--rounds",
                "1",
                "--iters",
                "1",
                "--iters-b1",
                "1",
                "--batch-sizes",
                "2",
                "--r",
                "0,3",
                "--only",
                "check,eager,compiled,profile,flex,training",
                "--json",
                str(out),
                "--markdown",
                str(md),
            ]
        )
    finally:
        torch._dynamo.reset()
    result = json.loads(out.read_text())
    assert result["env"]["device"] == "cpu" and result["env"]["small"] is True
    sections = result["sections"]
    check = sections["check"][0]
    assert check["r0_vs_plain"] == 0.0 and check["tome_fold_vs_mask"] <= 1e-5
    eager = {(row["method"], row["r"]): row for row in sections["eager"]}
    expected = {
        ("plain", 0),
        ("tome", 0),
        ("tome", 3),
        ("evit", 3),
        ("tome-ceiling", 3),
        ("tome-noprop", 3),
        ("tome-mask", 3),
    }
    assert set(eager) == expected
    assert eager[("plain", 0)]["speedup"] == 1.0
    assert all(row["ms"] > 0 and len(row["range"]) == 2 for row in eager.values())
    assert "vs_ceiling" in eager[("tome", 3)]
    compiled = {(row["method"], row["r"]): row for row in sections["compiled"]}
    assert set(compiled) == {("plain", 0), ("tome", 3), ("evit", 3), ("tome-ceiling", 3)}
    for key in (("plain", 0), ("tome", 3), ("evit", 3)):
        assert compiled[key]["max_abs_diff_vs_eager"] <= 1e-5  # (the ceiling's outputs are meaningless)
    profiled = {(row["method"], row["r"]): row for row in sections["profile"]}
    assert set(profiled) == {("plain", 0), ("tome", 3), ("evit", 3), ("tome-ceiling", 3)}
    for row in profiled.values():
        assert row["clock"] == "cpu" and row["total_ms_per_forward"] > 0
        assert 0 < sum(op["share"] for op in row["top"]) <= 1.0 + 1e-6
    flex = {(row["method"], row["r"]): row for row in sections["flex"]}
    assert set(flex) == {(m, 3) for m in ("tome", "tome-mask", "tome-flex", "tome-foldw", "tome-ceiling")} | {
        ("plain", 0)
    }
    for variant in ("tome-mask", "tome-flex", "tome-foldw"):  # exact forms: the same logits
        assert flex[(variant, 3)]["max_abs_diff_vs_tome"] <= 1e-5
    step = sections["training"][0]  # the distillation step vs full fine-tuning, with the step's parts
    assert step["ratio"] > 0 and set(step["distill_parts_ms"]) == {
        "teacher_forward",
        "student_forward",
        "backward",
        "optimizer",
    }
    ops = {op["op"] for op in profiled[("tome", 3)]["top"]}
    assert ops & {"aten::index_select", "aten::sort", "aten::index_add_", "aten::cat", "aten::mm"}, ops
    assert not any("error" in row for rows in sections.values() for row in rows)
    text = md.read_text()
    assert "| eager |" in text and "| compiled |" in text and "\nprofile fp32 b=2 tome r=3:" in text
    # the ceiling and attention-form rows pass reducer= / attention= to patch(): no library attribute changes
    assert not changed_since(before)


def test_gpu_benchmark_training_hook_skips_with_a_reason_when_functions_are_missing(tmp_path, monkeypatch):
    import sys
    import types

    bench = _load()
    monkeypatch.setitem(sys.modules, "distill_step", types.ModuleType("distill_step"))  # no functions yet
    out = tmp_path / "gpu.json"
    bench.main(["--small", "--device", "cpu", "--only", "training", "--json", str(out), "--markdown", ""])
    rows = json.loads(out.read_text())["sections"]["training"]
    assert len(rows) == 1 and "step_rates" in rows[0]["skipped"]


def test_gpu_benchmark_full_size_training_rows_call_step_loader_and_end_to_end(tmp_path, monkeypatch):
    """The full-size training section (not --small) asks distill_step.py for the step rates with their
    parts, the input pipeline alone and distill.py end to end, in that order (stand-ins record the calls)."""
    import sys
    import types

    calls = []
    fake = types.ModuleType("distill_step")
    fake.step_rates = lambda **kw: calls.append(("step_rates", kw)) or {"distill": {"img_per_s": 100.0}, "ratio": 1.0}
    fake.loader_rate = lambda data, **kw: calls.append(("loader_rate", data, kw)) or {"img_per_s": 50.0}
    fake.end_to_end = lambda **kw: calls.append(("end_to_end", kw)) or {"images_per_second": 40.0}
    monkeypatch.setitem(sys.modules, "distill_step", fake)
    bench = _load()
    out = tmp_path / "gpu.json"
    bench.main(["--device", "cpu", "--only", "training", "--json", str(out), "--markdown", ""])
    assert [c[0] for c in calls] == ["step_rates", "loader_rate", "end_to_end"]
    assert calls[0][1]["breakdown"] is True and calls[0][1]["model"] == "deit_base_patch16_224"
    assert calls[1][1] == "photo-crops" and calls[1][2]["img_size"] == 224
    assert calls[2][1]["raw_img_per_s"] == 100.0 and calls[2][1]["num_workers"] == calls[1][2]["num_workers"]
    rows = json.loads(out.read_text())["sections"]["training"]
    assert [row["what"] for row in rows] == [
        "distill step vs full fine-tuning step",
        "input pipeline alone (loader_rate)",
        "training/distill.py end to end",
    ]


def test_attention_variants_are_exact_and_fall_back_where_they_must():
    """benchmarks/attention_variants.py: flex_attention and the padded-weight fold give the library's
    proportional attention; the padded-weight fold leaves hooked projections to the library."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import attention_variants as av
    from timm.layers import Attention

    from tocom_hub.core import attention as lib

    g = torch.Generator().manual_seed(0)
    attn = Attention(64, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(2, 9, 64, generator=g)
    bias = torch.rand(2, 1, 1, 9, generator=g).log1p()
    with torch.no_grad():
        ref, q_ref, k_ref = lib.attend(attn, x, bias)  # CPU: the SDPA mask
        out, q, k = av.attend_padded_weights(attn, x, bias)
        assert (out - ref).abs().max() <= 1e-5
        assert (q - q_ref).abs().max() <= 1e-5 and (k - k_ref).abs().max() <= 1e-5
        qh, kh, vh = (torch.randn(2, 2, 9, 32, generator=g) for _ in range(3))
        flex = av.flex_key_bias(qh, kh, vh, bias, 0.2)
        mask = lib.sdpa_key_bias(qh, kh, vh, bias, 0.2, fold=False)
        assert (flex - mask).abs().max() <= 1e-5

        calls = []
        handle = attn.qkv.register_forward_hook(lambda m, i, o: calls.append(1))
        av.attend_padded_weights(attn, x, bias)  # a hooked projection: the library's path, hook called
        handle.remove()
        assert calls == [1]
