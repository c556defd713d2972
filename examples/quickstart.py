"""Quickstart: ToCom on a real (tiny) timm ViT, offline, in about a minute on a CPU.

    python examples/quickstart.py                      # the embedded study demo, full test split
    python examples/quickstart.py --json out.json      # also write the headline numbers as JSON
    python examples/quickstart.py --limit 256 --targets 0,5,10

What it runs is the CPU-scale study (``benchmarks/study/``) in miniature, on files that ship with
tocom-hub (``tocom_hub/assets/study``): a tiny timm ViT pre-trained on an embedded corpus, downstream
models fine-tuned from it at source ``r = 0`` and at source ``r = R`` (AdaptFormer, as the paper does
on VTAB-1k; one per fine-tuning seed of the study), and the ToCom bank trained for that backbone. For
every target ``r`` it prints tokens left after the last block, top-1 on the task's embedded test split
(mean over the seeds, as the study reports it) and images/s —
plain ToMe, and ToMe with the bank merged into the weights (``tocom_hub.apply``: the same call, the
same bank loader, as for a bank on the Hugging Face Hub).

The same lines on a real model and a Hub bank::

    import timm, tocom_hub
    model = timm.create_model("deit_base_patch16_224", pretrained=True)      # your fine-tune at r = 0
    tocom_hub.apply(model, source_r=0, target_r=16, bank="org/tocom-deit-base")
    tocom_hub.set_target_r(model, 8)                                       # switch r at run time
"""
import argparse
import json

import torch

import tocom_hub
from tocom_hub.demo import demo_bank_path, demo_info, load_demo_model
from tocom_hub.evaluation import build_eval_dataset, evaluate


def parse_targets(text: str, R: int):
    out = sorted({int(v) for v in text.split(",")}) if text else list(range(R + 1))
    if any(not 0 <= t <= R for t in out):
        raise SystemExit(f"--targets must lie in 0…{R} (the bank's range); got {text!r}")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="", help="comma-separated target r values (default 0…R)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N test images (default all)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--json", metavar="FILE", help="write src0_tgtR / srcR_tgt0 (and the full table) to FILE")
    args = parser.parse_args()

    info = demo_info()
    R, scales, task = info["R"], info["scale"], info["task"]
    targets = parse_targets(args.targets, R)
    bank = demo_bank_path()  # a bank folder; bank="org/name" would fetch the same files from the Hub
    print(f"demo: {info['model']} {info['model_kwargs']} pre-trained on '{info['corpus']}', fine-tuned on "
          f"'{task}' (AdaptFormer) at source r = 0 and r = {R}; ToCom bank {bank}, s = "
          f"{scales['0']:g} / {scales[str(R)]:g} (chosen on the validation split); "
          f"{torch.get_num_threads()} threads\n")
    seeds = info["seeds"]
    results = {}  # (source r, target r, with ToCom) -> rows of every shipped seed
    data = None
    for src in (0, R):
        for seed in seeds:
            model, _ = load_demo_model(src, seed=seed)
            if data is None:
                data = build_eval_dataset(model, task, split="test", limit=args.limit)
            loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
            rows = evaluate(model, loader, sorted(set(targets) | {0, R}), bank=bank, source_r=src,
                            scale=scales[str(src)], progress=False)
            for r in rows:
                results.setdefault((src, r["target_r"], r["tocom"]), []).append({**r, "seed": seed})

    def mean(src, t, tc, key="top1"):
        vals = [r[key] for r in results[(src, t, tc)]]
        return sum(vals) / len(vals)

    print(f"{len(data)} test images of '{task}'; top-1 (%, mean over fine-tuning seeds {seeds}) and images/s "
          f"per target r")
    print(f"{'target r':>8} {'tokens':>6} | {'src 0':>6} {'+ToCom':>7} | {f'src {R}':>6} {'+ToCom':>7} | "
          f"{'img/s':>7} {'+ToCom':>7}")
    for t in targets:
        tokens = results[(0, t, False)][0]["tokens"]
        print(f"{t:>8} {tokens:>6} | {mean(0, t, False):6.2f} {mean(0, t, True):7.2f} | {mean(R, t, False):6.2f} "
              f"{mean(R, t, True):7.2f} | {mean(0, t, False, 'images_per_s'):7.0f} "
              f"{mean(0, t, True, 'images_per_s'):7.0f}")
    top = lambda src, t, tc: round(mean(src, t, tc), 2)  # noqa: E731
    summary = {
        "task": task, "R": R, "seeds": seeds, "scale": scales, "images": len(data),
        "src0_tgt0": top(0, 0, False),
        "src0_tgtR": {"no_tocom": top(0, R, False), "tocom": top(0, R, True)},
        "srcR_tgtR": top(R, R, False),
        "srcR_tgt0": {"no_tocom": top(R, 0, False), "tocom": top(R, 0, True)},
    }
    print(f"\nsource 0 → target {R}: {summary['src0_tgtR']['no_tocom']:.2f} → {summary['src0_tgtR']['tocom']:.2f} "
          f"with ToCom (a model trained at r = {R}: {summary['srcR_tgtR']:.2f});  source {R} → target 0: "
          f"{summary['srcR_tgt0']['no_tocom']:.2f} → {summary['srcR_tgt0']['tocom']:.2f}")
    if args.json:
        summary["rows"] = [r for rows in results.values() for r in rows]
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {args.json}")
    print("\nSame on a real model: tocom_hub.apply(timm_model, source_r=0, target_r=16, bank='org/name') — see "
          "README.md; the study behind this demo: benchmarks/study/README.md.")


if __name__ == "__main__":
    main()
