"""Plug a :class:`~tocom_hub.bank.ToComBank` into a patched timm ViT and switch compression degree.

A model fine-tuned at *source* ``r = m`` runs at *target* ``r = n`` with the bank's ``m → n`` update
on its attention weights (paper Eq. 6/7). Two modes share the same maths and the same bank:

* **merged** (``merge=True``, inference; :mod:`~tocom_hub.core.compensation.merged`): the update is written into
  the fused ``attn.qkv`` (and/or ``attn.proj``) weight rows in place, so the forward is the plain
  ToMe/EViT forward; a switch adds only the change of the update, the weights are re-derived exactly
  from a copy of the original rows at least every ``RESYNC_EVERY`` switches (no drift), and
  :func:`remove` restores them bit-exact. The copy follows the weights: rows changed in between (training
  steps, ``load_state_dict``) are re-based, so a switch or :func:`remove` changes the current weights by exactly
  the bank's signed delta (docs/compensation.md: training under a merged bank).
* **unmerged** (``merge=False``, training; :mod:`~tocom_hub.core.compensation.hooked`): the adapted Linears
  (``attn.qkv`` / ``attn.proj``, their class swapped) add the masked LoRA path in their forward (it compiles,
  docs/compile.md); every bank parameter takes part in every forward, the backbone weights are never
  touched, and :func:`set_pair` switches in O(1).

This module owns the public functions, the validation (everything is checked before anything is
mutated) and the switch lock. Switching is serialised per model: :func:`apply`, :func:`set_target_r`,
:func:`set_pair`, :func:`remove` and :func:`disabled` hold the model's switch lock (:func:`switch_lock`),
so concurrent switches from several threads always leave the weights at the closed form of the last
one. A forward is not locked: a forward that runs while another thread switches may compute some
blocks with the old and some with the new weights (and token count). Switch between batches in the
thread that runs the forwards, hold ``switch_lock(model)`` around the forward too, or give each worker
its own model copy.

A model carries at most one bank; :func:`apply` on a model that already carries one replaces it (the
weights are first restored from the pristine copy, so the result equals applying to a fresh model).
The bank stays a separate module: it is not registered as a submodule, so ``model.state_dict()``
and ``model.parameters()`` never contain it.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Optional, Union

from torch import nn

from ..bank.module import MAX_SCALE, ToComBank
from ..patch import get_r, is_patched, patch, set_r, unpatch
from ..rspec import BANK_RANGE, check_r
from .base import Compensation
from .compatible import check_compatible, proj_weight
from .hooked import HookedCompensation, check_hookable
from .locks import switch_lock
from .merged import MergedCompensation

__all__ = [
    "apply",
    "set_target_r",
    "set_pair",
    "remove",
    "get_compensation",
    "disabled",
    "switch_lock",
    "Compensation",
    "MAX_SCALE",
]

_ATTR = "_tocom_compensation"
# merged mode: at most this many in-place difference updates between two exact re-derivations. Each
# update rounds once (≤ ½ ulp), so the distance to the closed form stays ≤ RESYNC_EVERY · 2⁻²⁴ ≈ 4.8e-7
# of the largest weight (measured: 10,000 random switches, never back to the source: 2.8e-7 with 8,
# 3e-7 with 16, 3.5e-5 without re-derivation).
RESYNC_EVERY = 8

BankLike = Union[ToComBank, str, os.PathLike, None]


# ---------------------------------------------------------------------------------------------------
# public API


def get_compensation(model: nn.Module) -> Optional[Compensation]:
    """The :class:`Compensation` :func:`apply` attached to ``model``, or ``None``. Example::

    tocom_hub.apply(model, 0, 8, bank=bank)
    st = tocom_hub.compensate.get_compensation(model)
    print(st.source_r, st.target_r, st.scale, st.merge)
    """
    return model.__dict__.get(_ATTR)


def _require_state(model: nn.Module) -> Compensation:
    st = get_compensation(model)
    if st is None:
        raise ValueError(f"{type(model).__name__} carries no ToCom bank; call tocom_hub.apply(model, ...) first")
    return st


def _resolve_bank(bank: BankLike, trust_unverified: bool) -> ToComBank:
    """A bank object, or the local bank at a path (the core reads local files only; a Hub repo id or
    ``bank=None`` are resolved by ``tocom_hub.apply`` / ``tocom_hub.load_bank``)."""
    if isinstance(bank, ToComBank):
        if trust_unverified:
            raise TypeError("trust_unverified only applies when `bank` is a path to load")
        return bank
    if bank is None:
        raise TypeError(
            "tocom_hub.compensate.apply needs a bank (a ToComBank or a local path); tocom_hub.apply(model, "
            "source_r, target_r) looks one up in the registry and fetches Hub repo ids"
        )
    if not isinstance(bank, (str, os.PathLike)):
        raise TypeError(
            f"bank must be a ToComBank or a local directory / .safetensors file (tocom_hub.apply also takes a "
            f"Hub repo id or None); got {type(bank).__name__}"
        )
    return ToComBank.from_pretrained(bank, trust_unverified=trust_unverified)


def _check_scale(bank: ToComBank, scale: Optional[float]) -> float:
    s = bank.scale if scale is None else scale
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 <= s <= MAX_SCALE:
        raise ValueError(f"scale must be a finite number in [0, {MAX_SCALE:g}] (the paper uses 0.01 … 0.15); got {s!r}")
    return float(s)


def apply(
    model: nn.Module,
    source_r: int,
    target_r: int,
    bank: BankLike = None,
    *,
    scale: Optional[float] = None,
    method: Optional[str] = None,
    merge: bool = True,
    ignore_base_model: bool = False,
    trust_unverified: bool = False,
) -> nn.Module:
    """Run a model fine-tuned at ``r = source_r`` at ``r = target_r``, compensated by a ToCom bank.

    Patches the model if needed (with the bank's method), validates everything before mutating
    anything (bank vs model dims / depth / heads / method, ``0 <= r <= R``, ``target_r`` supported
    by the model's token count), then either merges ``s · (±Σ B_i A_i)`` into the fused ``qkv``
    weight rows (``merge=True``; computed in fp32, stored in the model's dtype) or installs the
    LoRA path in the forward (``merge=False``, for training). Sets the patcher's ``r = target_r``.

    Args:
        model: a timm ViT (patched or not).
        source_r / target_r: degrees the model was fine-tuned at / will run at, in ``[0, R]``.
        bank: a :class:`ToComBank` or a local directory / ``.safetensors`` file (``tocom_hub.apply``, the
            top-level function, also takes a Hub repo id or ``None``: the registry; it loads the bank with
            ``tocom_hub.load_bank`` and calls this function).
        scale: ``s``; ``None`` uses ``bank.config.scale``.
        method: ``"tome"`` / ``"evit"`` to insist on; ``None`` uses the bank's.
        merge: merged (inference) or unmerged (training) mode.
        ignore_base_model: apply even when the bank's config names another timm architecture than
            ``model.pretrained_cfg`` (by default that is refused; when either name is unknown, only
            the shapes are checked).
        trust_unverified: accept a bank file without checksum (when ``bank`` is a path).

    A model carries one bank: applying again replaces the current one (same result as applying to
    the untouched model). Merged mode keeps a copy of the original adapted rows (see
    :func:`remove`). Example::

        model = timm.create_model("deit_base_patch16_224", pretrained=True)
        tocom_hub.apply(model, source_r=0, target_r=16, bank="out/bank")
        tocom_hub.set_target_r(model, 8)
    """
    bank = _resolve_bank(bank, trust_unverified)
    with switch_lock(model):
        return _apply_locked(model, source_r, target_r, bank, scale, method, merge, ignore_base_model)


def _apply_locked(
    model: nn.Module,
    source_r: int,
    target_r: int,
    bank: ToComBank,
    scale: Optional[float],
    method: Optional[str],
    merge: bool,
    ignore_base_model: bool,
) -> nn.Module:
    check_compatible(model, bank, method, ignore_base_model)
    s = _check_scale(bank, scale)
    source_r = check_r(source_r, "source_r", r_max=bank.r_max, why=BANK_RANGE)
    target_r = check_r(target_r, "target_r", r_max=bank.r_max, why=BANK_RANGE)
    merge = bool(merge)
    if not merge:
        dev = next(iter(bank.parameters())).device
        wdev = proj_weight(model).device
        if dev != wdev:
            raise ValueError(
                f"unmerged mode computes with the bank's own parameters: bank is on {dev}, model on "
                f"{wdev}; move it first with bank.to({str(wdev)!r})"
            )

    if not merge:
        check_hookable(model, bank.targets)  # before anything changes
    old = get_compensation(model)
    was_patched = is_patched(model)
    if not was_patched:
        patch(model, method=bank.method, **(dict(dense=True, dense_ratio=bank.dense_ratio) if bank.dense else {}))
    try:
        set_r(model, target_r)  # raises before anything else changes when the model cannot take it
    except BaseException:
        if not was_patched:
            unpatch(model)
        raise
    patched_here = (not was_patched) or (old is not None and old.patched_here)

    if merge:
        state = MergedCompensation(model, bank, source_r, target_r, s, patched_here, resync_every=RESYNC_EVERY)
    else:
        state = HookedCompensation(model, bank, source_r, target_r, s, patched_here)
    if old is not None:
        old._detach()
        model.__dict__.pop(_ATTR, None)
    state._attach()
    model.__dict__[_ATTR] = state
    return model


def set_pair(
    model: nn.Module, source_r: int, target_r: int, *, r: Optional[int] = None, exact: bool = False
) -> nn.Module:
    """Switch the bank to the pair ``source_r → target_r`` and the patcher to ``r`` (default ``target_r``).

    Unmerged mode: O(1) — picks a precomputed ``±1/0`` inner-dim mask, no tensor copies, so the trainer
    can call it every step (pass ``r=`` to run the student at another degree than ``target_r``).
    Merged mode: moves the weights to ``W₀ + Δ(source_r → target_r)`` like :func:`set_target_r`;
    ``exact=True`` derives them from the pristine rows (the closed form, bit for bit, as right after
    :func:`apply`) instead of adding the change. Returns ``model``. Example::

        tocom_hub.apply(model, 0, 0, bank=bank, merge=False)
        tocom_hub.compensate.set_pair(model, 3, 11)   # bank 3 → 11, model runs at r = 11
        loss = kd(model(x), teacher_logits); loss.backward()
    """
    with switch_lock(model):
        st = _require_state(model)
        r_max = st.bank.r_max
        source_r = check_r(source_r, "source_r", r_max=r_max, why=BANK_RANGE)
        target_r = check_r(target_r, "target_r", r_max=r_max, why=BANK_RANGE)
        old_r = get_r(model)
        set_r(model, target_r if r is None else r)
        try:
            st._switch(source_r, target_r, exact)
        except BaseException:  # e.g. weights the merged bank cannot follow: the patcher's r goes back too
            set_r(model, old_r)
            raise
    return model


def set_target_r(model: nn.Module, r: int) -> nn.Module:
    """Run at another target ``r`` (same source): applies only the change of the bank's update.

    Validates ``0 <= r <= R`` and the patcher's limit first. Merged mode adds ``Δ(r_old → r)`` in place
    (one fp32 ``addmm_`` per block and target over ``|r - r_old|·h`` inner dims) and re-derives
    ``W₀ + Δ(source → r)`` exactly from the pristine rows when ``r`` returns to the source (a copy)
    or after ``RESYNC_EVERY`` difference updates, so switches never drift from the closed form
    (≤ 5e-7 relative); fp16/bf16 models always re-derive. Unmerged mode swaps the mask. Thread-safe:
    switches from several threads are serialised by :func:`switch_lock`; a forward running in another
    thread during a switch is not (hold ``switch_lock(model)`` around it, or switch between batches).
    Example::

        tocom_hub.apply(model, 0, 16, bank=bank)
        tocom_hub.set_target_r(model, 4)      # lighter load: fewer tokens merged
        tocom_hub.set_target_r(model, 16)
    """
    with switch_lock(model):
        st = _require_state(model)
        set_pair(model, st.source_r, r)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Take the bank out: original weights back bit-exact, hooks off, and — if :func:`apply` patched
    the model — the patcher undone (a model you patched yourself stays patched at its current ``r``).

    Memory: merged mode holds a copy of every adapted weight block in the model's dtype until
    ``remove`` — ``len(targets) · depth · d²`` values (DeiT-B, q+v, fp32: 2·12·768²·4 B ≈ 56.6 MB,
    about 16 % of the model) plus an fp32 copy of the bank (4.7 MB). Unmerged mode keeps nothing.
    No-op on a model without a bank. Example::

        tocom_hub.apply(model, 0, 16, bank=bank)
        tocom_hub.remove(model)
        assert not tocom_hub.compensate.get_compensation(model)
    """
    with switch_lock(model):
        st = get_compensation(model)
        if st is None:
            return model
        st._detach()
        model.__dict__.pop(_ATTR, None)
        if st.patched_here and is_patched(model):
            unpatch(model)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` without its bank inside the block (e.g. the teacher forward), like peft's
    ``disable_adapter``. Unmerged: the hooks pass through (O(1)); merged: the original rows are written
    back and the update re-applied on exit. Example::

        with tocom_hub.compensate.disabled(model), torch.no_grad():
            teacher_logits = model(x)
        student_logits = model(x)
    """
    with switch_lock(model):
        st = _require_state(model)
        if not st.enabled:
            st = None
        else:
            st._set_enabled(False)
    if st is None:
        yield model
        return
    try:
        yield model
    finally:
        with switch_lock(model):
            if get_compensation(model) is st:
                st._set_enabled(True)
            else:  # applied again or removed inside the block: nothing of ours left to write
                st.enabled = True
