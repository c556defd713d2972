"""``tocom-hub export``: a patched model, its bank merged at fixed (source r, target r), as ONNX / ``torch.export``."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .options import _add_bank_options, _add_model_options, _load_bank, _load_model, _model_label, command_parser
from .types import positive_int, r_list


def export_command(args: argparse.Namespace) -> int:
    from ..tools.export import FORMATS, export_model

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"--format takes {', '.join(sorted(FORMATS))} (comma-separated); got {args.format!r}")
    if len(formats) > 1 and os.path.splitext(args.output)[1]:
        raise ValueError(f"-o {args.output}: with several formats pass a path without a suffix (each gets its own)")
    model, info, _ = _load_model(args)
    bank = _load_bank(args)
    source_r = args.source_r if args.source_r is not None else int(info.get("source_r") or 0)
    method = args.method or (bank.method if bank is not None else "tome")
    size = None if args.image_size is None else (args.image_size, args.image_size)
    for fmt in formats:
        written = export_model(
            model,
            args.output,
            source_r,
            args.target_r,
            bank=bank,
            format=fmt,
            scale=args.scale,
            method=method,
            batch_size=args.batch_size,
            input_size=size,
            opset=args.opset,
            verify=not args.no_verify,
        )
        for w in written:
            check = "" if w.max_abs_diff is None else f", max |exported - eager| = {w.max_abs_diff:.1e}"
            pair = f"bank {w.source_r} -> {w.target_r}" if bank is not None else f"r = {w.target_r}, no bank"
            print(f"wrote {w.path} ({fmt}, {_model_label(info, method)}, {pair}{check})")
    return 0


def add_export_parser(subparsers: Any) -> None:
    p = command_parser(
        subparsers,
        "export",
        help="export a model at a fixed r (bank merged) to ONNX or torch.export",
        description="Patch the model, merge its ToCom bank at (--source-r, each --target-r) and write one file per "
        "target r: ONNX through the dynamo exporter (needs tocom-hub[export]) and/or a torch.export program "
        "(.pt2, load with torch.export.load(path).module()). The input shape is static: --batch x 3 x the "
        "model's image size. Each file is checked against the eager model on a random batch unless --no-verify.",
        epilog="examples:\n"
        "  tocom-hub export --model deit_small_patch16_224 --pretrained --bank org/bank --target-r 8 -o deit-r8.onnx\n"
        "  tocom-hub export --model out/finetune-r0 --bank out/bank --target-r 0,8,16 --format onnx,torch -o out/m\n"
        "  tocom-hub export --model demo --target-r 4 --format torch -o demo-r4.pt2",
    )
    _add_model_options(p)
    _add_bank_options(p)
    g = p.add_argument_group("export")
    g.add_argument(
        "--target-r", type=r_list, required=True, metavar="R,R,…", help="r values to export, e.g. 8 or 0,8,16"
    )
    g.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="output file; several r get -r<R> before the suffix (or fill {r}); no suffix: the format's",
    )
    g.add_argument("--format", default="onnx", help="onnx, torch or onnx,torch (default onnx)")
    g.add_argument("--batch", "--batch-size", dest="batch_size", type=positive_int, default=1, help="static batch size")
    g.add_argument("--image-size", type=positive_int, default=None, help="input side in px (default: the model's)")
    g.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: the exporter's)")
    g.add_argument("--no-verify", action="store_true", help="skip running each file against the eager model")
    p.set_defaults(func=export_command)
