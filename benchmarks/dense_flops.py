"""Encoder GFLOPs and CPU time of dense mode (merge before the MLP, unmerge after) against plain timm.

The paper's dense setting (appendix, Table 11): DeiT-B at 512 px (1024 patches + the class token),
``k = 32 r`` tokens merged before every MLP, r = 16 → k = 512. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add) over ``forward_features`` (patch
embedding + blocks + final norm), with the attention unfused while counting: the counter has no
formula for the CPU's fused SDPA kernel, and the unfused path does the same products. They are
compared with :func:`closed_form`. Time: plain and dense forwards interleaved, in a random order per
round, on the same model object; the speed-up is the median of the paired ratios. Example::

    python benchmarks/dense_flops.py --rounds 7            # writes benchmarks/results/dense_flops.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import tocom_hub
from tocom_hub.core.jsonio import write_json
from tocom_hub.core.merge import max_merge
from tocom_hub.core.patch import set_r
from tocom_hub.tools.timing import interleaved, paired_ratios

RESULTS = Path(__file__).resolve().parent / "results" / "dense_flops.json"


def closed_form(model: torch.nn.Module, k: int = 0, matching: bool = True) -> int:
    """FLOPs (2 per multiply-add) of ``forward_features`` with ``k`` tokens merged before every MLP.

    Per block: qkv ``2·N·D·3D`` + attention ``4·N²·D`` + proj ``2·N·D²`` + MLP ``4·(N − k)·D·H``, and
    (``matching``) the bipartite similarity ``2·Na·Nb·d_head`` of the merge step; plus the patch
    embedding ``2·P·(3·p²)·D``. So dense mode removes ``depth · k · 4·D·H`` (the FFN tokens).
    """
    d = model.embed_dim
    pe = model.patch_embed
    p = pe.num_patches
    n = p + model.num_prefix_tokens
    ph, pw = pe.patch_size
    total = 2 * p * 3 * ph * pw * d
    for blk in model.blocks:
        hidden = blk.mlp.fc1.out_features
        k_blk = min(k, max_merge(n, model.num_prefix_tokens))
        total += 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * (n - k_blk) * d * hidden
        if matching and k_blk > 0:
            prefix = model.num_prefix_tokens
            first_a, first_b = 2 * ((prefix + 1) // 2), 2 * (prefix // 2) + 1
            num_a, num_b = len(range(first_a, n, 2)), len(range(first_b, n, 2))
            total += 2 * num_a * num_b * blk.attn.head_dim
    return total


def counted(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FlopCounterMode total of ``model.forward_features(x)`` (attention unfused while counting)."""
    fused = [blk.attn.fused_attn for blk in model.blocks]
    for blk in model.blocks:
        blk.attn.fused_attn = False
    try:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model.forward_features(x)
    finally:
        for blk, f in zip(model.blocks, fused):
            blk.attn.fused_attn = f
    return int(fc.get_total_flops())


def paired_times(model: torch.nn.Module, x: torch.Tensor, r: int, rounds: int, seed: int = 0) -> Dict[str, Any]:
    """Interleaved forwards at ``r = 0`` (plain) and ``r``; medians and the median paired speed-up."""
    runners = {value: (lambda: model.forward_features(x)) for value in (0, r)}  # one model, set_r switches
    with torch.no_grad():
        for value in (0, r):  # warm-up
            set_r(model, value)
            model.forward_features(x)
        ms = interleaved(runners, rounds, seed=seed, before=lambda value: set_r(model, value))
    times = {value: [t / 1e3 for t in v] for value, v in ms.items()}
    ratios = paired_ratios(times[0], times[r])
    return {
        "plain_s_median": statistics.median(times[0]),
        "dense_s_median": statistics.median(times[r]),
        "speedup_median": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "rounds": rounds,
    }


def run(
    model: torch.nn.Module,
    img_size: int,
    r: int,
    dense_ratio: int = 32,
    rounds: int = 5,
    threads: Optional[int] = None,
    method: str = "tome",
) -> Dict[str, Any]:
    """FLOPs (counted and closed form) and paired CPU times of ``model`` plain and dense at ``r``."""
    if threads:
        torch.set_num_threads(threads)
    model.eval()
    tocom_hub.patch(model, method=method, dense=True, dense_ratio=dense_ratio)
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    k = dense_ratio * r
    set_r(model, 0)
    plain = counted(model, x)
    set_r(model, r)
    dense = counted(model, x)
    plain_cf, dense_cf = closed_form(model, 0), closed_form(model, k, matching=method == "tome")
    removed_cf = closed_form(model, 0, matching=False) - closed_form(model, k, matching=False)
    out = {
        "method": method,
        "tokens": model.patch_embed.num_patches + model.num_prefix_tokens,
        "r": r,
        "k": k,
        "gflops_plain": plain / 1e9,
        "gflops_dense": dense / 1e9,
        "gflops_plain_closed_form": plain_cf / 1e9,
        "gflops_dense_closed_form": dense_cf / 1e9,
        "gflops_ffn_removed_closed_form": removed_cf / 1e9,
        "dense_vs_closed_form_rel": dense / (plain_cf - removed_cf) - 1.0,
        "flop_ratio": plain / dense,
        "threads": torch.get_num_threads(),
    }
    if rounds:
        out["time"] = paired_times(model, x, r, rounds)
        out["speedup_over_flop_ratio"] = out["time"]["speedup_median"] / out["flop_ratio"]
    tocom_hub.unpatch(model)
    return out


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=512)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dense-ratio", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--method", default="tome", choices=["tome", "evit"], help="evit: the k least attentive skip the MLP"
    )
    p.add_argument("--output", default=str(RESULTS))
    args = p.parse_args(argv)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size)
    result = {"model": args.model, "img_size": args.img_size, "torch": torch.__version__, "device": "cpu"}
    result.update(run(model, args.img_size, args.r, args.dense_ratio, args.rounds, args.threads, args.method))
    write_json(args.output, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
