"""study.json → study.md (paper Table 2 style) and study.png (paper Fig. 5 style).

    python benchmarks/study/report.py benchmarks/results/study.json    # re-render from the JSON
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional


def _pm(a: float, b: float, s=None) -> str:
    d = b - a
    return f"{b:.2f} ({'+' if d >= 0 else '−'}{abs(d):.2f}{'' if s is None else f', s={s:g}'})"


def gap_closed(v: Dict[str, Any]) -> Optional[float]:
    """Share of the "source 0 → target R" vs matched gap that ToCom closes (``None`` without a gap)."""
    gap = v["srcR_tgtR"] - v["src0_tgtR"]["no_tocom"]
    return (v["src0_tgtR"]["tocom"] - v["src0_tgtR"]["no_tocom"]) / gap if gap > 0 else None


def table(result: Dict[str, Any]) -> str:
    R = result["R"]
    head = (f"| task | kind | src 0 → tgt 0 | src 0 → tgt {R} | + ToCom | src {R} → tgt {R} (matched) "
            f"| gap closed | src {R} → tgt 0 | + ToCom |")
    lines: List[str] = [head, "|" + "---|" * 9]
    rows = list(result["tasks"].items())
    if result.get("average"):
        rows.append(("**average**", {**result["average"], "kind": ""}))
    for name, v in rows:
        kind = v.get("kind", result.get("kinds", {}).get(name, ""))
        closed = gap_closed(v)
        lines.append(
            f"| {name} | {kind} | {v['src0_tgt0']:.2f} | {v['src0_tgtR']['no_tocom']:.2f} "
            f"| {_pm(v['src0_tgtR']['no_tocom'], v['src0_tgtR']['tocom'], v.get('scale', {}).get('0'))} "
            f"| {v['srcR_tgtR']:.2f} "
            f"| {'—' if closed is None else f'{100 * closed:.0f} %'} | {v['srcR_tgt0']['no_tocom']:.2f} "
            f"| {_pm(v['srcR_tgt0']['no_tocom'], v['srcR_tgt0']['tocom'], v.get('scale', {}).get(str(R)))} |")
    return "\n".join(lines)


def markdown(result: Dict[str, Any]) -> str:
    R, pre, bank = result["R"], result["pretrained"], result["bank"]
    m0, m1 = bank.get("heldout_kl_no_bank"), bank.get("heldout_kl_with_bank")
    kl_line = ""
    if m0 and m1 is not None:
        kl_line = (f"- ToCom bank ({bank.get('kd', 'logits')} distillation): held-out "
                   f"{bank.get('heldout_metric') or 'KL'} on the corpus, mean over "
                   f"{len(bank.get('heldout_pairs') or [])} (m, n) pairs, without → with the bank: "
                   f"{m0:.4g} → {m1:.4g} ({100 * (m1 - m0) / m0:+.1f} %).\n")
    mins = result.get("total_runtime_s", 0) / 60
    return (
        f"# CPU-scale ToCom study\n\n"
        f"Top-1 (%) on each task's test split, mean over seeds {result['seeds']}; ToMe with proportional "
        f"attention, R = {R}; one ToCom bank for all tasks, its scale s chosen per task and source r on the "
        f"task's validation split from {result.get('scale_grid')}. Numbers in brackets: change from the column "
        f"on the left.\n\n"
        f"{table(result)}\n\n"
        f"- Backbone: `{result['model']}` pre-trained from scratch on `{result['corpus']}`; off the shelf "
        f"its top-1 falls {pre['top1']['0']:.2f} → {pre['top1'][str(R)]:.2f} at r = {R} "
        f"(−{pre['drop_at_R']:.2f}).\n"
        f"{kl_line}"
        f"- Command: `{result['command'].strip()}`; runtime {mins:.1f} min on {result['machine']['cpus']} CPU cores.\n"
    )


def plot(result: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R, tasks = result["R"], result["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.2), dpi=120, squeeze=False)
    for ax, (name, v) in zip(axes[0], tasks.items()):
        g = v["grid"]
        t = g["targets"]
        ax.plot(t, g["src0"]["no_tocom"], "o-", color="0.45", ms=3, label="source 0")
        ax.plot(t, g["src0"]["tocom"], "s-", color="tab:blue", ms=3, label="source 0 + ToCom")
        ax.plot(t, g[f"src{R}"]["no_tocom"], "o--", color="0.7", ms=3, label=f"source {R}")
        ax.plot(t, g[f"src{R}"]["tocom"], "s--", color="tab:orange", ms=3, label=f"source {R} + ToCom")
        ax.plot([0, R], [g["matched"]["0"], g["matched"][str(R)]], "D", color="tab:red", ms=5,
                label="source = target")
        ax.set_title(f"{name} ({result.get('kinds', {}).get(name, '')})", fontsize=9)
        ax.set_xlabel("target r")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(result: Dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "study.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "study.md").write_text(markdown(result))
    plot(result, out_dir / "study.png")
    print(markdown(result))


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "results" / "study.json")
    write_reports(json.loads(path.read_text()), path.parent)
