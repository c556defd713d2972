"""The embedded study demo: a tiny backbone, downstream models made from it, and its ToCom bank.

``benchmarks/study/run.py`` pre-trains a tiny timm ViT, trains a ToCom bank for it and fine-tunes it on
downstream tasks at source ``r = 0`` and ``r = R``; it ships the outcome for one task here, in fp16
safetensors (``tocom_hub/assets/study/``), so that ``examples/quickstart.py`` can show the paper's
effect offline::

    from tocom_hub.demo import load_demo_model, demo_bank_path, demo_info
    info = demo_info()                                    # task, R, seeds, s per source r, committed numbers
    model, _ = load_demo_model(source_r=0)                # fine-tuned at r = 0 (AdaptFormer PET)
    tocom_hub.apply(model, source_r=0, target_r=info["R"], bank=demo_bank_path(), scale=info["scale"]["0"])

``bank=demo_bank_path()`` is a local bank folder in the layout ``ToComBank.save_pretrained`` writes and the
Hub serves; ``bank="org/name"`` goes through the same :meth:`ToComBank.from_pretrained`.

Files (``assets/study/``): ``demo.json`` (what is where, the recipe and the study's numbers for these
exact files), ``backbone.safetensors`` (the pre-trained backbone, classifier of the pre-training corpus
included), ``<task>-src<r>-seed<k>.safetensors`` (the downstream models of every fine-tuning seed of
the study: classifier + AdaptFormer adapters; the backbone stays frozen in AdaptFormer fine-tuning, so
only these differ from ``backbone``) and ``bank/`` (the ToCom bank).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["DEMO_DIR", "demo_info", "demo_bank_path", "load_demo_model"]

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "study"


def demo_info() -> Dict[str, Any]:
    """The content of ``assets/study/demo.json``."""
    path = DEMO_DIR / "demo.json"
    if not path.is_file():
        raise FileNotFoundError(f"this install lacks the embedded study demo ({path}); reinstall tocom-hub or "
                                f"rebuild it with `python benchmarks/study/run.py`")
    return json.loads(path.read_text())


def demo_bank_path() -> str:
    """Folder of the demo's ToCom bank (``config.json`` + weights), usable as ``bank=`` anywhere."""
    return str(DEMO_DIR / demo_info()["bank"])


def _load(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


def load_demo_model(source_r: int = 0, seed: Optional[int] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """``(model, info)``: the demo task's model fine-tuned at ``source_r`` (fp32, eval mode, not patched).

    ``source_r`` must be one the demo ships (``demo_info()["models"]``: ``0`` and ``R``); ``seed`` one of
    ``demo_info()["seeds"]`` (default: the first). The study's numbers are means over these seeds.
    """
    import timm

    from .adaptformer import AdaptFormer

    info = demo_info()
    models = info["models"]
    if str(source_r) not in models:
        raise ValueError(f"the demo ships models fine-tuned at source r in {sorted(int(k) for k in models)}; "
                         f"got source_r={source_r!r}")
    entries = {e["seed"]: e for e in models[str(source_r)]}
    if seed is None:
        seed = info["seeds"][0]
    if seed not in entries:
        raise ValueError(f"the demo ships fine-tuning seeds {sorted(entries)}; got seed={seed!r}")
    entry = entries[seed]
    backbone = _load(DEMO_DIR / info["backbone"])
    down = _load(DEMO_DIR / entry["file"])
    head = {k[len("head."):]: v for k, v in down.items() if k.startswith("head.")}
    adapters = {k[len("adapters."):]: v for k, v in down.items() if k.startswith("adapters.")}
    model = timm.create_model(info["model"], pretrained=False, num_classes=int(head["weight"].shape[0]),
                              **info["model_kwargs"])
    state = {k: v for k, v in backbone.items() if not k.startswith("head.")}
    state.update({f"head.{k}": v for k, v in head.items()})
    model.load_state_dict(state)
    af = AdaptFormer.for_model(model, bottleneck=entry["adapter_bottleneck"], scale=entry["adapter_scale"])
    af.load_state_dict(adapters)
    af.attach(model)
    model.eval()
    return model, {**info, "source_r": int(source_r), "seed": seed, "adapters": af}
