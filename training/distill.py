"""Train a ToCom bank for a backbone by self-distillation (ToCom paper, §4.2 / Algorithm 1).

One frozen, token-reduced backbone serves as both teacher and student (there is no second copy of
its weights); only the bank — ``R`` groups of rank-``h`` LoRA on W_q / W_v, one per step
``r → r+1`` — trains. Every optimizer step draws a pair ``m != n`` uniformly from ``[0, R]``:

    direction "inference" (default)
        teacher = the frozen model at r = m, no bank (eval mode, no_grad)
        student = the same model at r = n, with the bank's m → n update (unmerged LoRA in the forward)
        — exactly what ``tocom_hub.apply(model, source_r=m, target_r=n)`` runs at inference, so the
        bank learns to make a model *made at r = m* behave at r = n as it did at r = m.
    direction "paper-eq8"
        teacher = the model at r = n, no bank; student = the model at r = m with the m → n update:
        Eq. 8 as printed in the paper. Under the inference convention above the bank this learns is
        the *negated* one (it moves an r = m model towards the r = n model), which is why it is not the
        default; kept for comparison.

The held-out metrics (``heldout_kl_no_bank`` / ``heldout_kl_with_bank`` in ``metrics.json``) use the
same direction as training: KL(teacher ‖ student) per pair on held-out images, without and with the
bank, for ``--heldout-pairs`` fixed pairs.

Loss: KL divergence on soft targets at ``--temperature`` (scaled by T²), or ``--kd features``: L1
between the pooled, normed final features (``forward_head(..., pre_logits=True)``; for head-less
backbones such as MAE), or ``--cls-loss`` (Table 5 ablation): cross-entropy on the labels.

Teacher mode: the teacher always runs in eval mode under ``no_grad`` (no stochastic depth, no dropout),
so its targets are exactly the outputs of the model at r = m that the bank must reproduce; the
student runs in train mode, so ``--drop-path`` (paper: 0.1) regularises the bank.

Determinism: the pair, mixup/cutmix and drop-path draws of step ``k`` are functions of
``(--seed, k)``; the sample order is a seeded permutation per epoch and every sample's augmentation is
a function of ``(--seed, epoch, index)`` (see ``tocom_hub/training/common.py``). So ``--resume``
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
import math
import os
import platform
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import tocom_hub
from tocom_hub.core import compensate
from tocom_hub.core.bank import TARGETS, ToComBank
from tocom_hub.tools._threads import setup_cpu_threads
from tocom_hub.tools.images import model_img_size
from tocom_hub.training import common

logger = logging.getLogger("tocom_hub.training.distill")

DIRECTIONS = ("inference", "paper-eq8")
# flags that must not change between a run and its --resume
RESUME_MUST_MATCH = (
    "model",
    "model_kwargs",
    "checkpoint_sha256",
    "data",
    "method",
    "r_max",
    "rank",
    "targets",
    "scale",
    "direction",
    "kd",
    "cls_loss",
    "temperature",
    "seed",
    "global_batch_size",
    "grad_accum",
    "total_steps",
    "lr",
    "weight_decay",
    "min_lr",
    "augment",
    "drop_path",
    "mixup",
    "cutmix",
    "img_size",
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="distill.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_model_args(p)
    common.add_data_args(p, default_data=common.EMBEDDED_DATA)
    g = p.add_argument_group("bank")
    g.add_argument(
        "--r-max",
        type=int,
        default=None,
        help=f"R, the largest r the bank covers (default 16; {common.EMBEDDED_R_MAX} for the embedded model)",
    )
    g.add_argument("--rank", type=int, default=2, help="LoRA rank h of every group (default 2)")
    g.add_argument("--targets", default="q,v", help=f"comma-separated subset of {','.join(TARGETS)} (default q,v)")
    g.add_argument("--scale", type=float, default=0.1, help="s during training (default 0.1)")
    g = p.add_argument_group("distillation")
    g.add_argument(
        "--direction",
        default="inference",
        choices=DIRECTIONS,
        help="inference (default): teacher r=m no bank, student r=n + bank m→n — what "
        "tocom_hub.apply(model, source_r=m, target_r=n) runs; paper-eq8: teacher r=n, student "
        "r=m + bank m→n (Eq. 8 as printed; learns the negated bank under the inference convention)",
    )
    g.add_argument(
        "--kd",
        default="logits",
        choices=["logits", "features"],
        help="logits: KL on soft targets; features: L1 on pooled final features (head-less backbones)",
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
    common.add_accelerate_args(p)
    args = p.parse_args(argv)

    common.check_common_args(p, args)
    if args.epochs is None and args.max_steps is None:
        args.epochs = 10
    if args.batch_size is None:
        args.batch_size = 128
    if args.r_max is None:
        args.r_max = common.EMBEDDED_R_MAX if args.model is None else 16
    if args.r_max < 1:
        p.error(f"--r-max must be >= 1 (the bank needs at least one step r → r+1); got {args.r_max}")
    if args.rank < 1:
        p.error(f"--rank must be >= 1; got {args.rank}")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    bad = [t for t in targets if t not in TARGETS]
    if not targets or bad or len(set(targets)) != len(targets):
        p.error(f"--targets must be distinct names from {','.join(TARGETS)}; got {args.targets!r}")
    args.targets = targets
    if not math.isfinite(args.scale) or args.scale == 0:
        p.error(f"--scale must be a finite, non-zero number; got {args.scale}")
    if not args.temperature > 0:
        p.error(f"--temperature must be > 0; got {args.temperature}")
    if args.cls_loss and args.kd == "features":
        p.error("--cls-loss trains on labels; it cannot be combined with --kd features")
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
    return args


# ---------------------------------------------------------------------------------------------------
# the module accelerate prepares


class Distiller(nn.Module):
    """The bank (trainable, a submodule) plus the frozen backbone it is plugged into (not a submodule).

    Keeping the backbone out of the module tree means ``accelerator.save_state`` checkpoints hold only
    the bank (DeiT-B: 4.7 MB instead of 350 MB) and DDP synchronises only bank gradients. The backbone
    carries the bank in *unmerged* mode (``tocom_hub.apply(..., merge=False)``), so student and
    inference share one forward: ``compensate.set_pair`` picks the pair, ``compensate.disabled`` turns
    the bank off for the teacher.
    """

    def __init__(self, backbone: nn.Module, bank: ToComBank, direction: str = "inference", kd: str = "logits") -> None:
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}; got {direction!r}")
        self.bank = bank
        self.__dict__["backbone"] = backbone  # deliberately not registered (see the class docstring)
        self.direction, self.kd = direction, kd

    def roles(self, m: int, n: int) -> Tuple[int, int]:
        """``(teacher r, student r)`` of the pair ``(m, n)`` (the bank always holds ``m → n``)."""
        return (m, n) if self.direction == "inference" else (n, m)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        if self.kd == "features":
            return bb.forward_head(bb.forward_features(x), pre_logits=True)
        return bb(x)

    @torch.no_grad()
    def teacher(self, x: torch.Tensor, m: int, n: int) -> torch.Tensor:
        bb = self.backbone
        bb.eval()
        tocom_hub.set_r(bb, self.roles(m, n)[0])
        with compensate.disabled(bb):
            return self._run(x)

    def student(self, x: torch.Tensor, m: int, n: int, bank: bool = True) -> torch.Tensor:
        bb = self.backbone
        bb.train(self.training)
        compensate.set_pair(bb, m, n, r=self.roles(m, n)[1])
        if bank:
            return self._run(x)
        with compensate.disabled(bb):
            return self._run(x)

    def forward(self, x: torch.Tensor, m: int, n: int, teacher: bool = True):
        t = self.teacher(x, m, n) if teacher else None
        return self.student(x, m, n), t


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, kd: str, temperature: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """KL(teacher ‖ student) at temperature ``T`` (× T²), or mean L1 for ``kd="features"``.

    ``reduction="none"`` returns one value per sample (held-out metrics).
    """
    s, t = student.float(), teacher.float()
    if kd == "features":
        per = (s - t).abs().flatten(1).mean(1)
    else:
        T = temperature
        log_s, log_t = F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)
        per = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1) * (T * T)
    return per if reduction == "none" else per.mean()


@torch.no_grad()
def heldout_eval(accelerator, distiller: Distiller, loader, pairs: List[Tuple[int, int]], kd: str) -> Dict[str, Any]:
    """Mean KL(teacher ‖ student) (or L1) per pair on the held-out loader, without and with the bank.

    Runs in fp32 (outside autocast) whatever ``--mixed-precision`` says: the KLs compared are ~1e-3
    and bf16 rounding of the logits alone moves them by several per cent.
    """
    was_training = distiller.training
    distiller.eval()
    k = len(pairs)
    sums = torch.zeros(2, k, dtype=torch.float64)
    count = 0
    from tqdm.auto import tqdm

    for x, _ in tqdm(
        loader,
        desc=f"held-out eval ({k} pairs)",
        unit="batch",
        leave=False,
        disable=not accelerator.is_local_main_process,
    ):
        x = x.to(accelerator.device)
        vals = torch.empty(x.shape[0], 2, k, device=x.device)
        for j, (m, n) in enumerate(pairs):  # fp32 even under --mixed-precision: the KL is ~1e-3, bf16 noise is not
            t = distiller.teacher(x, m, n)
            vals[:, 0, j] = kd_loss(distiller.student(x, m, n, bank=False), t, kd, reduction="none")
            vals[:, 1, j] = kd_loss(distiller.student(x, m, n, bank=True), t, kd, reduction="none")
        vals = accelerator.gather_for_metrics(vals)
        sums += vals.double().sum(0).cpu()
        count += vals.shape[0]
    distiller.train(was_training)
    per_pair = (sums / max(count, 1)).tolist()
    name = "l1" if kd == "features" else "kl"
    return {
        "heldout_metric": (
            "mean |student - teacher| of the pooled features"
            if kd == "features"
            else "KL(teacher || student) of the softmax outputs, T = 1"
        ),
        "heldout_direction": distiller.direction,
        f"heldout_{name}_no_bank": statistics.fmean(per_pair[0]),
        f"heldout_{name}_with_bank": statistics.fmean(per_pair[1]),
        "heldout_pairs": [list(p) for p in pairs],
        f"heldout_{name}_no_bank_per_pair": per_pair[0],
        f"heldout_{name}_with_bank_per_pair": per_pair[1],
        "heldout_images": count,
    }


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB → MiB


# ---------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.scheduler import CosineLRScheduler
    from tqdm.auto import tqdm

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum,
        log_with=common.resolve_report_to(args.report_to),
        project_dir=args.output_dir,
        cpu=common.use_cpu(args),
        # pinned batches are copied asynchronously: the host queues step k+1 while the GPU runs step k
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    setup_cpu_threads(accelerator.device.type, log=logger.info)  # accelerate launch sets OMP_NUM_THREADS=1
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    set_seed(args.seed)  # identical bank initialisation on every process

    # -- backbone (frozen) + bank -----------------------------------------------------------------
    model, model_info = common.build_backbone(args)
    if args.kd == "logits" and model_info["num_classes"] == 0:
        raise SystemExit(
            f"error: {model_info['model']} has no classifier head to distill logits from; "
            f"use --kd features (L1 on the final features)"
        )
    tocom_hub.patch(model, method=args.method, prop_attn=True)
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
        base_model=model_info["model"],
        pretrained_tag=(model.pretrained_cfg.get("tag") if args.pretrained else None),
    )
    model.to(accelerator.device)
    bank.to(accelerator.device)
    tocom_hub.apply(model, 0, 0, bank=bank, merge=False, scale=args.scale)
    distiller = Distiller(model, bank, direction=args.direction, kd=args.kd)

    # -- data ---------------------------------------------------------------------------------------
    train_set, val_set, data_info = common.build_datasets(
        args,
        common.EMBEDDED_DATA,
        img_size,
        need_val=args.heldout_pairs > 0,
        seed=args.seed,
        val_length=args.heldout_images,
    )
    train_tf, eval_tf, data_cfg = common.build_transforms(
        model, img_size, args.augment, data_info["kind"] == "embedded"
    )
    num_classes = model_info["num_classes"] or data_info["num_classes"] or 1
    global_micro = args.batch_size * accelerator.num_processes
    # workers stop at uint8 images, the float part of the transform runs on the device (bit-identical);
    # streamed datasets (hfids/, wds/): timm's reader shards by rank and shuffles by seed/epoch, so that
    # loader is not prepared (that would shard twice) and resume fast-forwards batches.
    train_loader, sampler, normalize = common.build_train_loader(
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
                common.SeededTransform(torch.utils.data.Subset(val_set, range(n_val)), eval_tf, args.seed),
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
        "script": "training/distill.py",
        "tocom_hub_version": tocom_hub.__version__,
        **{k: model_info[k] for k in ("model", "model_kwargs", "weights", "checkpoint_sha256")},
        "data": data_info["data"],
        "dataset": args.dataset_id or _hub_dataset_id(data_info["data"]),
        "img_size": img_size,
        "data_config": data_cfg,
        "method": args.method,
        "prop_attn": True,
        "r_max": args.r_max,
        "rank": args.rank,
        "targets": list(args.targets),
        "scale": args.scale,
        "direction": args.direction,
        "kd": args.kd,
        "cls_loss": args.cls_loss,
        "temperature": args.temperature,
        "teacher_mode": "eval, no_grad",
        "seed": args.seed,
        "optimizer": "AdamW",
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "min_lr": args.min_lr,
        "schedule": "cosine per step, no warm-up",
        "total_steps": total_steps,
        "epochs": (total_steps / steps_per_epoch) if steps_per_epoch else None,
        "batch_size_per_process": args.batch_size,
        "num_processes": accelerator.num_processes,
        "grad_accum": args.grad_accum,
        "global_batch_size": global_micro * args.grad_accum,
        "mixed_precision": args.mixed_precision,
        "drop_path": args.drop_path,
        "augment": args.augment,
        "auto_augment": "rand-m9-mstd0.5-inc1" if args.augment else None,
        "re_prob": 0.25 if args.augment else 0.0,
        "mixup": args.mixup if args.use_mixup else 0.0,
        "cutmix": args.cutmix if args.use_mixup else 0.0,
    }
    state = common.TrainState()
    resume_dir = common.find_checkpoint(args.output_dir, args.resume)
    resumed_from = None
    if resume_dir is not None:
        common.check_resume_config(resume_dir, run_config, RESUME_MUST_MATCH)
        common.load_checkpoint(accelerator, resume_dir, state)  # JSON step + weights_only loads, no pickle
        resumed_from = state.step
        logger.info("resumed from %s at step %d", resume_dir, state.step)
    elif args.resume == "latest":
        logger.info("--resume latest: no checkpoint under %s/checkpoints, starting at step 0", args.output_dir)
    if accelerator.log_with:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in run_config.items()}
        accelerator.init_trackers("tocom-distill", config=flat)

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
        args.direction,
    )
    pairs = common.heldout_pairs(args.seed, args.r_max, args.heldout_pairs) if heldout_loader is not None else []

    # -- training loop --------------------------------------------------------------------------------
    soft_ce = SoftTargetCrossEntropy()
    step = state.step
    batches_done = step * args.grad_accum
    epoch, skip = divmod(batches_done, micro_per_epoch) if micro_per_epoch else (0, batches_done)
    progress = tqdm(
        total=total_steps,
        initial=step,
        disable=not accelerator.is_local_main_process,
        desc="distill",
        dynamic_ncols=True,
    )
    step_times: List[float] = []
    stopped_early = False
    distiller.train()
    t_last = time.perf_counter()
    while step < total_steps and not stopped_early:
        # a resumed run skips what the checkpointed steps consumed (streamed data: read and dropped)
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        if sampler is not None:
            loader.set_epoch(epoch)  # accelerate re-applies its own epoch counter on __iter__: keep it ours
            sampler.set_epoch(epoch)
        elif hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        skip = 0
        micro = 0
        for batch in loader:
            x, y = common.device_batch(batch, accelerator.device, normalize)
            m, n = common.sample_pair(args.seed, step, args.r_max)
            set_seed(common.derive_seed(args.seed, "micro", step, micro, accelerator.process_index))
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
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    scheduler.step_update(step)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            if not accelerator.sync_gradients:
                continue
            micro = 0
            step += 1
            state.step = step
            now = time.perf_counter()
            step_times.append(now - t_last)
            t_last = now
            if len(step_times) == 1:  # the throughput window starts after the first step (workers warm up)
                _sync(accelerator.device)
                t_window = time.perf_counter()
            progress.update(1)
            if step % args.log_every == 0 or step == total_steps:
                loss_val = accelerator.reduce(loss.detach(), "mean").item()
                lr = optimizer.param_groups[0]["lr"]
                progress.set_postfix(loss=f"{loss_val:.4g}", m=m, n=n)
                accelerator.log({"train/loss": loss_val, "train/lr": lr, "train/m": m, "train/n": n}, step=step)
            if args.eval_every and step % args.eval_every == 0 and step < total_steps and heldout_loader is not None:
                ev = heldout_eval(accelerator, unwrapped, heldout_loader, pairs, args.kd)
                accelerator.log({f"heldout/{k}": v for k, v in ev.items() if isinstance(v, float)}, step=step)
                logger.info("step %d: %s", step, {k: round(v, 6) for k, v in ev.items() if isinstance(v, float)})
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                path = common.save_checkpoint(accelerator, args.output_dir, step, run_config)
                logger.info("saved checkpoint %s", path)
            if args.stop_after is not None and step >= args.stop_after:
                stopped_early = True
                break
            if step >= total_steps:
                break
        epoch += 1
    _sync(accelerator.device)
    window_seconds = time.perf_counter() - t_window if len(step_times) > 1 else 0.0
    progress.close()
    accelerator.wait_for_everyone()
    if stopped_early and step < total_steps:
        logger.info("--stop-after %d: stopping at step %d of %d without export", args.stop_after, step, total_steps)
        accelerator.end_training()
        return {"stopped_at": step}

    # -- held-out KL, export --------------------------------------------------------------------------
    metrics: Dict[str, Any] = {"steps": step, "resumed_from_step": resumed_from, "direction": args.direction}
    if heldout_loader is not None and pairs:
        metrics.update(heldout_eval(accelerator, unwrapped, heldout_loader, pairs, args.kd))
        accelerator.log({f"heldout/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=step)
    timed = step_times[1:] or step_times
    if timed:
        med = statistics.median(timed)
        metrics.update(
            {
                "median_step_seconds": med,
                "images_per_second": global_micro * args.grad_accum / med,
                # wall-clock rate over all steps but the first, the device synchronised at both ends
                "throughput_images_per_second": (
                    (len(step_times) - 1) * global_micro * args.grad_accum / window_seconds
                )
                if window_seconds > 0
                else None,
                "peak_memory_mb_per_process": _peak_memory_mb(accelerator.device),
                "device": str(accelerator.device),
                "cpu_threads": torch.get_num_threads(),
                "platform": platform.platform(),
            }
        )
    if accelerator.is_main_process:
        out_bank = unwrapped.bank
        out_bank.config.training_recipe = run_config
        out_bank.config.eval_results = {k: v for k, v in metrics.items() if k.startswith("heldout_")}
        try:
            out_bank.save_pretrained(args.output_dir)
            common.write_json(os.path.join(args.output_dir, "metrics.json"), metrics)
        except Exception as e:  # OSError, torch's RuntimeError, safetensors' SafetensorError
            raise common.CheckpointError(
                f"could not write the trained bank to {args.output_dir} ({type(e).__name__}: {e}); no partial "
                f"file was left. Free some space and rerun with --resume latest (from the last checkpoint)"
            ) from e
        name = "l1" if args.kd == "features" else "kl"
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
            out_bank.push_to_hub(args.push_to_hub)
            logger.info("pushed to https://huggingface.co/%s", args.push_to_hub)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hub_dataset_id(data: str) -> Optional[str]:
    """``imagenet-1k`` for ``--data hfds/imagenet-1k`` (what the bank's model card lists); else ``None``."""
    prefix, _, rest = data.partition("/")
    return rest if prefix.lower() in ("hfds", "hfids") and rest else None


if __name__ == "__main__":
    try:
        main()
    except common.CheckpointError as e:  # a clear one-paragraph message, no traceback
        raise SystemExit(f"distill: error: {e}") from None
