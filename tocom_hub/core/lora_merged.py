"""The bank merged into the weights (``merge=True``, inference): :class:`MergedCompensation`.

The update ``s · (±Σ B_i A_i)`` (paper Eq. 6/7) is written into the fused ``attn.qkv`` (and/or ``attn.proj``)
weight rows in place, so the forward is the plain ToMe/EViT forward. The original rows are kept (a
"pristine" copy). A switch adds only the change of the update (one in-place ``addmm_`` per (block, target)
on fp32 factors pre-arranged per block), and the weights are re-derived exactly as ``W₀ + Δ(source →
target)`` from the pristine rows whenever the target returns to the source and at least every
``resync_every`` switches: no drift however many switches, and :meth:`_detach` restores the weights
bit-exact.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .bank import ToComBank, signed_group_slice
from .compensation import Compensation

__all__ = ["MergedCompensation"]


class _Slot:
    """One (block, target) weight matrix of a merged bank: where it lives and what it started as."""

    __slots__ = ("block", "target", "module", "start", "stop", "ptr", "view", "pristine", "up", "down")

    def __init__(self, block: int, target: str, module: nn.Linear, start: int, stop: int) -> None:
        self.block, self.target, self.module, self.start, self.stop = block, target, module, start, stop
        self.ptr = -1
        self.view: Optional[torch.Tensor] = None
        self.pristine: Optional[torch.Tensor] = None
        self.up: Optional[torch.Tensor] = None
        self.down: Optional[torch.Tensor] = None

    def current_view(self) -> torch.Tensor:
        """The weight rows this slot writes, re-bound if the module's weight was replaced (``.to``,
        ``.half()``, …); the factor snapshot follows the weight's device."""
        w = self.module.weight
        if w.data_ptr() != self.ptr or self.view is None:
            self.view = w.detach()[self.start : self.stop]
            self.ptr = w.data_ptr()
            if self.up.device != w.device:
                self.up, self.down = self.up.to(w.device), self.down.to(w.device)
                self.pristine = self.pristine.to(w.device)
        return self.view


class MergedCompensation(Compensation):
    """The bank's update lives in the model's weights; the original rows are kept to restore them.

    ``resync_every``: at most this many in-place difference updates between two exact re-derivations
    (see :data:`tocom_hub.core.compensate.RESYNC_EVERY`).
    """

    merge = True

    def __init__(
        self,
        model: nn.Module,
        bank: ToComBank,
        source_r: int,
        target_r: int,
        scale: float,
        patched_here: bool,
        *,
        resync_every: int,
    ) -> None:
        super().__init__(model, bank, source_r, target_r, scale, patched_here)
        self.resync_every = resync_every
        self._slots: List[_Slot] = []
        self._written: Optional[Tuple[int, int]] = None  # (m, n) the merged weights hold
        self._inexact = 0  # in-place difference updates since the last exact write

    # -- lifecycle -----------------------------------------------------------------------------------
    def _attach(self) -> None:
        self._snapshot()
        self._write_exact(self.source_r, self.target_r)

    @torch.no_grad()
    def _detach(self) -> None:
        for slot in self._slots:
            slot.current_view().copy_(slot.pristine)
        self._slots, self._written = [], None

    def _switch(self, m: int, n: int) -> None:
        if self.enabled:
            self._write(m, n)
        self.source_r, self.target_r = m, n

    def _set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            self._write(self.source_r, self.target_r)
        else:
            self._write_exact(0, 0)

    # -- the arithmetic ------------------------------------------------------------------------------
    def _snapshot(self) -> None:
        """Copy the pristine rows and an fp32 snapshot of the factors (allocations only, no writes)."""
        slots = []
        for b, module, entries in self._layout:
            w = module.weight.detach()
            for t, start, stop in entries:
                slot = _Slot(b, t, module, start, stop)
                slot.pristine = w[start:stop].clone()
                slot.up = self.bank.lora_B[t][b].detach().to(device=w.device, dtype=torch.float32, copy=True)
                slot.down = self.bank.lora_A[t][b].detach().to(device=w.device, dtype=torch.float32, copy=True)
                slot.current_view()
                slots.append(slot)
        self._slots = slots

    def _bind_all(self) -> bool:
        """Re-bind every slot to its module's current weight; ``True`` if any weight was replaced."""
        moved = False
        for slot in self._slots:
            ptr = slot.ptr
            slot.current_view()
            moved |= slot.ptr != ptr
        return moved

    @torch.no_grad()
    def _write_exact(self, m: int, n: int) -> None:
        """Weights ← W₀ + Δ(m → n), derived from the pristine rows (exact: the closed form itself)."""
        self._bind_all()
        sl, sign = signed_group_slice(m, n, self._rank)
        alpha = sign * self.scale
        for slot in self._slots:
            view = slot.view
            if sl.start == sl.stop or alpha == 0.0:
                view.copy_(slot.pristine)
            elif view.dtype == torch.float32 and slot.pristine.dtype == torch.float32:
                torch.addmm(slot.pristine, slot.up[:, sl], slot.down[sl], alpha=alpha, out=view)
            else:  # fp16 / bf16 model: accumulate in fp32, round once
                view.copy_(torch.addmm(slot.pristine.float(), slot.up[:, sl], slot.down[sl], alpha=alpha))
        self._written, self._inexact = (m, n), 0

    @torch.no_grad()
    def _write(self, m: int, n: int) -> None:
        """Move the weights to W₀ + Δ(m → n) as cheaply as the no-drift guarantee allows.

        With the same source and fp32 weights, only the change ``Δ(n_old → n)`` is added (one
        in-place ``addmm_`` per slot over ``|n - n_old|·h`` inner dims). Each such step rounds once,
        so the weights are re-derived exactly from the pristine rows whenever the target returns to
        the source (a plain copy, cheaper than any update) and after ``resync_every`` inexact steps:
        the distance to the closed form stays within a few ulps however many switches happen.
        """
        moved = self._bind_all()
        cur = self._written
        if cur == (m, n) and not moved:
            return
        if cur is not None and cur[0] == cur[1]:
            cur = (m, m)  # the weights are W₀, i.e. Δ(m → m) for any m
        if (
            moved
            or cur is None
            or m != cur[0]
            or n == m
            or self._inexact >= self.resync_every
            or not self._slots
            or self._slots[0].view.dtype != torch.float32
        ):
            self._write_exact(m, n)
            return
        sl, sign = signed_group_slice(cur[1], n, self._rank)
        for slot in self._slots:
            slot.view.addmm_(slot.up[:, sl], slot.down[sl], alpha=sign * self.scale)
        self._written, self._inexact = (m, n), self._inexact + 1
