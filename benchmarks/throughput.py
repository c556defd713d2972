"""Throughput of plain timm vs tocom_hub-patched ViTs (ToMe and EViT) at several r.

    python benchmarks/throughput.py                       # DeiT-B/224, batch 1 and 8, fp32, 2 threads
    python benchmarks/throughput.py --batch-sizes 8 --rounds 3 --json out.json

CPU timings are noisy, so every configuration is timed in paired, interleaved runs on the *same*
model object (patched/unpatched in place, so the weights sit at the same addresses): in each round
the configurations come in a fresh random order, and each one alternates forwards with plain timm
(``--iters`` each); the round's ratio is ``median(plain) / median(config)``. A configuration's
speed-up is the median of its per-round ratios.
``--check`` exits non-zero unless the acceptance targets hold (r=16 ≥ 1.90× at batch 8, ≥ 1.75× at
batch 1, patched r=0 ≤ 1.02× plain time; with ``--ceiling``, batch-1 ToMe r=16 ≥ 0.97× its ceiling).

``--ceiling`` adds a diagnostic row per ToMe ``r > 0``, method ``tome-ceiling``: the same patched
model with bipartite matching and merging replaced by truncation to the same token counts. Its
outputs are meaningless; its time is what any ToMe implementation would cost here if the merge step
itself were free, so ``tome`` vs ``tome-ceiling`` is the merge step's whole cost in the forward.
A ToMe row then also carries ``of_ceiling``: the median over rounds of its speed-up ÷ the ceiling's.

``--compile`` times ``torch.compile``d models (default mode, inductor) instead of eager ones: a
compiled graph does not follow in-place re-patching, so every configuration gets its own copy of the
model, compiled once before the rounds (``compile_s``: its first two forwards), and the rounds pair
each compiled configuration with compiled plain timm in the same way. It writes
``benchmarks/results/throughput_compiled.json`` unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import timm
import torch

import tocom_hub
from tocom_hub.core.jsonio import write_json
from tocom_hub.tools.timing import WallTimer, interleaved, round_orders

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ceiling as _ceiling  # noqa: E402 -- benchmarks/ceiling.py (the merge-free ceiling rows)


def _configure(model, cfg):
    method, r = cfg
    if method == "plain":
        tocom_hub.unpatch(model)
    else:
        ceiling = method == "tome-ceiling"
        tocom_hub.patch(model, method="tome" if ceiling else method, reducer=_ceiling.CEILING if ceiling else None)
        tocom_hub.set_r(model, r)


def _compile_each(model, configs, x, backend="inductor"):
    """One compiled copy of ``model`` per configuration, warmed up; returns ``(models, seconds to compile)``.

    Each copy carries its own configuration (a ceiling copy its ceiling reducer), so no two share a graph.
    """
    models, seconds = {}, {}
    for cfg in configs:
        copied = copy.deepcopy(model)
        _configure(copied, cfg)
        models[cfg] = torch.compile(copied, backend=backend)
        start = time.perf_counter()
        for _ in range(2):  # the first call compiles; the second shows no recompile is pending
            models[cfg](x)
        seconds[cfg] = time.perf_counter() - start
    return models, seconds


def run(model, batch_size, configs, rounds, iters, img_size, seed=0, compile=False, backend="inductor"):
    """Paired A/B timing: every measurement of a configuration sits next to one of plain timm.

    Each round visits the configurations in a fresh random order; for each it alternates
    ``plain, config, plain, config, …`` (``iters`` forwards each) and records the ratio of the two
    medians. Slow drifts of machine load hit both sides of a pair alike. With ``compile``, each
    configuration (plain timm included) runs as its own compiled copy of ``model`` (``backend``: a
    ``torch.compile`` backend); ``model`` itself is left unpatched.
    """
    x = torch.randn(batch_size, 3, img_size, img_size)
    timer = WallTimer()
    plain_cfg = ("plain", 0)
    others = [cfg for cfg in configs if cfg != plain_cfg]
    times = {cfg: [] for cfg in configs}
    ratios = {cfg: [] for cfg in others}
    compile_s = {}
    with torch.inference_mode():
        if compile:
            compiled, compile_s = _compile_each(model, configs, x, backend)  # compiled and warmed up

            def use(cfg):
                return compiled[cfg]
        else:

            def use(cfg):
                _configure(model, cfg)
                return model

            for cfg in configs:  # warm-up
                use(cfg)(x)
        current = {}  # the forward of the configuration `use` set up last

        def before(cfg):
            current[0] = use(cfg)

        for order in round_orders(others, rounds, seed=seed):
            for cfg in order:  # plain, cfg, cfg, plain, plain, cfg, … (iters forwards each), one model
                pair = {plain_cfg: lambda: current[0](x), cfg: lambda: current[0](x)}
                ms = interleaved(pair, iters, timer=timer, order="alternate", before=before)
                t_plain, t_cfg = [t / 1e3 for t in ms[plain_cfg]], [t / 1e3 for t in ms[cfg]]
                times[plain_cfg] += t_plain
                times[cfg].append(statistics.median(t_cfg))
                ratios[cfg].append(statistics.median(t_plain) / statistics.median(t_cfg))
        _configure(model, plain_cfg)
    rows = []
    for cfg in configs:
        r = ratios.get(cfg, [1.0])
        row = {
            "batch_size": batch_size,
            "method": cfg[0],
            "r": cfg[1],
            "compiled": bool(compile),
            "ms_per_batch": 1e3 * statistics.median(times[cfg]),
            "images_per_s": batch_size / statistics.median(times[cfg]),
            "speedup": statistics.median(r),
            "speedup_min": min(r),
            "speedup_max": max(r),
            "time_ratio_vs_plain": statistics.median([1.0 / v for v in r]),
        }
        ceiling = ratios.get(("tome-ceiling", cfg[1]))
        if cfg[0] == "tome" and ceiling:  # per round: speed-up of ToMe / speed-up of its ceiling
            row["of_ceiling"] = statistics.median([a / b for a, b in zip(r, ceiling)])
        if compile:
            row["compile_s"] = compile_s[cfg]
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_base_patch16_224")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--r", default="0,4,8,12,16")
    parser.add_argument("--methods", default="tome,evit")
    parser.add_argument("--rounds", type=int, default=None, help="default: 7 at batch 1, 3 otherwise")
    parser.add_argument(
        "--iters", type=int, default=None, help="forwards per side of a pair (default: 4 at batch 1, 2 otherwise)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--json",
        default=None,
        help="results file (default: benchmarks/results/throughput.json, or throughput_compiled.json with --compile)",
    )
    parser.add_argument("--check", action="store_true", help="fail unless the acceptance targets hold")
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="add 'tome-ceiling' rows: ToMe's token counts with a free merge step (timing only)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="time torch.compile'd copies (default mode) instead of eager models"
    )
    args = parser.parse_args(argv)
    if args.json is None:
        args.json = f"benchmarks/results/throughput{'_compiled' if args.compile else ''}.json"

    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, pretrained=False).eval()
    img_size = model.patch_embed.img_size[0]
    rs = [int(v) for v in args.r.split(",")]
    configs = [("plain", 0)] + [(m, r) for m in args.methods.split(",") for r in rs]
    if args.ceiling:
        configs += [("tome-ceiling", r) for r in rs if r > 0]

    rows = []
    for bs in [int(v) for v in args.batch_sizes.split(",")]:
        rounds = args.rounds or (7 if bs == 1 else 3)
        iters = args.iters or (4 if bs == 1 else 2)
        start = time.perf_counter()
        rows += run(model, bs, configs, rounds, iters, img_size, compile=args.compile)
        print(f"batch {bs}: {rounds} rounds x {iters} iters in {time.perf_counter() - start:.0f} s", flush=True)

    mode = "torch.compile (inductor)" if args.compile else "eager"
    print(f"\n{args.model}, fp32, {mode}, {args.threads} threads, torch {torch.__version__}, timm {timm.__version__}")
    print(
        "| batch | method | r | ms / batch | images/s | speed-up vs plain (median) | range over rounds | of ceiling |"
    )
    print("|---:|---|---:|---:|---:|---:|---|---:|")
    for row in rows:
        of_ceiling = f"{row['of_ceiling']:.3f}" if "of_ceiling" in row else ""
        print(
            f"| {row['batch_size']} | {row['method']} | {row['r']} | {row['ms_per_batch']:.1f} | "
            f"{row['images_per_s']:.2f} | {row['speedup']:.3f}x | {row['speedup_min']:.2f}-{row['speedup_max']:.2f} "
            f"| {of_ceiling} |"
        )

    result = {
        "model": args.model,
        "threads": args.threads,
        "compiled": bool(args.compile),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "rows": rows,
    }
    if args.json:
        write_json(args.json, result)
        print(f"\nwrote {args.json}")

    if args.check:
        failures = []
        for row in rows:
            if row["method"] == "tome" and row["r"] == 16:
                need = 1.90 if row["batch_size"] >= 8 else 1.75
                if row["speedup"] < need:
                    failures.append(f"tome r=16 batch {row['batch_size']}: {row['speedup']:.3f}x < {need}x")
            if (
                row["method"] == "tome"
                and row["r"] == 16
                and row["batch_size"] == 1
                and row.get("of_ceiling", 1) < 0.97
            ):
                failures.append(f"tome r=16 batch 1: {row['of_ceiling']:.3f} of the merge-free ceiling < 0.97")
            if row["method"] in ("tome", "evit") and row["r"] == 0 and row["time_ratio_vs_plain"] > 1.02:
                failures.append(
                    f"{row['method']} r=0 batch {row['batch_size']}: {row['time_ratio_vs_plain']:.3f}x plain time"
                )
        if failures:
            raise SystemExit("targets missed:\n  " + "\n  ".join(failures))
        print("all targets met")


if __name__ == "__main__":
    main()
