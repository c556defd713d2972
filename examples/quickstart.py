"""Quickstart: ToCom on a real (tiny) timm ViT, offline, in under a minute on a 2-core CPU.

    python examples/quickstart.py                      # target r = 0 and 16: the headline numbers
    python examples/quickstart.py --full               # every target r = 0…16 (about 10x the evaluation work)
    python examples/quickstart.py --json out.json      # also write the numbers (and their intervals) as JSON
    python examples/quickstart.py --limit 200 --targets 0,8,16

What it runs is the CPU-scale study (``benchmarks/study/``) in miniature, on files that ship with
tocom-hub (``tocom_hub/demo/assets/study``): a tiny timm ViT pre-trained on an embedded corpus, downstream
models fine-tuned from it at source ``r = 0`` and at source ``r = R`` (AdaptFormer, as the paper does
on VTAB-1k; one per fine-tuning seed of the study), and the ToCom bank trained for that backbone. For
every target ``r`` it prints top-1 on the task's embedded test split (mean over the seeds), plain ToMe
and ToMe with the bank merged into the weights (``tocom_hub.apply``: the same call, the same bank
loader, as for a bank on the Hugging Face Hub), and the change ToCom makes with its 95 % interval
(paired bootstrap over the test images and the seeds). The same numbers in Python:
``tocom_hub.demo.evaluate_demo()``.

The same lines on a real model and a Hub bank::

    import timm, tocom_hub
    model = timm.create_model("deit_base_patch16_224", pretrained=True)      # your fine-tune at r = 0
    tocom_hub.apply(model, source_r=0, target_r=16, bank="org/tocom-deit-base")
    tocom_hub.set_target_r(model, 8)                                       # switch r at run time
"""

import argparse
import json

import torch

from tocom_hub.demo import demo_info, evaluate_demo
from tocom_hub.demo.data import get_dataset_spec


def parse_targets(text: str, R: int):
    try:
        out = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise SystemExit(f"--targets takes comma-separated integers such as 0,8,{R}; got {text!r}") from None
    if any(not 0 <= t <= R for t in out):
        raise SystemExit(f"--targets must lie in 0…{R} (the bank's range); got {text!r}")
    return out


def ci_text(d) -> str:
    return f"{d['delta']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def verdict(d) -> str:
    return (
        "the interval contains 0: these images cannot tell it from noise"
        if d["low"] <= 0 <= d["high"]
        else "the interval excludes 0: more than noise on these images"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--targets", default="", help="comma-separated target r values (default: 0 and R; 0 and R are always included)"
    )
    parser.add_argument("--full", action="store_true", help="every target r = 0…R (the study's grid)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N test images (default all)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: this tiny model gains little from more, and on a shared "
        "machine every extra thread waits for a busy core — 2 threads took 4x longer than 1 "
        "on a loaded 2-core machine)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", metavar="FILE", help="write the numbers (headline, table, intervals) to FILE")
    args = parser.parse_args()

    torch.set_num_threads(max(1, args.threads))
    info = demo_info()
    R, task, seeds, scales = info["R"], info["task"], info["seeds"], info["scale"]
    targets = list(range(R + 1)) if args.full else parse_targets(args.targets, R) if args.targets else [0, R]
    spec = get_dataset_spec(task)
    kw = info["model_kwargs"]
    print(f"ToCom quickstart — offline, {torch.get_num_threads()} CPU thread(s)")
    print(
        f"task    '{task}': {' '.join(spec.description.split())}; {spec.num_classes} classes, "
        f"so guessing scores {100 / spec.num_classes:.1f} %"
    )
    print(
        f"models  a tiny timm ViT ({info['model']}, {kw['img_size']} px, {kw['depth']} blocks) fine-tuned on it "
        f"at r = 0 and at r = {R}, {len(seeds)} seeds each"
    )
    print(
        f"bank    one ToCom bank for that backbone (s = {scales['0']:g} from r = 0, {scales[str(R)]:g} from "
        f"r = {R}; chosen on the validation split)\n"
    )

    res = evaluate_demo(targets, limit=args.limit, batch_size=args.batch_size, progress=not args.no_progress)
    top, delta, n = res["top1"], res["delta"], res["images"]

    print(
        f"\ntop-1 (%) on {n:,} test images, mean over {len(seeds)} seeds. target r: tokens merged per block "
        f"at inference; tokens: left after the last block (of {res['tokens'][0]})"
    )
    cols = f"{'ToMe':>6} {'+ToCom':>6}  {'change [95 % CI]':<22}"
    print(f"{'':>16}| {'fine-tuned at r = 0':<37}| fine-tuned at r = {R}")
    print(f"{'target r':>8} {'tokens':>6} | {cols}| {cols}")
    for t in res["targets"]:
        cells = []
        for src in (0, R):
            c = top[src][t]
            change = "(same model)" if t == src else ci_text(delta[src][t])
            cells.append(f"{c['no_tocom']:6.2f} {c['tocom']:6.2f}  {change:<22}")
        print(f"{t:>8} {res['tokens'][t]:>6} | {cells[0]}| {cells[1]}")

    a, b = res["src0_tgtR"], res["srcR_tgt0"]
    gap = res["srcR_tgtR"] - a["no_tocom"]
    closed = f", {100 * (a['tocom'] - a['no_tocom']) / gap:.0f} % of the gap" if gap > 0 else ""
    print(f"\nWhat it means (guessing: {res['chance']:.1f} %)")
    print(
        f"- The model fine-tuned at r = 0, run at r = {R}: {res['src0_tgt0']:.2f} → {a['no_tocom']:.2f}. The bank "
        f"wins back {ci_text(delta[0][R])} points{closed} to a model fine-tuned at r = {R} "
        f"({res['srcR_tgtR']:.2f}), without retraining; {verdict(delta[0][R])}."
    )
    print(
        f"- The model fine-tuned at r = {R}, run at r = 0: {b['no_tocom']:.2f} → {b['tocom']:.2f} with the bank "
        f"({ci_text(delta[R][0])}); {verdict(delta[R][0])}."
    )
    print(
        f"- [95 % CI]: paired bootstrap over the {n:,} images and the {len(seeds)} seeds. The study behind "
        f"this demo repeats it on four tasks (benchmarks/study/README.md)."
    )
    ips = res["images_per_s"]
    print(
        "- Speed (plain ToMe, images/s, noisy on a busy machine): "
        + ", ".join(f"r = {t}: {ips[t]:.0f}" for t in res["targets"] if ips[t])
        + "; the bank is merged into the weights, so it costs nothing at inference."
    )
    if not args.full:
        print(
            f"\nEvery target r = 0…{R}: python examples/quickstart.py --full. On your model: "
            f"tocom_hub.apply(model, source_r=0, target_r=16, bank='org/name')."
        )
    if args.json:
        out = {k: v for k, v in res.items() if k not in ("top1", "delta", "tokens", "images_per_s")}
        out["table"] = [
            {
                "target_r": t,
                "tokens": res["tokens"][t],
                **{f"src{s}": {**top[s][t], "delta": delta[s][t]} for s in (0, R)},
            }
            for t in res["targets"]
        ]
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
