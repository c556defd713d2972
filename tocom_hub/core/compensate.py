"""Plug a :class:`~tocom_hub.bank.ToComBank` into a patched timm ViT and switch compression degree.

A model fine-tuned at *source* ``r = m`` runs at *target* ``r = n`` with the bank's ``m → n`` update
on its attention weights (paper Eq. 6/7). Two modes share the same maths and the same bank:

* **merged** (``merge=True``, inference): the update is written into the fused ``attn.qkv`` (and/or
  ``attn.proj``) weight rows in place, so the forward is the plain ToMe/EViT forward. The original
  rows are kept (a "pristine" copy). A switch adds only the change of the update (one in-place
  ``addmm_`` per (block, target) on fp32 factors pre-arranged per block), and the weights are
  re-derived exactly as ``W₀ + Δ(source → target)`` from the pristine rows whenever the target
  returns to the source and at least every ``RESYNC_EVERY`` switches: no drift however many
  switches, and :func:`remove` restores the weights bit-exact.
* **unmerged** (``merge=False``, training): a forward hook on ``attn.qkv`` / ``attn.proj`` adds
  ``s · ((x Bᵀ) ⊙ c) Aᵀ`` to the q/k/v output slices, where ``c`` is a ``±1/0`` mask over the ``R·h``
  inner dims (the official one-adapter formulation). Every bank parameter takes part in every
  forward (inactive groups get zero gradient, which keeps DDP happy), the backbone weights are never
  touched, and :func:`set_pair` switches ``(source, target)`` in O(1) (it picks a precomputed mask).

Switching is serialised per model: :func:`apply`, :func:`set_target_r`, :func:`set_pair`, :func:`remove`
and :func:`disabled` hold the model's switch lock (:func:`switch_lock`), so concurrent switches from
several threads always leave the weights at the closed form of the last one. A forward is not
locked: a forward that runs while another thread switches may compute some blocks with the old and
some with the new weights (and token count). Switch between batches in the thread that runs the
forwards, hold ``switch_lock(model)`` around the forward too, or give each worker its own model copy.

A model carries at most one bank; :func:`apply` on a model that already carries one replaces it (the
weights are first restored from the pristine copy, so the result equals applying to a fresh model).
The bank stays a separate module: it is not registered as a submodule, so ``model.state_dict()``
and ``model.parameters()`` never contain it.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .bank import MAX_SCALE, ToComBank, _looks_local, model_dims, signed_group_slice
from .checks import is_int
from .patch import get_method, is_patched, patch, set_r, unpatch

__all__ = [
    "apply",
    "set_target_r",
    "set_pair",
    "remove",
    "get_state",
    "disabled",
    "switch_lock",
    "Compensation",
    "MAX_SCALE",
]

_ATTR = "_tocom_compensation"
_LOCK_ATTR = "_tocom_switch_lock"
_LOCK_CREATION = threading.Lock()
# merged mode: at most this many in-place difference updates between two exact re-derivations. Each
# update rounds once (≤ ½ ulp), so the distance to the closed form stays ≤ RESYNC_EVERY · 2⁻²⁴ ≈ 4.8e-7
# of the largest weight (measured: 10,000 random switches, never back to the source: 2.8e-7 with 8,
# 3e-7 with 16, 3.5e-5 without re-derivation).
RESYNC_EVERY = 8
_QKV_INDEX = {"q": 0, "k": 1, "v": 2}

BankLike = Union[ToComBank, str, os.PathLike, None]


# ---------------------------------------------------------------------------------------------------
# state attached to the model


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


class _LoRAHook:
    """Forward hook of the unmerged mode: adds the masked LoRA path to a Linear's output slices."""

    def __init__(self, state: "Compensation", block: int, entries: List[Tuple[str, int, int]]) -> None:
        self.state, self.block, self.entries = state, block, entries

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        st = self.state
        if not st.enabled:
            return output
        x = args[0]
        bank = st.bank
        coef = st.coef
        for target, start, stop in self.entries:
            down = bank.B[target][self.block]  # [R·h, d_in]
            up = bank.A[target][self.block]  # [d_out, R·h]
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


def _autocast_on(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # pragma: no cover - older torch
        return torch.is_autocast_enabled()


class Compensation:
    """What :func:`apply` attached to a model; read it with :func:`get_state`.

    Attributes: ``bank``, ``source_r``, ``target_r``, ``scale``, ``merge`` (``True``: weights merged;
    ``False``: LoRA path in the forward), ``enabled``.
    """

    def __init__(
        self,
        model: nn.Module,
        bank: ToComBank,
        source_r: int,
        target_r: int,
        scale: float,
        merge: bool,
        patched_here: bool,
    ) -> None:
        self.bank = bank
        self.source_r, self.target_r = source_r, target_r
        self.scale = scale
        self.merge = merge
        self.patched_here = patched_here
        self.enabled = True
        self._slots: List[_Slot] = []
        self._written: Optional[Tuple[int, int]] = None  # (m, n) the merged weights hold
        self._inexact = 0  # in-place difference updates since the last exact write
        self._hooked: List[nn.Module] = []
        self._coef_table: Optional[torch.Tensor] = None
        self.coef: Optional[torch.Tensor] = None
        rank = bank.rank
        self._layout: List[Tuple[int, nn.Linear, List[Tuple[str, int, int]]]] = []
        for b, blk in enumerate(model.blocks):
            qkv_entries, proj_entries = [], []
            d = blk.attn.qkv.out_features // 3
            for t in bank.targets:
                if t == "proj":
                    proj_entries.append((t, 0, blk.attn.proj.out_features))
                else:
                    i = _QKV_INDEX[t]
                    qkv_entries.append((t, i * d, (i + 1) * d))
            if qkv_entries:
                self._layout.append((b, blk.attn.qkv, qkv_entries))
            if proj_entries:
                self._layout.append((b, blk.attn.proj, proj_entries))
        self._rank = rank

    def __repr__(self) -> str:
        return (
            f"Compensation(source_r={self.source_r}, target_r={self.target_r}, scale={self.scale}, "
            f"merge={self.merge}, targets={self.bank.targets})"
        )

    # -- merged ------------------------------------------------------------------------------------
    def _snapshot(self) -> None:
        """Copy the pristine rows and an fp32 snapshot of the factors (allocations only, no writes)."""
        slots = []
        for b, module, entries in self._layout:
            w = module.weight.detach()
            for t, start, stop in entries:
                slot = _Slot(b, t, module, start, stop)
                slot.pristine = w[start:stop].clone()
                slot.up = self.bank.A[t][b].detach().to(device=w.device, dtype=torch.float32, copy=True)
                slot.down = self.bank.B[t][b].detach().to(device=w.device, dtype=torch.float32, copy=True)
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
        the source (a plain copy, cheaper than any update) and after ``RESYNC_EVERY`` inexact steps:
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
            or self._inexact >= RESYNC_EVERY
            or not self._slots
            or self._slots[0].view.dtype != torch.float32
        ):
            self._write_exact(m, n)
            return
        sl, sign = signed_group_slice(cur[1], n, self._rank)
        for slot in self._slots:
            slot.view.addmm_(slot.up[:, sl], slot.down[sl], alpha=sign * self.scale)
        self._written, self._inexact = (m, n), self._inexact + 1

    # -- unmerged ----------------------------------------------------------------------------------
    def _build_coef_table(self, device: torch.device) -> None:
        """``table[m, n]`` = the ``R·h`` inner-dim coefficients ``s·(±1/0)`` of the pair ``m → n``."""
        R, h = self.bank.r_max, self._rank
        table = torch.zeros(R + 1, R + 1, R * h, dtype=torch.float32)
        for m in range(R + 1):
            for n in range(R + 1):
                sl, sign = signed_group_slice(m, n, h)
                table[m, n, sl] = sign * self.scale
        self._coef_table = table.to(device)

    def _install_hooks(self) -> None:
        for b, module, entries in self._layout:
            module.register_forward_hook(_LoRAHook(self, b, entries))
            self._hooked.append(module)

    def _remove_hooks(self) -> None:
        for module in self._hooked:
            ids = [k for k, h in module._forward_hooks.items() if isinstance(h, _LoRAHook) and h.state is self]
            for k in ids:
                del module._forward_hooks[k]
                for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                    getattr(module, extra, {}).pop(k, None)
        self._hooked = []

    # -- lifecycle ---------------------------------------------------------------------------------
    def _attach(self) -> None:
        if self.merge:
            self._snapshot()
            self._write_exact(self.source_r, self.target_r)
        else:
            self._build_coef_table(next(iter(self.bank.parameters())).device)
            self.coef = self._coef_table[self.source_r, self.target_r]
            self._install_hooks()

    @torch.no_grad()
    def _detach(self) -> None:
        if self.merge:
            for slot in self._slots:
                slot.current_view().copy_(slot.pristine)
            self._slots, self._written = [], None
        else:
            self._remove_hooks()
            self._coef_table = self.coef = None

    def _set(self, m: int, n: int) -> None:
        if self.merge:
            if self.enabled:
                self._write(m, n)
        else:
            table = self._coef_table
            self.coef = table[m, n]
        self.source_r, self.target_r = m, n


class _SwitchLock:
    """A re-entrant lock stored on the model; copies and pickles of the model get a fresh one."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        self.lock = threading.RLock()

    def __reduce__(self):
        return (_SwitchLock, ())

    def __deepcopy__(self, memo: Any) -> _SwitchLock:
        return _SwitchLock()


def switch_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises switching on ``model`` (:func:`apply`, :func:`set_target_r`,
    :func:`set_pair`, :func:`remove`, :func:`disabled` take it). Hold it around a forward that must not
    overlap a switch from another thread. Example::

        with tocom_hub.compensate.switch_lock(model), torch.no_grad():
            logits = model(x)      # a control thread's set_target_r waits for this batch
    """
    holder = model.__dict__.get(_LOCK_ATTR)
    if holder is None:
        with _LOCK_CREATION:
            holder = model.__dict__.get(_LOCK_ATTR)
            if holder is None:
                holder = model.__dict__[_LOCK_ATTR] = _SwitchLock()
    return holder.lock


# ---------------------------------------------------------------------------------------------------
# public API


def get_state(model: nn.Module) -> Optional[Compensation]:
    """The :class:`Compensation` :func:`apply` attached to ``model``, or ``None``. Example::

    tocom_hub.apply(model, 0, 8, bank=bank)
    st = tocom_hub.compensate.get_state(model)
    print(st.source_r, st.target_r, st.scale, st.merge)
    """
    return model.__dict__.get(_ATTR)


def _require_state(model: nn.Module) -> Compensation:
    st = get_state(model)
    if st is None:
        raise ValueError(f"{type(model).__name__} carries no ToCom bank; call tocom_hub.apply(model, ...) first")
    return st


def _check_int_r(name: str, r: Any, r_max: int) -> None:
    if not is_int(r) or not 0 <= r <= r_max:
        raise ValueError(f"{name} must be an int in [0, {r_max}] (the bank covers r = 0 … {r_max}); got {r!r}")


def _resolve_bank(bank: BankLike, model: nn.Module, method: Optional[str], hub_kwargs: Dict[str, Any]) -> ToComBank:
    trust = hub_kwargs.pop("trust_unverified", False)
    if isinstance(bank, ToComBank):
        if hub_kwargs:
            raise TypeError(f"{sorted(hub_kwargs)} only apply when `bank` is a Hub repo id")
        return bank
    if bank is not None and not isinstance(bank, (str, os.PathLike)):
        raise TypeError(
            f"bank must be a ToComBank, a local directory / .safetensors file, a Hub repo id or None; "
            f"got {type(bank).__name__}"
        )
    if bank is not None and (os.path.exists(bank) or _looks_local(os.fspath(bank))):
        if hub_kwargs:
            raise TypeError(f"{sorted(hub_kwargs)} only apply when `bank` is a Hub repo id")
        return ToComBank.from_pretrained(bank, trust_unverified=trust)
    from .registry import load_bank  # the registry lookup, then huggingface_hub's download

    if bank is None and method is not None:
        hub_kwargs = dict(hub_kwargs, method=method)
    loaded = load_bank(bank, model=model, trust_unverified=trust, **hub_kwargs)
    if not isinstance(loaded, ToComBank):
        raise TypeError(f"tocom_hub.hub.load_bank returned {type(loaded).__name__}, expected a ToComBank")
    return loaded


def _model_architecture(model: nn.Module) -> Optional[str]:
    """timm's architecture name of ``model`` (``model.pretrained_cfg["architecture"]``), if it has one."""
    cfg = getattr(model, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else getattr(cfg, "architecture", None)
    return arch if isinstance(arch, str) and arch else None


def _check_compatible(model: nn.Module, bank: ToComBank, method: Optional[str], ignore_base_model: bool) -> None:
    """Raise if ``bank`` cannot serve ``model`` (no side effects)."""
    dims = model_dims(model)
    cfg = bank.config
    trained_for = f" ({cfg.base_model_id})" if cfg.base_model_id else ""
    arch = _model_architecture(model)
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
    for t in cfg.targets:
        if tuple(bank.A[t].shape) != (cfg.depth, cfg.target_shape(t)[0], cfg.r_max * cfg.rank) or tuple(
            bank.B[t].shape
        ) != (cfg.depth, cfg.r_max * cfg.rank, cfg.target_shape(t)[1]):
            raise ValueError(f"bank tensors for target {t!r} do not match its config; rebuild the bank")
    weight = model.blocks[0].attn.qkv.weight
    if not weight.dtype.is_floating_point:
        raise TypeError(f"model weights are {weight.dtype}; ToCom needs floating point weights")
    for name, p in bank.named_parameters():
        if not p.dtype.is_floating_point:
            raise TypeError(f"bank tensor {name} is {p.dtype}; a ToCom bank holds floating point factors")
        if p.device.type != "meta" and not bool(torch.isfinite(p.detach()).all()):
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
    **hub_kwargs: Any,
) -> nn.Module:
    """Run a model fine-tuned at ``r = source_r`` at ``r = target_r``, compensated by a ToCom bank.

    Patches the model if needed (with the bank's method), validates everything before mutating
    anything (bank vs model dims / depth / heads / method, ``0 <= r <= R``, ``target_r`` supported
    by the model's token count), then either merges ``s · (±Σ A_i B_i)`` into the fused ``qkv``
    weight rows (``merge=True``; computed in fp32, stored in the model's dtype) or installs the
    LoRA path in the forward (``merge=False``, for training). Sets the patcher's ``r = target_r``.

    Args:
        model: a timm ViT (patched or not).
        source_r / target_r: degrees the model was fine-tuned at / will run at, in ``[0, R]``.
        bank: a :class:`ToComBank`, a local directory or ``.safetensors`` file, a Hub repo id, or
            ``None`` (resolve a bank for the model through ``tocom_hub.hub.load_bank``).
        scale: ``s``; ``None`` uses ``bank.config.scale``.
        method: ``"tome"`` / ``"evit"`` to insist on; ``None`` uses the bank's.
        merge: merged (inference) or unmerged (training) mode.
        ignore_base_model: apply even when the bank's config names another timm architecture than
            ``model.pretrained_cfg`` (by default that is refused; when either name is unknown, only
            the shapes are checked).
        **hub_kwargs: ``revision``, ``cache_dir``, ``token``, ``local_files_only`` for Hub ids;
            ``trust_unverified=True`` accepts a bank file without checksum (local path or Hub).

    A model carries one bank: applying again replaces the current one (same result as applying to
    the untouched model). Merged mode keeps a copy of the original adapted rows (see
    :func:`remove`). Example::

        model = timm.create_model("deit_base_patch16_224", pretrained=True)
        tocom_hub.apply(model, source_r=0, target_r=16, bank="out/bank")
        tocom_hub.set_target_r(model, 8)
    """
    bank = _resolve_bank(bank, model, method, hub_kwargs)
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
    _check_compatible(model, bank, method, ignore_base_model)
    s = _check_scale(bank, scale)
    _check_int_r("source_r", source_r, bank.r_max)
    _check_int_r("target_r", target_r, bank.r_max)
    merge = bool(merge)
    if not merge:
        dev = next(iter(bank.parameters())).device
        wdev = model.blocks[0].attn.qkv.weight.device
        if dev != wdev:
            raise ValueError(
                f"unmerged mode computes with the bank's own parameters: bank is on {dev}, model on "
                f"{wdev}; move it first with bank.to({str(wdev)!r})"
            )

    old = get_state(model)
    was_patched = is_patched(model)
    if not was_patched:
        patch(model, method=bank.method)
    try:
        set_r(model, target_r)  # raises before anything else changes when the model cannot take it
    except BaseException:
        if not was_patched:
            unpatch(model)
        raise
    patched_here = (not was_patched) or (old is not None and old.patched_here)

    state = Compensation(model, bank, source_r, target_r, s, merge, patched_here)
    if old is not None:
        old._detach()
        model.__dict__.pop(_ATTR, None)
    state._attach()
    model.__dict__[_ATTR] = state
    return model


def set_pair(model: nn.Module, source_r: int, target_r: int, *, r: Optional[int] = None) -> None:
    """Switch the bank to the pair ``source_r → target_r`` and the patcher to ``r`` (default ``target_r``).

    Unmerged mode: O(1) — picks a precomputed ``±1/0`` inner-dim mask, no tensor copies, so the trainer
    can call it every step (pass ``r=`` to run the student at another degree than ``target_r``).
    Merged mode: moves the weights to ``W₀ + Δ(source_r → target_r)`` like :func:`set_target_r`.
    Example::

        tocom_hub.apply(model, 0, 0, bank=bank, merge=False)
        tocom_hub.compensate.set_pair(model, 3, 11)   # bank 3 → 11, model runs at r = 11
        loss = kd(model(x), teacher_logits); loss.backward()
    """
    with switch_lock(model):
        st = _require_state(model)
        r_max = st.bank.r_max
        _check_int_r("source_r", source_r, r_max)
        _check_int_r("target_r", target_r, r_max)
        set_r(model, target_r if r is None else r)
        st._set(source_r, target_r)


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
        assert not tocom_hub.compensate.get_state(model)
    """
    with switch_lock(model):
        st = get_state(model)
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
            st.enabled = False
            if st.merge:
                st._write_exact(0, 0)
    if st is None:
        yield model
        return
    try:
        yield model
    finally:
        with switch_lock(model):
            st.enabled = True
            if st.merge and get_state(model) is st:
                st._write(st.source_r, st.target_r)
