"""``tocom-hub eval``: top-1 over target ``r``, without and with a bank (:mod:`tocom_hub.tools.evaluation`)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

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
from .types import non_negative_int, positive_int, r_list

# ---------------------------------------------------------------------------------------------------
# eval


def eval_command(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from ..demo.data import build_eval_dataset
    from ..tools.evaluation import (
        add_intervals,
        evaluate,
        format_table,
        label_warning,
        plot_accuracy,
    )

    for path in (args.json, args.plot):
        if path and os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a directory; pass a file name (e.g. out/eval.json, out/eval.png)")
    model, info, device = _load_model(args)
    bank = _load_bank(args)
    _warn_about_model("eval", args, model, info, bank)  # random weights; a bank made for another backbone
    source_r = args.source_r if args.source_r is not None else int(info.get("source_r") or 0)
    method = args.method or (bank.method if bank is not None else None) or info.get("method") or "tome"
    dataset = build_eval_dataset(model, args.data, split=args.split, limit=args.limit, class_map=args.class_map)
    warning = label_warning(dataset, model)
    if warning:
        print(f"tocom-hub eval: warning: {warning}", file=sys.stderr)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers, pin_memory=device.type == "cuda"
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the bank was trained", category=UserWarning)  # said above
        rows = evaluate(
            model,
            loader,
            args.target_r,
            bank=bank,
            source_r=source_r,
            scale=args.scale,
            method=method,
            device=device,
            keep_correct=bank is not None,
        )
    add_intervals(rows)  # +ToCom − plain with its 95 % paired-bootstrap interval over the images
    scale = None if bank is None else (args.scale if args.scale is not None else bank.scale)
    result = {
        "model": info["model"],
        "model_label": _model_label(info, method, detail=True),
        "model_info": info,
        "data": os.path.abspath(args.data) if os.path.isdir(args.data) else args.data,
        "data_name": os.path.basename(os.path.normpath(args.data)),
        "split": args.split,
        "images": rows[0]["images"],
        "method": method,
        "source_r": source_r,
        "target_r": args.target_r,
        "bank": args.bank,
        "scale": scale,
        "batch_size": args.batch_size,
        "device": str(device),
        "rows": rows,
    }
    bank_text = f", bank {args.bank} (s={scale:g})" if bank is not None else ""
    print(
        f"{_model_label(info, method)} on {result['data_name']}: {result['images']} images, source r={source_r}"
        f"{bank_text}"
    )
    print(format_table(rows, source_r=source_r))
    if args.json:
        _write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot_accuracy(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def add_eval_parser(subparsers: Any) -> None:
    p = command_parser(
        subparsers,
        "eval",
        help="accuracy and images/s per target r, with/without a bank",
        description="Top-1 accuracy and images/s of a model at every target r: plain ToMe/EViT ('no ToCom') and, with "
        "--bank, the bank merged for source r -> target r, with the 95 % interval of the difference "
        "(paired bootstrap over the images). Images/s is the median over batches with its 10th-90th "
        "percentile. Prints a table; --json / --plot write the results and an accuracy-vs-r figure "
        "(PNG, 95 % interval per point).",
        epilog="examples:\n"
        "  tocom-hub eval --model out/finetune-r0 --data imagenet/val --target-r 0,4,8,16 --bank org/tocom-deit-b \\\n"
        "      --json eval.json --plot eval.png\n"
        "  tocom-hub eval --model deit_base_patch16_224 --checkpoint deit_b.safetensors --data imagenet \\\n"
        "      --source-r 16 --target-r 0-16 --bank out/bank --scale 0.1 --limit 2000\n"
        '  tocom-hub eval --model vit_tiny_patch16_224 --model-kwargs \'{"img_size": 64, "depth": 2}\' \\\n'
        "      --data my_folder --target-r 0,4,8\n\n"
        "--data is an ImageFolder root (DIR/<class>/<image>; a val/ or validation/ sub-folder is used when\n"
        "present) or an embedded dataset name (tocom_hub.demo.data). Images get timm's eval transform for the model.",
    )
    _add_model_options(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--data", required=True, metavar="DIR", help="ImageFolder root, or an embedded dataset name")
    g.add_argument("--split", default="validation", help="split sub-folder to look for under DIR (default validation)")
    g.add_argument("--class-map", default=None, metavar="FILE", help="timm class map file (class name per line)")
    g.add_argument(
        "--target-r",
        type=r_list,
        default=[0, 4, 8, 16],
        metavar="R,R,…",
        help="target r values, e.g. 0,4,8,16 or 0-16 (default 0,4,8,16)",
    )
    g.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default 32)")
    g.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader workers (default 2)")
    g.add_argument("--limit", type=positive_int, default=None, metavar="N", help="evaluate the first N images only")
    g.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    g.add_argument("--plot", default=None, metavar="FILE.png", help="write accuracy vs target r as a PNG")
    _add_bank_options(p)
    p.set_defaults(func=eval_command)
