"""Train a ToCom bank for a backbone by self-distillation (ToCom paper, §4.2 / Algorithm 1).

One frozen, token-reduced backbone serves as both teacher and student (there is no second copy of
its weights); only the bank — ``R`` groups of rank-``h`` LoRA on W_q / W_v, one per step
``r → r+1`` — trains. Every optimizer step draws a pair ``m != n`` uniformly from ``[0, R]``:
the teacher is the frozen model at r = m, no bank (eval mode, no_grad); the student is the same model
at r = n, with the bank's m → n update (unmerged LoRA in the forward) — exactly what
``tocom_hub.apply(model, source_r=m, target_r=n)`` runs at inference, so the bank learns to make a model
*made at r = m* behave at r = n as it did at r = m. (Eq. 8 as printed in the paper swaps the two roles;
under this convention that learns the negated bank. It is an ablation of the study:
``benchmarks/study/eq8.py``, which runs this script with its own :class:`Distiller`.)

The held-out metrics (``heldout_kl_no_bank`` / ``heldout_kl_with_bank`` in ``metrics.json``) use the
same roles as training: KL(teacher ‖ student) per pair on held-out images, without and with the
bank, for ``--heldout-pairs`` fixed pairs.

Loss: KL divergence on soft targets at ``--temperature`` (scaled by T²), or ``--kd features``: L1
between the pooled, normed final features (``forward_head(..., pre_logits=True)``; for head-less
backbones such as MAE), or ``--cls-loss`` (Table 5 ablation): cross-entropy on the labels.

Teacher mode: the teacher always runs in eval mode under ``no_grad`` (no stochastic depth, no dropout),
so its targets are exactly the outputs of the model at r = m that the bank must reproduce; the
student runs in train mode, so ``--drop-path`` (paper: 0.1) regularises the bank.

Determinism: the pair, mixup/cutmix and drop-path draws of step ``k`` are functions of
``(--seed, k)``; the sample order is a seeded permutation per epoch and every sample's augmentation is
a function of ``(--seed, epoch, index)`` (see ``training/seeds.py``, ``training/data.py``). So ``--resume``
continues bit-exactly, and ``P`` processes with ``--batch-size b`` take the same optimizer steps as one
process with ``--batch-size P·b`` (the global batch is the unit; with ``--grad-accum`` the pair is
drawn once per optimizer step).

Examples::

    accelerate launch training/distill.py --max-steps 50 --output-dir out/    # embedded default, CPU
    accelerate launch --multi_gpu --num_processes 8 training/distill.py \\
        --model deit_base_patch16_224 --pretrained --data /data/imagenet --batch-size 128 \\
        --mixed-precision bf16 --checkpoint-every 1000 --resume latest --output-dir out/deit-b
    torchrun --nproc_per_node 2 training/distill.py --max-steps 10 --output-dir out/
    python -m tocom_hub.training.distill --help
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Dict, Optional, Sequence, Type

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import tocom_hub
from tocom_hub.core.bank.module import ToComBank
from tocom_hub.core.jsonio import write_json
from tocom_hub.tools.images import model_img_size
from tocom_hub.training import run
from tocom_hub.training.args import (
    add_accelerate_args,
    add_data_args,
    add_distill_args,
    check_common_args,
    check_distill_args,
    script_parser,
)
from tocom_hub.training.backbone import EMBEDDED_DATA, build_backbone
from tocom_hub.training.batches import device_batch
from tocom_hub.training.checkpoints import CheckpointError
from tocom_hub.training.data import SeededTransform, build_datasets, build_train_loader, build_transforms
from tocom_hub.training.distiller import Distiller, heldout_eval, kd_loss
from tocom_hub.training.guards import RunGuard
from tocom_hub.training.metrics import StepTimer, step_metrics
from tocom_hub.training.seeds import derive_seed, heldout_pairs, sample_pair

logger = logging.getLogger("tocom_hub.training.distill")

# flags that must not change between a run and its --resume (besides run.RESUME_MUST_MATCH)
RESUME_MUST_MATCH = run.RESUME_MUST_MATCH + (
    "r_max",
    "rank",
    "targets",
    "scale",
    "direction",
    "kd",
    "cls_loss",
    "temperature",
    "dense",
    "dense_ratio",
)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``distill.py`` (every flag with its default in ``--help``)."""
    p = script_parser("distill.py", __doc__)
    add_data_args(p, default_data=EMBEDDED_DATA)
    add_distill_args(p)
    add_accelerate_args(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)

    check_common_args(p, args)
    if args.epochs is None and args.max_steps is None:
        args.epochs = 10
    if args.batch_size is None:
        args.batch_size = 128
    check_distill_args(p, args)
    return args


# ---------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None, *, distiller_cls: Type[Distiller] = Distiller) -> Dict[str, Any]:
    """Run the script with ``argv`` (default ``sys.argv[1:]``); ``distiller_cls`` builds the module that
    trains (a :class:`Distiller` subclass changes the roles or the forward, e.g. the study's Eq. 8
    ablation). Returns ``metrics.json``'s content, or ``{"stopped_at": step}`` (plus ``"signal"`` after a
    SIGTERM) for a run stopped before its last step."""
    args = parse_args(argv)
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.scheduler import CosineLRScheduler
    from tqdm.auto import tqdm

    # pinned batches are copied asynchronously: the host queues step k+1 while the GPU runs step k
    accelerator = run.start(args, logger, dataloader_config=DataLoaderConfiguration(non_blocking=True))

    # -- backbone (frozen) + bank -----------------------------------------------------------------
    model, model_info = build_backbone(args)
    if args.kd == "logits" and model_info["num_classes"] == 0:
        raise SystemExit(
            f"error: {model_info['model']} has no classifier head to distill logits from; "
            f"use --kd features (L1 on the final features)"
        )
    tocom_hub.patch(model, method=args.method, prop_attn=True, dense=args.dense, dense_ratio=args.dense_ratio)
    try:
        tocom_hub.set_r(model, args.r_max)
    except ValueError as e:
        raise SystemExit(f"error: --r-max {args.r_max} does not fit this model: {e}") from None
    model.requires_grad_(False)
    img_size = model_img_size(model)[0]
    bank = ToComBank.for_model(
        model,
        r_max=args.r_max,
        rank=args.rank,
        targets=args.targets,
        method=args.method,
        scale=args.scale,
        dense=args.dense,
        dense_ratio=args.dense_ratio if args.dense else None,
        base_model=model_info["model"],
        pretrained_tag=(model.pretrained_cfg.get("tag") if args.pretrained else None),
    )
    model.to(accelerator.device)
    bank.to(accelerator.device)
    tocom_hub.apply(model, 0, 0, bank=bank, merge=False, scale=args.scale)
    distiller = distiller_cls(model, bank, kd=args.kd)

    # -- data ---------------------------------------------------------------------------------------
    train_set, val_set, data_info = build_datasets(
        args,
        EMBEDDED_DATA,
        img_size,
        need_val=args.heldout_pairs > 0,
        seed=args.seed,
        val_length=args.heldout_images,
    )
    train_tf, eval_tf, data_cfg = build_transforms(model, img_size, args.augment, data_info["kind"] == "embedded")
    num_classes = model_info["num_classes"] or data_info["num_classes"] or 1
    global_micro = args.batch_size * accelerator.num_processes
    # workers stop at uint8 images, the float part of the transform runs on the device (bit-identical);
    # streamed datasets (hfids/, wds/): timm's reader shards by rank and shuffles by seed/epoch, so that
    # loader is not prepared (that would shard twice) and resume fast-forwards batches.
    train_loader, sampler, normalize = build_train_loader(
        train_set,
        train_tf,
        iterable=data_info["iterable"],
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        seed=args.seed,
        multiple_of=global_micro * args.grad_accum,
        pin_memory=accelerator.device.type == "cuda",
    )
    heldout_loader = None
    if val_set is not None:
        if data_info["iterable"]:
            val_set.transform = eval_tf
            heldout_loader = DataLoader(val_set, batch_size=args.batch_size, num_workers=args.num_workers)
        else:
            n_val = min(len(val_set), args.heldout_images)
            heldout_loader = DataLoader(
                SeededTransform(torch.utils.data.Subset(val_set, range(n_val)), eval_tf, args.seed),
                batch_size=args.batch_size,
                shuffle=False,
                num_workers=args.num_workers,
            )

    # -- optimizer / schedule -------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(bank.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if data_info["iterable"]:
        if args.max_steps is None:
            raise SystemExit("error: a streamed dataset has no reliable epoch length here; pass --max-steps")
        micro_per_epoch = 0  # one pass of the stream is one "epoch"; resume fast-forwards (approximate)
    else:
        micro_per_epoch = len(sampler) // global_micro
    steps_per_epoch = micro_per_epoch // args.grad_accum
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    scheduler = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=args.min_lr, warmup_t=0, t_in_epochs=False)
    mixup = None
    if args.use_mixup:
        mixup = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            label_smoothing=0.1 if args.cls_loss else 0.0,
            num_classes=num_classes,
        )

    distiller, optimizer = accelerator.prepare(distiller, optimizer)
    if not data_info["iterable"]:  # streamed data is sharded by timm's reader itself
        train_loader = accelerator.prepare(train_loader)
        if heldout_loader is not None:
            heldout_loader = accelerator.prepare(heldout_loader)
    unwrapped = accelerator.unwrap_model(distiller)

    # -- what was run (recipe, resume checks, trackers) -----------------------------------------------
    run_config: Dict[str, Any] = {
        **run.recipe(
            "training/distill.py",
            args,
            accelerator,
            model_info,
            data_info,
            img_size=img_size,
            data_config=data_cfg,
            total_steps=total_steps,
            use_mixup=args.use_mixup,
        ),
        "dataset": args.dataset_id or _hub_dataset_id(data_info["data"]),
        "r_max": args.r_max,
        "rank": args.rank,
        "targets": list(args.targets),
        "scale": args.scale,
        "direction": unwrapped.direction,
        "dense": args.dense,
        "dense_ratio": args.dense_ratio if args.dense else None,
        "kd": args.kd,
        "cls_loss": args.cls_loss,
        "temperature": args.temperature,
        "teacher_mode": "eval, no_grad",
        "schedule": "cosine per step, no warm-up",
        "epochs": (total_steps / steps_per_epoch) if steps_per_epoch else None,
        "auto_augment": "rand-m9-mstd0.5-inc1" if args.augment else None,
        "re_prob": 0.25 if args.augment else 0.0,
    }
    guard = RunGuard(args.output_dir, "distill.py").lock(accelerator).watch()  # nothing read or written before
    state, resumed_from = run.resume(args, accelerator, run_config, RESUME_MUST_MATCH, logger, "tocom-distill")

    logger.info(
        "bank: %d parameters (R=%d, rank=%d, targets=%s); backbone %s frozen; %d steps of %d images "
        "(%d process(es) × %d × %d accumulation); direction=%s",
        bank.num_parameters(),
        args.r_max,
        args.rank,
        ",".join(args.targets),
        model_info["model"],
        total_steps,
        global_micro * args.grad_accum,
        accelerator.num_processes,
        args.batch_size,
        args.grad_accum,
        unwrapped.direction,
    )
    pairs = heldout_pairs(args.seed, args.r_max, args.heldout_pairs) if heldout_loader is not None else []

    # -- training loop --------------------------------------------------------------------------------
    soft_ce = SoftTargetCrossEntropy()
    pos = run.LoopPosition(state)
    step = pos.step
    batches_done = step * args.grad_accum
    epoch, skip = divmod(batches_done, micro_per_epoch) if micro_per_epoch else (0, batches_done)
    progress = tqdm(
        total=total_steps,
        initial=step,
        disable=not accelerator.is_local_main_process,
        desc="distill",
        dynamic_ncols=True,
    )
    timer = StepTimer(accelerator.device)
    stop = False
    distiller.train()
    while step < total_steps and not stop:
        loader = run.epoch_loader(accelerator, train_loader, sampler, epoch, skip, train_set)
        skip = 0
        pos.micro = 0
        for batch in loader:
            x, y = device_batch(batch, accelerator.device, normalize)
            m, n = sample_pair(args.seed, step, args.r_max)
            set_seed(derive_seed(args.seed, "micro", step, pos.micro, accelerator.process_index))
            target = None
            if mixup is not None:
                x, target = mixup(x, y)
            elif args.cls_loss:
                target = y
            with accelerator.accumulate(distiller):
                student, teacher = distiller(x, m, n, teacher=not args.cls_loss)
                if args.cls_loss:
                    hard = target.ndim == 1
                    loss = F.cross_entropy(student.float(), target) if hard else soft_ce(student.float(), target)
                else:
                    loss = kd_loss(student, teacher, args.kd, args.temperature)
                run.backward_step(accelerator, loss, optimizer, scheduler, step)
            if not pos.micro_done(accelerator, timer, progress):
                continue
            step = pos.step
            if step % args.log_every == 0 or step == total_steps:
                run.log_loss(accelerator, progress, loss, optimizer, step, m=m, n=n)
            if args.eval_every and step % args.eval_every == 0 and step < total_steps and heldout_loader is not None:
                ev = heldout_eval(accelerator, unwrapped, heldout_loader, pairs, args.kd)
                accelerator.log({f"heldout/{k}": v for k, v in ev.items() if isinstance(v, float)}, step=step)
                logger.info("step %d: %s", step, {k: round(v, 6) for k, v in ev.items() if isinstance(v, float)})
            stop = run.after_step(args, accelerator, step, run_config, logger, guard)
            if stop or step >= total_steps:
                break
        epoch += 1
    window_seconds = timer.window_seconds()
    progress.close()
    if run.stopped_early(args, accelerator, step, total_steps, logger, guard):
        return {"stopped_at": step, **({"signal": guard.signalled} if guard.signalled else {})}

    # -- held-out KL, export --------------------------------------------------------------------------
    metrics: Dict[str, Any] = {"steps": step, "resumed_from_step": resumed_from, "direction": unwrapped.direction}
    if heldout_loader is not None and pairs:
        metrics.update(heldout_eval(accelerator, unwrapped, heldout_loader, pairs, args.kd))
        accelerator.log({f"heldout/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=step)
    metrics.update(step_metrics(timer, window_seconds, global_micro * args.grad_accum))
    if accelerator.is_main_process:
        out_bank = unwrapped.bank
        out_bank.config.training_recipe = run_config
        out_bank.config.eval_results = {k: v for k, v in metrics.items() if k.startswith("heldout_")}
        try:
            out_bank.save_pretrained(args.output_dir)
            write_json(os.path.join(args.output_dir, "metrics.json"), metrics, sort_keys=True)
        except Exception as e:  # OSError, torch's RuntimeError, safetensors' SafetensorError
            raise CheckpointError(
                f"could not write the trained bank to {args.output_dir} ({type(e).__name__}: {e}); no partial "
                f"file was left. Free some space and rerun with --resume latest (from the last checkpoint)"
            ) from e
        name = "kl" if args.kd == "logits" else "l1"
        if f"heldout_{name}_no_bank" in metrics:
            a, b = metrics[f"heldout_{name}_no_bank"], metrics[f"heldout_{name}_with_bank"]
            logger.info(
                "held-out %s over %d pairs: no bank %.6g → with bank %.6g (%+.1f%%)",
                name.upper(),
                len(pairs),
                a,
                b,
                100.0 * (b - a) / a if a else 0.0,
            )
        logger.info("bank saved to %s", args.output_dir)
        if args.push_to_hub:
            from tocom_hub.hub import push_bank

            push_bank(out_bank, args.push_to_hub)
            logger.info("pushed to https://huggingface.co/%s", args.push_to_hub)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    guard.close()
    return metrics


def _hub_dataset_id(data: str) -> Optional[str]:
    """``imagenet-1k`` for ``--data hfds/imagenet-1k`` (what the bank's model card lists); else ``None``."""
    prefix, _, rest = data.partition("/")
    return rest if prefix.lower() in ("hfds", "hfids") and rest else None


if __name__ == "__main__":
    run.script_main(main, "distill")
