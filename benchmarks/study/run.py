"""The CPU-scale ToCom study: the paper's protocol, end to end, with tocom-hub's own trainers.

    python benchmarks/study/run.py                        # the committed study (see README.md here)
    python benchmarks/study/run.py --workdir out/study --seeds 0 --finetune-steps 100   # a quick look

Stages (each one a call of a script users run; a finished stage is reused when its output exists):

1. pre-train the tiny timm ViT from random weights on the ``photo-regions`` corpus
   (``training/finetune.py --from-scratch``) and measure its accuracy at every r
   (``training/evaluate.py``): the off-the-shelf cost of merging;
2. fine-tune it on every downstream task at source r = 0 and at source r = R, for every seed
   (``training/finetune.py --mode adaptformer``: AdaptFormer PET, as the paper does on VTAB-1k) —
   the off-the-shelf models, made without any knowledge of ToCom;
3. train a ToCom bank on the corpus by label-free self-distillation (``training/distill.py``);
4. measure the bank on its own corpus (validation split);
5. per task and source r, choose the inference scale s from the paper's grid on the task's
   *validation* split, then evaluate every model on its task's *test* split at every target r in
   0…R, without and with ToCom (``training/evaluate.py --bank``); the source-0 and source-R models at
   their own r are the matched (source = target) reference.

Writes ``benchmarks/results/study.json``, ``study.md`` (paper Table 2 style) and ``study.png``
(paper Fig. 5 style); ``--results-dir`` changes where.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (benchmarks/study/report.py)

from tocom_hub.core.jsonio import write_json  # noqa: E402

CORPUS = os.environ.get("STUDY_CORPUS", "photo-regions")
TASKS = ("shape-count", "textures", "photo-orientation", "photo-crops")
KINDS = {
    "shape-count": "structured",
    "shape-location": "structured",
    "textures": "texture",
    "photo-orientation": "natural",
    "photo-crops": "natural",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="out/study", help="where models, banks and logs go (default out/study)")
    p.add_argument(
        "--results-dir", default=str(ROOT / "benchmarks" / "results"), help="where study.json / study.md / study.png go"
    )
    p.add_argument("--r-max", type=int, default=16, help="R: the bank covers r = 0…R (default 16, as the paper)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated downstream tasks")
    p.add_argument("--seeds", default="0,1", help="comma-separated fine-tuning seeds (default 0,1)")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--distill-steps", type=int, default=1000)
    p.add_argument("--distill-lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=2, help="bank rank h (paper: 2)")
    p.add_argument(
        "--kd",
        choices=("logits", "features"),
        default="logits",
        help="distillation target: the pre-training head's logits (KL; default, the paper's choice "
        "for DeiT) or the final features (L1; the paper's choice for head-less MAE)",
    )
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--adapter-scale", type=float, default=0.1)
    p.add_argument(
        "--scales",
        default="0.01,0.02,0.05,0.08,0.1,0.12,0.15",
        help="candidate inference scales s (the paper's grid), chosen per task and source r on the "
        "task's validation split",
    )
    p.add_argument("--demo-task", default="shape-count", help="the task whose model + bank ship with tocom-hub")
    p.add_argument(
        "--export-demo",
        default=str(ROOT / "tocom_hub" / "demo" / "assets" / "study"),
        help="where the demo task's model + bank are shipped ('' to skip)",
    )
    return p.parse_args(argv)


def evaluate(finetuned: Path, out: Path, options: List[str], log: Path, after: Sequence[str] = ()) -> None:
    """The stage ``training/evaluate.py --finetuned <finetuned> <options> --output-dir <out> --num-workers 0
    <after>`` (:func:`run`; done when ``out/eval.json`` exists)."""
    args = ["--finetuned", str(finetuned), *options, "--output-dir", str(out), "--num-workers", "0", *after]
    run("evaluate.py", args, log, out, done="eval.json")


def run(script: str, args: List[str], log: Path, stage: Path, done: str) -> None:
    """Run ``training/<script>`` in a subprocess (as a user would), appending its output to ``log``, unless
    ``stage/done`` exists from an earlier invocation with the same arguments (resuming a study).

    The stage's wall time goes to ``stage/runtime_s`` (a resumed study still reports the time of every
    stage) and its arguments to ``stage/command.json``; reusing a stage made with other arguments (an
    old recipe left in ``--workdir``) is an error, not a silent mix.
    """
    recorded = stage / "command.json"
    if (stage / done).is_file():
        if not recorded.is_file() or json.loads(recorded.read_text()) != [script, *args]:
            raise SystemExit(
                f"{stage} holds a stage made by another recipe (or an older tocom-hub); "
                f"use a fresh --workdir or delete it"
            )
        return
    cmd = [sys.executable, str(ROOT / "training" / script), *args]
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{script} failed (exit {proc.returncode}); see {log}")
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "runtime_s").write_text(f"{time.time() - t0:.1f}\n")
    write_json(recorded, [script, *args], indent=None)


def main(argv: Sequence[str] | None = None) -> Dict[str, Any]:
    t_start = time.time()
    a = parse_args(argv)
    wd = Path(a.workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    log = wd / "study.log"
    R = a.r_max
    seeds = [int(s) for s in a.seeds.split(",")]
    tasks = [t for t in a.tasks.split(",") if t]
    common = ["--num-workers", "0", "--log-every", "100"]
    stages: List[Path] = []  # the stage dirs this study uses (their runtime_s add up to its runtime)

    # 1. pre-train
    pre = wd / "pretrain"
    run(
        "finetune.py",
        [
            "--data",
            CORPUS,
            "--from-scratch",
            "--mode",
            "full",
            "--source-r",
            "0",
            "--max-steps",
            str(a.pretrain_steps),
            "--batch-size",
            "128",
            "--lr",
            str(a.pretrain_lr),
            "--weight-decay",
            "0.05",
            "--warmup-steps",
            "100",
            "--smoothing",
            "0",
            "--no-augment",
            "--drop-path",
            "0",
            "--seed",
            "0",
            "--eval-every",
            "0",
            "--output-dir",
            str(pre),
            *common,
        ],
        log,
        pre,
        done="model.safetensors",
    )
    ckpt = str(pre / "model.safetensors")
    stages += [pre, pre / "eval"]
    evaluate(pre, pre / "eval", ["--split", "test", "--targets", f"0-{R}", "--source-r", "0"], log)
    pre_eval = json.loads((pre / "eval" / "eval.json").read_text())

    # 2. downstream off-the-shelf models (they never see the bank, so they come first)
    for task in tasks:
        for seed in seeds:
            for src in (0, R):
                ft = wd / "downstream" / task / f"src{src}-seed{seed}"
                stages.append(ft)
                run(
                    "finetune.py",
                    [
                        "--checkpoint",
                        ckpt,
                        "--data",
                        task,
                        "--mode",
                        "adaptformer",
                        "--source-r",
                        str(src),
                        "--adapter-scale",
                        str(a.adapter_scale),
                        "--max-steps",
                        str(a.finetune_steps),
                        "--batch-size",
                        "64",
                        "--lr",
                        str(a.finetune_lr),
                        "--no-augment",
                        "--smoothing",
                        "0",
                        "--eval-every",
                        "0",
                        "--seed",
                        str(seed),
                        "--output-dir",
                        str(ft),
                        *common,
                    ],
                    log,
                    ft,
                    done="model.safetensors",
                )

    # 3. bank
    bank = wd / f"bank-{a.kd}"
    stages.append(bank)
    run(
        "distill.py",
        [
            "--checkpoint",
            ckpt,
            "--data",
            CORPUS,
            "--r-max",
            str(R),
            "--rank",
            str(a.rank),
            "--kd",
            a.kd,
            "--max-steps",
            str(a.distill_steps),
            "--batch-size",
            "128",
            "--lr",
            str(a.distill_lr),
            "--seed",
            "0",
            "--output-dir",
            str(bank),
            *common,
        ],
        log,
        bank,
        done="metrics.json",
    )
    distill_metrics = json.loads((bank / "metrics.json").read_text())

    # 4. the bank on its own corpus (validation split; reported, not used to pick anything)
    val_targets = ",".join(str(t) for t in sorted({*range(0, R + 1, max(R // 4, 1)), R}))
    out = pre / f"calib-{a.kd}"
    stages.append(out)
    evaluate(
        pre,
        out,
        ["--source-r", "0", "--bank", str(bank), "--split", "val", "--scales", a.scales, "--targets", val_targets],
        log,
    )
    corpus_eval = json.loads((out / "eval.json").read_text())

    # 5. per task and source r, choose s on the task's *validation* split (seed 0's model, the paper's
    #    s grid), then evaluate every model on the *test* split at every target r without and with ToCom
    per_task: Dict[str, Any] = {}
    scales: Dict[str, Dict[str, str]] = {}
    for task in tasks:
        scales[task] = {}
        for src in (0, R):
            ft = wd / "downstream" / task / f"src{src}-seed{seeds[0]}"
            out = ft / f"select-s-{a.kd}"
            stages.append(out)
            evaluate(
                ft, out, ["--bank", str(bank), "--scales", a.scales, "--split", "val", "--targets", val_targets], log
            )
            gains = json.loads((out / "eval.json").read_text())["mean_gain_by_scale"]
            scales[task][str(src)] = max(gains, key=lambda k: (gains[k], -float(k)))
        runs: Dict[str, List[Dict[str, Any]]] = {"0": [], str(R): []}
        for seed in seeds:
            for src in (0, R):
                ft = wd / "downstream" / task / f"src{src}-seed{seed}"
                s_ = scales[task][str(src)]
                ev = ft / f"eval-{a.kd}-s{s_}"
                stages.append(ev)
                evaluate(
                    ft,
                    ev,
                    ["--bank", str(bank), "--scales", s_, "--split", "test", "--targets", f"0-{R}"],
                    log,
                    after=["--save-correct"],
                )  # per-image hits: benchmarks/study/intervals.py bootstraps them
                runs[str(src)].append(json.loads((ev / "eval.json").read_text()))
        per_task[task] = summarise(runs, R, scales[task])
        per_task[task]["scale"] = {k: float(v) for k, v in scales[task].items()}

    result = {
        "R": R,
        "seeds": seeds,
        "scale_grid": [float(v) for v in a.scales.split(",")],
        "demo_task": a.demo_task,
        "corpus": CORPUS,
        "method": "tome",
        "model": pre_eval["model"],
        "kinds": {t: KINDS.get(t, "") for t in tasks},
        "pretrained": {
            "targets": pre_eval["targets"],
            "top1": pre_eval["no_tocom"],
            "drop_at_R": pre_eval["no_tocom"]["0"] - pre_eval["no_tocom"][str(R)],
        },
        "bank": {
            "kd": a.kd,
            "steps": a.distill_steps,
            "rank": a.rank,
            "heldout_kl_no_bank": distill_metrics.get("heldout_kl_no_bank", distill_metrics.get("heldout_l1_no_bank")),
            "heldout_kl_with_bank": distill_metrics.get(
                "heldout_kl_with_bank", distill_metrics.get("heldout_l1_with_bank")
            ),
            "heldout_pairs": distill_metrics.get("heldout_pairs"),
            "heldout_metric": distill_metrics.get("heldout_metric"),
            "on_corpus_val": {
                "targets": corpus_eval["targets"],
                "no_tocom": corpus_eval["no_tocom"],
                "tocom": corpus_eval["tocom"],
            },
        },
        "tasks": per_task,
        "average": average(per_task),
        "recipe": vars(a),
        "runtime_s": stage_times(wd, stages),
        "total_runtime_s": round(sum(stage_times(wd, stages).values()), 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "command": "python benchmarks/study/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if a.demo_task in per_task and a.export_demo:
        result["demo"] = export_demo(
            wd, pre, bank, a.demo_task, R, scales[a.demo_task], seeds, Path(a.export_demo), log
        )
    result["wall_s_this_invocation"] = round(time.time() - t_start, 1)
    report.write_reports(result, Path(a.results_dir))
    return result


def export_demo(
    wd: Path, pre: Path, bank: Path, task: str, R: int, scale: Dict[str, str], seeds: List[int], out: Path, log: Path
) -> Dict[str, Any]:
    """Ship the study's outcome for ``task`` as fp16 safetensors in ``out`` (``tocom_hub/demo/assets/study``):
    the backbone, the downstream models of every seed at source 0 and R (classifier + AdaptFormer
    adapters) and the bank; then measure them afresh through ``examples/quickstart.py --json`` — the
    path users run, which averages over the shipped seeds as ``study.json`` does."""
    import torch
    from safetensors.torch import load_file, save_file

    from tocom_hub import ToComBank
    from tocom_hub.tools.bank_fit import sha256_file

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{task}-src*.safetensors"):
        old.unlink()
    half = lambda sd: {k: v.to(torch.float16).contiguous() for k, v in sd.items()}  # noqa: E731
    meta = {"format": "pt", "source": "benchmarks/study/run.py"}
    save_file(half(load_file(str(pre / "model.safetensors"))), str(out / "backbone.safetensors"), metadata=meta)
    models: Dict[str, Any] = {}
    model_kwargs: Dict[str, Any] = {}
    model_name = ""
    for src in (0, R):
        models[str(src)] = []
        for seed in seeds:
            ft = wd / "downstream" / task / f"src{src}-seed{seed}"
            recipe = json.loads((ft / "finetune.json").read_text())
            model_name, model_kwargs = recipe["model"], recipe["model_kwargs"]
            sd = {k: v for k, v in load_file(str(ft / "model.safetensors")).items() if k.startswith("head.")}
            sd.update({f"adapters.{k}": v for k, v in load_file(str(ft / "adaptformer.safetensors")).items()})
            name = f"{task}-src{src}-seed{seed}.safetensors"
            save_file(half(sd), str(out / name), metadata=meta)
            models[str(src)].append(
                {
                    "file": name,
                    "seed": seed,
                    "adapter_bottleneck": recipe["adapter_bottleneck"],
                    "adapter_scale": recipe["adapter_scale"],
                    "steps": recipe.get("total_steps"),
                }
            )
    ToComBank.from_pretrained(str(bank)).save_pretrained(out / "bank", dtype=torch.float16)
    info = {
        "task": task,
        "R": R,
        "seeds": list(seeds),
        "scale": {k: float(v) for k, v in scale.items()},
        "model": model_name,
        "model_kwargs": model_kwargs,
        "backbone": "backbone.safetensors",
        # the fp32 file the bank and the downstream models were made from (backbone.safetensors is its fp16
        # copy): what `tocom-hub eval` compares with the bank's recorded checkpoint_sha256
        "backbone_trained_sha256": sha256_file(pre / "model.safetensors"),
        "bank": "bank",
        "models": models,
        "corpus": CORPUS,
        "made_by": "python benchmarks/study/run.py",
    }
    write_json(out / "demo.json", info)
    measured = wd / "demo-quickstart.json"
    cmd = [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--json", str(measured)]
    with open(log, "a") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, check=True)
    numbers = json.loads(measured.read_text())
    info["committed"] = {k: numbers[k] for k in ("src0_tgtR", "srcR_tgt0", "src0_tgt0", "srcR_tgtR") if k in numbers}
    write_json(out / "demo.json", info)
    return {"task": task, "seeds": list(seeds), **info["committed"]}


def stage_times(wd: Path, stages: Sequence[Path]) -> Dict[str, float]:
    """Wall time (s) of each of ``stages`` (across resumed invocations; leftovers of other runs in ``wd``
    are not counted)."""
    return {str(p.relative_to(wd)): float((p / "runtime_s").read_text()) for p in stages if (p / "runtime_s").is_file()}


def summarise(runs: Dict[str, List[Dict[str, Any]]], R: int, scale: Dict[str, str]) -> Dict[str, Any]:
    """Means over seeds of the numbers of one task (accuracies in percent); ``scale[src]`` is the s
    the models of source ``src`` were evaluated with."""

    def mean(xs: List[float]) -> float:
        return round(sum(xs) / len(xs), 2)

    def at(src: str, kind: str, t: int) -> float:
        if kind == "no_tocom":
            return mean([e["no_tocom"][str(t)] for e in runs[src]])
        return mean([e["tocom"][scale[src]][str(t)] for e in runs[src]])

    targets = list(range(R + 1))
    return {
        "src0_tgt0": at("0", "no_tocom", 0),
        "src0_tgtR": {"no_tocom": at("0", "no_tocom", R), "tocom": at("0", "tocom", R)},
        "srcR_tgtR": at(str(R), "no_tocom", R),
        "srcR_tgt0": {"no_tocom": at(str(R), "no_tocom", 0), "tocom": at(str(R), "tocom", 0)},
        "grid": {
            "targets": targets,
            "src0": {
                "no_tocom": [at("0", "no_tocom", t) for t in targets],
                "tocom": [at("0", "tocom", t) for t in targets],
            },
            f"src{R}": {
                "no_tocom": [at(str(R), "no_tocom", t) for t in targets],
                "tocom": [at(str(R), "tocom", t) for t in targets],
            },
            "matched": {"0": at("0", "no_tocom", 0), str(R): at(str(R), "no_tocom", R)},
        },
        "per_seed": {
            src: [{"no_tocom": e["no_tocom"], "tocom": e["tocom"][scale[src]]} for e in runs[src]] for src in runs
        },
    }


def average(per_task: Dict[str, Any]) -> Dict[str, Any]:
    n = len(per_task)
    if not n:
        return {}
    m = lambda f: round(sum(f(v) for v in per_task.values()) / n, 2)  # noqa: E731
    out = {
        "src0_tgt0": m(lambda v: v["src0_tgt0"]),
        "src0_tgtR": {
            "no_tocom": m(lambda v: v["src0_tgtR"]["no_tocom"]),
            "tocom": m(lambda v: v["src0_tgtR"]["tocom"]),
        },
        "srcR_tgtR": m(lambda v: v["srcR_tgtR"]),
        "srcR_tgt0": {
            "no_tocom": m(lambda v: v["srcR_tgt0"]["no_tocom"]),
            "tocom": m(lambda v: v["srcR_tgt0"]["tocom"]),
        },
    }
    closed = report.gap_closed(out)
    out["gap_closed"] = None if closed is None else round(closed, 3)
    return out


if __name__ == "__main__":
    main()
