"""The bank in the forward (``merge=False``, training): :class:`HookedCompensation`.

Each adapted ``nn.Linear`` (``attn.qkv``, separate ``q_proj`` / ``v_proj``, ``attn.proj``, a parallel
block's ``in_proj``) gets its class swapped for a thin subclass (``ToComLinear``) whose ``forward`` adds
``s · ((x Aᵀ) ⊙ c) Bᵀ`` to the q/k/v output rows, where ``c`` is a ``±1/0`` mask over the ``R·h`` inner dims:
paper Eq. 6/7 as one adapter whose groups are switched on (sign ±1) or off. Every bank parameter takes part in
every forward (inactive groups get zero gradient, which keeps DDP happy), the backbone weights and
``state_dict`` keys are never touched, and a switch of ``(source, target)`` is O(1) (it picks a precomputed
mask). :func:`~tocom_hub.remove` puts the original class back; hooks anyone registered on those Linears stay.

Why a class and not a forward hook: ``torch.compile`` does not guard on a module's hooks (dynamo's
``skip_nnmodule_hook_guards``), so a hook added after compiling, or on a second instance of a compiled model,
silently never ran in the compiled graph. A module's class is guarded, so the compiled forward recompiles
for the bank and traces its update (docs/compile.md). A family whose attention bypasses a Linear's forward
(EVA's fused ``qkv`` with q/v bias uses ``F.linear`` on the weight) routes it through the forward while the
bank is applied (``Family.unmerged_overrides``); one where nothing does refuses (``Family.unhookable``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..bank.module import ToComBank, signed_group_slice
from ..families import find_family
from .base import Compensation

__all__ = ["HookedCompensation", "check_hookable", "lora_linear_class"]


def _autocast_on(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # pragma: no cover - torch < 2.4 has no device_type argument (we support torch >= 2.1)
        return torch.is_autocast_enabled()


def _adapted_linears(model: nn.Module, targets):
    family = find_family(model)
    for b, blk in enumerate(family.model_blocks(model)):
        seen = set()
        where = family.qv(blk)
        for target in targets:
            module = where[target][0]
            if id(module) not in seen:
                seen.add(id(module))
                yield b, target, module


def check_hookable(model: nn.Module, targets=("q", "k", "v", "proj")) -> None:
    """``TypeError`` when the bank's update could not reach the model's forward in unmerged mode (its family
    says why, or a q/v Linear is not an ``nn.Linear`` / carries its own ``forward``)."""
    family = find_family(model)
    name = type(model).__name__
    for b, blk in enumerate(family.model_blocks(model)):
        why = family.unhookable(blk)
        if why:
            raise TypeError(f"{name}: the bank's unmerged mode cannot reach block {b}: {why}; use merge=True")
    for b, target, module in _adapted_linears(model, targets):
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"{name}: block {b}'s {target} projection is a {type(module).__name__}, not a torch.nn.Linear; "
                f"the bank's unmerged mode adapts Linear layers only (use merge=True)"
            )
        if "forward" in module.__dict__:
            raise TypeError(
                f"{name}: block {b}'s {target} projection has its own `forward` attribute (e.g. accelerate's "
                f"hooks), which would bypass the bank's update in unmerged mode; remove it or use merge=True"
            )


class _LoRAPath:
    """The bank's update of one Linear's output rows (read by ``ToComLinear.forward``)."""

    def __init__(self, state: HookedCompensation, block: int, entries: List[Tuple[str, int, int]]) -> None:
        self.state, self.block, self.entries = state, block, entries

    def __call__(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        st = self.state
        if not st.enabled:
            return output
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
            c = coef.to(device=z.device, dtype=z.dtype)  # no copy unless the bank moved or autocast runs
            delta = F.linear(z * c, up)
            output[..., start:stop] += delta.to(output.dtype)
        return output


class _ToComLinear:
    """Mixin put in front of a Linear's class in unmerged mode: the Linear's output plus the bank's update."""

    _tocom_base: type
    _tocom_lora: _LoRAPath

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._tocom_lora(input, super().forward(input))

    def __reduce_ex__(self, protocol):  # pickle / deepcopy: rebuilt from the timm class, not the made one
        return _rebuild, (self._tocom_base,), self.__getstate__()


_CLASSES: Dict[type, type] = {}  # Linear class → its ToCom subclass, made once (one class per base: one guard)


def lora_linear_class(base: type) -> type:
    """The subclass of the Linear class ``base`` used in unmerged mode (``ToComLinear`` for ``nn.Linear``)."""
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"ToCom{base.__name__}", (_ToComLinear, base), {"_tocom_base": base, "__module__": __name__})
        _CLASSES[base] = cls
    return cls


def _rebuild(base: type) -> nn.Module:
    return object.__new__(lora_linear_class(base))


class HookedCompensation(Compensation):
    """The bank's update is computed in the forward, from the bank's own (trainable) parameters."""

    merge = False

    def __init__(
        self, model: nn.Module, bank: ToComBank, source_r: int, target_r: int, scale: float, patched_here: bool
    ) -> None:
        check_hookable(model, bank.targets)
        super().__init__(model, bank, source_r, target_r, scale, patched_here)
        family = find_family(model)
        self._overrides = [o for blk in family.model_blocks(model) for o in family.unmerged_overrides(blk)]
        self._swapped: List[nn.Module] = []
        self._saved: List[Tuple[nn.Module, str, Any]] = []
        self._coef_table: Optional[torch.Tensor] = None
        self.coef: Optional[torch.Tensor] = None

    def _attach(self) -> None:
        self._build_coef_table(next(iter(self.bank.parameters())).device)
        self.coef = self._coef_table[self.source_r, self.target_r]
        self._saved = [(obj, name, getattr(obj, name)) for obj, name, _ in self._overrides]
        for obj, name, value in self._overrides:
            setattr(obj, name, value)
        for b, module, entries in self._layout:
            module._tocom_lora = _LoRAPath(self, b, entries)
            module.__class__ = lora_linear_class(type(module))
            self._swapped.append(module)

    def _detach(self) -> None:
        for module in self._swapped:
            module.__class__ = module._tocom_base
            del module._tocom_lora
        for obj, name, value in self._saved:
            setattr(obj, name, value)
        self._swapped, self._saved = [], []
        self._coef_table = self.coef = None

    def _switch(self, m: int, n: int, exact: bool = False) -> None:
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
