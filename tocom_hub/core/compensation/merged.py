"""The bank merged into the weights (``merge=True``, inference): :class:`MergedCompensation`.

The update ``s · (±Σ B_i A_i)`` (paper Eq. 6/7) is written into the fused ``attn.qkv`` (and/or ``attn.proj``)
weight rows in place, so the forward is the plain ToMe/EViT forward. The rows without the update are kept (a
"pristine" copy). A switch adds only the change of the update (one in-place ``addmm_`` per (block, target)
on fp32 factors pre-arranged per block), and the weights are re-derived exactly as ``W₀ + Δ(source →
target)`` from the pristine rows whenever the target returns to the source and at least every
``resync_every`` switches: no drift however many switches, and :meth:`_detach` restores the weights
bit-exact.

The bank follows the weights: after every write the fingerprint of the rows (:func:`fingerprint`, exact
integer sums of their bits) is kept; before the next switch or ``remove`` rows that no longer match it
(training steps, ``load_state_dict``, edits through ``.data``) are re-based, ``pristine ← current − Δ(written)``,
so every switch and ``remove`` changes them by exactly the bank's signed delta relative to the current
weights, never back to a stale copy (docs/compensation.md). What cannot be followed (meta tensors, another
shape) is refused with ``RuntimeError`` before anything changes.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..bank.config import FORMAT_VERSION
from ..bank.file import tensors_sha256
from ..bank.module import ToComBank, signed_group_slice
from .base import Compensation
from .locks import switch_lock
from .marker import MarkerHooks, describe

__all__ = ["MergedCompensation"]


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(rows: torch.Tensor) -> torch.Tensor:
    """Exact integer row and column sums of the bit patterns of ``rows`` (``[d_out + d_in]`` int64): equal for
    equal bits on any device, different after any change that does not cancel in both sums at once."""
    bits = rows.view(_INT_VIEW[rows.element_size()]).to(torch.int64)
    return torch.cat([bits.sum(dim=1), bits.sum(dim=0)])


class _Slot:
    """One (block, target) weight matrix of a merged bank: where it lives, its rows without the bank
    (``pristine``) and the fingerprint of the rows as last written (to see whether anyone changed them)."""

    __slots__ = (
        "block",
        "target",
        "module",
        "start",
        "stop",
        "ptr",
        "view",
        "pristine",
        "up",
        "down",
        "fp",
        "fp_dtype",
    )

    def __init__(self, block: int, target: str, module: nn.Linear, start: int, stop: int) -> None:
        self.block, self.target, self.module, self.start, self.stop = block, target, module, start, stop
        self.ptr = -1
        self.view: Optional[torch.Tensor] = None
        self.pristine: Optional[torch.Tensor] = None
        self.up: Optional[torch.Tensor] = None
        self.down: Optional[torch.Tensor] = None
        self.fp: Optional[torch.Tensor] = None  # fingerprint of the rows as we last wrote them
        self.fp_dtype: Optional[torch.dtype] = None  # ... and their dtype then

    def current_view(self) -> torch.Tensor:
        """The weight rows this slot writes, re-bound if the module's weight was replaced (``.to``,
        ``.half()``, …); the factor snapshot follows the weight's device."""
        w = self.module.weight
        if w.device.type == "meta" or not w.dtype.is_floating_point:
            raise RuntimeError(
                f"block {self.block} {self.target}: the weight is now {w.dtype} on {w.device}, so the merged ToCom "
                f"bank cannot be taken out of it or moved; load real floating point weights (nothing was changed)"
            )
        if w.dim() != 2 or w.shape[0] < self.stop or w.shape[1] != self.down.shape[1]:
            raise RuntimeError(
                f"block {self.block} {self.target}: the weight was replaced by one of shape {tuple(w.shape)}; the "
                f"merged ToCom bank cannot follow it (nothing was changed)"
            )
        if w.data_ptr() != self.ptr or self.view is None:
            self.view = w.detach()[self.start : self.stop]
            self.ptr = w.data_ptr()
            if self.up.device != w.device:
                self.up, self.down = self.up.to(w.device), self.down.to(w.device)
        return self.view


class MergedCompensation(Compensation):
    """The bank's update lives in the model's weights; the original rows are kept to restore them.

    ``resync_every``: at most this many in-place difference updates between two exact re-derivations
    (see :data:`tocom_hub.core.compensation.api.RESYNC_EVERY`).
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
        self._model: Optional[nn.Module] = model  # only until _attach has registered the marker hooks
        self._hooks = MarkerHooks(self)
        self._reload = False
        config = dataclasses.replace(bank.config, format_version=FORMAT_VERSION)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in bank.state_dict().items()}
        self._bank_sha256 = tensors_sha256(tensors, json.dumps(config.to_dict(), sort_keys=True))

    # -- lifecycle -----------------------------------------------------------------------------------
    def _attach(self) -> None:
        self._snapshot()
        self._write_exact(self.source_r, self.target_r)
        self._hooks.register(self._model)
        self._model = None

    @torch.no_grad()
    def _detach(self) -> None:
        self._follow()
        for slot in self._slots:
            slot.view.copy_(slot.pristine)
        self._slots, self._written = [], None
        self._hooks.remove()

    # -- the state_dict marker (core/compensation/marker.py) ------------------------------------------------------
    def _facts(self, m: int, n: int) -> Dict[str, Any]:
        cfg = self.bank.config
        return dict(
            bank_sha256=self._bank_sha256,
            source_r=m,
            target_r=n,
            scale=self.scale,
            method=cfg.method,
            targets=list(cfg.targets),
            r_max=cfg.r_max,
            rank=cfg.rank,
            base_model=cfg.base_model_id,
        )

    def _marker_facts(self) -> Optional[Dict[str, Any]]:
        """What the weights hold, for the state_dict entry; ``None`` when they hold no update."""
        if self._written is None or self._written[0] == self._written[1] or self.scale == 0.0:
            return None
        return self._facts(*self._written)

    def _on_load(self, facts: Dict[str, Any]) -> None:
        """A state dict that says its weights hold ``facts`` is about to be loaded (before anything is)."""
        m, n = facts["source_r"], facts["target_r"]
        r_max = self.bank.r_max
        ours = self._facts(self.source_r, self.target_r)
        if (
            facts["bank_sha256"] != self._bank_sha256
            or float(facts["scale"]) != self.scale
            or not (0 <= m <= r_max and 0 <= n <= r_max)
        ):
            raise ValueError(
                f"refusing to load: the state_dict's weights hold {describe(facts)}, this model carries "
                f"{describe(ours)}; applying one on top of the other would be wrong. Load it into a model with "
                f"that bank applied, or read it with tocom_hub.core.compensation.marker.read_marker "
                f"(nothing was loaded)"
            )
        self._written, self._reload = (m, n), True

    def _after_load(self, model: nn.Module) -> None:
        """After a marked state dict was loaded: re-base on it and move to this model's own pair."""
        if not self._reload:
            return
        self._reload = False
        with switch_lock(model):
            if self.enabled:
                self._write(self.source_r, self.target_r)
            else:
                self._write_exact(0, 0)

    def _switch(self, m: int, n: int, exact: bool = False) -> None:
        if self.enabled:
            (self._write_exact if exact else self._write)(m, n)
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
                slot.up = self.bank.lora_B[t][b].detach().to(device=w.device, dtype=torch.float32, copy=True)
                slot.down = self.bank.lora_A[t][b].detach().to(device=w.device, dtype=torch.float32, copy=True)
                slot.pristine = slot.current_view().clone()
                slots.append(slot)
        self._slots = slots

    def _applied(self, slot: _Slot, rows: torch.Tensor, sign: float) -> torch.Tensor:
        """``rows + sign · Δ(written)`` in fp32 (the rows with the update the weights hold added or taken out)."""
        m, n = self._written if self._written is not None else (0, 0)
        sl, s = signed_group_slice(m, n, self._rank)
        if sl.start == sl.stop or self.scale == 0.0:
            return rows.float()
        return torch.addmm(rows.float(), slot.up[:, sl], slot.down[sl], alpha=sign * s * self.scale)

    def _unchanged(self, slot: _Slot, view: torch.Tensor) -> bool:
        """Whether ``view`` still holds what we last wrote (bit for bit, or converted to another dtype)."""
        if view.dtype == slot.fp_dtype:
            return torch.equal(fingerprint(view), slot.fp.to(view.device))
        pristine = slot.pristine.to(view.device)
        expected = self._applied(slot, pristine, 1.0)
        tol = torch.finfo(view.dtype).eps * expected.abs().max().item() + 1e-6 * pristine.float().abs().max().item()
        return (view.float() - expected).abs().max().item() <= tol

    def _stamp(self) -> None:
        """Record the fingerprints of the rows just written."""
        for slot in self._slots:
            slot.fp, slot.fp_dtype = fingerprint(slot.view), slot.view.dtype

    @torch.no_grad()
    def _follow(self) -> bool:
        """Re-base on the current weights; ``True`` if anyone changed them since our last write.

        Rows whose bits still match the fingerprint of our last write keep their pristine copy (so switches and
        :meth:`_detach` stay bit-exact). Rows someone changed (training steps, ``load_state_dict``, in-place
        edits) get ``pristine ← current − Δ(written)`` (fp32, rounded once): the bank's update stays exactly
        the signed difference relative to whatever the weights are now. A weight replaced by one of another
        dtype (``.half()``) is a conversion when it equals our last write converted (within that dtype's
        rounding); the pristine rows then stay as they are. Refuses (``RuntimeError``, nothing changed) what
        cannot be followed: meta tensors, other shapes, non-floating dtypes."""
        views = [slot.current_view() for slot in self._slots]  # raises before anything changes
        changed = False
        for slot, view in zip(self._slots, views):
            if slot.fp is None:
                continue
            same = self._unchanged(slot, view)
            if slot.pristine.device != view.device:
                slot.pristine = slot.pristine.to(view.device)
            if not same:
                slot.pristine = self._applied(slot, view, -1.0).to(view.dtype)
                changed = True
        return changed

    @torch.no_grad()
    def _write_exact(self, m: int, n: int) -> None:
        """Weights ← W₀ + Δ(m → n), derived from the pristine rows (exact: the closed form itself)."""
        self._follow()
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
        self._stamp()

    @torch.no_grad()
    def _write(self, m: int, n: int) -> None:
        """Move the weights to W₀ + Δ(m → n) as cheaply as the no-drift guarantee allows.

        With the same source and fp32 weights, only the change ``Δ(n_old → n)`` is added (one
        in-place ``addmm_`` per slot over ``|n - n_old|·h`` inner dims). Each such step rounds once,
        so the weights are re-derived exactly from the pristine rows whenever the target returns to
        the source (a plain copy, cheaper than any update) and after ``resync_every`` inexact steps:
        the distance to the closed form stays within a few ulps however many switches happen.
        """
        moved = self._follow()  # someone changed the weights: the update is re-based on them
        if moved:
            self._stamp()
        cur = self._written
        if cur == (m, n):
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
        self._stamp()
