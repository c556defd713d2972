"""Model surgery: make a timm Vision Transformer merge (ToMe) or prune (EViT) tokens in every block.

:func:`patch` swaps the classes of the model and of its blocks for thin subclasses (the original
classes come back with :func:`unpatch`); parameters, buffers and ``state_dict`` keys are untouched.
Inside a block the token reduction runs between the attention and the MLP; the maths lives in
:mod:`tocom_hub.core.merge` and :mod:`tocom_hub.core.prune`.

The model's family (classic ViT, Eva, …) is found in one table (:mod:`tocom_hub.core.families`); its
adapter says how a block attends on reduced tokens and which positions travel with them. The reduction
step itself (:mod:`tocom_hub.core.reducers`) and the per-forward context (:mod:`tocom_hub.core.context`)
are the same for every family. Prefix tokens (class / distillation / register) are protected and stay
first. Anything outside a supported family raises ``TypeError`` with the reason.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from .attention import ATTENTION_FORMS, FOLD_BIAS_DEVICES, attend, sdpa_key_bias  # noqa: F401 (re-exported)
from .checks import METHODS, is_int, token_mode
from .context import POSITION_RULES, TokenState
from .families import find_family, patched_block_classes
from .families.base import ReducedModel
from .families.vit import ToComBlock  # noqa: F401 (re-exported: the classic family's reduced block)
from .reducers import default_reducer
from .rspec import RSpec, resolve_r

__all__ = [
    "METHODS",
    "POSITION_RULES",
    "patch",
    "unpatch",
    "set_r",
    "get_r",
    "is_patched",
    "get_method",
    "get_settings",
    "get_source",
    "get_size",
]

_MODEL_CLASSES = {}
_BLOCK_CLASSES = {}


def _patched_class(cls: type, mixin: type) -> type:
    """The patched subclass of a model class, created once and importable by name (pickle)."""
    if cls not in _MODEL_CLASSES:
        name = f"ToCom{cls.__name__}"
        new = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = new
        _MODEL_CLASSES[cls] = new
    return _MODEL_CLASSES[cls]


def _original_class(model: nn.Module) -> type:
    for orig, new in _MODEL_CLASSES.items():
        if type(model) is new:
            return orig
    return type(model)


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` was applied to ``model`` (and not undone)."""
    return isinstance(model, ReducedModel)


def _token_state(model: nn.Module) -> TokenState:
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched; call tocom_hub.patch(model) first")
    return model._tocom_state


def _check_options(method: str, positions: str, attention: Any, reducer: Any, dense: Any, dense_ratio: Any) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if not is_int(dense_ratio) or dense_ratio < 1:
        raise ValueError(f"dense_ratio must be a positive int; got {dense_ratio!r}")
    if dense and reducer is not None:
        raise ValueError("dense mode runs the default ToMe / EViT reducer; pass reducer=None with dense=True")
    if positions not in POSITION_RULES:
        raise ValueError(f"positions must be one of {POSITION_RULES}; got {positions!r}")
    if not (callable(attention) or attention in ATTENTION_FORMS):
        raise ValueError(f"attention must be one of {ATTENTION_FORMS} or a callable; got {attention!r}")
    if reducer is not None:
        missing = [m for m in ("plan", "apply", "source", "index") if not callable(getattr(reducer, m, None))]
        if missing or getattr(reducer, "info", None) not in ("keys", "cls_attention"):
            raise ValueError(
                "reducer must have plan/apply/source/index methods and info 'keys' or 'cls_attention' "
                f"(see tocom_hub.core.reducers); got {reducer!r}"
            )


def _check_family(model: nn.Module, positions: str, dense: bool) -> Any:
    """The family adapter :func:`patch` would use, or the ``TypeError`` it would raise (nothing is changed)."""
    family = find_family(model, positions)
    if dense:
        for i, blk in enumerate(family.model_blocks(model)):
            why = getattr(family.blocks.get(type(blk), type(blk)), "_tocom_no_dense", None)
            if why:
                name = type(model).__name__
                raise TypeError(f"{name}: dense mode cannot run block {i} ({type(blk).__name__}): {why}")
    return family


def check_supported(model: nn.Module, *, positions: str = "keep", dense: bool = False) -> Dict[str, Any]:
    """Check that :func:`patch` can reduce ``model``, without changing it.

    Raises the ``TypeError`` :func:`patch` would raise (unsupported family, block or dense layout);
    otherwise returns ``{"family", "model", "depth", "positional"}``. Example::

        tocom_hub.check_supported(timm.create_model("vit_small_patch16_224"))
        # {'family': 'vit', 'model': 'VisionTransformer', 'depth': 12, 'positional': False}
    """
    if positions not in POSITION_RULES:
        raise ValueError(f"positions must be one of {POSITION_RULES}; got {positions!r}")
    family = _check_family(model, positions, dense)
    return dict(
        family=family.name,
        model=_original_class(model).__name__,
        depth=len(model.blocks),
        positional=bool(family.positional),
    )


def patch(
    model: nn.Module,
    method: str = "tome",
    prop_attn: bool = True,
    trace_source: bool = False,
    fuse_token: bool = False,
    positions: str = "keep",
    attention: Any = "auto",
    reducer: Any = None,
    dense: bool = False,
    dense_ratio: int = 32,
) -> nn.Module:
    """Make a timm ViT merge (ToMe) or prune (EViT) ``r`` tokens per block; ``r`` starts at 0.

    Args:
        model: a model of a supported family (``docs/supported-models.md``): timm ``VisionTransformer``
            (and subclasses) with ``Block``/``Attention``; timm ``Eva`` (EVA-02, DINOv3, PE, …); ``Beit``,
            ``VisionTransformerRelPos`` (relative-position bias), ``Cait`` (``docs/families.md``).
        method: ``"tome"`` (bipartite soft matching, size-weighted merging) or ``"evit"`` (drop the
            tokens the class token attends to least).
        prop_attn: ToMe proportional attention (log token size added to attention logits, and to
            an attention-pool head). Ignored by EViT, which drops tokens instead of merging them.
        trace_source: record which input patches each token holds (:func:`get_source`).
        fuse_token: EViT only: fuse the dropped tokens into one extra token (it carries no rope position).
        positions: position of a merged token in families with positional state (RoPE, relative-position
            bias): ``"keep"`` (the destination keeps its own position; the default) or ``"centroid"`` (the
            size-weighted centroid of its patches, the rotation / ``RelPosMlp`` bias recomputed there; refused
            for a bias table: BEiT). Pruning always keeps each token's own position.
        attention: form of the attention with the log-size bias: ``"auto"`` (folded into q/k on GPUs, an
            additive mask on the CPU), ``"mask"``, ``"fold"``, or a callable ``(q, k, v, bias, scale, dropout_p)``
            (an object that also has ``attend(attn, x, bias) -> (out, q, k)`` replaces the classic ViT's attention).
        reducer: the object that plans and applies the reduction (default: :class:`~tocom_hub.core.reducers.ToMe`
            or :class:`~tocom_hub.core.reducers.EViT` for ``method``); benchmarks pass a merge-free ceiling.
        dense: dense prediction (ToCom paper, appendix): the grid stays full; in every block attention
            sees all tokens and ``k = dense_ratio · r`` of them merge (ToMe) or skip (EViT) only for
            the MLP, whose outputs are copied back to every token (:mod:`tocom_hub.core.dense_block`).
            ``forward_features`` / ``forward_intermediates`` keep every patch. Classic ViT and Eva blocks;
            a block whose MLP runs beside its attention (``ParallelScalingBlock``) is refused.
        dense_ratio: tokens per unit of ``r`` in dense mode (the paper merges ``32 r``).

    Idempotent; calling it on a patched model updates the settings (e.g. switches ``method``) and
    keeps ``r``. Parameters and ``state_dict`` are never modified. Per-forward state (sizes, sources,
    positions) belongs to the call: threads may run forwards on one patched model at once. Example::

        model = timm.create_model("deit_small_patch16_224")
        tocom_hub.patch(model, method="tome")
        tocom_hub.set_r(model, 16)
    """
    _check_options(method, positions, attention, reducer, dense, dense_ratio)
    family = _check_family(model, positions, dense)
    comp = model.__dict__.get("_tocom_compensation")  # set by tocom_hub.apply (core/compensation/api.py)
    if comp is not None and comp.bank.method != method:
        raise ValueError(
            f"model carries a ToCom bank trained for {comp.bank.method!r}; switching the patch to {method!r} "
            f"would run it with the wrong token reduction: call tocom_hub.remove(model) first, or apply a bank "
            f"trained for {method!r}"
        )
    mode, bank_mode = token_mode(dense, dense_ratio), comp and token_mode(comp.bank.dense, comp.bank.dense_ratio)
    if comp is not None and bank_mode != mode:
        raise ValueError(
            f"model carries a ToCom bank trained in {bank_mode} mode; patching it for {mode} would run the "
            f"bank with another token reduction: call tocom_hub.remove(model) first"
        )
    ratio = int(dense_ratio) if dense else 1
    settings = dict(
        method=method,
        prop_attn=bool(prop_attn),
        trace_source=bool(trace_source),
        fuse_token=bool(fuse_token),
        reducer=reducer if reducer is not None else default_reducer(method, bool(fuse_token)),
        positions=positions,
        attention=attention,
        dense=bool(dense),
        dense_ratio=int(dense_ratio),
    )
    if is_patched(model):
        state = model._tocom_state
        r = resolve_r(model, state.r_spec, method, ratio)  # a method / mode switch may change the r limit
        state.__dict__.update(settings)
        state._custom_reducer = reducer
        state.r = r
        state.begin()
        return model

    state = TokenState(
        num_prefix=family.num_prefix(model),
        has_class_token=family.has_class_token(model),
        depth=len(family.model_blocks(model)),
        family=family,
        **settings,
    )
    state._custom_reducer = reducer
    model.__class__ = _patched_class(type(model), family.model_mixin)
    model._tocom_state = state
    for i, blk in enumerate(model.blocks):
        blk.__class__ = family.blocks.get(type(blk), type(blk))
        blk._tocom_state = state
        blk._tocom_index = i
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original classes back, token reduction off. No-op on an unpatched model."""
    if not is_patched(model):
        return model
    originals = patched_block_classes()
    for blk in model.blocks:
        blk.__class__ = originals.get(type(blk), type(blk))
        del blk._tocom_state
        del blk._tocom_index
    del model._tocom_state
    model.__class__ = _original_class(model)
    return model


def set_r(model: nn.Module, r: RSpec) -> nn.Module:
    """Set the tokens removed per block: an int for every block, or a list with one int per block.

    ``r`` is validated first (``ValueError`` leaves the model unchanged): values must be ``>= 0`` and
    no larger than one block could remove from the model's full token count. At run time ``r`` is
    clamped per block to what is left, like the reference ToMe. Returns ``model``. Example::

        tocom_hub.patch(model)
        tocom_hub.set_r(model, 8)          # 8 per block
        tocom_hub.set_r(model, [16] * 6 + [0] * 6)
    """
    state = _token_state(model)
    values = resolve_r(model, r, state.method, state.dense_ratio if state.dense else 1)
    state.r, state.r_spec = values, (list(values) if isinstance(r, (list, tuple)) else int(r))
    return model


def get_r(model: nn.Module) -> RSpec:
    """The ``r`` given to :func:`set_r` (an int, or a per-block list); 0 right after :func:`patch`."""
    spec = _token_state(model).r_spec
    return list(spec) if isinstance(spec, list) else spec


def get_method(model: nn.Module) -> Optional[str]:
    """``"tome"`` or ``"evit"`` for a patched model, ``None`` otherwise."""
    return model._tocom_state.method if is_patched(model) else None


def get_settings(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The keyword arguments :func:`patch` was last called with (``method``, ``prop_attn``, ``trace_source``,
    ``fuse_token``, ``dense``, ``dense_ratio``, and ``positions`` / ``attention`` / ``reducer`` when not the
    default); ``None`` for an unpatched model. ``patch(model, **get_settings(model))`` changes nothing."""
    if not is_patched(model):
        return None
    st = model._tocom_state
    settings = dict(
        method=st.method,
        prop_attn=st.prop_attn,
        trace_source=st.trace_source,
        fuse_token=st.fuse_token,
        dense=st.dense,
        dense_ratio=st.dense_ratio,
    )
    if st.positions != "keep":
        settings["positions"] = st.positions
    if st.attention != "auto":
        settings["attention"] = st.attention
    if st._custom_reducer is not None:
        settings["reducer"] = st._custom_reducer
    return settings


def get_source(model: nn.Module) -> Optional[torch.Tensor]:
    """Source trace of the calling thread's last forward (``[B, N_out, N_in]`` 0/1; needs ``trace_source=True``).

    ``None`` when nothing was merged or pruned. Row ``j`` marks the input tokens (prefix tokens
    included, in input order) that output token ``j`` holds.
    """
    ctx = _token_state(model).last()
    return None if ctx is None else ctx.source


def get_size(model: nn.Module) -> Optional[torch.Tensor]:
    """Token sizes of the calling thread's last ToMe forward (``[B, N_out, 1]`` float32); ``None`` when nothing
    was merged."""
    ctx = _token_state(model).last()
    return None if ctx is None else ctx.size
