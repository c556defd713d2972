"""The segmentation study (ToCom paper, appendix Table 11, at CPU scale): mIoU of a Segmenter at target
r ∈ {0, 4, 8, 12, 16} in dense mode, without and with a dense ToCom bank, GFLOPs per r, 95 % intervals.

Per seed (``--seeds``, default 0 1 2):

1. ``finetune.py --task segmentation``: the embedded tiny ViT (32 px, 4 px patches → 8 × 8 = 64 patches +
   class token, 6 blocks, 96 dims; pre-trained on ``photo-crops``) + a Segmenter decoder, fine-tuned on
   ``photo-segments`` at source r = 0 (plain timm, as in the paper);
2. ``distill.py --dense --dense-ratio 2 --kd tokens``: a dense bank (R = 16) distilled on that backbone
   (teacher r = m and student r = n both dense, L1 on every final token), label-free, on the
   ``photo-segments`` training images;
3. evaluation on the 512 ``photo-segments`` test images (dataset seed 0, the same for every seed) at
   every target r, dense ToMe, ``k = 2 r``: without and with the bank (``apply(model, 0, r)``, merged).

Why ``--dense-ratio 2``: the paper merges ``k = 32 r`` of DeiT-B's 1024 patches at 512 px, so at r = 16
half of them (k / N = r / 32). A 64-patch grid keeps that fraction with ``k = 2 r``, and r = 16
(k = 32 = 64 // 2) is the largest merge one bipartite step allows, as in the paper.

Intervals: percentile bootstrap over the test images (one draw for all seeds, the seeds resampled too)
of the dataset mIoU (confusion matrices summed over the drawn images); the ToCom gain is a paired
bootstrap (one draw for both arms). GFLOPs: ``FlopCounterMode`` over the whole Segmenter forward of one
image (backbone + decoder + upsampling, attention unfused while counting). Writes
``benchmarks/results/segmentation.{json,md,png}``; trained models go to ``--workdir`` (reused when
present). ::

    python benchmarks/study/segmentation.py            # 15 min on 2 shared cores (docs/dense.md)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import tocom_hub
from tocom_hub.core.bank.module import ToComBank
from tocom_hub.core.compensation import api as compensate
from tocom_hub.core.jsonio import write_json
from tocom_hub.tools.miou import bootstrap_miou, paired_bootstrap_miou
from tocom_hub.training import distill, segment

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "..", "results")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="out/seg-study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rs", type=int, nargs="+", default=[0, 4, 8, 12, 16])
    p.add_argument("--dense-ratio", type=int, default=2)
    p.add_argument("--decoder", default="mask", choices=["linear", "mask"])
    p.add_argument("--ft-steps", type=int, default=1000)
    p.add_argument("--bank-steps", type=int, default=500)
    p.add_argument("--bank-lr", type=float, default=1e-3, help="AdamW lr of the bank (distill.py --lr)")
    p.add_argument("--bank-name", default="bank", help="sub-directory of the bank in each seed's workdir")
    p.add_argument("--test-images", type=int, default=512)
    p.add_argument("--boot", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(RESULTS, "segmentation"), help="path prefix of .json/.md/.png")
    return p.parse_args(argv)


def gflops(model: segment.Segmenter, x: torch.Tensor) -> float:
    """FlopCounterMode GFLOPs of ``model(x)`` (attention unfused while counting: no formula for fused SDPA)."""
    blocks = model.backbone.blocks
    fused = [b.attn.fused_attn for b in blocks]
    for b in blocks:
        b.attn.fused_attn = False
    try:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(x)
    finally:
        for b, f in zip(blocks, fused):
            b.attn.fused_attn = f
    return fc.get_total_flops() / 1e9


def train(args: argparse.Namespace, seed: int) -> Dict[str, str]:
    """Fine-tune the segmenter and distill its dense bank for ``seed`` (reused when present)."""
    ft = os.path.join(args.workdir, f"seed{seed}", "segmenter")
    bank = os.path.join(args.workdir, f"seed{seed}", args.bank_name)
    threads = ["--threads", str(args.threads)] if args.threads else []
    if not os.path.isfile(os.path.join(ft, "segmenter.json")):
        segment.main(["--output-dir", ft, "--decoder", args.decoder, "--steps", str(args.ft_steps),
                      "--seed", str(seed), "--dense-ratio", str(args.dense_ratio)] + threads)  # fmt: skip
    if not os.path.isfile(os.path.join(bank, "tocom.safetensors")):
        distill.main(["--checkpoint", os.path.join(ft, "backbone.safetensors"), "--dense", "--dense-ratio",
                      str(args.dense_ratio), "--kd", "tokens", "--data", "photo-segments", "--no-augment",
                      "--r-max", "16", "--max-steps", str(args.bank_steps), "--batch-size", "32",
                      "--heldout-images", "128", "--seed", str(seed), "--lr", str(args.bank_lr),
                      "--output-dir", bank])  # fmt: skip
    return {"segmenter": ft, "bank": bank}


def evaluate_seed(args, paths, x, y) -> Dict[str, Any]:
    model = segment.load_segmenter(paths["segmenter"])
    bank = ToComBank.from_pretrained(paths["bank"])
    bb = model.backbone
    tocom_hub.patch(bb, method="tome", dense=True, dense_ratio=args.dense_ratio)
    out: Dict[str, Any] = {"plain": {}, "tocom": {}, "gflops": {}}
    for r in args.rs:
        tocom_hub.set_r(bb, r)
        out["gflops"][r] = gflops(model, x[:1])
        out["plain"][r] = segment.evaluate_confusions(model, x, y).numpy()
        compensate.apply(bb, 0, r, bank=bank, merge=True)
        out["tocom"][r] = segment.evaluate_confusions(model, x, y).numpy()
        compensate.remove(bb)
    return out


def table(result: Dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [
        "| target r | k = 2r merged before each MLP | GFLOPs | mIoU plain dense | mIoU + dense ToCom | ToCom gain |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        p, t, d = row["plain"], row["tocom"], row["gain"]
        lines.append(
            f"| {row['r']} | {row['k']} / 64 | {row['gflops']:.4f} "
            f"| {p['miou']:.1f} [{p['low']:.1f}, {p['high']:.1f}] | {t['miou']:.1f} [{t['low']:.1f}, {t['high']:.1f}] "
            f"| {d['delta']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] |"
        )
    return "\n".join(lines) + "\n"


def plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, label, dx in (("plain", "dense ToMe", -0.15), ("tocom", "dense ToMe + ToCom", 0.15)):
        g = [row["gflops"] for row in rows]
        m = np.array([row[arm]["miou"] for row in rows])
        lo = m - np.array([row[arm]["low"] for row in rows])
        hi = np.array([row[arm]["high"] for row in rows]) - m
        ax.errorbar(np.array(g) + dx * 0.0, m, yerr=[lo, hi], marker="o", capsize=3, label=label)
    for row in rows:
        ax.annotate(f"r={row['r']}", (row["gflops"], row["plain"]["miou"]), textcoords="offset points", xytext=(4, -12))
    ax.set_xlabel("GFLOPs per image (FlopCounterMode)")
    ax.set_ylabel("mIoU (%) on 512 test images")
    ax.set_title(f"photo-segments, tiny ViT + Segmenter, {len(result['seeds'])} seeds, 95% bootstrap")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    paths = {s: train(args, s) for s in args.seeds}
    t_train = time.perf_counter() - t0
    cfg = json.load(open(os.path.join(paths[args.seeds[0]]["segmenter"], "segmenter.json"), encoding="utf-8"))
    x, y = segment.tensor_dataset(cfg["data"], "test", cfg["img_size"], args.test_images, 0, cfg["mean"], cfg["std"])
    per_seed = [evaluate_seed(args, paths[s], x, y) for s in args.seeds]
    rows: List[Dict[str, Any]] = []
    for r in args.rs:
        plain = np.stack([e["plain"][r] for e in per_seed])
        tocom = np.stack([e["tocom"][r] for e in per_seed])
        base0 = np.stack([e["plain"][args.rs[0]] for e in per_seed])
        rows.append({
            "r": r,
            "k": args.dense_ratio * r,
            "gflops": per_seed[0]["gflops"][r],
            "plain": bootstrap_miou(plain, n_boot=args.boot),
            "tocom": bootstrap_miou(tocom, n_boot=args.boot),
            "gain": paired_bootstrap_miou(plain, tocom, n_boot=args.boot),
            "plain_vs_r0": paired_bootstrap_miou(base0, plain, n_boot=args.boot),
            "plain_per_seed": [float(v) for v in _per_seed(plain)],
            "tocom_per_seed": [float(v) for v in _per_seed(tocom)],
        })  # fmt: skip
    result = {
        "what": "mIoU of a Segmenter (embedded tiny ViT + mask transformer) on photo-segments, dense ToMe at "
        "target r (k = dense_ratio * r tokens merged before every MLP, unmerged after), without and with a "
        "dense ToCom bank; source r = 0",
        "args": vars(args),
        "seeds": args.seeds,
        "val_miou_r0": [
            json.load(open(os.path.join(paths[s]["segmenter"], "segmenter.json")))["val_miou"] for s in args.seeds
        ],  # fmt: skip
        "bank_heldout": [
            json.load(open(os.path.join(paths[s]["bank"], "metrics.json"))).get("heldout_l1_no_bank")
            for s in args.seeds
        ],  # fmt: skip
        "bank_heldout_with_bank": [
            json.load(open(os.path.join(paths[s]["bank"], "metrics.json"))).get("heldout_l1_with_bank")
            for s in args.seeds
        ],
        "rows": rows,
        "seconds_train": t_train,
        "seconds_total": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
    }
    write_json(args.out + ".json", result)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(table(result))
    plot(result, args.out + ".png")
    print(table(result))
    return result


def _per_seed(confs: np.ndarray) -> List[float]:
    from tocom_hub.tools.miou import miou

    return [miou(c.sum(0)) for c in confs]


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
