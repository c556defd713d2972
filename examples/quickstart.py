"""Quickstart: token merging on a timm ViT, offline, in a few seconds on a CPU.

    python examples/quickstart.py

Builds a small timm ViT (random weights, no download), makes it merge ``r`` tokens per block with
``tocom_hub.patch`` / ``tocom_hub.set_r`` and prints, per ``r``: tokens left after the last block,
agreement with the r=0 output and images/s.
"""
import argparse
import time

import timm
import torch

import tocom_hub


def images_per_second(model, x, repeats=5):
    with torch.inference_mode():
        model(x)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - start)
    return x.shape[0] / best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model name (built without weights)")
    parser.add_argument("--method", default="tome", choices=tocom_hub.METHODS)
    parser.add_argument("--r", default="0,4,8,12,16", help="comma-separated r values")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch_size, 3, *model.patch_embed.img_size)
    with torch.inference_mode():
        reference = model(x)
    tocom_hub.patch(model, method=args.method, trace_source=True)

    print(f"{args.model} ({args.method}), batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"{'r':>4} {'tokens left':>12} {'top-1 agrees w/ r=0':>20} {'images/s':>10}")
    for r in [int(v) for v in args.r.split(",")]:
        tocom_hub.set_r(model, r)
        with torch.inference_mode():
            out = model(x)
        source = tocom_hub.get_source(model)
        left = source.shape[1] if source is not None else model.patch_embed.num_patches + model.num_prefix_tokens
        agree = (out.argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(f"{r:>4} {left:>12} {agree:>20.0%} {images_per_second(model, x):>10.1f}")


if __name__ == "__main__":
    main()
