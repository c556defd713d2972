"""95 % intervals for the study table: ToCom's change at the table's two cells of every task, by paired bootstrap
over the test images and the fine-tuning seeds, from the per-image hits a study run kept.

``run.py`` passes ``--save-correct`` to its test evaluations, so each ``downstream/<task>/src<r>-seed<k>/eval-*``
stage holds ``correct.safetensors`` (one 0/1 per test image and configuration). This script reads them for
the two cells of the table (source 0 → target R, source R → target 0; the scale s the study chose), checks
that the accuracies they give equal, to the last digit, the per-seed numbers of the committed results
(``--results``: the intervals belong to exactly those models), and writes ``study_intervals.json``::

    python benchmarks/study/intervals.py --workdir /tmp/study4
    python benchmarks/render_readme.py          # the README's study table shows them

Per cell: ``delta`` (points, mean over seeds of "with − without ToCom"), ``ci95`` ``[low, high]``
(:func:`tocom_hub.tools.intervals.paired_bootstrap`: images resampled with replacement, the same draw for
every seed, and the seeds resampled too), ``images``, ``seeds``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from tocom_hub.core.jsonio import write_json

ROOT = Path(__file__).resolve().parents[2]
CELLS = {"src0_tgtR": ("0", "R"), "srcR_tgt0": ("R", "0")}  # table cell -> (source r, target r), R = r_max


def _hits(stage: Path, key: str):
    from safetensors.torch import load_file

    path = stage / "correct.safetensors"
    if not path.is_file():
        raise SystemExit(f"{path}: missing; rerun the study with this version of run.py (it keeps the hits)")
    tensors = load_file(str(path))
    if key not in tensors:
        raise SystemExit(f"{path}: no {key!r}; has {sorted(tensors)[:6]} …")
    return tensors[key].numpy().astype("int8")


def _top1(hits) -> float:
    return 100.0 * int(hits.sum()) / len(hits)  # how training/evaluate.py computes top-1


def cell_interval(
    workdir: Path, task: str, source: int, target: int, scale: float, seeds: Sequence[int], kd: str, per_seed: List
) -> Dict[str, Any]:
    """Interval of ToCom's change for one cell; ``per_seed``: the committed per-seed numbers it must reproduce."""
    import numpy as np

    from tocom_hub.tools.intervals import paired_bootstrap

    base, other = [], []
    for k, seed in enumerate(seeds):
        stage = workdir / "downstream" / task / f"src{source}-seed{seed}" / f"eval-{kd}-s{scale:g}"
        b, o = _hits(stage, f"no_tocom.r{target}"), _hits(stage, f"tocom.s{scale:g}.r{target}")
        committed = per_seed[k]
        got = (_top1(b), _top1(o))
        want = (committed["no_tocom"][str(target)], committed["tocom"][str(target)])
        if got != want:
            raise SystemExit(
                f"{task} source {source} seed {seed} target {target}: this run gives top-1 {got} (without, with "
                f"ToCom), the committed results {want}: the hits are not those of the committed models"
            )
        base.append(b)
        other.append(o)
    ci = paired_bootstrap(np.stack(base), np.stack(other))
    return {
        "delta": round(ci["delta"], 4),
        "ci95": [round(ci["low"], 4), round(ci["high"], 4)],
        "images": ci["images"],
        "seeds": ci["seeds"],
    }


def intervals(workdir: Path, results: Dict[str, Any]) -> Dict[str, Any]:
    R, seeds, kd = results["R"], results["seeds"], results["bank"].get("kd", "logits")
    out: Dict[str, Any] = {"R": R, "seeds": seeds, "method": "paired bootstrap over test images and seeds", "tasks": {}}
    for task, v in results["tasks"].items():
        out["tasks"][task] = {}
        for cell, (src, tgt) in CELLS.items():
            source, target = (R if src == "R" else 0), (R if tgt == "R" else 0)
            scale = float(v["scale"][str(source)])
            runs = v["per_seed"][str(source)]
            out["tasks"][task][cell] = cell_interval(workdir, task, source, target, scale, seeds, kd, runs)
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the --workdir of a run.py run that kept the hits")
    p.add_argument(
        "--results",
        default=str(ROOT / "benchmarks" / "results" / "study.json"),
        help="the run's study.json: the intervals are refused unless the hits give exactly its per-seed numbers",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "study_intervals.json"))
    a = p.parse_args(argv)
    results = json.loads(Path(a.results).read_text())
    out = intervals(Path(a.workdir), results)
    path = Path(a.results).resolve()
    out = {"results": path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path), **out}
    write_json(a.out, out, indent=1)
    for task, cells in out["tasks"].items():
        for cell, c in cells.items():
            print(f"{task:18s} {cell}: {c['delta']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]")
    print(f"wrote {a.out}")
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
