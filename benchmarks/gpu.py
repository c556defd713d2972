"""GPU throughput and latency of plain timm vs tocom_hub (ToMe / EViT), eager, compiled and CUDA-graphed.

    python benchmarks/gpu.py                          # DeiT-B/224 + ViT-L/16 on CUDA, ~7 min, writes JSON + markdown
    python benchmarks/gpu.py --budget-s 300 --skip bf16,reduce-overhead
    python benchmarks/gpu.py --small --device cpu     # tiny model, few rounds: checks that it runs

Sections (each a list of rows, each row caught on its own: an exception becomes an ``error`` entry):

* ``check`` — fp32 correctness on the device: patched r=0 vs plain timm; ToMe r=16 with proportional
  attention folded into q/k (the GPU path) vs with an additive SDPA mask. (Compiled rows record their
  largest logit difference to eager in their own dtype.)
* ``eager`` — DeiT-B/224, fp16 and bf16 (``model.half()`` / ``.bfloat16()``), batch 256 / 64 / 1: plain,
  ToMe r ∈ {0, 8, 16} (r=16 also with ``prop_attn=False`` and with the SDPA-mask attention), EViT
  r ∈ {8, 16}, and the merge-free *ceiling* (ToMe's token counts, merging replaced by truncation, like
  ``throughput.py --ceiling``; its outputs are meaningless, its time is what a free merge step would give).
* ``vit_large`` — ViT-L/16 fp16 batch 128, r=8: plain, ToMe, EViT, ceiling.
* ``compiled`` — ``torch.compile`` (default mode) at batch 256 fp16, r=16: plain, ToMe, EViT, ceiling;
  the rows' base is compiled plain timm; compile times are recorded.
* ``cuda_graph`` — batch 1 fp16, each configuration captured once with ``torch.cuda.CUDAGraph`` and
  replayed; ``reduce_overhead`` — the same with ``torch.compile(mode="reduce-overhead")``.
* ``flex`` — proportional attention four ways at the first batch size, r=16: the default on the device
  (log(size) folded into q/k on CUDA), ``tome-mask`` (an additive SDPA mask), ``tome-flex``
  (``flex_attention`` with a ``score_mod``) and ``tome-foldw`` (the fold through padded qkv weights,
  no activation copies) — the last two from ``benchmarks/attention_variants.py`` — with each one's
  largest logit difference to the default and the ceiling, so one run says which exact form is fastest.
* ``profile`` — ``torch.profiler`` over a few forwards of plain, ToMe r=16, EViT r=16 and the ceiling at
  the first batch size, and of plain / ToMe r=16 at batch 1: per configuration the total device time
  (CPU time on a CPU) per forward and the operators that take most of it, so a GPU run brings back the
  profile that says where the time goes, next to the numbers.
* ``training`` — distillation step vs full fine-tuning step (with the step's parts: teacher forward,
  student forward, backward, optimizer), the input pipeline alone (224 px photo-crops, batch 128, up to
  14 workers, batches normalised on the device) and ``training/distill.py`` end to end, from the
  functions of ``benchmarks/distill_step.py`` (skipped with a message when they are absent).

Timing: every configuration of a section is timed in interleaved rounds (fresh random order each round)
on the *same* model object (patched/unpatched in place), with plain timm in every round; CUDA events
around ``--iters`` forwards. A row's ``speedup`` is the median over rounds of plain time / its time,
``range`` the min and max over rounds, ``vs_ceiling`` its median ratio to the ceiling row of the same
section and r. The JSON is rewritten after every row (``--json``), so a run cut short keeps what it
measured; ``--budget-s`` skips what would not fit. The markdown table goes to ``--markdown``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch

import tocom_hub
from tocom_hub.core.attention import FOLD_BIAS_DEVICES
from tocom_hub.core.jsonio import write_json
from tocom_hub.tools.timing import device_timer, interleaved, paired_ratios, summary

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/distill_step.py (training rows)

import attention_variants  # noqa: E402 -- benchmarks/attention_variants.py (the flex rows)
import ceiling as _ceiling  # noqa: E402 -- benchmarks/ceiling.py (the merge-free ceiling rows)

# the attention form of each row, passed as tocom_hub.patch(attention=...) (nothing in the library is overwritten)
_ATTENTION_FORMS = {
    "tome-mask": "mask",
    "tome-fold": "fold",
    "tome-flex": attention_variants.flex_attention_form,
    "tome-foldw": attention_variants.PADDED_WEIGHTS,
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SECTIONS = (
    "check",
    "eager",
    "vit_large",
    "compiled",
    "cuda_graph",
    "profile",
    "flex",
    "reduce_overhead",
    "bf16",
    "training",
)

Config = tuple[str, int]  # (method, r): plain, tome, tome-noprop, tome-mask, tome-fold(w), tome-flex, evit, ceiling


# ---------------------------------------------------------------------------------------------------
# configurations


def configure(model: torch.nn.Module, cfg: Config) -> None:
    """Put ``model`` (in place) into configuration ``cfg``; ``("plain", 0)`` restores everything."""
    method, r = cfg
    if method == "plain":
        tocom_hub.unpatch(model)
        return
    tocom_hub.patch(
        model,
        method="evit" if method == "evit" else "tome",
        prop_attn=method != "tome-noprop",
        attention=_ATTENTION_FORMS.get(method, "auto"),
        reducer=_ceiling.CEILING if method == "tome-ceiling" else None,
    )
    tocom_hub.set_r(model, r)


def _label(cfg: Config) -> str:
    return cfg[0] if cfg[0] == "plain" else f"{cfg[0]} r={cfg[1]}"


# ---------------------------------------------------------------------------------------------------
# timing


def interleaved_rows(
    runners: dict[Config, Callable[[], Any]],
    timer: Any,
    rounds: int,
    iters: int,
    batch: int,
    seed: int = 0,
    before: Callable[[Config], None] | None = None,
) -> list[dict]:
    """Rows of :func:`tocom_hub.tools.timing.interleaved` (one untimed call after each switch); ratios
    against ``("plain", 0)`` per round, and against the ceiling row of the same ``r``."""
    cfgs = list(runners)
    for c in cfgs:  # warm-up (and first-call compilation, if any)
        if before:
            before(c)
        runners[c]()
    timer.sync()
    times = interleaved(runners, rounds, timer=timer, iters=iters, seed=seed, before=before, settle=1)
    if before:
        before(("plain", 0))
    base = times[("plain", 0)]
    rows = []
    for c in cfgs:
        speed = summary(paired_ratios(base, times[c]))
        row = {
            "method": c[0],
            "r": c[1],
            "batch": batch,
            "ms": round(statistics.median(times[c]), 4),
            "img_per_s": round(1e3 * batch / statistics.median(times[c]), 1),
            "speedup": round(speed["median"], 4),
            "range": [round(speed["min"], 4), round(speed["max"], 4)],
            "rounds": rounds,
            "iters": iters,
        }
        ceiling = ("tome-ceiling", c[1])
        if c[0] != "tome-ceiling" and ceiling in times:
            row["vs_ceiling"] = round(statistics.median(paired_ratios(times[ceiling], times[c])), 4)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# the run


class Run:
    """Budget, results and the JSON file written after every row."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device, self.timer = args, device, device_timer(device)
        self.start = time.perf_counter()
        self.result: dict[str, Any] = {"env": _env(device, args), "sections": {}, "skipped": []}
        self._models: dict[tuple[str, str], torch.nn.Module] = {}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def fits(self, what: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        self.result["skipped"].append(f"{what}: needs ~{need_s:.0f} s, {self.left():.0f} s of the budget left")
        print(f"  skip {what} (budget)", flush=True)
        return False

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        if self.args.json:
            write_json(self.args.json, self.result, indent=1)

    def add(self, section: str, rows: list[dict], **common: Any) -> None:
        out = self.result["sections"].setdefault(section, [])
        for row in rows:
            out.append({**common, **row})
            if "speedup" in row:
                print(
                    f"  {section:15s} {common.get('model', ''):24s} {common.get('dtype', ''):5s} "
                    f"b={row.get('batch', '')!s:4s} {_label((row['method'], row['r'])):18s} "
                    f"{row['ms']:9.3f} ms  x{row['speedup']:.3f}  {row.get('vs_ceiling', '')}",
                    flush=True,
                )
        self.save()

    def error(self, section: str, what: str, exc: BaseException) -> None:
        print(f"  {section}: {what} failed: {exc!r}", flush=True)
        self.add(section, [{"what": what, "error": repr(exc), "traceback": traceback.format_exc()[-3000:]}])

    def model(self, name: str, dtype: str) -> torch.nn.Module:
        key = (name, dtype)
        if key not in self._models:
            self._models.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            kwargs = dict(self.args.model_kwargs) if self.args.small else {}
            model = timm.create_model(name, pretrained=False, **kwargs).eval()
            self._models[key] = model.to(self.device, DTYPES[dtype])
        return self._models[key]

    def image(self, model: torch.nn.Module, batch: int, dtype: str) -> torch.Tensor:
        size = model.patch_embed.img_size
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, 3, *size, generator=g).to(self.device, DTYPES[dtype])


def _env(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "tocom_hub": getattr(tocom_hub, "__version__", "?"),
        "python": platform.python_version(),
        "device": str(device),
        "small": bool(args.small),
        "budget_s": args.budget_s,
        "argv": sys.argv[1:],
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def eager_rows(run: Run, section: str, name: str, dtype: str, batch: int, cfgs: list[Config]) -> None:
    model = run.model(name, dtype)
    x = run.image(model, batch, dtype)
    rounds, iters = run.args.rounds, (run.args.iters_b1 if batch == 1 else run.args.iters)

    def forward() -> None:
        model(x)

    with torch.inference_mode():
        rows = interleaved_rows(
            {c: forward for c in cfgs}, run.timer, rounds, iters, batch, before=lambda c: configure(model, c)
        )
    run.add(section, rows, model=name, dtype=dtype, mode="eager")


def compiled_rows(run: Run, name: str, dtype: str, batch: int, cfgs: list[Config]) -> None:
    model = run.model(name, dtype)
    x = run.image(model, batch, dtype)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=run.args.compile_backend)
    compile_s: dict[str, float] = {}
    diff: dict[str, float] = {}
    with torch.inference_mode():
        for c in cfgs:
            if not run.fits(f"compiled {_label(c)}", run.args.compile_estimate_s):
                break
            configure(model, c)
            t0 = time.perf_counter()
            out = compiled(x)
            run.timer.sync()
            compile_s[_label(c)] = round(time.perf_counter() - t0, 1)
            diff[_label(c)] = (out.float() - model(x).float()).abs().max().item()
            print(f"  compiled {_label(c)} in {compile_s[_label(c)]} s", flush=True)
        cfgs = [c for c in cfgs if _label(c) in compile_s]
        if ("plain", 0) not in cfgs:
            return

        def forward() -> None:
            compiled(x)

        rows = interleaved_rows(
            {c: forward for c in cfgs},
            run.timer,
            run.args.rounds,
            run.args.iters,
            batch,
            before=lambda c: configure(model, c),
        )
    for row in rows:
        row["compile_s"] = compile_s[_label((row["method"], row["r"]))]
        row["max_abs_diff_vs_eager"] = diff[_label((row["method"], row["r"]))]
    run.add("compiled", rows, model=name, dtype=dtype, mode=f"torch.compile({run.args.compile_backend})")


def cuda_graph_rows(run: Run, name: str, dtype: str, cfgs: list[Config]) -> None:
    """Batch 1: every configuration captured once into its own CUDA graph, then replays interleaved."""
    model = run.model(name, dtype)
    x = run.image(model, 1, dtype)
    graphs: dict[Config, Callable[[], Any]] = {}
    with torch.inference_mode():
        for c in cfgs:
            configure(model, c)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    model(x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(x)
            graphs[c] = graph.replay
        configure(model, ("plain", 0))
        rows = interleaved_rows(graphs, run.timer, run.args.rounds, run.args.iters_b1, 1)
    run.add("cuda_graph", rows, model=name, dtype=dtype, mode="CUDAGraph capture")


def reduce_overhead_rows(run: Run, name: str, dtype: str, cfgs: list[Config]) -> None:
    """Batch 1 with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs managed by inductor)."""
    model = run.model(name, dtype)
    x = run.image(model, 1, dtype)
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead")
    compile_s = {}

    def forward() -> None:
        torch.compiler.cudagraph_mark_step_begin()
        compiled(x)

    with torch.inference_mode():
        for c in cfgs:
            configure(model, c)
            t0 = time.perf_counter()
            for _ in range(3):  # compile, warm-up, record
                forward()
            run.timer.sync()
            compile_s[_label(c)] = round(time.perf_counter() - t0, 1)
        rows = interleaved_rows(
            {c: forward for c in cfgs},
            run.timer,
            run.args.rounds,
            run.args.iters_b1,
            1,
            before=lambda c: configure(model, c),
        )
    for row in rows:
        row["compile_s"] = compile_s[_label((row["method"], row["r"]))]
    run.add("reduce_overhead", rows, model=name, dtype=dtype, mode="torch.compile(reduce-overhead)")


def profile_rows(run: Run, name: str, dtype: str, batch: int, cfgs: list[Config], top: int = 12) -> None:
    """``torch.profiler`` of ``iters`` forwards per configuration: total and top operators per forward.

    Times are self times (an operator's own, children excluded), on the device for CUDA (kernels launched
    by the operator) and on the CPU otherwise; ``share`` is the operator's part of the configuration's total.
    """
    from torch.profiler import ProfilerActivity, profile

    model = run.model(name, dtype)
    x = run.image(model, batch, dtype)
    cuda = run.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    iters = run.args.iters_b1 if batch == 1 else run.args.iters
    rows = []
    with torch.inference_mode():
        for c in cfgs:
            configure(model, c)
            for _ in range(2):
                model(x)
            run.timer.sync()
            with profile(activities=activities) as prof:
                for _ in range(iters):
                    model(x)
                run.timer.sync()
            events = prof.key_averages()

            def self_us(e: Any) -> float:
                if not cuda:
                    return e.self_cpu_time_total
                return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

            total = sum(self_us(e) for e in events) or 1.0
            ranked = sorted(events, key=self_us, reverse=True)[:top]
            rows.append(
                {
                    "method": c[0],
                    "r": c[1],
                    "batch": batch,
                    "clock": "device" if cuda else "cpu",
                    "total_ms_per_forward": round(total / 1e3 / iters, 4),
                    "top": [
                        {
                            "op": e.key,
                            "calls_per_forward": round(e.count / iters, 2),
                            "ms_per_forward": round(self_us(e) / 1e3 / iters, 4),
                            "share": round(self_us(e) / total, 4),
                        }
                        for e in ranked
                    ],
                }
            )
        configure(model, ("plain", 0))
    for row in rows:
        ops = ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in row["top"][:5])
        label = _label((row["method"], row["r"]))
        print(f"  profile b={batch} {label:18s} {row['total_ms_per_forward']:.3f} ms: {ops}", flush=True)
    run.add("profile", rows, model=name, dtype=dtype, mode="eager, torch.profiler")


def flex_rows(run: Run, name: str, dtype: str, batch: int, r: int) -> None:
    """Proportional attention as the device default, SDPA mask, flex_attention and padded-weight fold."""
    model = run.model(name, dtype)
    x = run.image(model, batch, dtype)
    cfgs = [("plain", 0), ("tome", r), ("tome-mask", r), ("tome-flex", r), ("tome-foldw", r), ("tome-ceiling", r)]
    diff: dict[Config, float] = {}
    with torch.inference_mode():
        configure(model, ("tome", r))
        ref = model(x).float()
        for c in cfgs[2:5]:
            configure(model, c)
            t0 = time.perf_counter()
            diff[c] = (model(x).float() - ref).abs().max().item()  # (first call: compiles flex on CUDA)
            run.timer.sync()
            print(f"  {_label(c)}: first forward {time.perf_counter() - t0:.1f} s", flush=True)

        def forward() -> None:
            model(x)

        iters = run.args.iters_b1 if batch == 1 else run.args.iters
        rows = interleaved_rows(
            {c: forward for c in cfgs}, run.timer, run.args.rounds, iters, batch, before=lambda c: configure(model, c)
        )
    for row in rows:
        if (row["method"], row["r"]) in diff:
            row["max_abs_diff_vs_tome"] = diff[(row["method"], row["r"])]
    run.add("flex", rows, model=name, dtype=dtype, mode="eager (flex_attention compiled on CUDA)")


def check_rows(run: Run, name: str) -> None:
    """fp32 correctness on the device (max abs logit differences); compiled rows carry their own."""
    model = run.model(name, "fp32")
    x = run.image(model, 4, "fp32")
    r = run.args.r_max
    out: dict[str, Any] = {"model": name, "r": r}
    with torch.inference_mode():
        configure(model, ("plain", 0))
        plain = model(x)
        configure(model, ("tome", 0))
        out["r0_vs_plain"] = (model(x) - plain).abs().max().item()
        configure(model, ("tome-fold", r))
        fold = model(x)
        configure(model, ("tome-mask", r))
        out["tome_fold_vs_mask"] = (model(x) - fold).abs().max().item()
        configure(model, ("plain", 0))
    out["device_folds_bias_by_default"] = run.device.type in FOLD_BIAS_DEVICES
    run.add("check", [out])


def training_rows(run: Run) -> None:
    """Distillation step vs full fine-tuning step, and ``training/distill.py`` end to end.

    Uses ``benchmarks/distill_step.py``: ``gpu_rows(device=, small=, budget_s=)`` when it exists, else
    its ``step_rates`` and ``end_to_end``; skipped (with the reason in the JSON) when neither exists.
    """
    try:
        distill_step = importlib.import_module("distill_step")
    except Exception as exc:  # noqa: BLE001 -- report, don't die
        run.add("training", [{"skipped": f"benchmarks/distill_step.py could not be imported: {exc!r}"}])
        return
    small, dev = run.args.small, str(run.device)
    if hasattr(distill_step, "gpu_rows"):
        run.add("training", [distill_step.gpu_rows(device=dev, small=small, budget_s=run.left() - 10)])
        return
    if not hasattr(distill_step, "step_rates"):
        run.add("training", [{"skipped": "benchmarks/distill_step.py has neither gpu_rows() nor step_rates()"}])
        return
    if small:
        kw = {
            "model": "vit_tiny_patch16_224",
            "img_size": 32,
            "batch_size": 2,
            "precision": "no",
            "rounds": 2,
            "warmup": 1,
            "r_max": 2,  # 4 patches: at most 2 tokens go in the first block
        }
    else:
        kw = {"model": "deit_base_patch16_224", "batch_size": 128, "precision": "bf16", "rounds": 5}
    kw["breakdown"] = True  # the step's parts: teacher forward, student forward, backward, optimizer
    try:
        rates = distill_step.step_rates(device=dev, **kw)
        run.add("training", [{"what": "distill step vs full fine-tuning step", **kw, **_jsonable(rates)}])
    except Exception as exc:  # noqa: BLE001
        run.error("training", "step_rates", exc)
        return
    if small or not hasattr(distill_step, "end_to_end"):
        why = "not run with --small" if small else "benchmarks/distill_step.py has no end_to_end()"
        run.add("training", [{"skipped": f"distill.py end to end: {why}"}])
        return
    workers = min(14, os.cpu_count() or 1)
    if hasattr(distill_step, "loader_rate") and run.fits("training: input pipeline alone", 30):
        try:  # the input pipeline alone: is it what limits distill.py end to end?
            rate = distill_step.loader_rate(
                "photo-crops", img_size=224, batch_size=128, num_workers=workers, device=dev
            )
            run.add("training", [{"what": "input pipeline alone (loader_rate)", **_jsonable(rate)}])
        except Exception as exc:  # noqa: BLE001
            run.error("training", "loader_rate", exc)
    if not run.fits("training: distill.py end to end", 90):
        return
    try:
        e2e = distill_step.end_to_end(
            model="deit_base_patch16_224",
            data="photo-crops",
            img_size=224,
            batch_size=128,
            precision="bf16",
            steps=30,
            num_workers=workers,
            raw_img_per_s=rates.get("distill", {}).get("img_per_s"),
            timeout=max(run.left() - 10, 30),
        )
        run.add("training", [{"what": "training/distill.py end to end", **_jsonable(e2e)}])
    except Exception as exc:  # noqa: BLE001
        run.error("training", "end_to_end", exc)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ---------------------------------------------------------------------------------------------------
# markdown


def markdown(result: dict[str, Any]) -> str:
    env = result["env"]
    where = env.get("gpu") or env.get("cpu") or env["device"]
    head = f"{where}, torch {env['torch']}, timm {env['timm']}; random weights; median of per-round ratios"
    lines = [
        f"{head} (range over rounds).",
        "",
        "| section | model | dtype | batch | method | r | ms | img/s | vs plain | range | vs ceiling |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for section, rows in result["sections"].items():
        for row in rows:
            if "speedup" not in row:
                continue
            rng = row["range"]
            vs_ceiling = f"{row['vs_ceiling']:.3f}×" if "vs_ceiling" in row else ""
            lines.append(
                f"| {section} | {row.get('model', '')} | {row.get('dtype', '')} | {row['batch']} | {row['method']} | "
                f"{row['r']} | {row['ms']:.3f} | {row['img_per_s']:.0f} | {row['speedup']:.3f}× | "
                f"{rng[0]:.2f}–{rng[1]:.2f} | {vs_ceiling} |"
            )
    for section, rows in result["sections"].items():
        for row in rows:
            if "speedup" in row:
                continue
            if "top" in row:  # a profile row
                ops = ", ".join(f"{o['op']} {100 * o['share']:.1f} %" for o in row["top"][:8])
                lines.append(
                    f"\nprofile {row.get('dtype', '')} b={row['batch']} {_label((row['method'], row['r']))}: "
                    f"{row['total_ms_per_forward']:.3f} ms {row['clock']} time per forward; {ops}"
                )
                continue
            lines.append(f"\n{section}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "traceback"))
    if result.get("skipped"):
        lines.append("\nskipped: " + "; ".join(result["skipped"]))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--small",
        action="store_true",
        help="tiny model (img 64, depth 2, dim 64), batches 1 and 4, fp32, 2 rounds: a smoke run",
    )
    parser.add_argument("--model", default="deit_base_patch16_224")
    parser.add_argument("--large-model", default="vit_large_patch16_224")
    parser.add_argument("--batch-sizes", default=None, help="eager batches (default 256,64,1; --small: 4,1)")
    parser.add_argument("--r", default=None, help="r values (default 0,8,16; --small: 0,2,4)")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (--small: 2)")
    parser.add_argument("--iters", type=int, default=None, help="forwards per timing, batch > 1 (default 5)")
    parser.add_argument("--iters-b1", type=int, default=None, help="forwards per timing at batch 1 (default 20)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget; later rows are skipped")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests: eager)")
    parser.add_argument(
        "--compile-estimate-s",
        type=float,
        default=None,
        help="budget reserved per compilation (default 45; --small: 5)",
    )
    parser.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    parser.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    parser.add_argument("--json", default="benchmarks/results/gpu.json")
    parser.add_argument("--markdown", default="benchmarks/results/gpu.md")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = args.small
    args.model_kwargs = {
        "img_size": 64,
        "patch_size": 8,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 2,
        "num_classes": 10,
    }
    if small:
        args.model = args.large_model = "vit_tiny_patch16_224"
    batches = [int(v) for v in (args.batch_sizes or ("4,1" if small else "256,64,1")).split(",")]
    rs = [int(v) for v in (args.r or ("0,2,4" if small else "0,8,16")).split(",")]
    args.r_max = max(rs)
    args.rounds = args.rounds or (2 if small else 5)
    args.iters = args.iters or (2 if small else 5)
    args.iters_b1 = args.iters_b1 or (2 if small else 20)
    args.compile_estimate_s = args.compile_estimate_s or (5.0 if small else 45.0)
    wanted = set(args.only.split(",")) - {""} or set(SECTIONS)
    wanted -= set(args.skip.split(","))
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    run = Run(args, device)
    print(f"{run.result['env']}", flush=True)
    dtypes = ["fp32"] if small else ["fp16"] + (["bf16"] if "bf16" in wanted else [])
    r_top, r_mid = max(rs), sorted(rs)[len(rs) // 2] if len(rs) > 1 else max(rs)
    full = [("plain", 0)] + [("tome", r) for r in rs] + [("evit", r) for r in rs if r]
    full += [("tome-ceiling", r) for r in rs if r] + [("tome-noprop", r_top), ("tome-mask", r_top)]
    lean = [("plain", 0), ("tome", r_top), ("evit", r_top), ("tome-ceiling", r_top)]

    plan: list[tuple[str, float, Callable[[], None]]] = []  # (section, estimated s, work)
    if "check" in wanted:
        plan.append(("check", 10, lambda: check_rows(run, args.model)))
    if "eager" in wanted:
        dt0 = dtypes[0]
        plan.append(("eager", 15, lambda: eager_rows(run, "eager", args.model, dt0, batches[0], full)))
    if "vit_large" in wanted:
        cfgs = [("plain", 0), ("tome", r_mid), ("evit", r_mid), ("tome-ceiling", r_mid)]
        batch = 4 if small else 128
        plan.append(("vit_large", 30, lambda: eager_rows(run, "vit_large", args.large_model, dtypes[0], batch, cfgs)))
    if "compiled" in wanted:
        plan.append(
            (
                "compiled",
                4 * args.compile_estimate_s,
                lambda: compiled_rows(run, args.model, dtypes[0], batches[0], lean),
            )
        )
    if "cuda_graph" in wanted and device.type == "cuda":
        plan.append(("cuda_graph", 15, lambda: cuda_graph_rows(run, args.model, dtypes[0], lean)))
    if "profile" in wanted:
        prof_cfgs = [("plain", 0), ("tome", r_top), ("evit", r_top), ("tome-ceiling", r_top)]
        plan.append(("profile", 20, lambda: profile_rows(run, args.model, dtypes[0], batches[0], prof_cfgs)))
        if batches[-1] == 1 and batches[0] != 1:
            b1 = [("plain", 0), ("tome", r_top)]
            plan.append(("profile", 10, lambda: profile_rows(run, args.model, dtypes[0], 1, b1)))
    if "flex" in wanted:
        plan.append(("flex", 60, lambda: flex_rows(run, args.model, dtypes[0], batches[0], r_top)))
    # the acceptance rows first (training and reduce-overhead included); other batch sizes and bf16 after
    if "training" in wanted:
        plan.append(("training", 20 if small else 120, lambda: training_rows(run)))
    if "reduce_overhead" in wanted and device.type == "cuda":
        cfgs = [("plain", 0), ("tome", r_top)]
        plan.append(
            (
                "reduce_overhead",
                2 * args.compile_estimate_s,
                lambda: reduce_overhead_rows(run, args.model, dtypes[0], cfgs),
            )
        )
    if "eager" in wanted:
        for b in batches[1:]:
            plan.append(("eager", 10, lambda b=b: eager_rows(run, "eager", args.model, dtypes[0], b, full)))
    if "bf16" in wanted and len(dtypes) > 1:
        for b in batches:
            plan.append(("eager", 10, lambda b=b: eager_rows(run, "eager", args.model, "bf16", b, full)))
    if device.type != "cuda":
        run.result["skipped"].append("cuda_graph / reduce_overhead: need CUDA")

    for section, need, work in plan:
        if not run.fits(section, need):
            continue
        print(f"[{section}] {run.left():.0f} s left", flush=True)
        try:
            work()
        except Exception as exc:  # noqa: BLE001 -- one failed row must not lose the rest
            run.error(section, section, exc)
        finally:
            with contextlib.suppress(Exception):
                for model in run._models.values():
                    configure(model, ("plain", 0))
    run.save()
    text = markdown(run.result)
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
    if args.json:
        print(f"wrote {args.json}" + (f" and {args.markdown}" if args.markdown else ""))
    return run.result


if __name__ == "__main__":
    main()
