"""Convert a checkpoint in the official ToCom layout into a :class:`~tocom_hub.ToComBank`.

The official layout (the ToCom authors' implementation; no checkpoint in it was ever published) is a
pickled ``.pth`` state dict with, for every block ``i`` and adapted matrix ``t`` (``q``, ``v``), one
adapter of inner dim ``R·h``::

    blocks.{i}.attn.{t}_tocom.adapter_down.weight   [R·h, d_in]
    blocks.{i}.attn.{t}_tocom.adapter_up.weight     [d_out, R·h]

where the group for step ``g → g+1`` occupies inner rows/cols ``[R·h − h(g+1), R·h − h·g)`` (the last
group first). ``adapter_down`` becomes the bank's ``lora_A`` and ``adapter_up`` its ``lora_B`` (peft's
names); our bank stores group ``g`` at ``[g·h, (g+1)·h)``, so conversion is a permutation of
the inner dimension; the products — and the model outputs — are unchanged. The file is read with
``torch.load(weights_only=True)``: no arbitrary code runs.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Dict, Optional, Union

import torch

from ..core.bank.module import ToComBank, ToComConfig

__all__ = ["convert_official", "official_group_slice"]

_KEY = re.compile(r"^(?:.*\.)?blocks\.(\d+)\.attn\.(q|k|v|proj)_tocom\.adapter_(down|up)\.weight$")


def official_group_slice(g: int, r_max: int, rank: int) -> slice:
    """Inner-dim slice of the official adapter that holds the group for step ``g → g+1``."""
    total = r_max * rank
    return slice(total - rank * (g + 1), total - rank * g)


def _unwrap(obj: Any, path: str) -> Dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    if not any(isinstance(k, str) and "_tocom." in k for k in obj):
        for key in ("model", "state_dict", "module", "model_ema"):
            if isinstance(obj.get(key), dict):
                return _unwrap(obj[key], path)
    return {k: v for k, v in obj.items() if isinstance(k, str)}


def convert_official(
    path: Union[str, os.PathLike],
    *,
    r_max: int = 16,
    num_heads: Optional[int] = None,
    scale: float = 0.1,
    method: str = "tome",
    base_model: Optional[str] = None,
    pretrained_tag: Optional[str] = None,
) -> ToComBank:
    """Read an official ToCom checkpoint (``.pth``, official layout) into a :class:`ToComBank`.

    ``rank`` comes from the adapter width (``R·h`` with ``R = r_max``), ``embed_dim`` / ``depth`` /
    targets from the tensors; ``num_heads`` cannot be read from the file and defaults to
    ``attn_dim // 64`` (every timm ViT-S/B/L has 64-wide heads). Checkpoints that wrap the state dict
    (``{"model": …}``) or prefix its keys (``module.``) are accepted. Example::

        bank = tocom_hub.convert_official("tocom_deit_base.pth", num_heads=12)
        bank.save_pretrained("tocom-deit-base")
        tocom_hub.apply(model, 0, 16, bank=bank)
    """
    path = os.fspath(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(
            f"{path}: cannot read it as a weights-only torch checkpoint ({type(e).__name__}: {e})"
        ) from None
    state = _unwrap(obj, path)

    found: Dict[str, Dict[int, Dict[str, torch.Tensor]]] = {}
    for key, value in state.items():
        m = _KEY.match(key)
        if m is None:
            if "_tocom." in key:
                raise ValueError(f"{path}: unexpected ToCom tensor {key!r} (only adapter_down/up weights are known)")
            continue
        if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.dtype.is_floating_point:
            raise ValueError(f"{path}: {key} must be a 2-d floating point tensor")
        block, target, kind = int(m.group(1)), m.group(2), m.group(3)
        found.setdefault(target, {}).setdefault(block, {})[kind] = value
    if not found:
        raise ValueError(f"{path}: no 'blocks.{{i}}.attn.{{q,v}}_tocom.adapter_{{down,up}}.weight' tensors found")

    targets = tuple(t for t in ("q", "k", "v", "proj") if t in found)
    depth = max(max(blocks) for blocks in found.values()) + 1
    inner = None
    shapes = {}
    for t in targets:
        for b in range(depth):
            pair = found[t].get(b, {})
            if set(pair) != {"down", "up"}:
                raise ValueError(f"{path}: block {b} target {t!r} lacks adapter_{'up' if 'down' in pair else 'down'}")
            down, up = pair["down"], pair["up"]
            if down.shape[0] != up.shape[1]:
                raise ValueError(
                    f"{path}: block {b} {t}: adapter_down {tuple(down.shape)} and adapter_up "
                    f"{tuple(up.shape)} disagree on the inner dim"
                )
            inner = down.shape[0] if inner is None else inner
            if down.shape[0] != inner:
                raise ValueError(f"{path}: inner dims differ between blocks ({inner} vs {down.shape[0]})")
            shape = (up.shape[0], down.shape[1])
            if shapes.setdefault(t, shape) != shape:
                raise ValueError(f"{path}: {t} shapes differ between blocks ({shapes[t]} vs {shape})")
    if inner % r_max:
        raise ValueError(f"{path}: adapter inner dim {inner} is not a multiple of r_max={r_max}; pass the right r_max")
    rank = inner // r_max

    proj_only = targets == ("proj",)
    embed_dim = shapes[targets[0]][0] if proj_only else shapes[targets[0]][1]
    attn_dim = shapes[targets[0]][1] if proj_only else shapes[targets[0]][0]
    if num_heads is None:
        if attn_dim % 64:
            raise ValueError(f"{path}: cannot guess num_heads for width {attn_dim}; pass num_heads=")
        num_heads = attn_dim // 64
        warnings.warn(
            f"convert_official: assuming num_heads={num_heads} (64-wide heads); pass num_heads= to be explicit",
            stacklevel=2,
        )
    config = ToComConfig(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        r_max=r_max,
        rank=rank,
        targets=targets,
        scale=scale,
        method=method,
        attn_dim=attn_dim if attn_dim != embed_dim else None,
        base_model=base_model,
        pretrained_tag=pretrained_tag,
    )
    for t in targets:
        if shapes[t] != config.target_shape(t):
            raise ValueError(f"{path}: {t} adapter is {shapes[t]} (out, in), expected {config.target_shape(t)}")

    # our inner index g·h + c  <-  official index (R-1-g)·h + c
    perm = torch.tensor([(r_max - 1 - g) * rank + c for g in range(r_max) for c in range(rank)])
    dtype = next(iter(found[targets[0]][0].values())).dtype
    bank = ToComBank(config, dtype=dtype)
    with torch.no_grad():
        for t in targets:
            bank.lora_A[t].copy_(torch.stack([found[t][b]["down"][perm, :] for b in range(depth)]))
            bank.lora_B[t].copy_(torch.stack([found[t][b]["up"][:, perm] for b in range(depth)]))
    return bank
