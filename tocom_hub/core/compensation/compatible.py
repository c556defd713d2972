"""Which bank can serve which model: :func:`check_compatible` (shapes, method, token mode, dtypes, devices,
finite factors, the backbone the bank was trained for). Pure checks, no side effects; :mod:`.api` runs them
before it changes anything.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..bank.module import ToComBank, model_dims
from ..checks import token_mode
from ..families import find_family
from ..patch import get_method, get_settings

__all__ = ["check_compatible", "bank_mode", "model_architecture", "proj_weight"]


def model_architecture(model: nn.Module) -> Optional[str]:
    """timm's architecture name of ``model`` (``model.pretrained_cfg["architecture"]``), if it has one."""
    cfg = getattr(model, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else getattr(cfg, "architecture", None)
    return arch if isinstance(arch, str) and arch else None


def proj_weight(model: nn.Module) -> torch.Tensor:
    """The first block's attention ``proj`` weight, where the model's family says it is."""
    family = find_family(model)
    return family.qv(family.model_blocks(model)[0])["proj"][0].weight


def check_compatible(model: nn.Module, bank: ToComBank, method: Optional[str], ignore_base_model: bool) -> None:
    """Raise if ``bank`` cannot serve ``model`` (no side effects)."""
    dims = model_dims(model)
    cfg = bank.config
    trained_for = f" ({cfg.base_model_id})" if cfg.base_model_id else ""
    arch = model_architecture(model)
    model_name = arch or type(model).__name__
    for key, want, have in (
        ("embed_dim", cfg.embed_dim, dims["embed_dim"]),
        ("depth", cfg.depth, dims["depth"]),
        ("num_heads", cfg.num_heads, dims["num_heads"]),
        ("attention width", cfg.qkv_dim, dims["attn_dim"]),
    ):
        if want != have:
            raise ValueError(
                f"bank was trained for {key} {want}{trained_for}, model {model_name} has {have}: "
                f"pick a bank for this backbone or train one (ToComBank.for_model(model))"
            )
    if method is not None and method != cfg.method:
        raise ValueError(
            f"bank was trained for method {cfg.method!r}{trained_for}, but method={method!r} was requested: "
            f"pick a bank trained for {method!r}, or leave method=None to use the bank's"
        )
    patched_method = get_method(model)
    if patched_method is not None and patched_method != cfg.method:
        raise ValueError(
            f"model is patched for {patched_method!r} but the bank was trained for {cfg.method!r}: call "
            f"tocom_hub.patch(model, method={cfg.method!r}) first or pick a bank for {patched_method!r}"
        )
    settings = get_settings(model)
    if settings is not None and token_mode(settings["dense"], settings["dense_ratio"]) != bank_mode(bank):
        raise ValueError(
            f"model is patched in {token_mode(settings['dense'], settings['dense_ratio'])} mode but the bank was "
            f"trained in {bank_mode(bank)} mode: a bank fits only the token reduction it was trained with; call "
            f"tocom_hub.patch(model, method={cfg.method!r}, dense={cfg.dense}"
            + (f", dense_ratio={cfg.dense_ratio}" if cfg.dense else "")
            + ") first or pick a bank trained in this mode"
        )
    for t in cfg.targets:
        if tuple(bank.lora_B[t].shape) != (cfg.depth, cfg.target_shape(t)[0], cfg.r_max * cfg.rank) or tuple(
            bank.lora_A[t].shape
        ) != (cfg.depth, cfg.r_max * cfg.rank, cfg.target_shape(t)[1]):
            raise ValueError(f"bank tensors for target {t!r} do not match its config; rebuild the bank")
    weight = proj_weight(model)
    if not weight.dtype.is_floating_point:
        raise TypeError(f"model weights are {weight.dtype}; ToCom needs floating point weights")
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise ValueError(
            f"model {model_name} has parameters on the meta device ({meta[0]}, {len(meta)} in all): they hold no "
            f"values to compensate. Materialise and load the weights first (model.to_empty(device=...) + "
            f"load_state_dict), then apply the bank"
        )
    for name, p in bank.named_parameters():
        if not p.dtype.is_floating_point:
            raise TypeError(f"bank tensor {name} is {p.dtype}; a ToCom bank holds floating point factors")
        if p.device.type == "meta":
            raise ValueError(f"bank tensor {name} is on the meta device (no values); load the bank's weights first")
        if not bool(torch.isfinite(p.detach()).all()):
            raise ValueError(
                f"bank tensor {name} contains NaN or inf: merging it would make the model's outputs "
                f"non-finite. Check how the bank was trained or edited (nothing was changed)"
            )
    bank_arch = cfg.base_model.split(".", 1)[0] if cfg.base_model else None  # "arch" of an "arch.tag" name
    if not ignore_base_model and arch is not None and bank_arch is not None and arch.split(".", 1)[0] != bank_arch:
        raise ValueError(
            f"bank was trained for {cfg.base_model_id}, but the model is {arch} (model.pretrained_cfg); "
            f"a bank fits only the backbone it was trained on, even when the shapes agree: pick a bank "
            f"for {arch}, or pass ignore_base_model=True if this model really is a {cfg.base_model}"
        )


def bank_mode(bank: ToComBank) -> str:
    """The token mode ``bank`` was trained in (``"regular"`` / ``"dense (k = 32·r)"``)."""
    return token_mode(bank.dense, bank.dense_ratio)
