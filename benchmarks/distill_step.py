"""Cost of one ToCom distillation step relative to one plain full fine-tuning step, and how much of that
step rate ``training/distill.py`` delivers end to end.

:func:`step_rates` — same timm model (``pretrained=False``: timing does not depend on the weights), same
synthetic batch, same drop-path rate, same precision (``no`` / ``bf16`` / ``fp16`` autocast, as
``accelerate`` applies it):

* **distill** — the step ``training/distill.py`` runs (its ``Distiller`` and ``kd_loss``): frozen
  backbone, teacher at r = m under ``no_grad`` without the bank, student at r = n with the bank's
  unmerged m → n LoRA, KL loss, backward (bank gradients only), AdamW on the bank. The pairs (m, n)
  are the training sequence (``sample_pair(seed, step, R)``), so the median is over the pairs a real
  run draws.
* **full_ft** — standard fine-tuning: r = 0 (unpatched timm), every parameter trainable,
  cross-entropy, backward, AdamW over all parameters.

Rounds interleave the two (alternating which goes first) so that load from other processes hits both
alike; the headline is the median over rounds of the per-round ratio distill / full_ft (target ≤ 1.1).
On CUDA each round times ``steps_per_round`` back-to-back steps between two synchronisations.
``breakdown=True`` also times the distillation step's parts (teacher forward, student forward,
backward, optimizer) with a synchronisation after each.

:func:`end_to_end` — runs ``training/distill.py`` for a fixed number of steps (subprocess, no held-out
evaluation) and reports its wall-clock images/s (all steps but the first, device synchronised) and, given
the raw step rate of :func:`step_rates`, the fraction of it the whole loop delivers (target ≥ 0.8).
:func:`loader_rate` — the training input pipeline alone (same loader as the script, batches moved to
the device and normalised there): if it is not well above the step rate, the data is the bottleneck.

Why the step can be cheap: the backbone is frozen, so the backward computes activation gradients only
(no weight gradients, about half of a normal backward) and AdamW touches 1 % of the parameters; the
teacher pass keeps no activations; and with token merging both passes see fewer tokens (r > 0 for at
least one of them in every pair).

    python benchmarks/distill_step.py --model deit_small_patch16_224 --batch-size 32 --rounds 10
    python benchmarks/distill_step.py --model deit_base_patch16_224 --batch-size 128 --precision bf16 \\
        --device cuda --end-to-end --data photo-crops --num-workers 14
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Optional, Sequence

import timm
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tocom_hub  # noqa: E402
from tocom_hub.core.bank.module import ToComBank  # noqa: E402
from tocom_hub.core.jsonio import write_json  # noqa: E402
from tocom_hub.tools.timing import Stopwatch, WallTimer, interleaved, paired_ratios, synchronize  # noqa: E402
from tocom_hub.training.distiller import Distiller, kd_loss  # noqa: E402
from tocom_hub.training.seeds import sample_pair  # noqa: E402

TARGET_RATIO = 1.1  # distill step ÷ full fine-tuning step
TARGET_END_TO_END = 0.8  # distill.py images/s ÷ raw distill step images/s
PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def step_rates(
    model: str = "deit_small_patch16_224",
    *,
    img_size: Optional[int] = None,
    batch_size: int = 32,
    precision: str = "no",
    device: Optional[str] = None,
    rounds: int = 10,
    warmup: int = 2,
    steps_per_round: int = 1,
    r_max: int = 16,
    rank: int = 2,
    method: str = "tome",
    drop_path: float = 0.1,
    seed: int = 0,
    model_kwargs: Optional[Dict[str, Any]] = None,
    breakdown: bool = False,
    verbose: bool = False,
) -> Dict[str, Any]:
    """Distillation step vs full fine-tuning step on synthetic data; medians over interleaved rounds.

    Returns a dict with ``full_ft`` and ``distill`` (each ``{"ms", "img_per_s"}``: median step time and
    the images/s it gives), ``ratio`` (median per-round ratio distill / full_ft), ``ratio_of_medians``,
    ``target_ratio``, ``meets_target``, per-round lists, the pairs, ``peak_mem_gb`` (CUDA) and, with
    ``breakdown``, ``distill_parts_ms`` (median ms of teacher forward / student forward / backward /
    optimizer). Works on CPU at tiny sizes (tests) and on CUDA at DeiT-B/224 batch 128 bf16.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}; got {precision!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp_dtype = PRECISIONS[precision]
    torch.manual_seed(seed)
    kwargs = dict(model_kwargs or {})
    if img_size:
        kwargs["img_size"] = img_size
    base = timm.create_model(model, pretrained=False, drop_path_rate=drop_path, **kwargs)
    size = tuple(base.patch_embed.img_size)
    x = torch.randn(batch_size, 3, *size, device=dev)
    y = torch.randint(0, max(base.num_classes, 1), (batch_size,), device=dev)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(dev.type, dtype=amp_dtype)

    # plain full fine-tuning: own copy, everything trainable, r = 0 (unpatched timm)
    plain = copy.deepcopy(base).to(dev).train()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0.05)

    def plain_step(_i: int) -> None:
        with autocast():
            loss = F.cross_entropy(plain(x).float(), y)
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    # distillation: frozen patched backbone + unmerged bank, exactly as training/distill.py builds it
    frozen = base
    tocom_hub.patch(frozen, method=method, prop_attn=True)
    frozen.requires_grad_(False)
    bank = ToComBank.for_model(frozen, r_max=r_max, rank=rank, method=method)
    with torch.no_grad():  # a trained-looking bank (fresh up factors are zero)
        for a in bank.lora_B.values():
            a.normal_(0.0, 0.02)
    frozen.to(dev)
    bank.to(dev)
    tocom_hub.apply(frozen, 0, 0, bank=bank, merge=False)
    distiller = Distiller(frozen, bank).train()
    bank_opt = torch.optim.AdamW(bank.parameters(), lr=1e-3, weight_decay=0.05)

    def distill_step(i: int) -> None:
        m, n = sample_pair(seed, i, r_max)
        with autocast():
            student, teacher = distiller(x, m, n)
            loss = kd_loss(student, teacher, "logits")
        loss.backward()
        bank_opt.step()
        bank_opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        distill_step(i)
        plain_step(i)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    # rounds alternate distill, full_ft / full_ft, distill; the c-th call of a step gets step index c
    calls = {"distill": itertools.count(), "full_ft": itertools.count()}
    runners = {
        "distill": lambda: distill_step(next(calls["distill"])),
        "full_ft": lambda: plain_step(next(calls["full_ft"])),
    }
    timer = WallTimer(sync=lambda: synchronize(dev))
    ms = interleaved(runners, rounds, timer=timer, iters=steps_per_round, order="alternate")
    d_times, p_times = [t / 1e3 for t in ms["distill"]], [t / 1e3 for t in ms["full_ft"]]
    ratios = paired_ratios(d_times, p_times)
    if verbose:
        for i, (td, tp) in enumerate(zip(d_times, p_times)):
            print(f"round {i:3d}  distill {td * 1e3:8.2f} ms  full_ft {tp * 1e3:8.2f} ms  ratio {td / tp:5.3f}")
    med_d, med_p = statistics.median(d_times), statistics.median(p_times)
    result: Dict[str, Any] = {
        "model": model,
        "model_kwargs": kwargs,
        "img_size": list(size),
        "batch_size": batch_size,
        "precision": precision,
        "device": str(dev),
        "r_max": r_max,
        "rank": rank,
        "method": method,
        "drop_path": drop_path,
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "pairs": [
            list(sample_pair(seed, i * steps_per_round + k, r_max))
            for i in range(rounds)
            for k in range(steps_per_round)
        ],
        "full_ft": {"ms": med_p * 1e3, "img_per_s": batch_size / med_p},
        "distill": {"ms": med_d * 1e3, "img_per_s": batch_size / med_d},
        "ratio": statistics.median(ratios),
        "median_ratio": statistics.median(ratios),  # (older results' name)
        "ratio_of_medians": med_d / med_p,
        "ratio_of_means": statistics.fmean(d_times) / statistics.fmean(p_times),
        "distill_ms": [t * 1e3 for t in d_times],
        "full_ft_ms": [t * 1e3 for t in p_times],
        "target_ratio": TARGET_RATIO,
        "bank_parameters": bank.num_parameters(),
        "backbone_parameters": sum(q.numel() for q in plain.parameters()),
        "trainable_backbone_parameters": sum(q.numel() for q in frozen.parameters() if q.requires_grad),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": torch.get_num_threads(),
    }
    result["meets_target"] = result["ratio"] <= TARGET_RATIO
    if dev.type == "cuda":
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
        result["gpu"] = torch.cuda.get_device_name(dev)
    if breakdown:
        result["distill_parts_ms"] = _distill_parts(distiller, bank_opt, x, seed, r_max, rounds, autocast, dev)
    return result


def _distill_parts(distiller, opt, x, seed, r_max, rounds, autocast, dev) -> Dict[str, float]:
    """Median ms of the distillation step's parts, each between two synchronisations."""
    parts: Dict[str, list] = {"teacher_forward": [], "student_forward": [], "backward": [], "optimizer": []}
    watch = Stopwatch(sync=lambda: synchronize(dev))
    for i in range(rounds):
        m, n = sample_pair(seed, i, r_max)
        watch.restart()
        with autocast():
            teacher = distiller.teacher(x, m, n)
        parts["teacher_forward"].append(watch.lap())
        with autocast():
            student = distiller.student(x, m, n)
            loss = kd_loss(student, teacher, "logits")
        parts["student_forward"].append(watch.lap())
        loss.backward()
        parts["backward"].append(watch.lap())
        opt.step()
        opt.zero_grad(set_to_none=True)
        parts["optimizer"].append(watch.lap())
    return {k: statistics.median(v) for k, v in parts.items()}


def loader_rate(
    data: str = "photo-crops",
    *,
    img_size: int = 224,
    batch_size: int = 128,
    num_workers: int = 2,
    augment: bool = True,
    batches: int = 20,
    device: Optional[str] = None,
    seed: int = 0,
    model: str = "deit_tiny_patch16_224",
) -> Dict[str, Any]:
    """Images/s of ``training/distill.py``'s training input pipeline alone, batches ready on the device.

    Builds the loader exactly as the script does (``build_train_loader``: seeded per-sample augmentation,
    uint8 batches, pinned on CUDA), moves each batch to ``device`` and normalises it there
    (``device_batch``). ``model`` only supplies timm's data config (mean/std, interpolation). The
    first batch (worker start-up) is not timed. Returns ``img_per_s``, ``ms_per_batch``, the settings,
    ``cpu_count`` and the number of CPUs this process may use (``cpu_affinity``).
    """
    from tocom_hub.training.backbone import EMBEDDED_DATA
    from tocom_hub.training.batches import device_batch
    from tocom_hub.training.data import build_datasets, build_train_loader, build_transforms

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = timm.create_model(model, pretrained=False, img_size=img_size)
    args = argparse.Namespace(
        data=data, data_dir=None, train_split="train", val_split="validation", batch_size=batch_size
    )
    train_set, _, info = build_datasets(args, EMBEDDED_DATA, img_size, need_val=False, seed=seed)
    train_tf, _, _ = build_transforms(net, img_size, augment, info["kind"] == "embedded")
    loader, _, normalize = build_train_loader(
        train_set,
        train_tf,
        iterable=info["iterable"],
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        multiple_of=batch_size,
        pin_memory=dev.type == "cuda",
    )
    it = iter(loader)
    device_batch(next(it), dev, normalize)
    watch = Stopwatch(sync=lambda: synchronize(dev))
    done = 0
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        device_batch(batch, dev, normalize)
        done += 1
    dt = watch.lap() / 1e3
    del it
    return {
        "data": data,
        "img_size": img_size,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "augment": augment,
        "uint8_batches": normalize is not None,
        "batches": done,
        "device": str(dev),
        "img_per_s": done * batch_size / dt if done else None,
        "ms_per_batch": dt / max(done, 1) * 1e3,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def end_to_end(
    model: Optional[str] = None,
    *,
    data: Optional[str] = None,
    img_size: Optional[int] = None,
    batch_size: int = 128,
    precision: str = "no",
    steps: int = 30,
    num_workers: int = 2,
    cpu: bool = False,
    extra_args: Sequence[str] = (),
    raw_img_per_s: Optional[float] = None,
    output_dir: Optional[str] = None,
    timeout: Optional[float] = None,
) -> Dict[str, Any]:
    """Run ``training/distill.py`` for ``steps`` optimizer steps and report its images/s.

    ``model=None`` is the embedded default backbone; ``data=None`` its embedded dataset. No held-out
    evaluation, loss logged once. Returns ``images_per_second`` (wall clock over all steps but the first,
    device synchronised: ``throughput_images_per_second`` of ``metrics.json``),
    ``median_step_images_per_second``, ``raw_img_per_s`` and ``ratio_to_step_rate`` (``None`` unless
    ``raw_img_per_s``, e.g. ``step_rates(...)["distill"]["img_per_s"]``, is given), ``target``, ``wall_s``,
    ``command`` and the run's ``metrics``.
    """
    cmd = [
        sys.executable,
        os.path.join(ROOT, "training", "distill.py"),
        "--max-steps",
        str(steps),
        "--batch-size",
        str(batch_size),
        "--mixed-precision",
        precision,
        "--num-workers",
        str(num_workers),
        "--heldout-pairs",
        "0",
        "--log-every",
        str(steps),
    ]
    if model is not None:
        cmd += ["--model", model]
    if data is not None:
        cmd += ["--data", data]
    if img_size is not None:
        cmd += ["--img-size", str(img_size)]
    if cpu:
        cmd += ["--cpu"]
    cmd += [str(a) for a in extra_args]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory() as tmp:
        out = output_dir or os.path.join(tmp, "out")
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd + ["--output-dir", out], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout, check=False
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
    ips = metrics.get("throughput_images_per_second") or metrics.get("images_per_second")
    global_batch = batch_size * metrics.get("num_processes", 1)
    return {
        "command": " ".join(cmd[1:]),
        "steps": metrics.get("steps"),
        "images_per_second": ips,
        "median_step_images_per_second": (
            global_batch / metrics["median_step_seconds"] if metrics.get("median_step_seconds") else None
        ),
        "raw_img_per_s": raw_img_per_s,
        "ratio_to_step_rate": (ips / raw_img_per_s) if raw_img_per_s and ips else None,
        "target": TARGET_END_TO_END,
        "wall_s": wall,
        "metrics": metrics,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="no", choices=sorted(PRECISIONS), help="autocast dtype (default no)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--r-max", type=int, default=16)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--method", default="tome", choices=tocom_hub.METHODS)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps-per-round", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--breakdown", action="store_true", help="also time the distillation step's parts")
    p.add_argument("--loader", action="store_true", help="also time the training input pipeline alone")
    p.add_argument("--end-to-end", action="store_true", help="also run training/distill.py with the same settings")
    p.add_argument("--data", default=None, help="--data for the end-to-end run (default: embedded)")
    p.add_argument("--num-workers", type=int, default=2, help="loader workers of the end-to-end run")
    p.add_argument("--e2e-steps", type=int, default=30, help="optimizer steps of the end-to-end run")
    p.add_argument("--json", default="out/distill_step.json", help="where to write the results ('' to skip)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    result = step_rates(
        args.model,
        img_size=args.img_size,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        rounds=args.rounds,
        warmup=args.warmup,
        steps_per_round=args.steps_per_round,
        r_max=args.r_max,
        rank=args.rank,
        method=args.method,
        drop_path=args.drop_path,
        seed=args.seed,
        breakdown=args.breakdown,
        verbose=True,
    )
    result.update(platform=platform.platform(), processor=platform.processor() or platform.machine())
    size = result["img_size"]
    print()
    print(
        f"{args.model} {size[0]}px, batch {args.batch_size}, precision {args.precision}, {result['device']}, "
        f"{result['threads']} threads, R={args.r_max}, {args.rounds} interleaved rounds"
    )
    print(f"{'step':<44} {'median ms':>10} {'img/s':>10}")
    print(
        f"{'plain full fine-tuning (r=0, all params, AdamW)':<44} {result['full_ft']['ms']:>10.1f} "
        f"{result['full_ft']['img_per_s']:>10.1f}"
    )
    print(
        f"{'ToCom distill (teacher+student, bank AdamW)':<44} {result['distill']['ms']:>10.1f} "
        f"{result['distill']['img_per_s']:>10.1f}"
    )
    print(
        f"median per-round ratio distill/full_ft: {result['ratio']:.3f} "
        f"(ratio of means {result['ratio_of_means']:.3f}; target <= {TARGET_RATIO}: "
        f"{'met' if result['meets_target'] else 'NOT met'})"
    )
    if args.breakdown:
        print(
            "distill step parts (ms, synchronised): "
            + ", ".join(f"{k} {v:.1f}" for k, v in result["distill_parts_ms"].items())
        )
    if args.loader:
        lr = loader_rate(
            args.data or "photo-crops",
            img_size=size[0],
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=result["device"],
        )
        result["loader"] = lr
        print(
            f"input pipeline alone ({lr['num_workers']} workers, {lr['cpu_affinity']} CPUs): "
            f"{lr['img_per_s']:.1f} img/s = {lr['img_per_s'] / result['distill']['img_per_s']:.2f}× the step rate"
        )
    if args.end_to_end:
        e2e = end_to_end(
            args.model,
            data=args.data,
            img_size=args.img_size,
            batch_size=args.batch_size,
            precision=args.precision,
            steps=args.e2e_steps,
            num_workers=args.num_workers,
            cpu=result["device"] == "cpu",
            raw_img_per_s=result["distill"]["img_per_s"],
            extra_args=[
                "--r-max",
                str(args.r_max),
                "--rank",
                str(args.rank),
                "--method",
                args.method,
                "--drop-path",
                str(args.drop_path),
            ],
        )
        result["end_to_end"] = e2e
        print(
            f"training/distill.py end to end: {e2e['images_per_second']:.1f} img/s = "
            f"{e2e['ratio_to_step_rate']:.2f} of the raw step rate (target >= {TARGET_END_TO_END})"
        )
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
