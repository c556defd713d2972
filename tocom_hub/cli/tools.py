"""``tocom-hub bench`` / ``visualize`` / ``convert``: throughput, merged-token pictures, checkpoint conversion."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..core.checks import METHODS
from .options import (
    _add_bank_options,
    _add_model_options,
    _load_bank,
    _load_model,
    _model_label,
    _warn_about_model,
    _write_json,
    command_parser,
)
from .types import finite_float, fraction, non_negative_int, positive_int, r_list, r_value

# ---------------------------------------------------------------------------------------------------
# bench


def bench_command(args: argparse.Namespace) -> int:
    from ..tools.benchmark import benchmark, format_table

    if args.json and os.path.isdir(args.json):
        raise IsADirectoryError(f"{args.json} is a directory; pass a file name such as bench.json")
    model, info, device = _load_model(args)
    method = args.method or "tome"
    result = benchmark(
        model, args.r, batch_size=args.batch_size, method=method, iters=args.iters, warmup=args.warmup, seed=args.seed
    )
    print(format_table(result, title=_model_label(info, method)))
    if args.json:
        _write_json(args.json, {"model": info["model"], "model_info": info, **result})
        print(f"wrote {args.json}")
    return 0


def add_bench_parser(subparsers: Any) -> None:
    p = command_parser(
        subparsers,
        "bench",
        help="latency / throughput table per r vs plain timm",
        description="Latency (median and p90, ms per batch) and throughput (images/s) of a model at each r, next to "
        "plain timm, with the speed-up. Measurements are interleaved (each iteration visits every "
        "configuration once, in random order) so load drifts hit all configurations alike. Weights do "
        "not change the speed: a timm name is built with random weights. A bank merged into the "
        "weights costs nothing, so there is no --bank.",
        epilog="examples:\n"
        "  tocom-hub bench --model deit_base_patch16_224 --r 0,8,16 --batch 8\n"
        "  tocom-hub bench --model vit_small_patch16_224 --r 0-16 --batch 1 --threads 4 --iters 50 --json b.json\n"
        "  tocom-hub bench --model deit_small_patch16_224 --method evit --r 0,10,20",
    )
    _add_model_options(p, weights=False)
    g = p.add_argument_group("benchmark")
    g.add_argument(
        "--r", type=r_list, default=[0, 8, 16], metavar="R,R,…", help="r values, e.g. 0,8,16 or 0-16 (default 0,8,16)"
    )
    g.add_argument(
        "--batch",
        "--batch-size",
        dest="batch_size",
        type=positive_int,
        default=8,
        help="images per forward (default 8)",
    )
    g.add_argument("--iters", type=positive_int, default=20, help="timed forwards per configuration (default 20)")
    g.add_argument("--warmup", type=non_negative_int, default=3, help="untimed forwards per configuration (default 3)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random batch and of the visiting order")
    g.add_argument("--json", default=None, metavar="FILE", help="also write the table (and every sample) as JSON")
    p.set_defaults(func=bench_command)


# ---------------------------------------------------------------------------------------------------
# visualize


def visualize_command(args: argparse.Namespace) -> int:
    from ..tools.visualize import visualize

    if not os.path.isfile(args.image):
        raise FileNotFoundError(f"--image {args.image}: no such file")
    if os.path.isdir(args.output):
        raise IsADirectoryError(f"-o {args.output} is a directory; pass a file name such as merged.png")
    from ..tools.segmenter import is_segmenter_dir

    if args.dense or is_segmenter_dir(args.model):
        return _visualize_dense(args)
    model, info, _ = _load_model(args)
    bank = _load_bank(args)
    _warn_about_model("visualize", args, model, info, bank)
    source_r = args.source_r if args.source_r is not None else int(info.get("source_r") or 0)
    out = visualize(
        model,
        args.image,
        args.r,
        args.output,
        method=args.method,
        bank=bank,
        source_r=source_r,
        scale=args.scale,
        alpha=args.alpha,
        cell=args.cell,
        json_path=args.json,
    )
    prefix = f" (+{out['prefix_tokens']} prefix)" if out["prefix_tokens"] else ""
    pruned = f", {out['pruned_patches']} patches pruned (grey)" if out["pruned_patches"] else ""
    print(
        f"{_model_label(info, out['method'])} r={args.r}: {out['patches']} patches -> {out['tokens_left']} tokens"
        f"{prefix}, {out['groups']} colour groups{pruned}"
    )
    print(f"wrote {out['output']} and {out['json']}")
    return 0


def _visualize_dense(args: argparse.Namespace) -> int:
    """``visualize --dense`` (or ``--model`` a segmenter directory): patches sharing an MLP, predicted mask."""
    from ..tools.segmenter import is_segmenter_dir, load_segmenter
    from ..tools.visualize_dense import visualize_dense

    if args.bank is not None:
        raise ValueError("--bank is not supported with --dense (the picture shows the plain dense model)")
    if args.dense_ratio < 1:
        raise ValueError(f"--dense-ratio must be >= 1; got {args.dense_ratio}")
    if is_segmenter_dir(args.model):
        model = load_segmenter(args.model)
        label = f"segmenter {args.model}"
    else:
        model, info, _ = _load_model(args)
        label = _model_label(info, args.method or "tome")
    out = visualize_dense(
        model,
        args.image,
        args.r,
        args.output,
        dense_ratio=args.dense_ratio,
        method=args.method or "tome",
        block=args.block,
        alpha=args.alpha,
        cell=args.cell,
        json_path=args.json,
    )
    skipped = f", {out['skipped_patches']} skip the MLP" if out["skipped_patches"] else ""
    mask = f"; predicted mask pixels per class {out['mask_classes']}" if "mask_classes" in out else ""
    print(
        f"{label} dense r={args.r} (k={out['k']}), block {out['block']}: {out['grid'][0] * out['grid'][1]} patches "
        f"-> {out['groups']} MLP tokens{skipped}{mask}"
    )
    print(f"wrote {out['output']} and {out['json']}")
    return 0


def add_visualize_parser(subparsers: Any) -> None:
    p = command_parser(
        subparsers,
        "visualize",
        help="paint the patches merged into each token",
        description="Run one image through the model at r with source tracing and paint every token's patches one "
        "colour. The PNG has three panels: the input (as the model saw it), the groups over it with "
        "borders, and the groups as flat colours (one exact colour per token left after the last block, "
        "prefix tokens excluded). With EViT each kept token is one patch and the patches of pruned "
        "tokens are grey. A side-car JSON (default: OUTPUT with .json) holds the token and group counts.",
        epilog="examples:\n"
        "  tocom-hub visualize --model deit_small_patch16_224 --pretrained --image cat.jpg --r 8 -o merged.png\n"
        "  tocom-hub visualize --model out/finetune-r0 --image cat.jpg --r 16 --method evit -o pruned.png\n"
        "  tocom-hub visualize --model out/finetune-r0 --image cat.jpg --r 16 --bank out/bank -o tocom.png\n"
        "  tocom-hub visualize --model demo --image cat.jpg --r 8 --dense --dense-ratio 2 -o dense.png\n"
        "  tocom-hub visualize --model out/seg --image shapes.png --r 8 --dense-ratio 2 -o mask.png  "
        "# a finetune.py --task segmentation directory: dense groups + predicted mask",
    )
    _add_model_options(p)
    g = p.add_argument_group("picture")
    g.add_argument("--image", required=True, metavar="FILE", help="input image (any format Pillow reads)")
    g.add_argument("--r", type=r_value, required=True, help="tokens merged (or pruned) per block")
    g.add_argument("-o", "--output", required=True, metavar="FILE.png", help="output PNG")
    g.add_argument("--json", default=None, metavar="FILE", help="side-car JSON (default: OUTPUT with .json)")
    g.add_argument("--alpha", type=fraction, default=0.5, help="opacity of the colours over the image (default 0.5)")
    g.add_argument(
        "--cell",
        type=positive_int,
        default=None,
        metavar="PX",
        help="pixels per patch in the output (default: panels of about 320 px)",
    )
    g = p.add_argument_group("dense mode (docs/dense.md)")
    g.add_argument(
        "--dense",
        action="store_true",
        help="patch in dense mode and paint which patches share an MLP in one block (implied when --model is a "
        "directory saved by finetune.py --task segmentation, which also paints the predicted mask)",
    )
    g.add_argument("--dense-ratio", type=int, default=32, help="dense mode: k = ratio · r (default 32)")
    g.add_argument("--block", type=int, default=-1, help="dense mode: the block painted (-1: last)")
    _add_bank_options(p)
    p.set_defaults(func=visualize_command)


# ---------------------------------------------------------------------------------------------------
# convert


def convert_command(args: argparse.Namespace) -> int:
    import warnings

    import torch

    from ..core.bank.module import WEIGHTS_NAME
    from ..tools.convert import convert_official

    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"{args.checkpoint}: no such file (expected an official ToCom .pth checkpoint)")
    if os.path.isfile(args.output_dir):
        raise FileExistsError(f"-o {args.output_dir} is a file; pass a directory for the bank")
    if os.path.isfile(os.path.join(args.output_dir, WEIGHTS_NAME)) and not args.overwrite:
        raise FileExistsError(
            f"{args.output_dir} already holds a bank ({WEIGHTS_NAME}); pass --overwrite to replace it"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank = convert_official(
            args.checkpoint,
            r_max=args.r_max,
            num_heads=args.num_heads,
            scale=args.scale,
            method=args.method,
            base_model=args.base_model,
            pretrained_tag=args.pretrained_tag,
        )
    for w in caught:
        print(f"tocom-hub convert: warning: {w.message}", file=sys.stderr)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    bank.save_pretrained(args.output_dir, dtype=dtype)
    c = bank.config
    print(
        f"converted {args.checkpoint}: {c.depth} blocks, targets {','.join(c.targets)}, r 0-{c.r_max}, rank {c.rank}, "
        f"{bank.num_parameters():,} parameters, method {c.method}, scale {c.scale:g}"
    )
    print(f"wrote {args.output_dir} (load it with ToComBank.from_pretrained or --bank {args.output_dir})")
    return 0


def add_convert_parser(subparsers: Any) -> None:
    p = command_parser(
        subparsers,
        "convert",
        help="convert an official ToCom checkpoint into a bank",
        description="Read a checkpoint in the official ToCom layout (blocks.{i}.attn.{q,v}_tocom.adapter_{down,up}."
        "weight; loaded with torch.load(weights_only=True), no code runs) and save it as a tocom-hub bank "
        "directory (tocom.safetensors + tocom_config.json + the README.md model card).",
        epilog="examples:\n"
        "  tocom-hub convert tocom_deit_base.pth -o tocom-deit-base --base-model deit_base_patch16_224 --num-heads 12\n"
        "  tocom-hub convert tocom_evit.pth -o tocom-evit --method evit --dtype fp16\n"
        "  tocom-hub push tocom-deit-base my-org/tocom-deit-base      # then share it",
    )
    p.add_argument("checkpoint", metavar="official.pth", help="official ToCom checkpoint (.pth)")
    p.add_argument("-o", "--output-dir", required=True, metavar="DIR", help="bank directory to write")
    p.add_argument(
        "--method", choices=METHODS, default="tome", help="token reduction the bank was trained for (default tome)"
    )
    p.add_argument("--base-model", default=None, help="timm architecture of the backbone, e.g. deit_base_patch16_224")
    p.add_argument("--pretrained-tag", default=None, help="timm pretrained tag of the backbone, e.g. fb_in1k")
    p.add_argument("--r-max", type=positive_int, default=16, help="R, groups in the checkpoint (default 16)")
    p.add_argument(
        "--num-heads",
        type=positive_int,
        default=None,
        help="attention heads of the backbone (default: width / 64, with a warning)",
    )
    p.add_argument("--scale", type=finite_float, default=0.1, help="default scale s stored in the bank (default 0.1)")
    p.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="dtype on disk (default: the checkpoint's)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a bank already in DIR")
    p.set_defaults(func=convert_command)
