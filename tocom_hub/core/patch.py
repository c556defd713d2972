"""Model surgery: make a timm Vision Transformer merge (ToMe) or prune (EViT) tokens in every block.

:func:`patch` swaps the classes of the model and of its blocks for thin subclasses (the original
classes come back with :func:`unpatch`); parameters, buffers and ``state_dict`` keys are untouched.
Inside a block the token reduction runs between the attention and the MLP; the maths lives in
:mod:`tocom_hub.merge` and :mod:`tocom_hub.prune`.

Supported: timm ``VisionTransformer`` and its subclasses (``VisionTransformerDistilled``, …) whose
blocks are timm's ``Block`` with timm's ``Attention``: class / distillation / register tokens (all
prefix tokens are protected and stay first), no-class-token models with average pooling (size
weighted) or an attention-pool head (log-size bias), layer scale, qk-norm, gated attention,
``dynamic_img_size``, fused (SDPA) and non-fused attention. Anything else raises ``TypeError``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .attention import FOLD_BIAS_DEVICES, attend, sdpa_key_bias  # noqa: F401 (re-exported)
from .checks import METHODS, is_int, token_mode
from .dense import compose_index, merge_positions, prune_positions
from .dense_block import dense_forward
from .grid import merged_intermediates
from .merge import bipartite_soft_matching, max_merge, merge_source, merge_wavg
from .prune import cls_attention, max_prune, prune_source, prune_tokens, select_attentive

try:  # present in every timm version we support, but keep the import soft
    from timm.layers.attention_pool import AttentionPoolLatent
except ImportError:  # pragma: no cover
    AttentionPoolLatent = ()

__all__ = [
    "METHODS",
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

RSpec = Union[int, Sequence[int]]


class TokenState:
    """Settings and per-forward state shared by a patched model and its blocks."""

    def __init__(
        self,
        method: str,
        prop_attn: bool,
        trace_source: bool,
        fuse_token: bool,
        num_prefix: int,
        has_class_token: bool,
        depth: int,
        dense: bool = False,
        dense_ratio: int = 32,
    ) -> None:
        self.method = method
        self.dense, self.dense_ratio = dense, dense_ratio  # dense: k = dense_ratio * r tokens share an MLP
        self.track_index = False  # record the index map (tocom_hub.core.grid)
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.fuse_token = fuse_token
        self.num_prefix = num_prefix
        self.has_class_token = has_class_token
        self.r: List[int] = [0] * depth
        self.r_spec: RSpec = 0
        self.reset()

    def reset(self) -> None:
        """Forget the token sizes / sources of the previous forward."""
        self.size: Optional[torch.Tensor] = None  # [B, N, 1] float32, input patches per token (ToMe)
        self.source: Optional[torch.Tensor] = None  # [B, N, N_in] 0/1, with trace_source
        self.attn_bias: Optional[torch.Tensor] = None  # [B, 1, 1, N] float32 log(size), with prop_attn
        self.index: Optional[torch.Tensor] = None  # [B, N_in] long, patch -> token, when tracking


# ---------------------------------------------------------------------------------------------------
# block


def _attention(attn: Attention, x: torch.Tensor, bias: Optional[torch.Tensor], state: TokenState, info: bool):
    """:func:`attend`, plus (when ``info``) the metric for ToMe (keys summed over heads, ``[B, N, D]``)
    or the class-token attentiveness for EViT (``[B, N]``); ``None`` when ``info`` is false."""
    out, q, k = attend(attn, x, bias)
    if not info:
        return out, None
    if state.method == "tome":
        metric = k.sum(dim=1)  # direction of the head-averaged keys: all bipartite matching needs
    else:
        with torch.no_grad():
            metric = cls_attention(q, k, attn.scale, state.has_class_token)
    return out, metric


class ToComBlock(Block):
    """timm ``Block`` that removes ``r`` tokens between attention and MLP (see :func:`patch`)."""

    _tocom_state: TokenState
    _tocom_index: int

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        state = self._tocom_state
        r = state.r[self._tocom_index]
        bias = state.attn_bias
        if attn_mask is not None or is_causal:
            if any(state.r):
                raise ValueError("token merging/pruning cannot be combined with attn_mask / is_causal")
            return Block.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
        if r <= 0 and bias is None:  # nothing merged so far and nothing to merge: timm's own forward
            return Block.forward(self, x)
        if state.dense:  # the grid stays full: only the MLP sees merged tokens
            k = r * state.dense_ratio
            return dense_forward(self, x, k, state.method, state.num_prefix, state.has_class_token, state.fuse_token)
        track = state.trace_source or state.track_index

        out, info = _attention(self.attn, self.norm1(x), bias, state, info=r > 0)
        x = x + self.drop_path1(self.ls1(out))
        if r > 0 and state.method == "tome":
            plan = bipartite_soft_matching(info, r, state.num_prefix)
            if plan is not None:
                x, state.size = merge_wavg(plan, x, state.size)
                if state.trace_source:
                    state.source = merge_source(plan, state.source)
                if track:
                    state.index = compose_index(merge_positions(plan), state.index)
                if state.prop_attn:
                    state.attn_bias = state.size.log().view(x.shape[0], 1, 1, -1)  # [B, 1, 1, N] float32
        elif r > 0:
            plan = select_attentive(info, r, state.num_prefix, fuse=state.fuse_token)
            if plan is not None:
                x = prune_tokens(plan, x)
                if state.trace_source:
                    state.source = prune_source(plan, state.source)
                if track:
                    state.index = compose_index(prune_positions(plan), state.index)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


# ---------------------------------------------------------------------------------------------------
# model


class _ToComModel:
    """Mixin put in front of the model's class: resets per-forward state, size-aware pooling."""

    _tocom_state: TokenState

    def forward_features(self, *args, **kwargs):
        state = self._tocom_state
        state.reset()
        if any(state.r) and self.grad_checkpointing and self.training:
            raise RuntimeError(
                "gradient checkpointing re-runs blocks and cannot be combined with token merging/pruning; "
                "call model.set_grad_checkpointing(False) or tocom_hub.set_r(model, 0)"
            )
        return super().forward_features(*args, **kwargs)

    def forward_intermediates(self, *args, **kwargs):
        state = self._tocom_state
        state.reset()
        if any(state.r) and not state.dense:  # each intermediate unmerged onto the grid (core/grid.py)
            return merged_intermediates(self, super().forward_intermediates, *args, **kwargs)
        return super().forward_intermediates(*args, **kwargs)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        size = self._tocom_state.size
        if size is None:
            return super().pool(x, pool_type)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        if self.attn_pool is not None:
            if isinstance(self.attn_pool, AttentionPoolLatent) and self._tocom_state.prop_attn:
                bias = size[:, start:].log().transpose(1, 2)[:, None].to(x.dtype)  # [B, 1, 1, N]
                return self.attn_pool(x[:, start:], attn_mask=bias)
            return super().pool(x, pool_type)
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type not in ("avg", "avgmax"):
            return super().pool(x, pool_type)
        tokens, weight = x[:, start:], size[:, start:]
        avg = (tokens * (weight / weight.sum(dim=1, keepdim=True)).to(tokens.dtype)).sum(dim=1)
        return avg if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + avg)


_MODEL_CLASSES = {}


def _patched_class(cls: type) -> type:
    """The patched subclass of a model class, created once and importable by name (pickle)."""
    if cls not in _MODEL_CLASSES:
        name = f"ToCom{cls.__name__}"
        new = type(name, (_ToComModel, cls), {"__module__": __name__, "__qualname__": name})
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
    return isinstance(model, _ToComModel)


def _check_supported(model: nn.Module) -> None:
    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"tocom_hub supports timm VisionTransformer models (and subclasses such as "
            f"VisionTransformerDistilled); got {name}. Architectures with rotary/relative position "
            f"attention (Eva, Beit, VisionTransformerRelPos, …) are not supported."
        )
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise TypeError(f"{name}: expected `model.blocks` to be a non-empty nn.Sequential of timm Blocks")
    for i, blk in enumerate(blocks):
        if type(blk) not in (Block, ToComBlock):
            raise TypeError(
                f"{name}: block {i} is {type(blk).__name__}; tocom_hub supports only timm's ViT `Block` "
                f"(not ResPostBlock, ParallelScalingBlock, ParallelThingsBlock, …)"
            )
        if type(blk.attn) is not Attention:
            raise TypeError(
                f"{name}: block {i} uses {type(blk.attn).__name__}; tocom_hub supports only timm's "
                f"`Attention` (fused qkv, no rotary/relative position bias)"
            )


def _num_tokens(model: nn.Module) -> Optional[int]:
    """Token count entering the first block at the model's configured image size."""
    num_patches = getattr(model.patch_embed, "num_patches", None)
    if num_patches is None:
        return None
    return int(num_patches) + int(model.num_prefix_tokens)


def _resolve_r(model: nn.Module, r: RSpec, method: str, dense_ratio: int = 1) -> List[int]:
    """Validate ``r`` for ``model`` and expand it to one value per block (no side effects)."""
    depth = len(model.blocks)
    if isinstance(r, (list, tuple)):
        values = list(r)
        if len(values) != depth:
            raise ValueError(f"r has {len(values)} entries but the model has {depth} blocks")
    else:
        values = [r] * depth
    for v in values:
        if not is_int(v):
            raise ValueError(f"r must be a non-negative int or a list of {depth} ints; got {r!r}")
        if v < 0:
            raise ValueError(f"r must be >= 0; got {r!r}")
    num_tokens = _num_tokens(model)
    if num_tokens is not None:
        prefix = int(model.num_prefix_tokens)
        limit = max_merge(num_tokens, prefix) if method == "tome" else max_prune(num_tokens, prefix)
        worst = max(values) * dense_ratio
        if worst > limit:
            k = f" (dense mode: k = {dense_ratio}·r = {worst} tokens share an MLP)" if dense_ratio != 1 else ""
            raise ValueError(
                f"r={max(values)} cannot be supported{k}: the model sees {num_tokens} tokens "
                f"({prefix} prefix) and {method} can remove at most {limit} in one block"
            )
    return values


def _state(model: nn.Module) -> TokenState:
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched; call tocom_hub.patch(model) first")
    return model._tocom_state


def patch(
    model: nn.Module,
    method: str = "tome",
    prop_attn: bool = True,
    trace_source: bool = False,
    fuse_token: bool = False,
    dense: bool = False,
    dense_ratio: int = 32,
) -> nn.Module:
    """Make a timm ViT merge (ToMe) or prune (EViT) ``r`` tokens per block; ``r`` starts at 0.

    Args:
        model: a timm ``VisionTransformer`` (or subclass) built from timm ``Block``/``Attention``.
        method: ``"tome"`` (bipartite soft matching, size-weighted merging) or ``"evit"`` (drop the
            tokens the class token attends to least).
        prop_attn: ToMe proportional attention (log token size added to attention logits, and to
            an attention-pool head). Ignored by EViT, which drops tokens instead of merging them.
        trace_source: record which input patches each token holds (:func:`get_source`).
        fuse_token: EViT only: fuse the dropped tokens into one extra token.
        dense: dense prediction (ToCom paper, appendix): the grid stays full; in every block attention
            sees all tokens and ``k = dense_ratio · r`` of them merge (ToMe) or skip (EViT) only for
            the MLP, whose outputs are copied back to every token (:mod:`tocom_hub.core.dense_block`).
            ``forward_features`` / ``forward_intermediates`` keep every patch.
        dense_ratio: tokens per unit of ``r`` in dense mode (the paper merges ``32 r``).

    Idempotent; calling it on a patched model updates the settings (e.g. switches ``method``) and
    keeps ``r``. Parameters and ``state_dict`` are never modified. Example::

        model = timm.create_model("deit_small_patch16_224")
        tocom_hub.patch(model, method="tome")
        tocom_hub.set_r(model, 16)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if not is_int(dense_ratio) or dense_ratio < 1:
        raise ValueError(f"dense_ratio must be a positive int; got {dense_ratio!r}")
    _check_supported(model)
    comp = model.__dict__.get("_tocom_compensation")  # set by tocom_hub.apply (compensate.py)
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
    if is_patched(model):
        state = model._tocom_state
        r = _resolve_r(model, state.r_spec, method, ratio)  # a method / mode switch may change the r limit
        state.method, state.prop_attn, state.trace_source = method, bool(prop_attn), bool(trace_source)
        state.fuse_token = bool(fuse_token)
        state.dense, state.dense_ratio = bool(dense), int(dense_ratio)
        state.r = r
        state.reset()
        return model

    state = TokenState(
        method=method,
        prop_attn=bool(prop_attn),
        trace_source=bool(trace_source),
        fuse_token=bool(fuse_token),
        num_prefix=int(model.num_prefix_tokens),
        has_class_token=bool(getattr(model, "has_class_token", model.cls_token is not None)),
        depth=len(model.blocks),
        dense=bool(dense),
        dense_ratio=int(dense_ratio),
    )
    model.__class__ = _patched_class(type(model))
    model._tocom_state = state
    for i, blk in enumerate(model.blocks):
        blk.__class__ = ToComBlock
        blk._tocom_state = state
        blk._tocom_index = i
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original classes back, token reduction off. No-op on an unpatched model."""
    if not is_patched(model):
        return model
    for blk in model.blocks:
        blk.__class__ = Block
        del blk._tocom_state
        del blk._tocom_index
    del model._tocom_state
    model.__class__ = _original_class(model)
    return model


def set_r(model: nn.Module, r: RSpec) -> None:
    """Set the tokens removed per block: an int for every block, or a list with one int per block.

    ``r`` is validated first (``ValueError`` leaves the model unchanged): values must be ``>= 0`` and
    no larger than one block could remove from the model's full token count. At run time ``r`` is
    clamped per block to what is left, like the reference ToMe. Example::

        tocom_hub.patch(model)
        tocom_hub.set_r(model, 8)          # 8 per block
        tocom_hub.set_r(model, [16] * 6 + [0] * 6)
    """
    state = _state(model)
    values = _resolve_r(model, r, state.method, state.dense_ratio if state.dense else 1)
    state.r, state.r_spec = values, (list(r) if isinstance(r, (list, tuple)) else r)


def get_r(model: nn.Module) -> RSpec:
    """The ``r`` given to :func:`set_r` (an int, or a per-block list); 0 right after :func:`patch`."""
    spec = _state(model).r_spec
    return list(spec) if isinstance(spec, list) else spec


def get_method(model: nn.Module) -> Optional[str]:
    """``"tome"`` or ``"evit"`` for a patched model, ``None`` otherwise."""
    return model._tocom_state.method if is_patched(model) else None


def get_settings(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The keyword arguments :func:`patch` was last called with (``method``, ``prop_attn``, ``trace_source``,
    ``fuse_token``, ``dense``, ``dense_ratio``); ``None`` for an unpatched model.
    ``patch(model, **get_settings(model))`` changes nothing."""
    if not is_patched(model):
        return None
    st = model._tocom_state
    return dict(
        method=st.method,
        prop_attn=st.prop_attn,
        trace_source=st.trace_source,
        fuse_token=st.fuse_token,
        dense=st.dense,
        dense_ratio=st.dense_ratio,
    )


def get_source(model: nn.Module) -> Optional[torch.Tensor]:
    """Source trace of the last forward (``[B, N_out, N_in]`` 0/1; needs ``trace_source=True``).

    ``None`` when nothing was merged or pruned. Row ``j`` marks the input tokens (prefix tokens
    included, in input order) that output token ``j`` holds.
    """
    return _state(model).source


def get_size(model: nn.Module) -> Optional[torch.Tensor]:
    """Token sizes of the last ToMe forward (``[B, N_out, 1]`` float32); ``None`` when nothing was merged."""
    return _state(model).size
