"""Where a merged RoPE token sits: ToMe with ``patch(positions="keep")`` vs ``positions="centroid"``, measured.

Per seed (``--seeds``), from random weights, on the embedded ``photo-regions`` corpus (135 classes: which
photograph and which cell of its 3 × 3 grid a crop comes from):

1. pre-train a tiny RoPE ViT (timm ``Eva``, 2-D rope, **no** absolute position embedding: rope is its only
   positional signal) and a classic timm ``VisionTransformer`` of the same size (learned absolute position
   embedding); same blocks (pre-norm, MLP ratio 4, qkv bias), class-token pooling, same recipe and data order;
2. top-1 on the test split at every r (tokens merged per block): the RoPE ViT with ToMe under each position
   rule (``keep``: the destination keeps its own rope rows; ``centroid``: the size-weighted centroid of the
   merged patches' coordinates, rotation recomputed there) and with EViT (pruning: exact, no rule); the
   classic ViT (no per-token positional state) with ToMe and EViT.

Intervals (95 %): percentile bootstrap over the test images (one draw shared by the seeds) and over the
seeds (:func:`tocom_hub.tools.intervals.paired_bootstrap`): of each accuracy, of ``centroid − keep`` at each
r (paired: the same images and models), and of ``centroid − keep`` averaged over the r > 0 measured (the
summary that decides the default). With few seeds the seed part of an interval is coarse.

Writes ``position_rules.{json,md,png}`` in ``--results-dir``. ::

    python benchmarks/study/position_rules.py          # the committed run (docs/positions.md)
    python benchmarks/study/position_rules.py --steps 20 --seeds 0 --results-dir /tmp/pr   # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tocom_hub import patch, set_r  # noqa: E402
from tocom_hub.core.jsonio import write_json  # noqa: E402
from tocom_hub.demo.data import build_dataset  # noqa: E402
from tocom_hub.tools.intervals import paired_bootstrap  # noqa: E402

ARCHS = {"rope": "RoPE ViT (Eva, rope only)", "vit": "classic ViT (abs. pos. emb.)"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default="photo-regions", help="embedded dataset (default: %(default)s)")
    a("--results-dir", default=str(ROOT / "benchmarks" / "results"), help="default: %(default)s")
    a("--workdir", default=None, help="keep each (model, seed)'s per-image hits here and reuse them (resume)")
    a("--seeds", default="0,1,2,3", help="model seeds, comma-separated (default: %(default)s)")
    a("--depth", type=int, default=4, help="blocks (default: %(default)s)")
    a("--dim", type=int, default=64, help="embedding width (default: %(default)s)")
    a("--heads", type=int, default=2, help="attention heads (default: %(default)s)")
    a("--img-size", type=int, default=32, help="input side in px (default: %(default)s)")
    a("--patch-size", type=int, default=4, help="patch side in px (default: %(default)s: 64 patches)")
    a("--steps", type=int, default=1000, help="pre-training steps (default: %(default)s)")
    a("--batch-size", type=int, default=64, help="pre-training batch (default: %(default)s)")
    a("--lr", type=float, default=1e-3, help="AdamW peak lr, one-cycle (default: %(default)s)")
    a("--train-images", type=int, default=12800, help="distinct training images (default: %(default)s)")
    a("--test-images", type=int, default=2000, help="test images (default: %(default)s)")
    a("--rs", default="0,4,8,10,12,14,15", help="r per block measured (default: %(default)s)")
    a("--boot", type=int, default=10000, help="bootstrap resamples (default: %(default)s)")
    a("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    args.rs = [int(r) for r in str(args.rs).split(",")]
    if 0 not in args.rs or len(args.rs) < 2 or min(args.rs) < 0:
        p.error(f"--rs must hold 0 and at least one r > 0; got {args.rs}")
    return args


def tensors(name: str, split: str, n: int, img_size: int):
    ds = build_dataset(name, split=split, img_size=img_size, length=n)
    x = np.stack([np.asarray(ds[i][0], dtype=np.float32) / 255.0 for i in range(n)])
    y = torch.tensor([int(ds[i][1]) for i in range(n)])
    x = torch.from_numpy(x).permute(0, 3, 1, 2)
    return (x - 0.5) / 0.25, y, ds.num_classes


def make(arch: str, a: argparse.Namespace, num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(img_size=a.img_size, patch_size=a.patch_size, embed_dim=a.dim, depth=a.depth,
                  num_heads=a.heads, num_classes=num_classes, global_pool="token")  # fmt: skip
    if arch == "rope":
        from timm.models.eva import Eva

        return Eva(**common, use_abs_pos_emb=False, use_rot_pos_emb=True, ref_feat_shape=None)
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**common)


def pretrain(model, x, y, a, seed, log) -> float:
    g = torch.Generator().manual_seed(seed)  # the same batches and flips for both architectures
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, a.lr, total_steps=a.steps, pct_start=0.1)
    model.train()
    t0 = time.time()
    for step in range(a.steps):
        idx = torch.randint(len(x), (a.batch_size,), generator=g)
        flip = torch.rand(len(idx), generator=g) < 0.5  # a mirrored crop still comes from the same cell
        xb = torch.where(flip[:, None, None, None], x[idx].flip(-1), x[idx])
        loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == a.steps - 1:
            log(f"  step {step} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    return time.time() - t0


@torch.no_grad()
def hits(model, x, y, bs: int = 250) -> np.ndarray:
    model.eval()
    out = [model(x[i : i + bs]).argmax(-1) == y[i : i + bs] for i in range(0, len(x), bs)]
    return torch.cat(out).numpy().astype(np.int8)


def curves(model, arch: str, x, y, rs) -> Dict[str, Dict[int, np.ndarray]]:
    """Per-image hits for every curve of ``arch`` at every r."""
    rules = [("tome", "keep"), ("tome", "centroid"), ("evit", "keep")] if arch == "rope" else [
        ("tome", "keep"), ("evit", "keep")]  # fmt: skip
    res: Dict[str, Dict[int, np.ndarray]] = {}
    for method, pos in rules:
        patch(model, method=method, positions=pos)
        name = f"tome-{pos}" if arch == "rope" and method == "tome" else method
        res[name] = {}
        for r in rs:
            set_r(model, r)
            res[name][r] = hits(model, x, y)
    return res


def cache(a: argparse.Namespace, arch: str, seed: int):
    """Where ``--workdir`` keeps one (model, seed)'s hits; its name holds every setting that changes them."""
    if a.workdir is None:
        return None
    keys = ("data", "depth", "dim", "heads", "img_size", "patch_size", "steps", "batch_size", "lr", "train_images",
            "test_images", "rs")  # fmt: skip
    tag = "-".join(str(getattr(a, k)).replace(" ", "") for k in keys)
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    return Path(a.workdir) / f"{arch}-seed{seed}-{tag}.json"


def averaged_difference(base: Dict[int, np.ndarray], other: Dict[int, np.ndarray], rs, n_boot: int) -> dict:
    """``other − base`` (points) averaged over ``rs``, with a bootstrap over the images (one draw for every r
    and seed: the comparison stays paired) and the seeds. ``base[r]``: ``(seeds, images)`` hits."""
    d = np.mean([other[r].astype(np.float64) - base[r] for r in rs], axis=0)  # (seeds, images)
    seeds, n = d.shape
    rng = np.random.default_rng(0)
    boot = np.empty(n_boot)
    for i in range(n_boot):
        rows = d[rng.integers(seeds, size=seeds)] if seeds > 1 else d
        boot[i] = rows[:, rng.integers(n, size=n)].mean()
    low, high = np.quantile(100 * boot, [0.025, 0.975])
    return {"delta": round(100 * float(d.mean()), 3), "low": round(float(low), 3), "high": round(float(high), 3),
            "rs": list(rs), "images": int(n), "seeds": int(seeds), "resamples": n_boot}  # fmt: skip


def verdict(avg: dict) -> str:
    if avg["low"] > 0:
        return "centroid"
    if avg["high"] < 0:
        return "keep"
    return "undecided"


def main(argv: Sequence[str] | None = None) -> Dict[str, Any]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t0 = time.time()
    xtr, ytr, num_classes = tensors(a.data, "train", a.train_images, a.img_size)
    xte, yte, _ = tensors(a.data, "test", a.test_images, a.img_size)
    log(f"data: {len(xtr)} train / {len(xte)} test images of {a.data} ({time.time() - t0:.0f} s)")
    per: Dict[str, Dict[str, Dict[int, List[np.ndarray]]]] = {arch: {} for arch in ARCHS}
    train_s: Dict[str, List[float]] = {arch: [] for arch in ARCHS}
    params: Dict[str, int] = {}
    for seed in a.seeds:
        for arch in ARCHS:
            model = make(arch, a, num_classes, seed)
            params[arch] = sum(p.numel() for p in model.parameters())
            cached = cache(a, arch, seed)
            if cached is not None and cached.is_file():
                saved = json.loads(cached.read_text())
                train_s[arch].append(saved["pretrain_s"])
                got = {
                    n: {int(r): np.array(h, dtype=np.int8) for r, h in by_r.items()}
                    for n, by_r in saved["hits"].items()
                }
                log(f"{arch} seed {seed}: reused {cached}")
            else:
                log(f"{arch} seed {seed}: pre-train {a.steps} steps × {a.batch_size} ({params[arch]} parameters)")
                train_s[arch].append(round(pretrain(model, xtr, ytr, a, seed, log), 1))
                got = curves(model, arch, xte, yte, a.rs)
                if cached is not None:
                    hits_json = {n: {str(r): h.tolist() for r, h in by_r.items()} for n, by_r in got.items()}
                    write_json(cached, {"pretrain_s": train_s[arch][-1], "hits": hits_json}, indent=None)
            for name, by_r in got.items():
                for r, h in by_r.items():
                    per[arch].setdefault(name, {}).setdefault(r, []).append(h)
                log(f"  {name}: " + " ".join(f"r{r}={100 * h.mean():.2f}" for r, h in by_r.items()))
    hits_of = {arch: {n: {r: np.stack(h) for r, h in by_r.items()} for n, by_r in names.items()}
               for arch, names in per.items()}  # fmt: skip
    out: Dict[str, Any] = {
        "what": f"top-1 (%) on {a.data} test vs r (tokens merged / pruned per block); ToMe position rules on a "
        "RoPE ViT, and a classic ViT of the same size",
        "config": {k: v for k, v in vars(a).items() if k not in ("results_dir", "workdir")},
        "tokens": (a.img_size // a.patch_size) ** 2,
        "parameters": params,
        "pretrain_s": train_s,
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}, {a.threads} threads",
        "curves": {},
        "centroid_minus_keep": {},
    }
    for arch, names in hits_of.items():
        out["curves"][arch] = {}
        for name, by_r in names.items():
            rows = {}
            for r, m in by_r.items():
                ci = paired_bootstrap(np.zeros_like(m), m, n_boot=a.boot)  # the accuracy itself, bootstrapped
                rows[str(r)] = {"top1": round(ci["delta"], 3), "ci95": [round(ci["low"], 3), round(ci["high"], 3)],
                                "per_seed": [round(100 * float(s.mean()), 3) for s in m]}  # fmt: skip
            out["curves"][arch][name] = rows
    keep, cen = hits_of["rope"]["tome-keep"], hits_of["rope"]["tome-centroid"]
    for r in a.rs:
        ci = paired_bootstrap(keep[r], cen[r], n_boot=a.boot)
        out["centroid_minus_keep"][str(r)] = {"delta": round(ci["delta"], 3), "ci95": [round(ci["low"], 3),
                                              round(ci["high"], 3)]}  # fmt: skip
    rs_pos = [r for r in a.rs if r > 0]
    out["centroid_minus_keep_averaged"] = averaged_difference(keep, cen, rs_pos, a.boot)
    out["better_rule"] = verdict(out["centroid_minus_keep_averaged"])
    out["runtime_s"] = round(time.time() - t0, 1)
    res = Path(a.results_dir)
    res.mkdir(parents=True, exist_ok=True)
    write_json(res / "position_rules.json", out, indent=1)
    (res / "position_rules.md").write_text(markdown(out))
    plot(out, a.rs, res / "position_rules.png")
    log(json.dumps({"averaged": out["centroid_minus_keep_averaged"], "better_rule": out["better_rule"]}))
    return out


def table(out: Dict[str, Any]) -> str:
    """Every curve at every r measured: top-1 (%) with its 95 % interval (docs/positions.md, the .md file)."""
    rs = out["config"]["rs"]
    lines = ["| model | curve | " + " | ".join(f"r={r}" for r in rs) + " |", "|---|---|" + "---|" * len(rs)]
    for arch, names in out["curves"].items():
        for name, rows in names.items():
            cells = [f"{rows[str(r)]['top1']:.2f} [{rows[str(r)]['ci95'][0]:.1f}, {rows[str(r)]['ci95'][1]:.1f}]"
                     for r in rs]  # fmt: skip
            lines.append(f"| {ARCHS[arch]} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(x: float) -> str:
    return f"{x:+.2f}".replace("-", "−")


def summary_table(out: Dict[str, Any]) -> str:
    """The RoPE ViT's ToMe under both rules and their paired difference, at each r > 0 measured and averaged
    over them (the README's table)."""
    rs = [r for r in out["config"]["rs"] if r > 0]
    rope, diff, avg = out["curves"]["rope"], out["centroid_minus_keep"], out["centroid_minus_keep_averaged"]
    lines = ["| RoPE ViT, ToMe | r=0 | " + " | ".join(f"r={r}" for r in rs) + " | mean over r > 0 |",
             "|---|---:|" + "---:|" * len(rs) + "---:|"]  # fmt: skip
    for rule in ("keep", "centroid"):
        rows = rope[f"tome-{rule}"]
        top1 = [rows[str(r)]["top1"] for r in rs]
        lines.append(f"| `{rule}` | {rows['0']['top1']:.2f} | " + " | ".join(f"{t:.2f}" for t in top1)
                     + f" | {np.mean(top1):.2f} |")  # fmt: skip
    cells = [f"{_pm(d['delta'])} [{_pm(d['ci95'][0])}, {_pm(d['ci95'][1])}]" for d in (diff[str(r)] for r in rs)]
    lines.append("| centroid − keep [95 % CI] | — | " + " | ".join(cells)
                 + f" | {_pm(avg['delta'])} [{_pm(avg['low'])}, {_pm(avg['high'])}] |")  # fmt: skip
    return "\n".join(lines)


def markdown(out: Dict[str, Any]) -> str:
    cfg, rs = out["config"], out["config"]["rs"]
    lines = [f"# Position rule of a merged RoPE token ({cfg['data']}, {out['tokens']} patches, depth {cfg['depth']},"
             f" dim {cfg['dim']}, seeds {cfg['seeds']})", "",  # fmt: skip
             "Top-1 (%) on the test split, mean over seeds, 95 % bootstrap interval (images and seeds).", "",
             table(out)]  # fmt: skip
    d = out["centroid_minus_keep"]
    lines += ["", "centroid − keep (points, paired, 95 % interval): "
              + ", ".join(f"r={r}: {d[str(r)]['delta']:+.2f} [{d[str(r)]['ci95'][0]:+.2f}, {d[str(r)]['ci95'][1]:+.2f}]"
                          for r in rs if r > 0)]  # fmt: skip
    avg = out["centroid_minus_keep_averaged"]
    lines += ["", f"Averaged over r ∈ {avg['rs']}: {avg['delta']:+.3f} [{avg['low']:+.3f}, {avg['high']:+.3f}] points "
              f"→ better rule: **{out['better_rule']}**.", "",
              f"Pre-training: {cfg['steps']} steps × {cfg['batch_size']}, AdamW {cfg['lr']} one-cycle; parameters "
              f"{out['parameters']}; {out['machine']}; runtime {out['runtime_s'] / 60:.1f} min.", ""]  # fmt: skip
    return "\n".join(lines)


def plot(out: Dict[str, Any], rs: List[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arch, names in out["curves"].items():
        for name, rows in names.items():
            y = [rows[str(r)]["top1"] for r in rs]
            lo, hi = [rows[str(r)]["ci95"][0] for r in rs], [rows[str(r)]["ci95"][1] for r in rs]
            ls = "-" if arch == "rope" else "--"
            ax.plot(rs, y, ls, marker="o", ms=3, label=f"{ARCHS[arch]}: {name}")
            ax.fill_between(rs, lo, hi, alpha=0.15)
    ax.set_xlabel("r (tokens reduced per block)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{out['config']['data']}, {out['tokens']} patches, seeds {out['config']['seeds']}")
    ax.legend(fontsize=7)
    d = out["centroid_minus_keep"]
    rp = [r for r in rs if r > 0]
    delta = [d[str(r)]["delta"] for r in rp]
    err = [[v - d[str(r)]["ci95"][0] for v, r in zip(delta, rp)], [d[str(r)]["ci95"][1] - v for v, r in zip(delta, rp)]]
    bx.errorbar(rp, delta, yerr=err, marker="o", capsize=3)
    bx.axhline(0, color="k", lw=0.5)
    bx.set_xlabel("r")
    bx.set_ylabel("centroid − keep (points, 95 % interval)")
    bx.set_title("RoPE ViT, ToMe: position rule (paired)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
