"""Is a code change slower? ``benchmarks/throughput.py`` of two source trees, interleaved on one machine.

    git worktree add /tmp/old <commit>                        # the code before the change
    python benchmarks/code_versions.py --old /tmp/old --new . --rounds 4 -- --batch-sizes 1,8 --r 0,16

Each round runs both trees' own ``benchmarks/throughput.py`` (in a fresh order per round, each in its own
process, run in its tree with ``PYTHONPATH`` set to it, so each imports its own ``tocom_hub``) with the arguments after
``--``. A throughput run already reports a self-normalised number per configuration: the speed-up over plain
timm, paired and interleaved in the same process. Two trees are compared by the ratio of those speed-ups
(``new / old``) within a round; the result is the median ratio over the rounds with its range, per
configuration. A ratio below 1 means the new code is slower relative to plain timm. Plain timm itself is the
same in both trees (same environment), so the ratio isolates the package's own code.

Writes ``--json`` (default ``benchmarks/results/throughput_versions.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from tocom_hub.core.jsonio import write_json

Key = Tuple[int, str, int]  # (batch, method, r)


def _git_commit(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain"], capture_output=True, text=True).stdout
    return out.stdout.strip() + ("+dirty" if dirty.strip() else "") if out.returncode == 0 else "unknown"


def run_tree(tree: Path, extra: Sequence[str]) -> Dict[Key, float]:
    """One ``throughput.py`` run of ``tree``: speed-up over plain timm per (batch, method, r)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "t.json"
        cmd = [sys.executable, str(tree / "benchmarks" / "throughput.py"), *extra, "--json", str(out)]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        probe = [sys.executable, "-c", "import tocom_hub, os; print(os.path.dirname(tocom_hub.__file__))"]
        where = subprocess.run(probe, env=env, cwd=tree, capture_output=True, text=True, check=True).stdout.strip()
        if Path(where).resolve() != (tree / "tocom_hub").resolve():
            raise SystemExit(f"{tree}: PYTHONPATH did not win, tocom_hub imports from {where}")
        subprocess.run(cmd, env=env, cwd=tree, check=True, stdout=subprocess.DEVNULL)
        rows = json.loads(out.read_text())["rows"]
    return {(r["batch_size"], r["method"], r["r"]): r["speedup"] for r in rows if r["method"] != "plain"}


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, type=Path, help="source tree of the code before the change")
    p.add_argument("--new", default=Path("."), type=Path, help="source tree of the changed code (default: .)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="order of the trees per round (default: %(default)s)")
    p.add_argument("--json", default="benchmarks/results/throughput_versions.json", help="default: %(default)s")
    a = p.parse_args(own)
    trees = {"old": a.old.resolve(), "new": a.new.resolve()}
    rng = random.Random(a.seed)
    per_round: List[Dict[str, Dict[Key, float]]] = []
    t0 = time.time()
    for i in range(a.rounds):
        order = list(trees)
        rng.shuffle(order)
        got = {name: run_tree(trees[name], extra) for name in order}
        per_round.append(got)
        print(f"round {i + 1}/{a.rounds} ({' then '.join(order)}): {time.time() - t0:.0f} s", flush=True)
    rows = []
    for key in sorted(per_round[0]["new"]):
        ratios = [r["new"][key] / r["old"][key] for r in per_round if key in r["old"]]
        rows.append({"batch_size": key[0], "method": key[1], "r": key[2],
                     "old_speedup": round(statistics.median(r["old"][key] for r in per_round), 3),
                     "new_speedup": round(statistics.median(r["new"][key] for r in per_round), 3),
                     "new_over_old": round(statistics.median(ratios), 3),
                     "new_over_old_min": round(min(ratios), 3), "new_over_old_max": round(max(ratios), 3)})  # fmt: skip
    result = {
        "what": "speed-up over plain timm (benchmarks/throughput.py) of two code versions, interleaved rounds",
        "old": _git_commit(trees["old"]),
        "new": _git_commit(trees["new"]),
        "throughput_args": extra,
        "rounds": a.rounds,
        "runtime_s": round(time.time() - t0, 1),
        "rows": rows,
    }
    print("| batch | method | r | old speed-up | new speed-up | new / old (range) |\n|---:|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['method']} | {r['r']} | {r['old_speedup']:.3f}× | {r['new_speedup']:.3f}× | "
              f"{r['new_over_old']:.3f} ({r['new_over_old_min']:.3f}–{r['new_over_old_max']:.3f}) |")  # fmt: skip
    if a.json:
        write_json(a.json, result)
        print(f"wrote {a.json}")
    return result


if __name__ == "__main__":
    main()
