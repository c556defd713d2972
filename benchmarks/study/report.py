"""study.json → study.md (paper Table 2 style) and study.png (paper Fig. 5 style).

python benchmarks/study/report.py benchmarks/results/study.json    # re-render from the JSON
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple


def _signed(d: float) -> str:
    return f"{'+' if d >= 0 else '−'}{abs(d):.2f}"


def _pm(a: float, b: float, s=None, seeds: Optional[List[float]] = None, ci: Optional[List[float]] = None) -> str:
    """``b (change[ [95 % CI]], s=…[; seeds …])``: the change from ``a``, its interval and its per-seed values."""
    extra = "" if ci is None else f" [{_signed(ci[0])}, {_signed(ci[1])}]"
    extra += "" if s is None else f", s={s:g}"
    extra += "" if not seeds else "; seeds " + ", ".join(_signed(d) for d in seeds)
    return f"{b:.2f} ({_signed(b - a)}{extra})"


def seed_changes(v: Dict[str, Any], src: str, target: str) -> Optional[List[float]]:
    """ToCom's change (points) per fine-tuning seed for models of source ``src`` at ``target``."""
    runs = (v.get("per_seed") or {}).get(src)
    if not runs:
        return None
    return [e["tocom"][target] - e["no_tocom"][target] for e in runs]


def gap_closed(v: Dict[str, Any]) -> Optional[float]:
    """Share of the "source 0 → target R" vs matched gap that ToCom closes (``None`` without a gap)."""
    gap = v["srcR_tgtR"] - v["src0_tgtR"]["no_tocom"]
    return (v["src0_tgtR"]["tocom"] - v["src0_tgtR"]["no_tocom"]) / gap if gap > 0 else None


def with_intervals(result: Dict[str, Any], intervals: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``result`` (study.json) with each task cell's 95 % interval (``ci95``) from ``intervals``
    (study_intervals.json, written by ``benchmarks/study/intervals.py``); ``result`` itself is not changed."""
    out = copy.deepcopy(result)
    for task, cells in ((intervals or {}).get("tasks") or {}).items():
        for cell, c in cells.items():
            if task in out["tasks"]:
                out["tasks"][task][cell]["ci95"] = c["ci95"]
    return out


def _row(name: str, kind: str, v: Dict[str, Any], R: int, scale: Dict[str, Any]) -> str:
    closed = gap_closed(v)
    a, b = v["src0_tgtR"], v["srcR_tgt0"]
    return (
        f"| {name} | {kind} | {v['src0_tgt0']:.2f} | {a['no_tocom']:.2f} "
        f"| {_pm(a['no_tocom'], a['tocom'], scale.get('0'), seed_changes(v, '0', str(R)), a.get('ci95'))} "
        f"| {v['srcR_tgtR']:.2f} "
        f"| {'—' if closed is None else f'{100 * closed:.0f} %'} | {b['no_tocom']:.2f} "
        f"| {_pm(b['no_tocom'], b['tocom'], scale.get(str(R)), seed_changes(v, str(R), '0'), b.get('ci95'))} |"
    )


def table(result: Dict[str, Any]) -> str:
    """The study table (markdown). A ``result["demo"]`` with ``ci95`` intervals (the shipped demo files,
    re-measured by the quickstart) adds a row for them under the tasks."""
    R = result["R"]
    head = (
        f"| task | kind | src 0 → tgt 0 | src 0 → tgt {R} | + ToCom | src {R} → tgt {R} (matched) "
        f"| gap closed | src {R} → tgt 0 | + ToCom |"
    )
    lines: List[str] = [head, "|" + "---|" * 9]
    for name, v in result["tasks"].items():
        kind = v.get("kind", result.get("kinds", {}).get(name, ""))
        lines.append(_row(name, kind, v, R, v.get("scale", {})))
    demo = result.get("demo") or {}
    if demo.get("src0_tgtR", {}).get("ci95") and demo.get("task") in result["tasks"]:
        scale = demo.get("scale") or result["tasks"][demo["task"]].get("scale", {})  # the shipped files' own s
        lines.append(_row(f"{demo['task']}, shipped files", "quickstart", demo, R, scale))
    if result.get("average"):
        lines.append(_row("**average**", "", result["average"], R, {}))
    return "\n".join(lines)


def intervals_note(result: Dict[str, Any]) -> str:
    """What the table can and cannot say about noise (the interval text follows the demo row's numbers)."""
    demo = result.get("demo") or {}
    task_cis = [v[c].get("ci95") for v in result["tasks"].values() for c in ("src0_tgtR", "srcR_tgt0")]
    if task_cis and all(task_cis):
        excluding = sum(1 for lo, hi in task_cis if not lo <= 0 <= hi)
        return (
            "How sure: in square brackets, the 95 % interval of each change (paired bootstrap over the test "
            "images and the seeds, `tocom_hub.tools.evaluation.paired_bootstrap`, from the per-image hits the "
            "study kept; `benchmarks/study/intervals.py` checks they give exactly the numbers in the table). "
            f"{excluding} of the {len(task_cis)} task-level intervals {'excludes' if excluding == 1 else 'exclude'} 0."
        )
    text = (
        "How sure: a 95 % interval of a change needs the per-image predictions (paired bootstrap over the "
        "test images and the seeds, `tocom_hub.tools.evaluation.paired_bootstrap`). The study run did not keep them; "
        "the demo task's models ship with tocom-hub, so the row *shipped files* re-measures them (fp16, what "
        "`python examples/quickstart.py` prints) and gives the interval in square brackets."
    )
    cis = [demo.get(k, {}).get("ci95") for k in ("src0_tgtR", "srcR_tgt0")]
    if all(cis):
        contains = [lo <= 0 <= hi for lo, hi in cis]
        verdict = (
            "both contain 0: on its own, this task's change is not distinguishable from noise"
            if all(contains)
            else "they exclude 0"
            if not any(contains)
            else "one of them contains 0"
        )
        text += (
            f" Its intervals span {cis[0][1] - cis[0][0]:.1f} and {cis[1][1] - cis[1][0]:.1f} points; "
            f"{verdict}. The per-seed values show how much one fine-tuning run moves a change."
        )
    return text


def markdown(result: Dict[str, Any]) -> str:
    R, pre, bank = result["R"], result["pretrained"], result["bank"]
    m0, m1 = bank.get("heldout_kl_no_bank"), bank.get("heldout_kl_with_bank")
    kl_line = ""
    if m0 and m1 is not None:
        kl_line = (
            f"- ToCom bank ({bank.get('kd', 'logits')} distillation): held-out "
            f"{bank.get('heldout_metric') or 'KL'} on the corpus, mean over "
            f"{len(bank.get('heldout_pairs') or [])} (m, n) pairs, without → with the bank: "
            f"{m0:.4g} → {m1:.4g} ({100 * (m1 - m0) / m0:+.1f} %).\n"
        )
    mins = result.get("total_runtime_s", 0) / 60
    return (
        f"# CPU-scale ToCom study\n\n"
        f"Top-1 (%) on each task's test split, mean over seeds {result['seeds']}; ToMe with proportional "
        f"attention, R = {R}; one ToCom bank for all tasks, its scale s chosen per task and source r on the "
        f"task's validation split from {result.get('scale_grid')}. Numbers in brackets: change from the column "
        f"on the left; `seeds`: that change for each fine-tuning seed.\n\n"
        f"{table(result)}\n\n"
        f"{intervals_note(result)}\n\n"
        f"- Backbone: `{result['model']}` pre-trained from scratch on `{result['corpus']}`; off the shelf "
        f"its top-1 falls {pre['top1']['0']:.2f} → {pre['top1'][str(R)]:.2f} at r = {R} "
        f"(−{pre['drop_at_R']:.2f}).\n"
        f"{kl_line}"
        f"- Command: `{result['command'].strip()}`; runtime {mins:.1f} min on {result['machine']['cpus']} CPU cores.\n"
    )


def _test_images(task: str) -> Optional[int]:
    try:
        from tocom_hub.demo.data import get_dataset_spec

        return int(get_dataset_spec(task).lengths["test"])
    except Exception:  # an unknown or renamed task: no interval band
        return None


def _band(ys: List[float], n: Optional[int]) -> Tuple[List[float], List[float]]:
    """95 % Wilson interval of each accuracy (%) measured on ``n`` images."""
    if not n:
        return ys, ys
    lo, hi = [], []
    z = 1.96
    for y in ys:
        p = y / 100.0
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        lo.append(100 * (centre - half))
        hi.append(100 * (centre + half))
    return lo, hi


def plot(result: Dict[str, Any], path: Path) -> None:
    """Top-1 vs target r per task, every curve with its 95 % band (Wilson, from the test image count),
    a y-axis of at least 6 points, and the backbone and image count in the titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R, tasks = result["R"], result["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.6), dpi=120, squeeze=False)
    for ax, (name, v) in zip(axes[0], tasks.items()):
        g = v["grid"]
        t = g["targets"]
        n = _test_images(name)
        lows, highs = [], []
        for ys, style, colour, label in (
            (g["src0"]["no_tocom"], "o-", "0.45", "source 0"),
            (g["src0"]["tocom"], "s-", "tab:blue", "source 0 + ToCom"),
            (g[f"src{R}"]["no_tocom"], "o--", "0.7", f"source {R}"),
            (g[f"src{R}"]["tocom"], "s--", "tab:orange", f"source {R} + ToCom"),
        ):
            lo, hi = _band(ys, n)
            lows += lo
            highs += hi
            ax.fill_between(t, lo, hi, color=colour, alpha=0.12, lw=0)
            ax.plot(t, ys, style, color=colour, ms=3, label=label)
        ax.plot([0, R], [g["matched"]["0"], g["matched"][str(R)]], "D", color="tab:red", ms=5, label="source = target")
        lo, hi = min(lows), max(highs)
        if hi - lo < 6.0:
            mid = (lo + hi) / 2
            lo, hi = mid - 3.0, mid + 3.0
        ax.set_ylim(max(0.0, lo - 0.5), min(100.0, hi + 0.5))
        kind = result.get("kinds", {}).get(name, "")
        ax.set_title(f"{name} ({kind})" + (f", {n:,} test images" if n else ""), fontsize=9)
        ax.set_xlabel("target r")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 (%), mean of the seeds")
    axes[0][-1].legend(fontsize=7)
    kw = result.get("model_kwargs") or {}
    if not kw:
        try:  # the shipped demo records the study backbone's shape
            from tocom_hub.demo import demo_info

            kw = demo_info()["model_kwargs"] if demo_info()["task"] == result.get("demo_task") else {}
        except Exception:
            kw = {}
    size = f", {kw['img_size']} px, depth {kw['depth']}" if {"img_size", "depth"} <= set(kw) else ""
    fig.suptitle(
        f"{result['model']}{size} (pre-trained on {result.get('corpus', '?')}), ToMe, R = {R}; "
        f"bands: 95 % interval of each point",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(result: Dict[str, Any], out_dir: Path) -> None:
    from tocom_hub.core.jsonio import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "study.json", result)
    (out_dir / "study.md").write_text(markdown(result))
    plot(result, out_dir / "study.png")
    print(markdown(result))


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "results" / "study.json")
    intervals = path.with_name("study_intervals.json")
    result = json.loads(path.read_text())
    if intervals.is_file():  # only the intervals measured for these results (intervals.py records which)
        measured = json.loads(intervals.read_text())
        if Path(measured.get("results", "")).name == path.name:
            result = with_intervals(result, measured)
    write_reports(result, path.parent)
