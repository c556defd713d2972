"""What every family shares: the reduced block (attention → reduce → MLP, written once), the model mixin
(a fresh per-forward context, size-aware pooling) and the :class:`Family` adapter interface."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..context import ForwardContext, TokenState
from ..dense_block import dense_step
from ..grid import merged_intermediates
from ..prune import cls_attention
from ..reducers import reduce_tokens

try:
    from timm.layers.attention_pool import AttentionPoolLatent
except ImportError:  # pragma: no cover
    AttentionPoolLatent = ()

__all__ = [
    "Family",
    "ReducedBlock",
    "MaskableBlock",
    "PreNormBranches",
    "GammaPreNormBranches",
    "PostNormBranches",
    "ReducedModel",
    "SizePoolModel",
    "QVEntry",
    "token_info",
    "size_pool",
    "fused_qkv_rows",
]

# (Linear, [(target, first row, row after the last)]): where the bank's q / k / v / proj rows live
QVEntry = Tuple[nn.Linear, List[Tuple[str, int, int]]]


def token_info(kind: str, q: torch.Tensor, k: torch.Tensor, scale: float, has_class_token: bool) -> torch.Tensor:
    """What a reducer plans from: ``"keys"`` (summed over heads, ``[B, N, D]``: only their direction matters
    to ToMe's matching) or ``"cls_attention"`` (EViT's attentiveness ``[B, N]``)."""
    if kind == "keys":
        return k.sum(dim=1)
    with torch.no_grad():
        return cls_attention(q, k, scale, has_class_token)


def fused_qkv_rows(qkv: nn.Linear, proj: nn.Linear) -> Dict[str, Tuple[nn.Linear, int, Optional[int]]]:
    """:meth:`Family.qv` of an attention with one fused ``qkv`` Linear (rows q, k, v in thirds) and ``proj``."""
    d = qkv.out_features // 3
    return {"q": (qkv, 0, d), "k": (qkv, d, 2 * d), "v": (qkv, 2 * d, 3 * d), "proj": (proj, 0, None)}


class ReducedBlock:
    """Mixin put in front of a timm block class. A family's block subclass provides

    * ``_tocom_attention(x, ctx, need_info, **extra) -> (x, info)``: the attention residual branch on the
      current tokens with ``ctx.attn_bias`` as a per-key bias and the positions in ``ctx``; ``info`` as
      :func:`token_info` when ``need_info`` (else ``None``);
    * ``_tocom_mlp_branch(x) -> y``: the MLP residual branch without the residual (``_tocom_mlp`` adds it);

    and calls :meth:`_tocom_forward` from its ``forward``. The reduction between them is
    :func:`~tocom_hub.core.reducers.reduce_tokens`, the same for every family; in dense mode
    (``patch(dense=True)``) it is :func:`~tocom_hub.core.dense_block.dense_step` instead. A block whose MLP
    does not follow its attention sets ``_tocom_no_dense`` to the reason dense mode is refused.
    """

    _tocom_state: TokenState
    _tocom_index: int
    _tocom_no_dense: Optional[str] = None

    def _tocom_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _tocom_mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._tocom_mlp_branch(x)

    def _tocom_forward(self, plain, x: torch.Tensor, masked: bool, **extra) -> torch.Tensor:
        state = self._tocom_state
        r = state.r[self._tocom_index]
        if masked:
            if any(state.r):
                raise ValueError("token merging/pruning cannot be combined with attn_mask / is_causal")
            return plain()
        ctx = state.context()
        if r <= 0 and not ctx.reduced:  # nothing reduced so far and nothing to reduce: timm's own forward
            return plain()
        x, info = self._tocom_attention(x, ctx, state.reducer.info if r > 0 else None, **extra)
        if r > 0:
            if state.dense:  # the grid stays full: only the MLP sees merged / kept tokens
                k = r * state.dense_ratio
                return dense_step(state.reducer, x, info, k, state.num_prefix, self._tocom_mlp_branch, ctx.valid)
            x = reduce_tokens(state, ctx, x, info, r)
        return self._tocom_mlp(x)


class MaskableBlock(ReducedBlock):
    """:class:`ReducedBlock` with the ``forward(x, attn_mask=None, is_causal=False)`` of timm's
    ``vision_transformer`` blocks; ``_tocom_plain`` is the timm block class whose forward runs unreduced."""

    _tocom_plain: type

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        masked = attn_mask is not None or is_causal
        plain = self._tocom_plain.forward
        return self._tocom_forward(lambda: plain(self, x, attn_mask=attn_mask, is_causal=is_causal), x, masked)


# -- the residual arrangement of timm's blocks around a family's attention branch ----------------------
# A family's block provides ``_tocom_branch(x, ctx, need_info, **extra) -> (out, info)``: its attention on the
# (normed) tokens, before layer scale and drop path; one of these mixins puts the residuals around it.


class PreNormBranches(ReducedBlock):
    """``x + drop_path1(ls1(attn(norm1(x))))``, then ``+ drop_path2(ls2(mlp(norm2(x))))`` (timm ``Block``)."""

    def _tocom_attention(self, x, ctx, need_info, **extra):
        out, info = self._tocom_branch(self.norm1(x), ctx, need_info, **extra)
        return x + self.drop_path1(self.ls1(out)), info

    def _tocom_mlp_branch(self, x):
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class GammaPreNormBranches(ReducedBlock):
    """Pre-norm with an optional layer-scale parameter ``gamma_1`` / ``gamma_2`` (timm ``EvaBlock``, BEiT)."""

    def _tocom_attention(self, x, ctx, need_info, **extra):
        out, info = self._tocom_branch(self.norm1(x), ctx, need_info, **extra)
        if self.gamma_1 is not None:
            out = self.gamma_1 * out
        return x + self.drop_path1(out), info

    def _tocom_mlp_branch(self, x):
        out = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            out = self.gamma_2 * out
        return self.drop_path2(out)


class PostNormBranches(ReducedBlock):
    """``x + drop_path1(norm1(attn(x)))``, then ``+ drop_path2(norm2(mlp(x)))`` (timm ``ResPostBlock``,
    ``EvaBlockPostNorm``, ``ResPostRelPosBlock``: the norm after each branch)."""

    def _tocom_attention(self, x, ctx, need_info, **extra):
        out, info = self._tocom_branch(x, ctx, need_info, **extra)
        return x + self.drop_path1(self.norm1(out)), info

    def _tocom_mlp_branch(self, x):
        return self.drop_path2(self.norm2(self.mlp(x)))


def size_pool(model: nn.Module, x: torch.Tensor, ctx: ForwardContext, pool_type: str, start: int, prop_attn: bool):
    """Size-weighted pooling of merged tokens; ``None`` when the model's own pooling is right as it is."""
    size = ctx.size
    if size is None:
        return None
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None:
        if isinstance(attn_pool, AttentionPoolLatent) and prop_attn:
            bias = size[:, start:].log().transpose(1, 2)[:, None].to(x.dtype)  # [B, 1, 1, N]
            return attn_pool(x[:, start:], attn_mask=bias)
        return None
    if pool_type not in ("avg", "avgmax"):
        return None
    tokens, weight = x[:, start:], size[:, start:]
    avg = (tokens * (weight / weight.sum(dim=1, keepdim=True)).to(tokens.dtype)).sum(dim=1)
    return avg if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + avg)


class ReducedModel:
    """Mixin put in front of the model's class: a fresh context per forward, refusals where reduced tokens
    cannot go (gradient checkpointing), ``forward_intermediates`` on the full grid (:mod:`~tocom_hub.core.grid`)."""

    _tocom_state: TokenState

    def forward_features(self, *args, **kwargs):
        state = self._tocom_state
        state.begin()
        if any(state.r) and self.grad_checkpointing and self.training:
            raise RuntimeError(
                "gradient checkpointing re-runs blocks and cannot be combined with token merging/pruning; "
                "call model.set_grad_checkpointing(False) or tocom_hub.set_r(model, 0)"
            )
        return super().forward_features(*args, **kwargs)

    def forward_intermediates(self, *args, **kwargs):
        state = self._tocom_state
        ctx = state.begin()
        if any(state.r) and not state.dense:  # each intermediate unmerged onto the grid (core/grid.py)
            ctx.track = True
            return merged_intermediates(self, super().forward_intermediates, *args, **kwargs)
        return super().forward_intermediates(*args, **kwargs)


class SizePoolModel(ReducedModel):
    """:class:`ReducedModel` whose timm ``pool(x, pool_type)`` is size-weighted after merging (:func:`size_pool`);
    ``_tocom_pool_start()`` says where the pooled tokens begin."""

    def _tocom_pool_start(self) -> int:
        raise NotImplementedError

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        state = self._tocom_state
        ctx = state.last()
        if ctx is not None:
            pool_type = self.global_pool if pool_type is None else pool_type
            pooled = size_pool(self, x, ctx, pool_type, self._tocom_pool_start(), state.prop_attn)
            if pooled is not None:
                return pooled
        return super().pool(x, pool_type)


class Family:
    """One timm family: which model and block classes it covers and how their blocks are reduced.

    Subclasses set ``name``, ``model_classes`` (accepted model classes, subclasses included),
    ``model_mixin`` (put in front of the model class), ``blocks`` (``{timm block class: reduced mixin}``)
    and ``positional`` (tokens carry positions: rope rows / relative-position bias), and implement
    :meth:`check` (a ``TypeError`` naming the class and the true reason) and :meth:`qv` (where q/k/v/proj
    live, for the bank). ``initial_coords`` is needed by positional families for the "centroid" rule.
    """

    name: str = ""
    model_classes: Tuple[type, ...] = ()
    model_mixin: type = ReducedModel
    blocks: Dict[type, type] = {}
    positional: bool = False

    def __init__(self, model: Optional[nn.Module] = None) -> None:
        pass

    def check(self, model: nn.Module, positions: str) -> None:
        """Raise ``TypeError`` if some block or attention of ``model`` is outside this family."""
        raise NotImplementedError

    def check_attentions(self, model: nn.Module, allowed: Tuple[type, ...], needs: Optional[str] = None) -> None:
        """``TypeError`` naming the first block whose attention's class is not one of ``allowed`` (exact classes);
        ``needs`` says what the family needs (default: the class names joined by "or")."""
        needs = " or ".join(c.__name__ for c in allowed) if needs is None else needs
        for i, blk in enumerate(self.model_blocks(model)):
            if type(blk.attn) not in allowed:
                raise TypeError(f"{type(model).__name__}: block {i} uses {type(blk.attn).__name__}; the {self.name} "
                                f"family needs {needs}")  # fmt: skip

    def qv(self, block: nn.Module) -> Dict[str, Tuple[nn.Linear, int, int]]:
        """``{target: (Linear, first row, row after the last)}`` for ``q``, ``k``, ``v`` and ``proj``."""
        raise NotImplementedError

    def unhookable(self, block: nn.Module) -> Optional[str]:
        """Why the bank's unmerged (training) mode cannot reach the block's q/v Linears (its attention bypasses
        their ``forward``), or ``None``."""
        return None

    def unmerged_overrides(self, block: nn.Module) -> List[Tuple[nn.Module, str, object]]:
        """``[(module, attribute, value)]`` set while the bank's unmerged mode is applied (restored by ``remove``)
        so that the block's attention calls its q/v Linears' ``forward`` instead of reading their weights."""
        return []

    @classmethod
    def model_blocks(cls, model: nn.Module):
        """The model's transformer blocks (``model.blocks``; a wrapper family says where they are)."""
        return getattr(model, "blocks", None)

    def num_prefix(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def has_class_token(self, model: nn.Module) -> bool:
        return bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))

    def initial_coords(self, ctx: ForwardContext, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError(f"{self.name}: no token coordinates")

    def describe(self) -> Optional[str]:
        return None
