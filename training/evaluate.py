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
and "source = target" when given) into ``--output-dir``; with ``--save-correct`` also ``correct.safetensors``
(one uint8 0/1 per test image and configuration, keys ``no_tocom.r{t}`` / ``tocom.s{s}.r{t}``: what a paired
bootstrap of "with − without ToCom" over the images needs).

Examples::

    python training/evaluate.py --finetuned out/ft-r0 --bank out/bank --scales 0.05,0.1,0.15
    python training/evaluate.py --finetuned out/ft-r0 --bank out/bank --matched out/ft-r5 out/ft-r10
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch.utils.data import DataLoader

import tocom_hub
import tocom_hub.demo  # noqa: F401 -- registers the "demo" model alias
from tocom_hub.cli.types import r_list
from tocom_hub.core.jsonio import write_json
from tocom_hub.core.rspec import BANK_RANGE, check_r, check_r_values
from tocom_hub.demo.models import DEMO_WEIGHTS
from tocom_hub.tools.bank_fit import model_lineage
from tocom_hub.tools.evaluation import evaluate
from tocom_hub.tools.images import model_img_size
from tocom_hub.tools.models import load_model
from tocom_hub.tools.plots import plot_accuracy
from tocom_hub.training.args import HelpFormatter
from tocom_hub.training.backbone import EMBEDDED_DATA, EMBEDDED_MODEL
from tocom_hub.training.data import InMemory, SeededTransform, build_datasets, build_transforms, fits_in_memory
from tocom_hub.training.threads import setup_cpu_threads

logger = logging.getLogger("tocom_hub.training.evaluate")


def build_parser() -> argparse.ArgumentParser:
    """The command line (every flag with its default in ``--help``)."""
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__, formatter_class=HelpFormatter)
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
    p.add_argument("--data-dir", default=None, help="root folder / cache dir for timm.data.create_dataset")
    p.add_argument("--split", default="validation", help="split to evaluate on (default validation)")
    p.add_argument("--val-images", type=int, default=None, help="evaluate on the first N images")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    p.add_argument(
        "--cache-mb",
        type=int,
        default=1024,
        help="decode the evaluation images once and keep them in memory when they fit in this many "
        "MiB (every target r and scale re-reads the split; 0: never cache)",
    )
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"], help="autocast dtype")
    p.add_argument("--output-dir", default="out/eval", help="where eval.json / eval.png go")
    p.add_argument(
        "--save-correct",
        action="store_true",
        help="also write correct.safetensors: per image and configuration, was the top-1 prediction right",
    )
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)

    for d in [args.finetuned, *args.matched]:
        if d is not None and not (Path(d) / "finetune.json").is_file():
            p.error(f"{d}: no finetune.json here; pass an output dir of training/finetune.py")
    if args.bank is not None and os.path.sep in args.bank and not os.path.exists(args.bank):
        p.error(f"--bank {args.bank}: no such file or directory")
    try:
        args.targets = r_list(args.targets) if args.targets else None
        args.scales = [float(s) for s in args.scales.split(",") if s.strip()] if args.scales else None
    except (ValueError, argparse.ArgumentTypeError) as e:
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


def load(path: Optional[str], device: torch.device):
    """``(model, recipe)``: the model through the one model loader (:func:`tocom_hub.tools.models.load_model`,
    which rebuilds finetune.py outputs, AdaptFormer adapters included), in eval mode on ``device``, and what
    finetune.py recorded (data, method, source r, seed, …); for ``None`` (the embedded backbone,
    ``load_model("demo")``) its pre-training task at source r = 0."""
    if path is None:
        model = load_model("demo").model
        recipe = {
            "model": EMBEDDED_MODEL,
            "data": EMBEDDED_DATA,
            "method": "tome",
            "source_r": 0,
            "mode": "full",
            "img_size": model_img_size(model)[0],
        }
    else:
        model, info = load_model(path)
        recipe = info["recipe"]
    return model.to(device).eval(), recipe


def make_loader(args, recipe, model, accelerator):
    ns = argparse.Namespace(
        data=args.data or recipe["data"],
        data_dir=args.data_dir,
        train_split="train",
        val_split=args.split,
        batch_size=args.batch_size,
    )
    img_size = model_img_size(model)[0]
    _, val_set, info = build_datasets(
        ns, recipe["data"], img_size, seed=recipe.get("seed", 0), val_length=args.val_images
    )
    _, eval_tf, _ = build_transforms(model, img_size, False, info["kind"] == "embedded")
    n = min(len(val_set), args.val_images or len(val_set))
    ds = SeededTransform(torch.utils.data.Subset(val_set, range(n)), eval_tf, 0)
    if fits_in_memory(n, img_size, args.cache_mb):
        # the evaluation transform is deterministic: decode once, then every pass (one per target r and
        # scale) reads tensors instead of re-decoding / re-rendering the images
        ds = InMemory(ds, args.batch_size, args.num_workers)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    return accelerator.prepare(loader), n


def plot(result: Dict[str, Any], path: str) -> None:
    """``eval.png``: ``result`` (what :func:`main` writes to eval.json) drawn by the one accuracy plotter,
    :func:`tocom_hub.tools.plots.plot_accuracy`: "no ToCom", "+ToCom (s = …)" per scale, "source r = target r"."""
    rows = [{"target_r": t, "tocom": False, "top1": result["no_tocom"][str(t)]} for t in result["targets"]]
    for s, acc in result.get("tocom", {}).items():
        rows += [{"target_r": t, "tocom": True, "top1": acc[str(t)], "scale": float(s)} for t in result["targets"]]
    plot_accuracy(
        {
            **result,
            "rows": rows,
            "model_label": f"{result['model']} ({result['method']})",
            "data_name": f"{result['data']} {result['split']}",
        },
        path,
    )


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    from accelerate import Accelerator

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu)
    setup_cpu_threads(accelerator.device.type, log=logger.info)  # accelerate launch sets OMP_NUM_THREADS=1

    model, recipe = load(args.finetuned, accelerator.device)
    source_r = recipe["source_r"] if args.source_r is None else args.source_r
    tocom_hub.patch(model, method=recipe.get("method", "tome"), prop_attn=recipe.get("prop_attn", True))
    bank = None
    if args.bank is not None:
        bank = tocom_hub.load_bank(args.bank, device=accelerator.device)
        if bank.method != recipe.get("method", "tome"):
            raise SystemExit(
                f"error: the bank was trained for {bank.method!r} but the model uses {recipe.get('method')!r}"
            )
    targets = args.targets or list(range(0, (bank.r_max if bank else source_r) + 1))
    if bank is not None:
        try:
            check_r(source_r, "source r", r_max=bank.r_max, why=BANK_RANGE)
            check_r_values(targets, "--targets", r_max=bank.r_max, why=BANK_RANGE)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    try:
        tocom_hub.set_r(model, max(targets))
    except ValueError as e:
        raise SystemExit(f"error: target r={max(targets)} does not fit this model: {e}") from None
    scales = args.scales or ([bank.scale] if bank is not None else [])
    # a bank trained on another backbone (architecture, tag or weights) warns instead of printing "+0.00"
    weights = args.finetuned if args.finetuned is not None else str(DEMO_WEIGHTS)
    lineage = model_lineage(model, {"weights": weights, "recipe": recipe}) if bank is not None else None
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
    # one pass over the data per model and scale, every target r interleaved (tocom_hub.tools.evaluation)
    run = dict(source_r=source_r, progress=accelerator.is_local_main_process, gather=accelerator.gather_for_metrics)
    run["keep_correct"] = args.save_correct
    correct: Dict[str, torch.Tensor] = {}
    with accelerator.autocast():
        rows = evaluate(model, loader, targets, **run)
        top1 = {row["target_r"]: row["top1"] for row in rows}
        result["no_tocom"] = {str(t): top1[t] for t in targets}
        correct.update({f"no_tocom.r{row['target_r']}": row["correct"] for row in rows if "correct" in row})
        for s in scales:
            rows = evaluate(model, loader, targets, bank=bank, scale=s, plain=False, lineage=lineage, **run)
            top1 = {row["target_r"]: row["top1"] for row in rows}
            result["tocom"][f"{s:g}"] = {str(t): top1[t] for t in targets}
            correct.update({f"tocom.s{s:g}.r{row['target_r']}": row["correct"] for row in rows if "correct" in row})
    for t in targets:
        logger.info(
            "target r=%d: no ToCom %.2f%s",
            t,
            result["no_tocom"][str(t)],
            "".join(f", +ToCom (s={k}) {acc[str(t)]:.2f}" for k, acc in result["tocom"].items()),
        )
    if result["tocom"]:
        gains = {
            s: sum(acc[str(t)] - result["no_tocom"][str(t)] for t in targets) / len(targets)
            for s, acc in result["tocom"].items()
        }
        result["mean_gain_by_scale"] = gains
    for d in args.matched:
        m_model, m_recipe = load(d, accelerator.device)
        tocom_hub.patch(m_model, method=m_recipe.get("method", "tome"), prop_attn=m_recipe.get("prop_attn", True))
        r = m_recipe["source_r"]
        with accelerator.autocast():
            (row,) = evaluate(m_model, loader, [r], **{**run, "source_r": r})
        result["matched"][str(r)] = row["top1"]
        logger.info("matched source=target r=%d: %.2f", r, result["matched"][str(r)])

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(os.path.join(args.output_dir, "eval.json"), result, sort_keys=True)
        if args.save_correct:
            from safetensors.torch import save_file

            hits = {k: v.to(torch.uint8).contiguous() for k, v in correct.items()}
            save_file(hits, os.path.join(args.output_dir, "correct.safetensors"))
        plot(result, os.path.join(args.output_dir, "eval.png"))
        logger.info("wrote %s/eval.json and eval.png", args.output_dir)
    return result


if __name__ == "__main__":
    main()
