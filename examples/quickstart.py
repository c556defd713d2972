"""Quickstart: token merging on a real (tiny) timm ViT, offline, in under a minute on a CPU.

    python examples/quickstart.py                 # embedded demo model + embedded test images
    python examples/quickstart.py --r 0,2,4,6,8,10 --limit 1024 --method evit

Loads the embedded demo backbone that ships with tocom-hub (a 6-block, 96-dim timm ViT on 32 px
images, trained on the embedded ``photo-crops`` task: scikit-image's public-domain photographs),
makes it merge ``r`` tokens per block with ``tocom_hub.patch`` / ``tocom_hub.set_r`` and prints, per
``r``: tokens left after the last block, top-1 accuracy on held-out images, and images/s.

The same three lines work on any timm ViT::

    model = timm.create_model("deit_base_patch16_224", pretrained=True)
    tocom_hub.apply(model, source_r=0, target_r=16, bank="org/name")   # a ToCom bank from the Hub
    tocom_hub.set_target_r(model, 8)                                    # switch r at run time
"""
import argparse

import torch

import tocom_hub
from tocom_hub.evaluation import build_eval_dataset, evaluate, format_table
from tocom_hub.models import load_model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="tome", choices=tocom_hub.METHODS)
    parser.add_argument("--r", default="0,2,4,6,8,10", help="comma-separated r values (tokens removed per block)")
    parser.add_argument("--limit", type=int, default=512, help="held-out images to evaluate")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    model, info = load_model("demo")
    tocom_hub.patch(model, method=args.method)
    data = build_eval_dataset(model, "photo-crops", split="test", limit=args.limit)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    rs = [int(v) for v in args.r.split(",")]
    print(f"demo model: {info['model']} {info['model_kwargs']}, {args.method}, "
          f"{len(data)} held-out images, {torch.get_num_threads()} threads")
    rows = evaluate(model, loader, rs, method=args.method, progress=False)
    print(format_table(rows))
    print("\nNext: `tocom-hub visualize --model demo --image IMG --r 8 -o merged.png` shows which patches merge;"
          "\n`accelerate launch training/distill.py --max-steps 50 --output-dir out/` trains a ToCom bank for it.")


if __name__ == "__main__":
    main()
