"""The command-line flags of the training scripts, and their validation.

``add_model_args`` / ``add_data_args`` / ``add_accelerate_args`` add the groups ``distill.py`` and
``finetune.py`` share, :func:`check_common_args` checks them before anything heavy runs (``p.error``
exits with status 2); :func:`add_distill_args` / :func:`check_distill_args` are ``distill.py``'s own
groups (bank, distillation, held-out evaluation and export). :func:`use_cpu` and
:func:`resolve_report_to` turn flags into ``Accelerator`` arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from tocom_hub.cli.options import DefaultsFormatter
from tocom_hub.core.bank.module import TARGETS
from tocom_hub.core.checks import METHODS
from tocom_hub.demo import data as embedded_data
from tocom_hub.training.backbone import EMBEDDED_MODEL, EMBEDDED_MODEL_KWARGS, EMBEDDED_R_MAX

__all__ = [
    "HelpFormatter",
    "script_parser",
    "add_model_args",
    "add_data_args",
    "add_accelerate_args",
    "check_common_args",
    "output_dir_problem",
    "use_cpu",
    "resolve_report_to",
    "add_distill_args",
    "check_distill_args",
]


class HelpFormatter(DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default at the end of its help line
    (:class:`tocom_hub.cli.options.DefaultsFormatter`)."""


def script_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The parser of a training script (``prog``, its module docstring as the description) with the model flags."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=HelpFormatter)
    add_model_args(p)
    return p


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument(
        "--model",
        default=None,
        help=f"timm model name. Default: the embedded tiny ViT ({EMBEDDED_MODEL} with "
        f"{EMBEDDED_MODEL_KWARGS}, weights shipped with tocom-hub).",
    )
    g.add_argument(
        "--model-kwargs",
        default=None,
        metavar="JSON",
        help="extra keyword arguments for timm.create_model as a JSON object, e.g. '{\"depth\": 6}'",
    )
    g.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights for --model")
    g.add_argument(
        "--checkpoint",
        default=None,
        metavar="PATH",
        help="backbone weights: a state_dict file (.safetensors, or a torch file loaded with "
        "weights_only=True; 'model'/'state_dict' nesting is unwrapped)",
    )
    g.add_argument(
        "--img-size", type=int, default=None, help="input resolution (default: the model's; 32 for the embedded model)"
    )
    g.add_argument("--method", default="tome", choices=METHODS, help="token reduction (default: tome)")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the backbone (default 0.1)")


def add_data_args(p: argparse.ArgumentParser, default_data: str) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=None,
        metavar="DIR|NAME",
        help=f"an ImageFolder root in ImageNet layout (train/ and val/ sub-folders), an embedded "
        f"dataset name ({', '.join(embedded_data.list_datasets())}), or a timm dataset name "
        f"with prefix: hfds/<hf-dataset> (Hugging Face datasets, map-style), "
        f"hfids/<hf-dataset> (streamed), wds/<name> (webdataset; --data-dir gives the shards). "
        f"Default: {default_data} (embedded, offline).",
    )
    g.add_argument("--data-dir", default=None, help="root folder / cache dir passed to timm.data.create_dataset")
    g.add_argument("--train-split", default="train", help="split to train on")
    g.add_argument(
        "--val-split", default="validation", help="split for validation / the held-out metrics (embedded data: its own)"
    )
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process (default 2)")
    g.add_argument(
        "--no-augment",
        action="store_true",
        help="no RandAugment / random erasing / mixup / cutmix (plain resize + normalise)",
    )


def add_accelerate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="out", help="where checkpoints, metrics and exports go (default out/)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random draw (pairs, order, augmentation)")
    g.add_argument("--epochs", type=int, default=None, help="passes over the data (default 10 unless --max-steps)")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per process per micro-step (default 128 distill, 64 finetune)",
    )
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    g.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"], help="autocast dtype")
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="accelerator.save_state every N optimizer steps (0: never)",
    )
    g.add_argument(
        "--resume",
        default=None,
        metavar="DIR|latest",
        help="resume from a checkpoint dir, or 'latest' under OUTPUT_DIR/checkpoints (every flag that changes the "
        "numbers must be as in the first run)",
    )
    g.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="K",
        help="stop after optimizer step K without exporting (simulates a preemption; "
        "the schedule still runs to --max-steps / --epochs)",
    )
    g.add_argument(
        "--report-to",
        default="none",
        choices=["none", "tensorboard", "wandb", "all"],
        help="experiment trackers (only those installed)",
    )
    g.add_argument("--log-every", type=int, default=10, help="log loss / lr every N steps")
    g.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")


def _positive(p: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str], allow_zero=()) -> None:
    for name in names:
        v = getattr(args, name)
        if v is None:
            continue
        low = 0 if name in allow_zero else 1
        if v < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}; got {v}")


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate the shared flags before anything heavy runs (``p.error`` exits with status 2)."""
    _positive(p, args, ["max_steps", "epochs", "batch_size", "grad_accum", "img_size", "log_every"])
    _positive(p, args, ["checkpoint_every", "num_workers"], allow_zero=("checkpoint_every", "num_workers"))
    if args.stop_after is not None and args.stop_after < 1:
        p.error(f"--stop-after must be >= 1; got {args.stop_after}")
    if not 0.0 <= args.drop_path < 1.0:
        p.error(f"--drop-path must be in [0, 1); got {args.drop_path}")
    if args.model_kwargs is not None:
        try:
            kw = json.loads(args.model_kwargs)
        except json.JSONDecodeError as e:
            p.error(f"--model-kwargs is not valid JSON ({e}); example: --model-kwargs '{{\"depth\": 6}}'")
        if not isinstance(kw, dict):
            p.error(f"--model-kwargs must be a JSON object; got {args.model_kwargs!r}")
        args.model_kwargs = kw
    if args.pretrained and args.checkpoint:
        p.error("--pretrained and --checkpoint are exclusive: pick timm's weights or your own file")
    if args.model is None and args.pretrained:
        p.error("--pretrained needs --model (the embedded tiny ViT has no timm weights; its own are loaded by default)")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint}: no such file (expected a .safetensors or torch state_dict file)")
    if args.data is not None and not (
        os.path.isdir(args.data) or args.data in embedded_data.list_datasets() or "/" in args.data
    ):
        p.error(
            f"--data {args.data!r} is neither a directory, an embedded dataset "
            f"({', '.join(embedded_data.list_datasets())}) nor a timm dataset name like hfds/<name>"
        )
    if args.data is not None and "/" in args.data and not os.path.isdir(args.data):
        prefix = args.data.split("/", 1)[0].lower()
        if prefix not in ("hfds", "hfids", "wds", "tfds", "torch"):
            p.error(
                f"--data {args.data!r}: no such directory, and {prefix!r} is not a timm dataset prefix "
                f"(hfds/, hfids/, wds/, tfds/, torch/)"
            )
    if args.resume not in (None, "latest") and not os.path.isdir(args.resume):
        p.error(f"--resume {args.resume}: no such checkpoint directory (or use --resume latest)")
    problem = output_dir_problem(args.output_dir)
    if problem:
        p.error(f"--output-dir {args.output_dir}: {problem}; pick a directory you can write to")
    if args.report_to in ("tensorboard", "wandb"):
        from accelerate.utils import is_tensorboard_available, is_wandb_available

        ok = is_tensorboard_available() if args.report_to == "tensorboard" else is_wandb_available()
        if not ok:
            p.error(f"--report-to {args.report_to}: the package is not installed (pip install {args.report_to})")


def output_dir_problem(path: str) -> Optional[str]:
    """Why checkpoints and exports could not be written under ``path`` (``None``: they can).

    Checked before any training, by writing and removing a small file in ``path`` — or, when it does
    not exist yet, in the nearest existing parent (nothing is created: the run makes the folder).
    """
    target = Path(path).expanduser()
    probe_dirs = []
    if target.exists():
        if not target.is_dir():
            return "exists and is not a directory"
        probe_dirs.append(target)
        if (target / "checkpoints").exists():
            probe_dirs.append(target / "checkpoints")
    else:
        parent = target.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            return f"{parent} is a file, not a directory"
        probe_dirs.append(parent)
    for d in probe_dirs:
        try:
            fd, probe = tempfile.mkstemp(prefix=".tocom-write-test-", dir=d)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            return f"cannot write into {d} ({e.strerror or e})"
    return None


def use_cpu(args: argparse.Namespace) -> bool:
    """``Accelerator(cpu=...)``: ``--cpu``, or a multi-process launch (torchrun / accelerate) on a machine
    without CUDA — accelerate only sets up its gloo CPU backend when told the run is on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return bool(args.cpu) or (world > 1 and not torch.cuda.is_available())


def resolve_report_to(value: str) -> Optional[List[str]]:
    """``--report-to`` → ``Accelerator(log_with=...)`` (``all`` keeps the installed trackers)."""
    if value == "none":
        return None
    if value == "all":
        from accelerate.utils import is_tensorboard_available, is_wandb_available

        found = [n for n, ok in (("tensorboard", is_tensorboard_available()), ("wandb", is_wandb_available())) if ok]
        return found or None
    return [value]


# ---------------------------------------------------------------------------------------------------
# distill.py's own flags


def add_distill_args(p: argparse.ArgumentParser) -> None:
    """The bank, distillation and held-out/export groups of ``distill.py``."""
    g = p.add_argument_group("bank")
    g.add_argument(
        "--r-max",
        type=int,
        default=None,
        help=f"R, the largest r the bank covers (default 16; {EMBEDDED_R_MAX} for the embedded model)",
    )
    g.add_argument("--rank", type=int, default=2, help="LoRA rank h of every group (default 2)")
    g.add_argument("--targets", default="q,v", help=f"comma-separated subset of {','.join(TARGETS)} (default q,v)")
    g.add_argument("--scale", type=float, default=0.1, help="s during training (default 0.1)")
    g.add_argument(
        "--dense",
        action="store_true",
        help="teacher and student in dense mode (tocom_hub.patch(dense=True): every patch kept, k = "
        "--dense-ratio · r tokens share an MLP); the bank records it and fits only dense models",
    )
    g.add_argument("--dense-ratio", type=int, default=32, help="dense mode: k = ratio · r (default 32, the paper's)")
    g = p.add_argument_group("distillation")
    g.add_argument(
        "--kd",
        default="logits",
        choices=["logits", "features", "tokens"],
        help="logits: KL on soft targets; features: L1 on pooled final features (head-less backbones); tokens: "
        "L1 on every final token (forward_features; dense prediction, with --dense)",
    )
    g.add_argument("--temperature", type=float, default=1.0, help="KD temperature T (default 1)")
    g.add_argument(
        "--cls-loss",
        action="store_true",
        help="ablation (Table 5): cross-entropy on the labels instead of distillation",
    )
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    g.add_argument("--min-lr", type=float, default=1e-5, help="cosine schedule floor (default 1e-5; no warm-up)")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (default 0.8; images only for KD)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (default 1.0)")
    g = p.add_argument_group("held-out evaluation and export")
    g.add_argument(
        "--heldout-pairs",
        type=int,
        default=8,
        metavar="K",
        help="number of fixed (m, n) pairs for the held-out KL (default 8; 0 skips it)",
    )
    g.add_argument("--heldout-images", type=int, default=512, help="held-out images (default 512)")
    g.add_argument(
        "--eval-every",
        type=int,
        default=0,
        metavar="N",
        help="also log the held-out KL every N steps (default 0: only at the end)",
    )
    g.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="upload the bank when done")
    g.add_argument(
        "--dataset-id",
        default=None,
        metavar="HUB_DATASET",
        help="Hub dataset id of the training data for the bank's model card, e.g. imagenet-1k "
        "(default: taken from --data hfds/<id> / hfids/<id>)",
    )


def check_distill_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate and complete :func:`add_distill_args`'s flags (after :func:`check_common_args`)."""
    if args.r_max is None:
        args.r_max = EMBEDDED_R_MAX if args.model is None else 16
    if args.r_max < 1:
        p.error(f"--r-max must be >= 1 (the bank needs at least one step r → r+1); got {args.r_max}")
    if args.rank < 1:
        p.error(f"--rank must be >= 1; got {args.rank}")
    if args.dense_ratio < 1:
        p.error(f"--dense-ratio must be >= 1; got {args.dense_ratio}")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    bad = [t for t in targets if t not in TARGETS]
    if not targets or bad or len(set(targets)) != len(targets):
        p.error(f"--targets must be distinct names from {','.join(TARGETS)}; got {args.targets!r}")
    args.targets = targets
    if not math.isfinite(args.scale) or args.scale == 0:
        p.error(f"--scale must be a finite, non-zero number; got {args.scale}")
    if not args.temperature > 0:
        p.error(f"--temperature must be > 0; got {args.temperature}")
    if args.cls_loss and args.kd != "logits":
        p.error(f"--cls-loss trains on labels; it cannot be combined with --kd {args.kd}")
    if args.heldout_pairs < 0 or args.heldout_images < 1 or args.eval_every < 0:
        p.error("--heldout-pairs and --eval-every must be >= 0 and --heldout-images >= 1")
    if args.lr <= 0 or args.weight_decay < 0 or args.min_lr < 0:
        p.error("--lr must be > 0, --weight-decay and --min-lr >= 0")
    args.augment = not args.no_augment
    args.use_mixup = args.augment and (args.mixup > 0 or args.cutmix > 0)
    if args.use_mixup and args.batch_size % 2:
        p.error(
            f"mixup/cutmix pair up images inside a batch: --batch-size must be even (got {args.batch_size}); "
            f"or pass --mixup 0 --cutmix 0 / --no-augment"
        )
    if args.push_to_hub is not None:
        if args.push_to_hub.count("/") != 1:
            p.error(f"--push-to-hub expects a repo id 'org/name'; got {args.push_to_hub!r}")
        try:
            import tocom_hub.hub  # noqa: F401
        except ImportError as e:
            p.error(
                f"--push-to-hub needs tocom_hub.hub, which is not available ({e}); train without it and upload "
                f"OUTPUT_DIR with `hf upload ORG/NAME OUTPUT_DIR`"
            )
