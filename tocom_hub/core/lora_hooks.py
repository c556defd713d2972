"""The bank as forward hooks (``merge=False``, training): :class:`HookedCompensation`.

A forward hook on ``attn.qkv`` / ``attn.proj`` adds ``s · ((x Aᵀ) ⊙ c) Bᵀ`` to the q/k/v output slices,
where ``c`` is a ``±1/0`` mask over the ``R·h`` inner dims: paper Eq. 6/7 as one adapter whose groups
are switched on (sign ±1) or off. Every bank parameter takes part in every forward (inactive
groups get zero gradient, which keeps DDP happy), the backbone weights are never touched, and a switch of
``(source, target)`` is O(1) (it picks a precomputed mask). The hooks are removed through the
``RemovableHandle`` that ``register_forward_hook`` returned, so hooks of others on the same modules stay.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .bank import ToComBank, signed_group_slice
from .compensation import Compensation
from .families import find_family

__all__ = ["HookedCompensation", "check_hookable"]


def _autocast_on(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # pragma: no cover - torch < 2.4 has no device_type argument (we support torch >= 2.1)
        return torch.is_autocast_enabled()


def check_hookable(model: nn.Module) -> None:
    """``TypeError`` when forward hooks on the model's q/v Linears would never run (its family says why)."""
    family = find_family(model)
    for blk in model.blocks:
        why = family.unhookable(blk)
        if why:
            raise TypeError(f"{type(model).__name__}: the bank's unmerged mode needs forward hooks: {why}")


class _LoRAHook:
    """Forward hook of the unmerged mode: adds the masked LoRA path to a Linear's output slices."""

    def __init__(self, state: HookedCompensation, block: int, entries: List[Tuple[str, int, int]]) -> None:
        self.state, self.block, self.entries = state, block, entries

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        st = self.state
        if not st.enabled:
            return output
        x = args[0]
        bank = st.bank
        coef = st.coef
        for target, start, stop in self.entries:
            down = bank.lora_A[target][self.block]  # [R·h, d_in]
            up = bank.lora_B[target][self.block]  # [d_out, R·h]
            if down.device != x.device:
                raise RuntimeError(
                    f"ToCom bank is on {down.device} but the model runs on {x.device}; move the bank "
                    f"with bank.to({str(x.device)!r}) (it is not a submodule of the model)"
                )
            xin = x if x.dtype == down.dtype or _autocast_on(x) else x.to(down.dtype)
            z = F.linear(xin, down)
            if coef.device != z.device:  # the bank was moved after apply: move the mask table once
                st._coef_table = st._coef_table.to(z.device)
                st.coef = coef = st._coef_table[st.source_r, st.target_r]
            if coef.dtype != z.dtype:
                coef = coef.to(z.dtype)
            delta = F.linear(z * coef, up)
            output[..., start:stop] += delta.to(output.dtype)
        return output


class HookedCompensation(Compensation):
    """The bank's update is computed in the forward, from the bank's own (trainable) parameters."""

    merge = False

    def __init__(
        self, model: nn.Module, bank: ToComBank, source_r: int, target_r: int, scale: float, patched_here: bool
    ) -> None:
        check_hookable(model)
        super().__init__(model, bank, source_r, target_r, scale, patched_here)
        self._handles: List[RemovableHandle] = []
        self._coef_table: Optional[torch.Tensor] = None
        self.coef: Optional[torch.Tensor] = None

    def _attach(self) -> None:
        self._build_coef_table(next(iter(self.bank.parameters())).device)
        self.coef = self._coef_table[self.source_r, self.target_r]
        self._handles = [
            module.register_forward_hook(_LoRAHook(self, b, entries)) for b, module, entries in self._layout
        ]

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._coef_table = self.coef = None

    def _switch(self, m: int, n: int) -> None:
        self.coef = self._coef_table[m, n]
        self.source_r, self.target_r = m, n

    def _build_coef_table(self, device: torch.device) -> None:
        """``table[m, n]`` = the ``R·h`` inner-dim coefficients ``s·(±1/0)`` of the pair ``m → n``."""
        R, h = self.bank.r_max, self._rank
        table = torch.zeros(R + 1, R + 1, R * h, dtype=torch.float32)
        for m in range(R + 1):
            for n in range(R + 1):
                sl, sign = signed_group_slice(m, n, h)
                table[m, n, sl] = sign * self.scale
        self._coef_table = table.to(device)
