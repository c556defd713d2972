"""Fine-tune a backbone on a downstream task at a *source* r — how the paper makes off-the-shelf models.

The model is patched with ToMe / EViT and trained with ``r = --source-r`` in every block; a ToCom bank
later lets it run at any other target r (``training/evaluate.py``). Two modes:

    --mode full          all parameters train (paper: CIFAR-100 / FGVC recipe)
    --mode adaptformer   AdaptFormer PET (paper: VTAB-1k): a bottleneck adapter (d → 32 → d, ReLU,
                         zero-initialised up projection, scaled by s) parallel to every block's MLP;
                         the backbone is frozen, adapters + classifier head train
                         (``tocom_hub.adaptformer``; hooks, so it works on patched ToMe blocks)

Outputs in ``--output-dir``, in timm's ``save_for_hf`` layout: ``config.json`` (timm's model config,
plus the recipe under ``"tocom_finetune"``) and ``model.safetensors`` (the timm model's state_dict, new
head included; the recipe is in the file's metadata too), ``adaptformer.safetensors`` (PET mode);
``finetune.json`` (recipe, validation top-1 and its history) and checkpoints.
``tocom_hub.tools.models.load_model(OUTPUT_DIR)`` (``tocom-hub eval --model OUTPUT_DIR``,
``evaluate.py --finetuned OUTPUT_DIR``) rebuilds the model from these files, adapters attached.

The same loop (seeded sampler, per-sample seeded augmentation, ``save_state`` / ``--resume``)
as ``distill.py``. Without ``--data`` it fine-tunes the embedded tiny ViT on the embedded
``photo-orientation`` task. With ``--from-scratch`` the backbone starts from random weights — the
embedded backbone itself was made this way (see README.md, "Embedded default backbone").

Examples::

    python training/finetune.py --source-r 0 --max-steps 300 --output-dir out/ft-r0
    accelerate launch training/finetune.py --model deit_base_patch16_224 --pretrained \\
        --data /data/cifar100 --source-r 16 --lr 5e-5 --epochs 100 --warmup-steps 500 --output-dir out/c100-r16
    python training/finetune.py --mode adaptformer --adapter-scale 0.1 --source-r 10 --output-dir out/pet-r10
    python training/finetune.py --task segmentation --decoder mask --steps 600 --output-dir out/seg
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

import tocom_hub
from tocom_hub.core.jsonio import write_json
from tocom_hub.demo import data as embedded_data
from tocom_hub.tools.adaptformer import AdaptFormer
from tocom_hub.tools.images import model_img_size
from tocom_hub.training import run
from tocom_hub.training.args import add_accelerate_args, add_data_args, check_common_args, script_parser
from tocom_hub.training.backbone import EMBEDDED_DOWNSTREAM_DATA, EMBEDDED_MODEL_KWARGS, build_backbone
from tocom_hub.training.data import (
    EpochSampler,
    InMemory,
    SeededTransform,
    build_datasets,
    build_transforms,
    fits_in_memory,
)
from tocom_hub.training.export import save_finetuned
from tocom_hub.training.guards import RunGuard
from tocom_hub.training.metrics import StepTimer, evaluate_top1
from tocom_hub.training.seeds import derive_seed

logger = logging.getLogger("tocom_hub.training.finetune")

# flags that must not change between a run and its --resume (besides run.RESUME_MUST_MATCH)
RESUME_MUST_MATCH = run.RESUME_MUST_MATCH + (
    "task",
    "source_r",
    "mode",
    "adapter_bottleneck",
    "adapter_scale",
    "num_classes",
    "from_scratch",
    "warmup_steps",
    "smoothing",
)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``finetune.py`` (every flag with its default in ``--help``)."""
    p = script_parser("finetune.py", __doc__)
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="start from random weights (for the embedded model: do not load its shipped weights)",
    )
    add_data_args(p, default_data=EMBEDDED_DOWNSTREAM_DATA)
    p.add_argument(
        "--cache-mb",
        type=int,
        default=1024,
        help="with --no-augment, keep the decoded train/val images in memory when they fit in this many MiB (0: never)",
    )
    g = p.add_argument_group("fine-tuning")
    g.add_argument(
        "--task",
        default="classification",
        choices=["classification", "segmentation"],
        help="segmentation: a Segmenter on the embedded photo-segments masks (its own flags: "
        "finetune.py --task segmentation --help; training/segment.py)",
    )
    g.add_argument("--source-r", type=int, default=0, help="r the model is trained at (default 0)")
    g.add_argument("--mode", default="full", choices=["full", "adaptformer"], help="all parameters, or AdaptFormer PET")
    g.add_argument("--adapter-bottleneck", type=int, default=32, help="AdaptFormer width (default 32)")
    g.add_argument("--adapter-scale", type=float, default=0.1, help="AdaptFormer s (default 0.1)")
    g.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the dataset's)")
    g.add_argument("--lr", type=float, default=None, help="AdamW lr (default 1e-4 full, 1e-3 adaptformer)")
    g.add_argument("--weight-decay", type=float, default=None, help="(default 0.05 full, 1e-4 adaptformer)")
    g.add_argument("--min-lr", type=float, default=1e-6, help="cosine schedule floor")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps before the cosine decay")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default 0.1)")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (default 0.8; 0 to disable)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (default 1.0; 0 to disable)")
    g.add_argument("--val-images", type=int, default=None, help="limit validation to the first N images")
    g.add_argument("--eval-every", type=int, default=0, metavar="N", help="validate every N steps (0: at the end)")
    g.add_argument(
        "--save-dtype",
        default="fp32",
        choices=["fp32", "fp16", "bf16"],
        help="dtype of model.safetensors (default fp32)",
    )
    add_accelerate_args(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)

    check_common_args(p, args)
    if args.from_scratch and (args.pretrained or args.checkpoint):
        p.error("--from-scratch cannot be combined with --pretrained / --checkpoint")
    if args.epochs is None and args.max_steps is None:
        args.epochs = 10
    if args.batch_size is None:
        args.batch_size = 64
    if args.source_r < 0:
        p.error(f"--source-r must be >= 0; got {args.source_r}")
    embedded = args.data in embedded_data.list_datasets()
    if embedded and embedded_data.get_dataset_spec(args.data).task != "classification":
        p.error(f"--data {args.data} is a segmentation dataset: pass --task segmentation")
    if args.mode == "adaptformer" and args.from_scratch:
        p.error("--mode adaptformer freezes the backbone; it needs pre-trained weights, not --from-scratch")
    if args.adapter_bottleneck < 1:
        p.error(f"--adapter-bottleneck must be >= 1; got {args.adapter_bottleneck}")
    if args.lr is None:
        args.lr = 1e-3 if args.mode == "adaptformer" else 1e-4
    if args.weight_decay is None:
        args.weight_decay = 1e-4 if args.mode == "adaptformer" else 0.05
    if args.lr <= 0 or args.weight_decay < 0 or args.warmup_steps < 0 or not 0 <= args.smoothing < 1:
        p.error("--lr must be > 0, --weight-decay / --warmup-steps >= 0, --smoothing in [0, 1)")
    if args.num_classes is not None and args.num_classes < 1:
        p.error(f"--num-classes must be >= 1; got {args.num_classes}")
    if args.cache_mb < 0:
        p.error(f"--cache-mb must be >= 0; got {args.cache_mb}")
    args.augment = not args.no_augment
    args.use_mixup = args.augment and (args.mixup > 0 or args.cutmix > 0)
    if args.use_mixup and args.batch_size % 2:
        p.error(f"mixup/cutmix need an even --batch-size (got {args.batch_size}); or --mixup 0 --cutmix 0")
    return args


class Classifier(nn.Module):
    """What ``accelerate`` prepares: the (patched) timm model plus, in PET mode, its AdaptFormer."""

    def __init__(self, model: nn.Module, adapters: Optional[AdaptFormer] = None) -> None:
        super().__init__()
        self.model = model
        self.adapters = adapters
        if adapters is not None:
            adapters.attach(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _task(argv: Sequence[str]) -> str:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--task", default="classification")
    return p.parse_known_args(list(argv))[0].task


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the script with ``argv`` (default ``sys.argv[1:]``); ``--task segmentation`` runs
    ``training/segment.py`` with the same arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if _task(argv) == "segmentation":
        from tocom_hub.training import segment

        return segment.main(argv)
    args = parse_args(argv)
    from accelerate.utils import set_seed
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.scheduler import CosineLRScheduler
    from tqdm.auto import tqdm

    accelerator = run.start(args, logger)

    # -- data first (the head size comes from it) -----------------------------------------------------
    probe_size = args.img_size or (EMBEDDED_MODEL_KWARGS["img_size"] if args.model is None else None)
    train_set, val_set, data_info = build_datasets(
        args, EMBEDDED_DOWNSTREAM_DATA, probe_size or 224, seed=args.seed, val_length=args.val_images
    )
    num_classes = args.num_classes or data_info["num_classes"]
    if num_classes is None:
        raise SystemExit("error: cannot tell the number of classes of this dataset; pass --num-classes")

    # -- model ----------------------------------------------------------------------------------------
    model, model_info = build_backbone(args, num_classes=num_classes)
    img_size = model_img_size(model)[0]
    if probe_size is None and data_info["kind"] == "embedded":
        train_set, val_set, data_info = build_datasets(
            args, EMBEDDED_DOWNSTREAM_DATA, img_size, seed=args.seed, val_length=args.val_images
        )
    tocom_hub.patch(model, method=args.method, prop_attn=True)
    try:
        tocom_hub.set_r(model, args.source_r)
    except ValueError as e:
        raise SystemExit(f"error: --source-r {args.source_r} does not fit this model: {e}") from None
    adapters = None
    if args.mode == "adaptformer":
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
        adapters = AdaptFormer.for_model(model, bottleneck=args.adapter_bottleneck, scale=args.adapter_scale)
    net = Classifier(model, adapters)
    trainable = [p for p in net.parameters() if p.requires_grad]

    train_tf, eval_tf, data_cfg = build_transforms(model, img_size, args.augment, data_info["kind"] == "embedded")
    global_micro = args.batch_size * accelerator.num_processes
    loader_kwargs = dict(
        num_workers=args.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=args.num_workers > 0,
    )
    if data_info["iterable"]:
        raise SystemExit(
            "error: finetune.py needs a map-style dataset (folder, embedded or hfds/); "
            "streamed datasets are supported by distill.py"
        )
    n_val = min(len(val_set), args.val_images or len(val_set))
    sampler = EpochSampler(len(train_set), seed=args.seed, multiple_of=global_micro * args.grad_accum)
    train_data = SeededTransform(train_set, train_tf, args.seed)
    val_data = SeededTransform(torch.utils.data.Subset(val_set, range(n_val)), eval_tf, args.seed)
    if not args.augment and fits_in_memory(len(train_set) + n_val, img_size, args.cache_mb):
        # no random transform: decode / render every image once instead of once per epoch
        train_data = InMemory(train_data, args.batch_size, args.num_workers)
        val_data = InMemory(val_data, args.batch_size, args.num_workers)
    train_loader = DataLoader(
        train_data,
        sampler=sampler,
        batch_size=args.batch_size,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
        **loader_kwargs,
    )
    val_loader = DataLoader(val_data, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)

    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    micro_per_epoch = len(sampler) // global_micro
    steps_per_epoch = micro_per_epoch // args.grad_accum
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - args.warmup_steps, 1),
        lr_min=args.min_lr,
        warmup_t=args.warmup_steps,
        warmup_lr_init=args.lr * 1e-3,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    mixup = (
        Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing, num_classes=num_classes)
        if args.use_mixup
        else None
    )
    criterion = (
        SoftTargetCrossEntropy()
        if mixup is not None
        else (LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss())
    )

    net, optimizer, train_loader, val_loader = accelerator.prepare(net, optimizer, train_loader, val_loader)

    run_config: Dict[str, Any] = {
        **run.recipe(
            "training/finetune.py",
            args,
            accelerator,
            model_info,
            data_info,
            img_size=img_size,
            data_config=data_cfg,
            total_steps=total_steps,
            use_mixup=mixup is not None,
        ),
        "task": args.task,
        "from_scratch": args.from_scratch,
        "num_classes": num_classes,
        "source_r": args.source_r,
        "mode": args.mode,
        "adapter_bottleneck": args.adapter_bottleneck,
        "adapter_scale": args.adapter_scale,
        "warmup_steps": args.warmup_steps,
        "smoothing": args.smoothing,
    }
    guard = RunGuard(args.output_dir, "finetune.py").lock(accelerator).watch()  # nothing read or written before
    state, resumed_from = run.resume(args, accelerator, run_config, RESUME_MUST_MATCH, logger, "tocom-finetune")
    n_train = sum(p.numel() for p in trainable)
    logger.info(
        "%s fine-tuning of %s at source r=%d (%s): %d trainable parameters, %d steps of %d images",
        args.mode,
        model_info["model"],
        args.source_r,
        args.method,
        n_train,
        total_steps,
        global_micro * args.grad_accum,
    )

    pos = run.LoopPosition(state)
    step = pos.step
    epoch, skip = divmod(step * args.grad_accum, micro_per_epoch)
    progress = tqdm(
        total=total_steps,
        initial=step,
        disable=not accelerator.is_local_main_process,
        desc=f"finetune r={args.source_r}",
        dynamic_ncols=True,
    )
    history = []
    timer = StepTimer(accelerator.device)
    stop = False
    net.train()
    while step < total_steps and not stop:
        loader = run.epoch_loader(accelerator, train_loader, sampler, epoch, skip)
        skip, pos.micro = 0, 0
        for x, y in loader:
            set_seed(derive_seed(args.seed, "micro", step, pos.micro, accelerator.process_index))
            if mixup is not None:
                x, y = mixup(x, y)
            with accelerator.accumulate(net):
                loss = criterion(net(x).float(), y)
                run.backward_step(accelerator, loss, optimizer, scheduler, step)
            if not pos.micro_done(accelerator, timer, progress):
                continue
            step = pos.step
            if step % args.log_every == 0 or step == total_steps:
                run.log_loss(accelerator, progress, loss, optimizer, step)
            if args.eval_every and step % args.eval_every == 0 and step < total_steps:
                acc = evaluate_top1(accelerator, net, val_loader)
                history.append({"step": step, "val_top1": acc})
                accelerator.log({"val/top1": acc}, step=step)
                logger.info("step %d: val top-1 %.2f", step, acc)
            stop = run.after_step(args, accelerator, step, run_config, logger, guard)
            if stop or step >= total_steps:
                break
        epoch += 1
    progress.close()
    if run.stopped_early(args, accelerator, step, total_steps, logger, guard):
        return {"stopped_at": step, **({"signal": guard.signalled} if guard.signalled else {})}

    acc = evaluate_top1(accelerator, net, val_loader)
    history.append({"step": step, "val_top1": acc})
    accelerator.log({"val/top1": acc}, step=step)
    result = {
        **run_config,
        "steps": step,
        "resumed_from_step": resumed_from,
        "val_top1": acc,
        "val_images": n_val,
        "history": history,
        "median_step_seconds": timer.median(),
    }
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(net)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.save_dtype]
        recipe = {k: v for k, v in result.items() if k != "history"}
        save_finetuned(inner.model, args.output_dir, recipe, adapters=inner.adapters, dtype=dtype)
        write_json(os.path.join(args.output_dir, "finetune.json"), result, sort_keys=True)
        logger.info("val top-1 at r=%d: %.2f; saved to %s", args.source_r, acc, args.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    guard.close()
    return result


if __name__ == "__main__":
    run.script_main(main, "finetune")
