"""What ``distill.py`` and ``finetune.py`` both do around their loop, written once.

:func:`start` makes the ``Accelerator`` (and seeds it), :func:`recipe` records the flags both scripts
share, :func:`resume` restores a checkpoint after checking that the run's settings match, and
:func:`epoch_loader` / :func:`after_step` are the resume-aware pieces of the loop itself. The loops stay
in the scripts, readable top to bottom.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import tocom_hub
from tocom_hub.training.args import resolve_report_to, use_cpu
from tocom_hub.training.checkpoints import (
    TrainState,
    check_resume_config,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tocom_hub.training.guards import RunGuard
from tocom_hub.training.threads import setup_cpu_threads

__all__ = [
    "LoopPosition",
    "RESUME_MUST_MATCH",
    "RESUME_MAY_CHANGE",
    "FLAG_TO_RECIPE",
    "script_main",
    "start",
    "recipe",
    "resume",
    "epoch_loader",
    "backward_step",
    "log_loss",
    "after_step",
    "stopped_early",
]

# recipe entries that must not change between a run and its --resume (each script adds its own): every
# flag that changes the trained numbers. tests/test_run.py checks that each flag of both scripts is either
# behind one of these entries or listed in RESUME_MAY_CHANGE.
RESUME_MUST_MATCH = (
    "model",
    "model_kwargs",
    "weights",
    "checkpoint_sha256",
    "data",
    "train_split",
    "method",
    "seed",
    "global_batch_size",
    "grad_accum",
    "total_steps",
    "lr",
    "weight_decay",
    "min_lr",
    "mixed_precision",
    "drop_path",
    "augment",
    "mixup",
    "cutmix",
    "img_size",
)

# flags a resumed run may change: where things are written or read from, logging, the device, and what is
# measured or exported after the last step (none of them changes a trained weight)
RESUME_MAY_CHANGE = (
    "output_dir",
    "resume",
    "stop_after",
    "checkpoint_every",
    "log_every",
    "report_to",
    "num_workers",
    "cpu",
    "data_dir",
    "val_split",
    "eval_every",
    "push_to_hub",
    "dataset_id",
    "heldout_pairs",
    "heldout_images",
    "cache_mb",
    "val_images",
    "save_dtype",
)

# the recipe entry behind a flag, where it is not the flag's own name (the resume error names the flag)
FLAG_TO_RECIPE = {
    "pretrained": "weights",
    "checkpoint": "checkpoint_sha256",
    "no_augment": "augment",
    "batch_size": "global_batch_size",
    "epochs": "total_steps",
    "max_steps": "total_steps",
}
RECIPE_FLAGS = {
    "weights": "--pretrained/--checkpoint",
    "checkpoint_sha256": "--checkpoint",
    "augment": "--no-augment",
    "global_batch_size": "--batch-size (times processes times --grad-accum)",
    "total_steps": "--max-steps/--epochs",
    "direction": "the distiller's direction",
}


def start(args: argparse.Namespace, logger: logging.Logger, **accelerator_kwargs: Any):
    """The run's ``Accelerator`` (flags of :func:`~tocom_hub.training.args.add_accelerate_args`), seeded."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum,
        log_with=resolve_report_to(args.report_to),
        project_dir=args.output_dir,
        cpu=use_cpu(args),
        **accelerator_kwargs,
    )
    setup_cpu_threads(accelerator.device.type, log=logger.info)  # accelerate launch sets OMP_NUM_THREADS=1
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    set_seed(args.seed)  # identical initialisation on every process
    return accelerator


def recipe(
    script: str,
    args: argparse.Namespace,
    accelerator,
    model_info: Dict[str, Any],
    data_info: Dict[str, Any],
    *,
    img_size: int,
    data_config: Dict[str, Any],
    total_steps: int,
    use_mixup: bool,
) -> Dict[str, Any]:
    """The recipe entries both scripts record (bank config, ``finetune.json``, ``run_config.json``)."""
    global_batch = args.batch_size * accelerator.num_processes * args.grad_accum
    return {
        "script": script,
        "tocom_hub_version": tocom_hub.__version__,
        **{k: model_info[k] for k in ("model", "model_kwargs", "weights", "checkpoint_sha256", "family")},
        "data": data_info["data"],
        "train_split": args.train_split,
        "img_size": img_size,
        "data_config": data_config,
        "method": args.method,
        "prop_attn": True,
        "seed": args.seed,
        "optimizer": "AdamW",
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "min_lr": args.min_lr,
        "total_steps": total_steps,
        "batch_size_per_process": args.batch_size,
        "num_processes": accelerator.num_processes,
        "grad_accum": args.grad_accum,
        "global_batch_size": global_batch,
        "mixed_precision": args.mixed_precision,
        "drop_path": args.drop_path,
        "augment": args.augment,
        "mixup": args.mixup if use_mixup else 0.0,
        "cutmix": args.cutmix if use_mixup else 0.0,
    }


def resume(
    args: argparse.Namespace,
    accelerator,
    run_config: Dict[str, Any],
    must_match: Sequence[str],
    logger: logging.Logger,
    tracker: str,
) -> Tuple[TrainState, Optional[int]]:
    """``(state, resumed from step)``: ``--resume`` (if any) restored into a fresh :class:`TrainState`,
    the trackers started."""
    state, resumed_from = TrainState(), None
    resume_dir = find_checkpoint(args.output_dir, args.resume)
    if resume_dir is not None:
        check_resume_config(resume_dir, run_config, must_match, RECIPE_FLAGS)
        load_checkpoint(accelerator, resume_dir, state)  # JSON step + weights_only loads, no pickle
        resumed_from = state.step
        logger.info("resumed from %s at step %d", resume_dir, state.step)
    elif args.resume == "latest":
        logger.info("--resume latest: no checkpoint under %s/checkpoints, starting at step 0", args.output_dir)
    if accelerator.log_with:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in run_config.items()}
        accelerator.init_trackers(tracker, config=flat)
    return state, resumed_from


def epoch_loader(accelerator, train_loader, sampler, epoch: int, skip: int, dataset: Optional[Any] = None):
    """``train_loader`` for ``epoch``; a resumed run skips the ``skip`` batches the checkpointed steps used
    (a streamed dataset, ``sampler=None``, reads and drops them)."""
    loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
    if sampler is not None:
        loader.set_epoch(epoch)  # accelerate re-applies its own epoch counter on __iter__: keep it ours
        sampler.set_epoch(epoch)
    elif hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    return loader


def backward_step(accelerator, loss, optimizer, scheduler, step: int) -> None:
    """``accelerator.backward(loss)`` and the optimizer step (a no-op until the gradients are accumulated);
    timm's scheduler moves per optimizer step. Call inside ``accelerator.accumulate(model)``."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        scheduler.step_update(step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def log_loss(accelerator, progress, loss, optimizer, step: int, **extra: Any) -> None:
    """The loss (mean over processes) and learning rate to the progress bar and the trackers."""
    loss_val = accelerator.reduce(loss.detach(), "mean").item()
    progress.set_postfix(loss=f"{loss_val:.4g}", **extra)
    logs = {"train/loss": loss_val, "train/lr": optimizer.param_groups[0]["lr"]}
    accelerator.log({**logs, **{f"train/{k}": v for k, v in extra.items()}}, step=step)


def after_step(
    args: argparse.Namespace,
    accelerator,
    step: int,
    run_config: Dict[str, Any],
    logger,
    guard: Optional[RunGuard] = None,
) -> bool:
    """Checkpoint at ``--checkpoint-every`` (and, after a SIGTERM, now); ``True`` when the loop must stop
    here: ``--stop-after`` reached, or SIGTERM (``guard``, on any process)."""
    saved = False
    if args.checkpoint_every and step % args.checkpoint_every == 0:
        path = save_checkpoint(accelerator, args.output_dir, step, run_config)
        logger.info("saved checkpoint %s", path)
        saved = True
    if guard is not None and guard.preempted(accelerator):
        if not saved:
            path = save_checkpoint(accelerator, args.output_dir, step, run_config)
        if accelerator.is_main_process:
            logger.warning(
                "SIGTERM: saved checkpoint %s at step %d; continue with the same flags and --resume latest",
                os.path.join(args.output_dir, "checkpoints", f"step_{step:08d}"),
                step,
            )
        return True
    return args.stop_after is not None and step >= args.stop_after


def stopped_early(
    args: argparse.Namespace, accelerator, step: int, total_steps: int, logger, guard: Optional[RunGuard] = None
) -> bool:
    """After the loop: ``True`` (and the run is closed) when ``--stop-after`` or SIGTERM ended it without
    export (``guard.signalled`` then says which signal)."""
    accelerator.wait_for_everyone()
    if guard is not None and guard.signalled:
        accelerator.end_training()
        guard.close()
        return True
    if args.stop_after is None or step >= total_steps:
        return False
    logger.info("--stop-after %d: stopping at step %d of %d without export", args.stop_after, step, total_steps)
    accelerator.end_training()
    if guard is not None:
        guard.close()
    return True


class LoopPosition:
    """Where a training loop is: optimizer steps done (``step``, mirrored into the checkpointed
    :class:`~tocom_hub.training.checkpoints.TrainState`) and micro-batches accumulated since the last one
    (``micro``); the per-micro-batch seeds derive from both."""

    def __init__(self, state: Any) -> None:
        self.state, self.step, self.micro = state, state.step, 0

    def micro_done(self, accelerator: Any, timer: Any, progress: Any) -> bool:
        """Count one micro-batch; ``True`` when it completed an optimizer step (gradients synchronised)."""
        self.micro += 1
        if not accelerator.sync_gradients:
            return False
        self.micro = 0
        self.step += 1
        self.state.step = self.step
        timer.tick()
        progress.update(1)
        return True


def script_main(main, prog: str) -> None:
    """Run a training script's ``main()`` as a command: the errors a user can fix (a busy output dir, a
    model or checkpoint that does not load, a checkpoint that cannot be written or resumed) end in one
    line ``PROG: error: …`` and exit status 1; a run stopped by SIGTERM (checkpoint written) exits 143."""
    from tocom_hub.training.backbone import BackboneError
    from tocom_hub.training.checkpoints import CheckpointError
    from tocom_hub.training.guards import OutputDirBusy

    try:
        result = main()
    except (CheckpointError, OutputDirBusy, BackboneError) as e:  # a clear one-line message, no traceback
        if int(os.environ.get("RANK", "0") or 0) != 0:
            raise SystemExit(1) from None  # every process stops; only the first one says why
        raise SystemExit(f"{prog}: error: {e}") from None
    if isinstance(result, dict) and result.get("signal") == "SIGTERM":
        raise SystemExit(128 + 15)  # what the shell reports for a process ended by SIGTERM
