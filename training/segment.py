"""Fine-tune a Segmenter (timm ViT + linear or mask-transformer decoder) on the embedded ``photo-segments``
task and report its mIoU — ``finetune.py --task segmentation`` runs this script.

The backbone is the embedded tiny ViT (pre-trained on ``photo-crops``; or ``--model`` / ``--checkpoint``),
its classifier dropped; the decoder (``tocom_hub.tools.segmenter``) is new. Everything trains with AdamW
(``--lr`` for the decoder, ``--lr × --backbone-lr-scale`` for the backbone), a cosine schedule and
per-pixel cross-entropy, at ``--source-r`` with the backbone patched in dense mode (``k = --dense-ratio
· r``; r = 0 is plain timm, the paper's Table 11 source). Training images are drawn with dataset seed
``--seed``, held-out images always with seed 0 (the same test set for every seed); horizontal flips of
image and mask are drawn from ``(--seed, step)``.

Outputs in ``--output-dir``: ``backbone.safetensors`` (the timm state_dict without classifier: a
``training/distill.py --checkpoint`` for a dense bank), ``decoder.safetensors``, ``segmenter.json``
(recipe, decoder config, validation mIoU). :func:`load_segmenter` rebuilds the model. Example::

    python training/finetune.py --task segmentation --steps 300 --output-dir out/seg
    python training/distill.py --checkpoint out/seg/backbone.safetensors --dense --dense-ratio 2 \\
        --kd tokens --data photo-segments --no-augment --r-max 16 --max-steps 200 --output-dir out/seg-bank
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import tocom_hub
from tocom_hub.demo.data import build_dataset
from tocom_hub.tools.miou import confusion_matrices, miou
from tocom_hub.tools.models import load_model
from tocom_hub.tools.segmenter import DECODERS, Segmenter, load_segmenter, save_segmenter
from tocom_hub.training.args import HelpFormatter
from tocom_hub.training.backbone import EMBEDDED_CHECKPOINT, EMBEDDED_MODEL, EMBEDDED_MODEL_KWARGS

logger = logging.getLogger("tocom_hub.training.segment")

__all__ = ["build_parser", "main", "load_segmenter", "tensor_dataset", "evaluate_confusions"]


def build_parser() -> argparse.ArgumentParser:
    """The command line (every flag with its default in ``--help``)."""
    p = argparse.ArgumentParser(
        prog="finetune.py --task segmentation",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--task", default="segmentation", choices=["segmentation"], help=argparse.SUPPRESS)
    p.add_argument("--output-dir", required=True, help="where the model and segmenter.json go")
    p.add_argument("--data", default="photo-segments", help="embedded segmentation dataset")
    p.add_argument("--model", default=None, help="timm name (default: the embedded tiny ViT)")
    p.add_argument("--model-kwargs", type=json.loads, default=None, help="JSON kwargs for timm.create_model")
    p.add_argument("--checkpoint", default=None, help="backbone weights (default: the embedded ones)")
    p.add_argument("--from-scratch", action="store_true", help="random backbone weights")
    p.add_argument("--decoder", default="linear", choices=DECODERS, help="Segmenter decoder")
    p.add_argument("--decoder-depth", type=int, default=1, help="mask transformer blocks")
    p.add_argument("--source-r", type=int, default=0, help="r the model trains at (dense mode)")
    p.add_argument("--dense-ratio", type=int, default=2, help="dense mode: k = ratio · r")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--train-images", type=int, default=4096, help="distinct training images")
    p.add_argument("--val-images", type=int, default=256, help="held-out images (test split, seed 0)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW lr of the decoder")
    p.add_argument("--backbone-lr-scale", type=float, default=0.3, help="backbone lr = lr × this (0: frozen)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=0, help="seed of the decoder init, training images and order")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1 or a.train_images < 1 or a.val_images < 1:
        p.error("--steps, --batch-size, --train-images and --val-images must be >= 1")
    if a.lr <= 0 or a.backbone_lr_scale < 0 or a.weight_decay < 0:
        p.error("--lr must be > 0, --backbone-lr-scale and --weight-decay >= 0")
    if a.source_r < 0 or a.dense_ratio < 1 or a.decoder_depth < 1:
        p.error("--source-r must be >= 0, --dense-ratio and --decoder-depth >= 1")
    return a


def tensor_dataset(
    data: str, split: str, img_size: int, length: int, seed: int, mean: Sequence[float], std: Sequence[float]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 3, S, S] float32 normalised, masks [N, S, S] int64)`` of an embedded segmentation set."""
    import numpy as np

    ds = build_dataset(data, split, img_size, length=length, seed=seed)
    imgs = np.stack([np.asarray(ds[i][0], dtype=np.float32) for i in range(len(ds))]) / 255.0
    masks = torch.from_numpy(np.stack([ds[i][1] for i in range(len(ds))]))
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x.contiguous(), masks.long()


@torch.no_grad()
def evaluate_confusions(model: Segmenter, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``[N, C, C]`` per-image confusion matrices of ``model`` (eval mode) on ``(x, y)``."""
    was = model.training
    model.eval()
    out = [
        confusion_matrices(model.predict(x[i : i + batch_size]), y[i : i + batch_size], model.num_classes)
        for i in range(0, x.shape[0], batch_size)
    ]
    model.train(was)
    return torch.cat(out)


def _backbone(args: argparse.Namespace) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    embedded = args.model is None
    name = EMBEDDED_MODEL if embedded else args.model
    kwargs: Dict[str, Any] = dict(EMBEDDED_MODEL_KWARGS) if embedded else {}
    kwargs.update(args.model_kwargs or {})
    checkpoint = args.checkpoint
    if embedded and checkpoint is None and not args.from_scratch:
        checkpoint = str(EMBEDDED_CHECKPOINT)
    model = load_model(name, model_kwargs=kwargs, checkpoint=checkpoint).model
    model.reset_classifier(0)
    return model, {"model": name, "model_kwargs": kwargs, "checkpoint": os.path.basename(checkpoint or "") or None}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the fine-tuning; returns ``segmenter.json``'s content."""
    from timm.data import resolve_data_config

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    backbone, info = _backbone(args)
    img = int(backbone.patch_embed.img_size[0])
    ds_classes = build_dataset(args.data, "val", img, length=1).num_classes
    dkw = {"depth": args.decoder_depth} if args.decoder == "mask" else {}
    model = Segmenter(backbone, ds_classes, args.decoder, **dkw)
    tocom_hub.patch(model.backbone, method="tome", dense=True, dense_ratio=args.dense_ratio)
    tocom_hub.set_r(model.backbone, args.source_r)  # validates r against the grid before any work
    cfg = resolve_data_config({}, model=backbone)
    mean, std = list(cfg["mean"]), list(cfg["std"])
    t0 = time.perf_counter()
    x, y = tensor_dataset(args.data, "train", img, args.train_images, args.seed, mean, std)
    vx, vy = tensor_dataset(args.data, "test", img, args.val_images, 0, mean, std)
    groups = [{"params": list(model.decoder.parameters()), "lr": args.lr}]
    if args.backbone_lr_scale > 0:
        groups.append({"params": list(model.backbone.parameters()), "lr": args.lr * args.backbone_lr_scale})
    else:
        model.backbone.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    losses = []
    for step in range(args.steps):
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        idx = torch.randint(x.shape[0], (args.batch_size,), generator=gen)
        xb, yb = x[idx], y[idx]
        flip = torch.rand(args.batch_size, generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        yb = torch.where(flip[:, None, None], yb.flip(-1), yb)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            logger.info("step %d/%d loss %.4f", step + 1, args.steps, sum(losses[-50:]) / len(losses[-50:]))
    conf = evaluate_confusions(model, vx, vy)
    tocom_hub.unpatch(model.backbone)
    extra = {
        "data": args.data,
        "img_size": img,
        "mean": mean,
        "std": std,
        "recipe": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "val_miou": miou(conf.sum(0).numpy()),
        "val_images": int(vx.shape[0]),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "seconds": time.perf_counter() - t0,
    }
    out = save_segmenter(model, args.output_dir, info, extra)
    logger.info("validation mIoU %.2f on %d images", out["val_miou"], out["val_images"])
    return out


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
