"""Top-1 accuracy and images/s per target ``r``, without and with a ToCom bank (``tocom-hub eval``).

"Without" is plain ToMe / EViT at that ``r`` (:func:`tocom_hub.set_r`); "with" is the bank merged
into the weights for ``source_r → r`` (:func:`tocom_hub.apply` once, then
:func:`tocom_hub.set_target_r` — the inference path users run). Every batch is decoded once and run
through every configuration, so the data pipeline costs the same as a single evaluation and the
timings of the configurations are interleaved. Example::

    from tocom_hub.demo.data import build_eval_dataset      # an ImageFolder root or an embedded dataset name
    from tocom_hub.tools.evaluation import evaluate
    loader = torch.utils.data.DataLoader(build_eval_dataset(model, "data/imagenet"), batch_size=64)
    rows = evaluate(model, loader, target_rs=[0, 4, 8, 16], bank="out/bank", source_r=0)
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import Dataset

from ..core.bank.module import ToComBank
from ..core.compensation.api import apply, disabled, get_compensation, set_target_r
from ..core.patch import METHODS, get_method, get_settings, patch, set_r
from ..core.preserve import preserved
from ..core.rspec import BANK_RANGE, check_r, check_r_values
from .bank_fit import backbone_mismatch
from .intervals import add_intervals, paired_bootstrap
from .plots import plot_accuracy
from .timing import percentile

__all__ = [
    "evaluate",
    "paired_bootstrap",
    "add_intervals",
    "format_table",
    "plot_accuracy",
    "label_warning",
]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    target_rs: Sequence[int],
    bank: Union[ToComBank, str, os.PathLike, None] = None,
    source_r: int = 0,
    scale: Optional[float] = None,
    *,
    method: Optional[str] = None,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
    keep_correct: bool = False,
    plain: bool = True,
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    lineage: Optional[set] = None,
    **hub_kwargs: Any,
) -> List[Dict[str, Any]]:
    """Top-1 (and top-5) accuracy and images/s of ``model`` at every target ``r``.

    Args:
        model: a timm ViT (patched or not; it is left as found — patched at its previous ``r`` and
            settings, or unpatched; a patched model is evaluated with its own ``prop_attn`` /
            ``fuse_token`` settings). It must not carry a bank already (:func:`tocom_hub.remove` it first).
        loader: yields ``(images, labels)`` batches.
        target_rs: ``r`` values to evaluate, e.g. ``[0, 4, 8, 16]``.
        bank: a :class:`ToComBank`, a local bank path or a Hub id; ``None`` evaluates plain ToMe/EViT only.
        source_r: the ``r`` the model was fine-tuned at (the bank's ``m``).
        scale: ToCom ``s`` (default: the bank's).
        method: ``"tome"`` / ``"evit"`` (default: the bank's, else the model's patch method, else ToMe).
        device: where to run (default: the model's device).
        progress: show a tqdm bar over the batches.
        keep_correct: also return, per row, ``correct``: a bool tensor with one entry per image (top-1 hit),
            in loader order — what :func:`paired_bootstrap` / :func:`add_intervals` need.
        plain: also evaluate without the bank (``False``: only the +ToCom rows; needs ``bank``).
        gather: applied to every batch's per-image hits before they are counted, e.g.
            ``accelerator.gather_for_metrics`` to count the images of every process under ``accelerate launch``.
        lineage: the weights the model descends from (:func:`tocom_hub.tools.bank_fit.model_lineage`), so a
            bank trained on another backbone of the same architecture is noticed too.

    A bank whose recorded backbone differs from the model (architecture, pretrained tag, or — with
    ``lineage`` — the backbone weights) gives a ``UserWarning`` (:func:`~tocom_hub.tools.bank_fit.backbone_mismatch`):
    it runs, but compensates another model.

    Everything (bank vs model, ``r`` within the bank's range and the model's token count) is
    validated before the first forward. Images/s excludes the first batch (warm-up) when there are
    more. At ``target r == source_r`` the bank's update is zero, so the +ToCom row reuses the plain
    forward (the same logits, and the same time) instead of running it again. Returns one row per
    (``r``, with/without bank): ``target_r``, ``tocom`` (bool), ``top1``, ``top5`` (``None`` for < 5
    classes), ``tokens`` (left after the last block), ``images``,
    ``images_per_s`` (median over the timed batches of images / s) and ``images_per_s_range`` (the 10th and
    90th percentile over those batches: how much the machine's load moved it). Example::

        rows = evaluate(model, loader, [0, 8, 16], bank="out/bank", source_r=0, scale=0.1)
        for row in rows: print(row["target_r"], row["tocom"], row["top1"])
    """
    rs = check_r_values(target_rs, "target_rs")
    if not plain and bank is None:
        raise ValueError("plain=False evaluates only the +ToCom rows: pass a bank")
    if get_compensation(model) is not None:
        raise ValueError(
            "the model already carries a ToCom bank; call tocom_hub.remove(model) first and pass "
            "the bank to evaluate(bank=...)"
        )
    if bank is not None and not isinstance(bank, ToComBank):
        from ..hub.load import load_bank

        bank = load_bank(bank, **hub_kwargs)
    if method is not None and method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if bank is not None:
        if method is not None and method != bank.method:
            raise ValueError(
                f"the bank was trained for {bank.method!r} but method={method!r} was requested; "
                f"drop --method or pick a bank for {method!r}"
            )
        method = bank.method
        mismatch = backbone_mismatch(bank, model, lineage)
        if mismatch:
            warnings.warn(mismatch, UserWarning, stacklevel=2)
        source_r = check_r(source_r, "source_r", r_max=bank.r_max, why=BANK_RANGE)
        rs = check_r_values(rs, "target_rs", r_max=bank.r_max, why=BANK_RANGE)
    method = method or get_method(model) or "tome"

    with preserved(model):
        patch(model, **{**(get_settings(model) or {}), "method": method})
        for r in rs:  # validate every r (the patcher's token-count limit) before any forward
            set_r(model, r)
        if bank is not None:
            apply(model, source_r, rs[0], bank=bank, scale=scale, merge=True)
        return _run(model, loader, rs, bank is not None, plain, device, progress, keep_correct, source_r, gather)


def _count(
    st: Dict[str, Any],
    logits: torch.Tensor,
    y: torch.Tensor,
    elapsed: Optional[float],
    keep_correct: bool,
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]],
) -> None:
    """Add one batch's top-1 / top-5 hits (and its images/s when ``elapsed`` is given) to ``st``."""
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    hit = top == y[:, None]
    if gather is not None:
        hit = gather(hit.to(torch.uint8)).bool()  # uint8: every collective backend can gather it
    st["correct1"] += int(hit[:, 0].sum())
    st["correct5"] += int(hit.any(dim=-1).sum())
    st["seen"] += int(hit.shape[0])
    if keep_correct:
        st["hits"].append(hit[:, 0].cpu())
    if elapsed is not None and elapsed > 0:
        st["rates"].append(int(y.numel()) / elapsed)


def _run(model, loader, rs, with_bank, plain, device, progress, keep_correct, source_r, gather) -> List[Dict[str, Any]]:
    from tqdm.auto import tqdm

    model.eval()
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    if device != param.device:
        model.to(device)
        param = next(model.parameters())
    groups = ((False,) if plain else ()) + ((True,) if with_bank else ())
    configs = [(r, group) for group in groups for r in rs]
    stats = {c: {"correct1": 0, "correct5": 0, "seen": 0, "rates": [], "hits": [], "tokens": None} for c in configs}
    try:
        total = len(loader)
    except TypeError:
        total = None
    num_classes = None
    off = {} if progress else {"disable": True}  # an explicit disable=False would override TQDM_DISABLE=1
    bar = tqdm(loader, total=total, desc="eval", unit="batch", **off)
    for i, (x, y) in enumerate(bar):
        x = x.to(device=device, dtype=param.dtype if param.dtype.is_floating_point else None)
        y = y.to(device)
        timed = i > 0 or total == 1
        same: Dict[int, Any] = {}  # at target r = source r the bank adds nothing: one forward serves both
        for group_bank in groups if i % 2 == 0 else groups[::-1]:  # alternate which group runs first
            ctx = disabled(model) if (with_bank and not group_bank) else contextlib.nullcontext()
            with ctx:
                for r in rs:
                    if group_bank:
                        set_target_r(model, r)
                    else:
                        set_r(model, r)
                    st = stats[(r, group_bank)]
                    if r == source_r and r in same:  # Δ(m → m) = 0: the plain model's forward
                        logits, elapsed = same[r]
                        st["tokens"] = st["tokens"] or stats[(r, not group_bank)]["tokens"]
                        _count(st, logits, y, elapsed if timed else None, keep_correct, gather)
                        continue
                    hook = None
                    if st["tokens"] is None:
                        seen: List[int] = []
                        hook = model.blocks[-1].register_forward_hook(
                            lambda m, a, out, _s=seen: _s.append(int(out.shape[1]))
                        )
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    logits = model(x)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    elapsed = time.perf_counter() - start
                    if hook is not None:
                        hook.remove()
                        st["tokens"] = seen[-1]
                    if len(groups) == 2 and r == source_r:
                        same[r] = (logits, elapsed)
                    num_classes = logits.shape[-1]
                    _count(st, logits, y, elapsed if timed else None, keep_correct, gather)
        if total:
            first = stats[configs[-1]]
            bar.set_postfix(top1=f"{100.0 * first['correct1'] / max(first['seen'], 1):.1f}")
    bar.close()
    if stats[configs[0]]["seen"] == 0:
        raise ValueError("the loader yielded no images")
    rows = []
    for (r, with_tocom), st in stats.items():
        n = st["seen"]
        rates = st["rates"]
        row = {
            "target_r": r,
            "tocom": with_tocom,
            "top1": 100.0 * st["correct1"] / n,
            "top5": 100.0 * st["correct5"] / n if num_classes and num_classes >= 5 else None,
            "tokens": st["tokens"],
            "images": n,
            "images_per_s": percentile(rates, 50) if rates else None,
            "images_per_s_range": [percentile(rates, 10), percentile(rates, 90)] if rates else None,
        }
        if keep_correct:
            row["correct"] = torch.cat(st["hits"])
        rows.append(row)
    rows.sort(key=lambda row: (row["target_r"], row["tocom"]))
    return rows


def _ips(row: Dict[str, Any]) -> str:
    if row.get("images_per_s") is None:
        return "-"
    rng = row.get("images_per_s_range")
    return f"{row['images_per_s']:.1f}" + (f" ({rng[0]:.0f}-{rng[1]:.0f})" if rng else "")


def _noisy(rows: Sequence[Dict[str, Any]], spread: float = 0.3) -> bool:
    """True when some row's images/s moved by more than ``spread`` (10th-90th percentile / median)."""
    for row in rows:
        rng, mid = row.get("images_per_s_range"), row.get("images_per_s")
        if rng and mid and (rng[1] - rng[0]) / mid > spread:
            return True
    return False


def format_table(rows: Sequence[Dict[str, Any]], source_r: Optional[int] = None) -> str:
    """Rows of :func:`evaluate` as a table: one line per ``r``, plain vs ToCom side by side (with the 95 %
    interval of the difference when :func:`add_intervals` added it) and a legend under it."""
    by_r: Dict[int, Dict[bool, Dict[str, Any]]] = {}
    for row in rows:
        by_r.setdefault(row["target_r"], {})[row["tocom"]] = row
    with_bank = any(row["tocom"] for row in rows)
    with_ci = any("delta_ci95" in row for row in rows)
    cols = ["target r", "tokens", "top-1 plain", "img/s plain"]
    if with_bank:
        cols += ["top-1 +ToCom", "delta [95 % CI]" if with_ci else "delta", "img/s +ToCom"]
    body = []
    for r in sorted(by_r):
        plain = by_r[r].get(False)
        mark = "*" if source_r is not None and r == source_r else ""
        cells = [f"{r}{mark}", str(plain["tokens"]), f"{plain['top1']:.2f}", _ips(plain)]
        if with_bank:
            tc = by_r[r].get(True)
            delta = f"{tc['top1'] - plain['top1']:+.2f}"
            if "delta_ci95" in tc:
                lo, hi = tc["delta_ci95"]
                delta += f" [{lo:+.2f}, {hi:+.2f}]"
            cells += [f"{tc['top1']:.2f}", delta, _ips(tc)]
        body.append(cells)
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    lines = [fmt(cols), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body]
    if source_r is not None and source_r in by_r:
        lines.append(f"* source r = {source_r} (the r the model was fine-tuned at)")
    n = rows[0].get("images") if rows else None
    lines.append(
        f"top-1 in % of {n} images; target r = tokens removed per block, tokens = tokens left after the "
        f"last block; img/s = median over batches (10th-90th percentile)"
    )
    if with_ci:
        lines.append(
            "delta = +ToCom minus plain in points; [95 % CI]: paired bootstrap over the images — an "
            "interval that contains 0 means no detectable difference on these images"
        )
    if _noisy(rows):
        lines.append(
            "img/s: noisy — batches differ by more than 30 % (a busy machine?); rerun, or use "
            "`tocom-hub bench`, before comparing speeds"
        )
    return "\n".join(lines)


def label_warning(ds: Dataset, model: nn.Module) -> Optional[str]:
    """A warning when the data has more classes than the model predicts (``None`` when fine)."""
    k = getattr(ds, "num_classes", None)
    n = getattr(model, "num_classes", None)
    if k and n and k > n:
        return (
            f"the data has {k} classes but the model predicts {n}: labels above {n - 1} can never be right; "
            f"is this the model's dataset?"
        )
    return None
