"""Independent references for the ToCom bank tests: per-group factors kept in plain Python lists and
the paper's formula evaluated with a naive loop in float64."""

from __future__ import annotations

import hashlib
from typing import Dict, List, Tuple

import torch

from tocom_hub.core.bank.module import ToComBank

QKV_ROW = {"q": 0, "k": 1, "v": 2}

Groups = Dict[str, List[List[Tuple[torch.Tensor, torch.Tensor]]]]  # groups[t][block][i] = (up_i, down_i)


def random_groups(bank: ToComBank, seed: int = 0, std: float = 0.3) -> Groups:
    """Random per-group factors ``up_i [d_out, h]`` (``lora_B``), ``down_i [h, d_in]`` (``lora_A``), written into
    ``bank`` through its documented layout (group ``i`` = inner slice ``[i·h, (i+1)·h)``), and returned."""
    g = torch.Generator().manual_seed(seed)
    cfg = bank.config
    h = cfg.rank
    groups: Groups = {}
    with torch.no_grad():
        for t in cfg.targets:
            d_out, d_in = cfg.target_shape(t)
            groups[t] = []
            for b in range(cfg.depth):
                per_block = []
                for i in range(cfg.r_max):
                    up = torch.randn(d_out, h, generator=g) * std
                    down = torch.randn(h, d_in, generator=g) * std
                    bank.lora_B[t][b, :, i * h : (i + 1) * h] = up
                    bank.lora_A[t][b, i * h : (i + 1) * h, :] = down
                    per_block.append((up, down))
                groups[t].append(per_block)
    return groups


def naive_delta(groups: Groups, t: str, b: int, m: int, n: int, s: float) -> torch.Tensor:
    """``s · Σ_{i=m}^{n-1} up_i down_i`` (n > m) or ``-s · Σ_{i=n}^{m-1} up_i down_i`` (n < m), float64."""
    d_out, d_in = groups[t][b][0][0].shape[0], groups[t][b][0][1].shape[1]
    total = torch.zeros(d_out, d_in, dtype=torch.float64)
    if n > m:
        for i in range(m, n):
            up, down = groups[t][b][i]
            total += s * (up.double() @ down.double())
    else:
        for i in range(n, m):
            up, down = groups[t][b][i]
            total -= s * (up.double() @ down.double())
    return total


def weight_rows(model: torch.nn.Module, b: int, t: str) -> torch.Tensor:
    attn = model.blocks[b].attn
    if t == "proj":
        return attn.proj.weight.detach()
    d = attn.qkv.out_features // 3
    i = QKV_ROW[t]
    return attn.qkv.weight.detach()[i * d : (i + 1) * d]


def closed_form(
    original: Dict[str, torch.Tensor], groups: Groups, t: str, b: int, m: int, n: int, s: float
) -> torch.Tensor:
    """W₀ + Δ(m → n) in float64 from a saved ``state_dict`` of the untouched model."""
    if t == "proj":
        w0 = original[f"blocks.{b}.attn.proj.weight"]
    else:
        full = original[f"blocks.{b}.attn.qkv.weight"]
        d = full.shape[0] // 3
        w0 = full[QKV_ROW[t] * d : (QKV_ROW[t] + 1) * d]
    return w0.double() + naive_delta(groups, t, b, m, n, s)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a − ref| / max |ref|."""
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def state_hash(model: torch.nn.Module) -> str:
    """SHA-256 over every state_dict tensor (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        v = v.detach().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def clone_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
