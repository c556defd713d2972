"""Render the result tables of README.md and the docs from the committed JSON (one script for all of them).

    python benchmarks/render_readme.py            # rewrite the tables in every file of HOMES
    python benchmarks/render_readme.py --check    # exit 1 (and name the tables) when a file is stale

A table lives right under its marker comment; the rows (the ``|`` lines directly under the marker) are
replaced, everything else — the prose around them — is left alone. ``HOMES`` says which file must hold which
markers (a marker may appear in several files):

=================================== ============================================== ==========================
marker                              source                                         rendered by
=================================== ============================================== ==========================
``<!-- quickstart-table -->``        ``tocom_hub/demo/assets/study/demo.json``      :func:`quickstart_table`
``<!-- speed-table -->``             ``benchmarks/results/throughput*.json``        :func:`speed_table`
``<!-- throughput-table -->``        ``benchmarks/results/throughput.json``         :func:`throughput_table`
``<!-- throughput-compiled-table -->`` ``benchmarks/results/throughput_compiled.json`` :func:`throughput_table`
``<!-- versions-table -->``          ``benchmarks/results/throughput_versions.json`` :func:`versions_table`
``<!-- study-table -->``             ``benchmarks/results/study.json``              ``benchmarks/study/report.py``
``<!-- study-rerun-table -->``       ``benchmarks/results/study_rerun.json``        ``benchmarks/study/report.py``
``<!-- supported-models-table -->``  ``docs/supported-models.md`` (written by        :func:`supported_models_table`
                                     ``tests/test_supported_models.py``)
``<!-- dense-flops-table -->``       ``benchmarks/results/dense_flops.json``        :func:`dense_flops_table`
``<!-- segmentation-table -->``      ``benchmarks/results/segmentation.json``       ``benchmarks/study/segmentation.py``
``<!-- positions-table -->``         ``benchmarks/results/position_rules.json``     ``study/position_rules.py``
``<!-- positions-full-table -->``    ``benchmarks/results/position_rules.json``     ``study/position_rules.py``
=================================== ============================================== ==========================
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "study"))

import report  # noqa: E402


def _load(rel: str) -> Dict[str, Any]:
    return json.loads((ROOT / rel).read_text())


def _signed(d: float) -> str:
    return f"{'+' if d >= 0 else '−'}{abs(d):.2f}"


def quickstart_table(demo: Dict[str, Any]) -> str:
    """What ``python examples/quickstart.py`` prints as its headline (demo.json's ``committed``)."""
    c, R = demo["committed"], demo["R"]
    lines = [
        "| model fine-tuned at | run at | top-1 | + ToCom | change [95 % CI] | fine-tuned at the target r |",
        "|---|---|---:|---:|---|---:|",
    ]
    for src, tgt, key, matched in ((0, R, "src0_tgtR", c["srcR_tgtR"]), (R, 0, "srcR_tgt0", c["src0_tgt0"])):
        v = c[key]
        lo, hi = v["ci95"]
        lines.append(
            f"| r = {src} | r = {tgt} | {v['no_tocom']:.2f} | {v['tocom']:.2f} | "
            f"{_signed(v['tocom'] - v['no_tocom'])} [{_signed(lo)}, {_signed(hi)}] | {matched:.2f} |"
        )
    return "\n".join(lines)


def throughput_table(result: Dict[str, Any]) -> str:
    """``benchmarks/throughput.py``'s results: images/s and paired speed-up (range over rounds) per batch and r;
    with an "of ceiling" column (ToMe's speed-up ÷ the ceiling's, median over rounds) when the rows have it."""
    rows = result["rows"]
    cell: Dict[Any, Dict[str, Any]] = {(r["batch_size"], r["method"], r["r"]): r for r in rows}
    of_ceiling = any("of_ceiling" in r for r in rows)

    def speed(row):
        return f"{row['speedup']:.2f}× ({row['speedup_min']:.2f}–{row['speedup_max']:.2f})"

    lines = [
        "| batch | r | ToMe images/s | ToMe speed-up | EViT images/s | EViT speed-up "
        "| ToMe ceiling (merge step free) |" + (" ToMe ÷ ceiling |" if of_ceiling else ""),
        "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if of_ceiling else ""),
    ]
    for batch in sorted({r["batch_size"] for r in rows}):
        plain = cell[(batch, "plain", 0)]
        extra = " |" if of_ceiling else ""
        lines.append(f"| {batch} | plain timm | {plain['images_per_s']:.2f} | 1.00× | | | |{extra}")
        for r in sorted({r["r"] for r in rows if r["batch_size"] == batch and r["method"] == "tome"}):
            tome, evit, ceil = (cell.get((batch, m, r)) for m in ("tome", "evit", "tome-ceiling"))
            evit_ips = "" if evit is None else f"{evit['images_per_s']:.2f}"
            line = (
                f"| {batch} | {r} | {tome['images_per_s']:.2f} | {speed(tome)} | {evit_ips} | "
                f"{'' if evit is None else speed(evit)} | {'' if ceil is None else speed(ceil)} |"
            )
            if of_ceiling:
                line += f" {tome['of_ceiling']:.3f} |" if "of_ceiling" in tome else " |"
            lines.append(line)
    return "\n".join(line.replace("|  |", "| |").replace("|  |", "| |") for line in lines)


def versions_table(result: Dict[str, Any]) -> str:
    """``benchmarks/code_versions.py``: two code versions' speed-ups over plain timm and their ratio."""
    lines = ["| batch | method | r | speed-up, old code | speed-up, new code | new ÷ old (range over rounds) |",
             "|---:|---|---:|---:|---:|---|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['batch_size']} | {r['method']} | {r['r']} | {r['old_speedup']:.2f}× | "
                     f"{r['new_speedup']:.2f}× | {r['new_over_old']:.3f} ({r['new_over_old_min']:.2f}–"
                     f"{r['new_over_old_max']:.2f}) |")  # fmt: skip
    return "\n".join(lines)


def speed_table(eager: Dict[str, Any], compiled: Dict[str, Any]) -> str:
    """The headline speed-ups: the largest r of every batch size in ``eager`` and ``compiled`` (both written by
    ``benchmarks/throughput.py``), ToMe and EViT against plain timm, and ToMe's merge-free ceiling."""

    def speed(row):
        return "" if row is None else f"{row['speedup']:.2f}× ({row['speedup_min']:.2f}–{row['speedup_max']:.2f})"

    lines = [
        "| run | batch | r | ToMe speed-up | EViT speed-up | merge step free (ceiling) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, result in (("eager", eager), ("torch.compile", compiled)):
        rows = result["rows"]
        cell = {(r["batch_size"], r["method"], r["r"]): r for r in rows}
        for batch in sorted({r["batch_size"] for r in rows}):
            r = max(r["r"] for r in rows if r["batch_size"] == batch and r["method"] == "tome")
            tome, evit, ceil = (cell.get((batch, m, r)) for m in ("tome", "evit", "tome-ceiling"))
            lines.append(f"| {label} | {batch} | {r} | {speed(tome)} | {speed(evit)} | {speed(ceil)} |")
    return "\n".join(lines)


def supported_models_table(doc: str) -> str:
    """The table of ``docs/supported-models.md`` (which ``tests/test_supported_models.py`` checks against
    ``timm.list_models()``), row for row."""
    lines = doc.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("| timm module"))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[start:end])


def dense_flops_table(result: Dict[str, Any]) -> str:
    """``benchmarks/dense_flops.py``'s counted GFLOPs of plain and dense ToMe against their closed forms."""
    removed = result["gflops_plain"] - result["gflops_ffn_removed_closed_form"]
    matching = result["gflops_dense_closed_form"] - removed
    return "\n".join(
        [
            "| | counted GFLOPs | closed form |",
            "|---|---|---|",
            f"| plain | {result['gflops_plain']:.2f} | {result['gflops_plain_closed_form']:.2f} |",
            f"| dense ToMe r = {result['r']} | {result['gflops_dense']:.2f} | "
            f"{result['gflops_dense_closed_form']:.2f} (incl. {matching:.2f} of matching) |",
            f"| plain − FFN tokens removed | — | {removed:.2f} |",
        ]
    )


def segmentation_table() -> str:
    """The segmentation study's table (``benchmarks/study/segmentation.py`` renders it; imported here only when
    asked for, since that script imports torch and the trainers)."""
    import segmentation

    return segmentation.table(_load("benchmarks/results/segmentation.json")).rstrip("\n")


def positions_table(full: bool) -> str:
    """The position-rule study's tables (``benchmarks/study/position_rules.py`` renders them; imported only when
    asked for, since that script imports torch)."""
    import position_rules

    out = _load("benchmarks/results/position_rules.json")
    return position_rules.table(out) if full else position_rules.summary_table(out)


def _with_intervals(rel: str) -> Dict[str, Any]:
    """The study results ``rel`` with the 95 % intervals of ``study_intervals.json`` when they were measured
    for exactly these results (``benchmarks/study/intervals.py`` records which)."""
    result = _load(rel)
    path = ROOT / "benchmarks" / "results" / "study_intervals.json"
    intervals = json.loads(path.read_text()) if path.is_file() else None
    return report.with_intervals(result, intervals) if intervals and intervals.get("results") == rel else result


TABLES: Dict[str, Callable[[], str]] = {
    "quickstart-table": lambda: quickstart_table(_load("tocom_hub/demo/assets/study/demo.json")),
    "speed-table": lambda: speed_table(
        _load("benchmarks/results/throughput.json"), _load("benchmarks/results/throughput_compiled.json")
    ),
    "dense-flops-table": lambda: dense_flops_table(_load("benchmarks/results/dense_flops.json")),
    "segmentation-table": segmentation_table,
    "positions-table": lambda: positions_table(full=False),
    "positions-full-table": lambda: positions_table(full=True),
    "supported-models-table": lambda: supported_models_table((ROOT / "docs" / "supported-models.md").read_text()),
    "versions-table": lambda: versions_table(_load("benchmarks/results/throughput_versions.json")),
    "throughput-table": lambda: throughput_table(_load("benchmarks/results/throughput.json")),
    "throughput-compiled-table": lambda: throughput_table(_load("benchmarks/results/throughput_compiled.json")),
    "study-table": lambda: report.table(_with_intervals("benchmarks/results/study.json")),
    "study-rerun-table": lambda: report.table(_with_intervals("benchmarks/results/study_rerun.json")),
}


def render(text: str, names=None) -> str:
    """``text`` (README.md) with the rows under every known marker (or those in ``names``) replaced by the
    rendered table."""
    lines = text.split("\n")
    out: List[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        name = line.strip()[len("<!-- ") : -len(" -->")] if line.strip().startswith("<!-- ") else ""
        if name in TABLES and (names is None or name in names):
            while i < len(lines) and lines[i].startswith("|"):
                i += 1  # the old rows
            out.extend(TABLES[name]().split("\n"))
    return "\n".join(out)


# every file with tables, and the markers it must hold
HOMES: Dict[Path, List[str]] = {
    ROOT / "README.md": [
        "quickstart-table",
        "supported-models-table",
        "speed-table",
        "study-rerun-table",
        "positions-table",
    ],
    ROOT / "docs" / "performance.md": ["throughput-table", "throughput-compiled-table", "versions-table"],
    ROOT / "docs" / "dense.md": ["dense-flops-table", "segmentation-table"],
    ROOT / "docs" / "positions.md": ["positions-full-table", "positions-table"],
    ROOT / "benchmarks" / "study" / "README.md": ["study-table", "study-rerun-table"],
}
FILES = list(HOMES)


def stale(path: Path = ROOT / "README.md") -> List[str]:
    """Markers whose table in ``path`` differs from its source (empty when the file is up to date)."""
    text = path.read_text()
    missing = [n for n in HOMES.get(Path(path).resolve(), []) if f"<!-- {n} -->" not in text]
    if missing:
        raise SystemExit(f"{path}: no marker for {missing}")
    return [n for n in TABLES if render(text, [n]) != text]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when a table is stale")
    parser.add_argument(
        "--readme",
        action="append",
        default=None,
        help="file to render (repeatable; default: every file of HOMES)",
    )
    args = parser.parse_args(argv)
    status = 0
    for path in [Path(p) for p in args.readme] if args.readme else FILES:
        if args.check:
            bad = stale(path)
            if bad:
                print(f"{path}: stale tables {bad}; run python benchmarks/render_readme.py", file=sys.stderr)
                status = 1
            else:
                print(f"{path}: tables match the JSON")
            continue
        text = path.read_text()
        new = render(text)
        path.write_text(new)
        print(f"{path}: {'updated' if new != text else 'already up to date'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
