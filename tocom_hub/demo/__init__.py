"""The embedded study demo: a tiny backbone, downstream models made from it, and its ToCom bank.

``benchmarks/study/run.py`` pre-trains a tiny timm ViT, trains a ToCom bank for it and fine-tunes it on
downstream tasks at source ``r = 0`` and ``r = R``; it ships the outcome for one task here, in fp16
safetensors (``tocom_hub/demo/assets/study/``), so that ``examples/quickstart.py`` can show the paper's
effect offline::

    from tocom_hub.demo import load_demo_model, demo_bank_path, demo_info
    info = demo_info()                                    # task, R, seeds, s per source r, committed numbers
    model = load_demo_model(source_r=0).model             # fine-tuned at r = 0 (AdaptFormer PET)
    tocom_hub.apply(model, source_r=0, target_r=info["R"], bank=demo_bank_path(), scale=info["scale"]["0"])

    result = evaluate_demo(targets=[0, 16])               # what examples/quickstart.py prints, as a dict

``load_demo_model`` returns a ``(model, info)`` named tuple: ``model, info = load_demo_model(0)`` works as
before, and so do ``.model`` / ``.info``.

``bank=demo_bank_path()`` is a local bank folder in the layout ``ToComBank.save_pretrained`` writes and the
Hub serves; ``bank="org/name"`` is downloaded into such a folder (``tocom_hub.load_bank``) and read the same way.

Files (``assets/study/``): ``demo.json`` (what is where, the recipe and the study's numbers for these
exact files), ``backbone.safetensors`` (the pre-trained backbone, classifier of the pre-training corpus
included), ``<task>-src<r>-seed<k>.safetensors`` (the downstream models of every fine-tuning seed of
the study: classifier + AdaptFormer adapters; the backbone stays frozen in AdaptFormer fine-tuning, so
only these differ from ``backbone``) and ``bank/`` (the ToCom bank).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from . import models as models  # registers the "demo" model alias of tocom_hub.tools.models

__all__ = ["DEMO_DIR", "DemoModel", "demo_info", "demo_bank_path", "load_demo_model", "evaluate_demo"]


class DemoModel(NamedTuple):
    """What :func:`load_demo_model` returns: unpacks as ``model, info`` and reads as ``.model`` / ``.info``."""

    model: nn.Module
    info: Dict[str, Any]


DEMO_DIR = Path(__file__).resolve().parent / "assets" / "study"


def demo_info() -> Dict[str, Any]:
    """The content of ``assets/study/demo.json``."""
    path = DEMO_DIR / "demo.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"this install lacks the embedded study demo ({path}); reinstall tocom-hub or "
            f"rebuild it with `python benchmarks/study/run.py`"
        )
    return json.loads(path.read_text())


def demo_bank_path() -> str:
    """Folder of the demo's ToCom bank, usable as ``bank=`` anywhere. It was trained for the study's backbone:
    pair it with :func:`load_demo_model`'s models (model aliases ``study-backbone``, ``study-<task>-src<r>``),
    not with ``load_model("demo")`` (the training scripts' photo-crops backbone; that pairing warns)."""
    return str(DEMO_DIR / demo_info()["bank"])


def _load(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


def load_demo_model(source_r: int = 0, seed: Optional[int] = None) -> DemoModel:
    """``(model, info)`` (a :class:`DemoModel`): the demo task's model fine-tuned at ``source_r`` (fp32, eval
    mode, not patched).

    ``source_r`` must be one the demo ships (``demo_info()["models"]``: ``0`` and ``R``); ``seed`` one of
    ``demo_info()["seeds"]`` (default: the first). The study's numbers are means over these seeds.
    """
    import timm

    from ..tools.adaptformer import AdaptFormer

    info = demo_info()
    models = info["models"]
    if str(source_r) not in models:
        raise ValueError(
            f"the demo ships models fine-tuned at source r in {sorted(int(k) for k in models)}; "
            f"got source_r={source_r!r}"
        )
    entries = {e["seed"]: e for e in models[str(source_r)]}
    if seed is None:
        seed = info["seeds"][0]
    if seed not in entries:
        raise ValueError(f"the demo ships fine-tuning seeds {sorted(entries)}; got seed={seed!r}")
    entry = entries[seed]
    backbone = _load(DEMO_DIR / info["backbone"])
    down = _load(DEMO_DIR / entry["file"])
    head = {k[len("head.") :]: v for k, v in down.items() if k.startswith("head.")}
    adapters = {k[len("adapters.") :]: v for k, v in down.items() if k.startswith("adapters.")}
    model = timm.create_model(
        info["model"], pretrained=False, num_classes=int(head["weight"].shape[0]), **info["model_kwargs"]
    )
    state = {k: v for k, v in backbone.items() if not k.startswith("head.")}
    state.update({f"head.{k}": v for k, v in head.items()})
    model.load_state_dict(state)
    af = AdaptFormer.for_model(model, bottleneck=entry["adapter_bottleneck"], scale=entry["adapter_scale"])
    af.load_state_dict(adapters)
    af.attach(model)
    model.eval()
    return DemoModel(model, {**info, "source_r": int(source_r), "seed": seed, "adapters": af})


def _headline(cell: Dict[str, float], ci: Dict[str, Any]) -> Dict[str, Any]:
    return {
        **cell,
        "delta": round(cell["tocom"] - cell["no_tocom"], 2),
        "ci95": [round(ci["low"], 2), round(ci["high"], 2)],
    }


class _Counted:
    """A loader that advances a shared progress bar by one per batch."""

    def __init__(self, loader, bar) -> None:
        self.loader, self.bar = loader, bar

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch
            self.bar.update(1)


def evaluate_demo(
    targets: Optional[Sequence[int]] = None,
    *,
    limit: Optional[int] = None,
    batch_size: int = 250,
    progress: bool = True,
    n_boot: int = 10000,
) -> Dict[str, Any]:
    """Evaluate every shipped model (source ``0`` and ``R``, every seed) on the demo task's test split at
    each target ``r`` (default ``0`` and ``R``; ``0`` and ``R`` are always included), without and with
    the bank — what ``examples/quickstart.py`` prints.

    Returns a dict: ``task``, ``R``, ``seeds``, ``scale``, ``images``, ``num_classes``, ``chance`` (top-1
    of guessing, %: the test labels are balanced), ``targets``, ``top1`` (``{source: {target: {"no_tocom",
    "tocom"}}}``, mean over seeds, %), ``tokens`` (per target), ``images_per_s`` (per target, source 0,
    no ToCom), ``delta`` (``{source: {target: paired_bootstrap(...)}}``: +ToCom − plain over images and
    seeds), and the headline numbers of ``demo.json``'s ``committed`` (``src0_tgt0``, ``src0_tgtR``,
    ``srcR_tgtR``, ``srcR_tgt0``), rounded to 2 decimals; the two mismatched pairs also carry ``delta`` and
    ``ci95`` (+ToCom − plain and its 95 % interval, points).
    """
    from tqdm.auto import tqdm

    from ..tools.evaluation import evaluate, paired_bootstrap
    from .data import build_eval_dataset

    info = demo_info()
    R, seeds, scales, task = info["R"], list(info["seeds"]), info["scale"], info["task"]
    wanted = sorted({int(t) for t in (targets if targets is not None else (0, R))} | {0, R})
    if any(not 0 <= t <= R for t in wanted):
        raise ValueError(f"targets must lie in 0…{R} (the demo bank's range); got {list(targets or [])}")
    sources = [0, R]
    bank = demo_bank_path()
    data = None
    bar = None
    runs: Dict[int, List[List[Dict[str, Any]]]] = {src: [] for src in sources}
    try:
        for src in sources:
            for seed in seeds:
                model = load_demo_model(src, seed=seed).model
                if data is None:
                    data = build_eval_dataset(model, task, split="test", limit=limit)
                    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
                    bar = tqdm(
                        total=len(sources) * len(seeds) * len(loader),
                        desc="evaluating",
                        unit="batch",
                        **({} if progress else {"disable": True}),  # disable=False would override TQDM_DISABLE
                    )
                rows = evaluate(
                    model,
                    _Counted(loader, bar),
                    wanted,
                    bank=bank,
                    source_r=src,
                    scale=scales[str(src)],
                    progress=False,
                    keep_correct=True,
                )
                runs[src].append(rows)
    finally:
        if bar is not None:
            bar.close()

    def cell(src: int, t: int, tocom: bool) -> List[Dict[str, Any]]:
        return [next(r for r in rows if r["target_r"] == t and r["tocom"] == tocom) for rows in runs[src]]

    def top1(src: int, t: int, tocom: bool) -> float:
        vals = [r["top1"] for r in cell(src, t, tocom)]
        return round(sum(vals) / len(vals), 2)

    top = {src: {t: {"no_tocom": top1(src, t, False), "tocom": top1(src, t, True)} for t in wanted} for src in sources}
    delta = {}
    for src in sources:
        delta[src] = {}
        for t in wanted:
            base = torch.stack([r["correct"] for r in cell(src, t, False)]).numpy()
            other = torch.stack([r["correct"] for r in cell(src, t, True)]).numpy()
            delta[src][t] = paired_bootstrap(base, other, n_boot=n_boot)
    num_classes = getattr(data, "num_classes", None)
    return {
        "task": task,
        "R": R,
        "seeds": seeds,
        "scale": scales,
        "images": len(data),
        "num_classes": num_classes,
        "chance": round(100.0 / num_classes, 2) if num_classes else None,
        "targets": wanted,
        "top1": top,
        "delta": delta,
        "tokens": {t: cell(0, t, False)[0]["tokens"] for t in wanted},
        "images_per_s": {t: cell(0, t, False)[0]["images_per_s"] for t in wanted},
        "src0_tgt0": top[0][0]["no_tocom"],
        "src0_tgtR": _headline(top[0][R], delta[0][R]),
        "srcR_tgtR": top[R][R]["no_tocom"],
        "srcR_tgt0": _headline(top[R][0], delta[R][0]),
    }


from .study_models import register_study_aliases  # noqa: E402  (the CLI's names for the models above)

register_study_aliases(load_demo_model)
