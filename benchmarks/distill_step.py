"""Cost of one ToCom distillation step relative to one plain full fine-tuning step.

Same timm model (``pretrained=False``: timing does not depend on the weights), same batch, same
drop-path rate, fp32, CPU threads fixed:

* **distill** — the step ``training/distill.py`` runs (its ``Distiller`` and ``kd_loss``): frozen
  backbone, teacher at r = m under ``no_grad`` without the bank, student at r = n with the bank's
  unmerged m → n LoRA, KL loss, backward (bank gradients only), AdamW on the bank. The pairs (m, n)
  are the training sequence (``sample_pair(seed, step, R)``), so the median is over the pairs a real
  run draws.
* **plain** — standard fine-tuning: r = 0, every parameter trainable, cross-entropy, backward,
  AdamW over all parameters.

Rounds interleave the two (alternating which goes first) so that load from other processes hits both
alike; the headline is the median over rounds of the per-round ratio distill / plain (target ≤ 1.1).

Why it can be that cheap: the backbone is frozen, so the backward computes activation gradients only
(no weight gradients, about half of a normal backward) and AdamW touches 1 % of the parameters; the
teacher pass keeps no activations; and with token merging both passes see fewer tokens (r > 0 for at
least one of them in every pair).

    python benchmarks/distill_step.py --model deit_small_patch16_224 --batch-size 32 --rounds 10
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tocom_hub  # noqa: E402
from tocom_hub.bank import ToComBank  # noqa: E402
from tocom_hub.training.common import sample_pair  # noqa: E402
from tocom_hub.training.distill import Distiller, kd_loss  # noqa: E402

TARGET_RATIO = 1.1


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--r-max", type=int, default=16)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--method", default="tome", choices=tocom_hub.METHODS)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="out/distill_step.json", help="where to write the results ('' to skip)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    kwargs = {"img_size": args.img_size} if args.img_size else {}
    base = timm.create_model(args.model, pretrained=False, drop_path_rate=args.drop_path, **kwargs)
    size = base.patch_embed.img_size
    x = torch.randn(args.batch_size, 3, *size)
    y = torch.randint(0, base.num_classes, (args.batch_size,))

    # plain full fine-tuning: own copy, everything trainable, r = 0 (unpatched timm)
    plain = copy.deepcopy(base).train()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0.05)

    def plain_step(_i: int) -> None:
        loss = F.cross_entropy(plain(x), y)
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    # distillation: frozen patched backbone + unmerged bank, exactly as training/distill.py builds it
    frozen = base
    tocom_hub.patch(frozen, method=args.method)
    frozen.requires_grad_(False)
    bank = ToComBank.for_model(frozen, r_max=args.r_max, rank=args.rank, method=args.method)
    with torch.no_grad():  # a trained-looking bank (fresh up factors are zero)
        for a in bank.A.values():
            a.normal_(0.0, 0.02)
    tocom_hub.apply(frozen, 0, 0, bank=bank, merge=False)
    distiller = Distiller(frozen, bank).train()
    bank_opt = torch.optim.AdamW(bank.parameters(), lr=1e-3, weight_decay=0.05)

    def distill_step(i: int) -> None:
        m, n = sample_pair(args.seed, i, args.r_max)
        student, teacher = distiller(x, m, n)
        loss = kd_loss(student, teacher, "logits")
        loss.backward()
        bank_opt.step()
        bank_opt.zero_grad(set_to_none=True)

    def timed(fn, i: int) -> float:
        t0 = time.perf_counter()
        fn(i)
        return time.perf_counter() - t0

    for i in range(args.warmup):
        distill_step(i)
        plain_step(i)
    d_times, p_times, ratios, pairs = [], [], [], []
    for i in range(args.rounds):
        if i % 2 == 0:
            td, tp = timed(distill_step, i), timed(plain_step, i)
        else:
            tp, td = timed(plain_step, i), timed(distill_step, i)
        d_times.append(td)
        p_times.append(tp)
        ratios.append(td / tp)
        pairs.append(sample_pair(args.seed, i, args.r_max))
        print(f"round {i:3d}  pair {pairs[-1]}  distill {td * 1e3:8.1f} ms  plain {tp * 1e3:8.1f} ms  "
              f"ratio {td / tp:5.3f}", flush=True)

    result = {
        "model": args.model, "img_size": list(size), "batch_size": args.batch_size, "r_max": args.r_max,
        "rank": args.rank, "method": args.method, "drop_path": args.drop_path, "threads": args.threads,
        "rounds": args.rounds, "pairs": pairs, "distill_ms": [t * 1e3 for t in d_times],
        "plain_ms": [t * 1e3 for t in p_times],
        "median_distill_ms": statistics.median(d_times) * 1e3, "median_plain_ms": statistics.median(p_times) * 1e3,
        "median_ratio": statistics.median(ratios),
        "ratio_of_medians": statistics.median(d_times) / statistics.median(p_times),
        "ratio_of_means": statistics.fmean(d_times) / statistics.fmean(p_times),
        "bank_parameters": bank.num_parameters(), "backbone_parameters": sum(q.numel() for q in plain.parameters()),
        "target_ratio": TARGET_RATIO, "torch": torch.__version__, "timm": timm.__version__,
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
    }
    result["meets_target"] = result["median_ratio"] <= TARGET_RATIO
    print()
    print(f"{args.model} {size[0]}px, batch {args.batch_size}, {args.threads} threads, R={args.r_max}, "
          f"{args.rounds} interleaved rounds")
    print(f"{'step':<44} {'median ms':>10}")
    print(f"{'plain full fine-tuning (r=0, all params, AdamW)':<44} {result['median_plain_ms']:>10.1f}")
    print(f"{'ToCom distill (teacher+student, bank AdamW)':<44} {result['median_distill_ms']:>10.1f}")
    print(f"median per-round ratio distill/plain: {result['median_ratio']:.3f} "
          f"(ratio of means {result['ratio_of_means']:.3f}; target <= {TARGET_RATIO}: "
          f"{'met' if result['meets_target'] else 'NOT met'})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
