"""Accuracy of an off-the-shelf model over target r and scale s, without and with a ToCom bank.

Takes a model made by ``finetune.py`` (``--finetuned DIR``: ``finetune.json`` + ``model.safetensors``
[+ ``adaptformer.safetensors``]) at source ``r = m`` and measures top-1 on its validation split at
every target r: plain (``tocom_hub.set_r``), and with the bank merged into the weights
(``tocom_hub.apply(model, source_r=m, target_r=n, bank=..., scale=s, merge=True)``, then
``tocom_hub.set_target_r`` — the inference path users run). ``--matched DIR ...`` adds models
fine-tuned at other source r, each evaluated at its own r (the "source = target" reference of the
paper's Fig. 5). Without ``--finetuned`` the embedded backbone is evaluated on its own pre-training
task (``photo-crops``) at source r = ``--source-r``.

Writes ``eval.json`` and ``eval.png`` (accuracy vs target r: "no ToCom", "+ToCom (s=…)" per scale,
and "source = target" when given) into ``--output-dir``.

Examples::

    python training/evaluate.py --finetuned out/ft-r0 --bank out/bank --scales 0.05,0.1,0.15
    python training/evaluate.py --finetuned out/ft-r0 --bank out/bank --matched out/ft-r5 out/ft-r10
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader

import tocom_hub
from tocom_hub.demo.adaptformer import AdaptFormer
from tocom_hub.tools._threads import setup_cpu_threads
from tocom_hub.tools.images import model_img_size
from tocom_hub.training import common

logger = logging.getLogger("tocom_hub.training.evaluate")


def _int_list(text: str) -> List[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part and not part.startswith("-"):
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--finetuned",
        default=None,
        metavar="DIR",
        help="output dir of finetune.py (default: the embedded backbone on photo-crops)",
    )
    p.add_argument(
        "--source-r",
        type=int,
        default=None,
        help="source r of the model (default: finetune.json's; 0 for the embedded backbone)",
    )
    p.add_argument("--bank", default=None, metavar="DIR|FILE|REPO", help="ToCom bank (omit: only 'no ToCom')")
    p.add_argument(
        "--targets",
        default=None,
        help="target r values, e.g. '0,2,4' or '0-10' (default 0…R of the bank, else 0…source r)",
    )
    p.add_argument("--scales", default=None, help="comma-separated s values (default: the bank's scale)")
    p.add_argument(
        "--matched",
        nargs="*",
        default=[],
        metavar="DIR",
        help="finetune.py dirs trained at other source r, each evaluated at its own r",
    )
    p.add_argument("--data", default=None, help="override the dataset recorded in finetune.json")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="validation", help="split to evaluate on (default validation)")
    p.add_argument("--val-images", type=int, default=None, help="evaluate on the first N images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument(
        "--cache-mb",
        type=int,
        default=1024,
        help="decode the evaluation images once and keep them in memory when they fit in this many "
        "MiB (every target r and scale re-reads the split; 0: never cache)",
    )
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--output-dir", default="out/eval")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)

    for d in [args.finetuned, *args.matched]:
        if d is not None and not (Path(d) / "finetune.json").is_file():
            p.error(f"{d}: no finetune.json here; pass an output dir of training/finetune.py")
    if args.bank is not None and os.path.sep in args.bank and not os.path.exists(args.bank):
        p.error(f"--bank {args.bank}: no such file or directory")
    try:
        args.targets = _int_list(args.targets) if args.targets else None
        args.scales = [float(s) for s in args.scales.split(",") if s.strip()] if args.scales else None
    except ValueError as e:
        p.error(f"--targets / --scales must be comma-separated numbers ({e})")
    if args.targets is not None and (not args.targets or min(args.targets) < 0):
        p.error(f"--targets must be non-negative ints; got {args.targets}")
    if args.scales is not None and (not args.scales or not all(math.isfinite(s) for s in args.scales)):
        p.error("--scales must be finite numbers")
    if args.scales and args.bank is None:
        p.error("--scales needs --bank")
    if args.cache_mb < 0:
        p.error(f"--cache-mb must be >= 0; got {args.cache_mb}")
    if args.batch_size < 1 or (args.val_images is not None and args.val_images < 1):
        p.error("--batch-size and --val-images must be >= 1")
    if args.source_r is not None and args.source_r < 0:
        p.error(f"--source-r must be >= 0; got {args.source_r}")
    return args


def load_finetuned(path: Optional[str], device: torch.device):
    """``(model, recipe)`` rebuilt from a finetune.py output dir (or the embedded backbone for ``None``)."""
    import timm
    from safetensors.torch import load_file

    if path is None:
        ns = argparse.Namespace(
            model=None, model_kwargs=None, pretrained=False, checkpoint=None, img_size=None, drop_path=0.0
        )
        model, info = common.build_backbone(ns)
        recipe = {
            **info,
            "data": common.EMBEDDED_DATA,
            "method": "tome",
            "source_r": 0,
            "mode": "full",
            "img_size": model_img_size(model)[0],
        }
        return model.to(device).eval(), recipe, None
    recipe = json.loads((Path(path) / "finetune.json").read_text())
    model = timm.create_model(
        recipe["model"], pretrained=False, num_classes=recipe["num_classes"], **recipe.get("model_kwargs", {})
    )
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    adapters = None
    if recipe.get("mode") == "adaptformer":
        adapters = AdaptFormer.for_model(model, bottleneck=recipe["adapter_bottleneck"], scale=recipe["adapter_scale"])
        adapters.load_state_dict(load_file(str(Path(path) / "adaptformer.safetensors")))
        adapters.attach(model)
    return model.to(device).eval(), recipe, adapters


def make_loader(args, recipe, model, accelerator):
    ns = argparse.Namespace(
        data=args.data or recipe["data"],
        data_dir=args.data_dir,
        train_split="train",
        val_split=args.split,
        batch_size=args.batch_size,
    )
    img_size = model_img_size(model)[0]
    _, val_set, info = common.build_datasets(
        ns, recipe["data"], img_size, seed=recipe.get("seed", 0), val_length=args.val_images
    )
    _, eval_tf, _ = common.build_transforms(model, img_size, False, info["kind"] == "embedded")
    n = min(len(val_set), args.val_images or len(val_set))
    ds = common.SeededTransform(torch.utils.data.Subset(val_set, range(n)), eval_tf, 0)
    if common.fits_in_memory(n, img_size, args.cache_mb):
        # the evaluation transform is deterministic: decode once, then every pass (one per target r and
        # scale) reads tensors instead of re-decoding / re-rendering the images
        ds = common.InMemory(ds, args.batch_size, args.num_workers)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    return accelerator.prepare(loader), n


def plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    targets = result["targets"]
    src = result["source_r"]
    ax.plot(
        targets, [result["no_tocom"][str(t)] for t in targets], "o-", color="0.4", label=f"source r={src}, no ToCom"
    )
    cmap = plt.get_cmap("viridis")
    scales = sorted(result.get("tocom", {}), key=float)
    for i, s in enumerate(scales):
        color = cmap(0.15 + 0.7 * i / max(len(scales) - 1, 1))
        ax.plot(targets, [result["tocom"][s][str(t)] for t in targets], "s-", color=color, label=f"+ToCom (s={s})")
    if result.get("matched"):
        rs = sorted(result["matched"], key=int)
        ax.plot(
            [int(r) for r in rs],
            [result["matched"][r] for r in rs],
            "D--",
            color="tab:red",
            label="source r = target r",
        )
    ax.set_xlabel("target r (tokens removed per block)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{result['model']} on {result['data']} ({result['method']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    from accelerate import Accelerator

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu)
    setup_cpu_threads(accelerator.device.type, log=logger.info)  # accelerate launch sets OMP_NUM_THREADS=1

    model, recipe, _ = load_finetuned(args.finetuned, accelerator.device)
    source_r = recipe["source_r"] if args.source_r is None else args.source_r
    tocom_hub.patch(model, method=recipe.get("method", "tome"), prop_attn=recipe.get("prop_attn", True))
    bank = None
    if args.bank is not None:
        bank = tocom_hub.ToComBank.from_pretrained(args.bank, device=accelerator.device)
        if bank.method != recipe.get("method", "tome"):
            raise SystemExit(
                f"error: the bank was trained for {bank.method!r} but the model uses {recipe.get('method')!r}"
            )
        if source_r > bank.r_max:
            raise SystemExit(f"error: source r={source_r} is outside the bank's range 0…{bank.r_max}")
    targets = args.targets or list(range(0, (bank.r_max if bank else source_r) + 1))
    if bank is not None and max(targets) > bank.r_max:
        raise SystemExit(f"error: target r up to {max(targets)} requested; the bank covers 0…{bank.r_max}")
    try:
        tocom_hub.set_r(model, max(targets))
    except ValueError as e:
        raise SystemExit(f"error: target r={max(targets)} does not fit this model: {e}") from None
    scales = args.scales or ([bank.scale] if bank is not None else [])
    loader, n_images = make_loader(args, recipe, model, accelerator)

    result: Dict[str, Any] = {
        "model": recipe["model"],
        "data": args.data or recipe["data"],
        "split": args.split,
        "images": n_images,
        "method": recipe.get("method", "tome"),
        "source_r": source_r,
        "finetuned": args.finetuned,
        "bank": args.bank,
        "targets": targets,
        "no_tocom": {},
        "tocom": {},
        "matched": {},
    }
    for t in targets:
        tocom_hub.set_r(model, t)
        result["no_tocom"][str(t)] = common.evaluate_top1(accelerator, model, loader)
        logger.info("target r=%d: no ToCom %.2f", t, result["no_tocom"][str(t)])
    for s in scales:
        key = f"{s:g}"
        result["tocom"][key] = {}
        tocom_hub.apply(model, source_r, targets[0], bank=bank, scale=s, merge=True)
        for t in targets:
            tocom_hub.set_target_r(model, t)
            result["tocom"][key][str(t)] = common.evaluate_top1(accelerator, model, loader)
            logger.info("target r=%d: +ToCom (s=%s) %.2f", t, key, result["tocom"][key][str(t)])
        tocom_hub.remove(model)
    if result["tocom"]:
        gains = {
            s: sum(acc[str(t)] - result["no_tocom"][str(t)] for t in targets) / len(targets)
            for s, acc in result["tocom"].items()
        }
        result["mean_gain_by_scale"] = gains
    for d in args.matched:
        m_model, m_recipe, _ = load_finetuned(d, accelerator.device)
        tocom_hub.patch(m_model, method=m_recipe.get("method", "tome"), prop_attn=m_recipe.get("prop_attn", True))
        tocom_hub.set_r(m_model, m_recipe["source_r"])
        result["matched"][str(m_recipe["source_r"])] = common.evaluate_top1(accelerator, m_model, loader)
        r = m_recipe["source_r"]
        logger.info("matched source=target r=%d: %.2f", r, result["matched"][str(r)])

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        common.write_json(os.path.join(args.output_dir, "eval.json"), result)
        plot(result, os.path.join(args.output_dir, "eval.png"))
        logger.info("wrote %s/eval.json and eval.png", args.output_dir)
    return result


if __name__ == "__main__":
    main()
