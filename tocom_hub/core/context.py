"""Settings of a patched model (:class:`TokenState`, shared by every call) and the state of one forward
(:class:`ForwardContext`: token sizes, sources, the attention bias, token positions).

A forward starts a fresh context (:meth:`TokenState.begin`, called by the patched model's
``forward_features``); its blocks and its pooling read the context of the *calling thread*
(:meth:`TokenState.context`), so two threads running forwards on one patched model never see each
other's tokens, and :func:`tocom_hub.get_size` / :func:`tocom_hub.get_source` report the last forward of
the calling thread. ``torch.compile(fullgraph=True)`` traces the thread-local store without a break.
"""

from __future__ import annotations

import threading
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["ForwardContext", "TokenState", "POSITION_RULES"]

RSpec = Union[int, Sequence[int]]

# How a merged token's position is defined (rope rows, relative-position bias rows); see docs/families.md.
#   "keep":     the destination token keeps its own position (the merged A tokens' positions are dropped);
#   "centroid": the size-weighted centroid of the merged patches' coordinates, with the rotation recomputed
#               there (RoPE angles are affine in the coordinate, so this is the rotation of the mean patch).
# Pruning keeps each kept token's own position under both rules (exact).
POSITION_RULES = ("keep", "centroid")


class ForwardContext:
    """Per-forward token state; created by :meth:`TokenState.begin`, never shared between calls.

    Attributes:
        size: ``[B, N, 1]`` float32, the input patches each token stands for (ToMe), or ``None``.
        source: ``[B, N, N_in]`` 0/1 source trace (``trace_source=True``), or ``None``.
        attn_bias: ``[B, 1, 1, N]`` float32 ``log(size)`` (ToMe proportional attention), or ``None``.
        index: ``[B, N]`` long, the input token each token sits at ("keep" rule and pruning), or ``None``
            before the first reduction and for families without positional state.
        coords: ``[B, N, 2]`` float32 positional coordinates ("centroid" rule), or ``None``.
        grid: ``(H, W)`` of the patch grid of this forward (families with positional state); ``gemma4_vit``
            keeps its patches' ``[B, N, 2]`` ``(x, y)`` coordinates here (its inputs may carry their own).
        track: record ``grid_index`` in this forward (``trace_source``, :func:`tocom_hub.track_grid`,
            ``forward_intermediates`` of a reduced model).
        grid_index: ``[B, N_in]`` long, the token holding each input token (``-1``: pruned), while tracking
            (:mod:`tocom_hub.core.grid`), or ``None`` before the first reduction.
        valid: ``[B, N]`` bool, ``False`` for padding tokens of a padded batch (NaFlexViT), or ``None``;
            padding never merges with real tokens, is never pruned in place of one and sorts last.
    """

    __slots__ = ("size", "source", "attn_bias", "index", "coords", "grid", "track", "grid_index", "valid")

    def __init__(self) -> None:
        self.size: Optional[torch.Tensor] = None
        self.source: Optional[torch.Tensor] = None
        self.attn_bias: Optional[torch.Tensor] = None
        self.index: Optional[torch.Tensor] = None
        self.coords: Optional[torch.Tensor] = None
        self.grid: Optional[Tuple[int, int]] = None
        self.track = False
        self.grid_index: Optional[torch.Tensor] = None
        self.valid: Optional[torch.Tensor] = None

    @property
    def reduced(self) -> bool:
        """Whether an earlier block of this forward merged or pruned tokens."""
        return self.attn_bias is not None or self.index is not None or self.coords is not None


class TokenState:
    """Settings shared by a patched model and its blocks (``method``, ``r`` per block, the reducer, …)
    and the per-thread last :class:`ForwardContext`."""

    def __init__(
        self,
        method: str,
        prop_attn: bool,
        trace_source: bool,
        fuse_token: bool,
        num_prefix: int,
        has_class_token: bool,
        depth: int,
        reducer: Any,
        positions: str,
        attention: Any,
        family: Any,
        dense: bool = False,
        dense_ratio: int = 32,
    ) -> None:
        self.method = method
        self.dense, self.dense_ratio = dense, dense_ratio  # dense: k = dense_ratio * r tokens share an MLP
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.fuse_token = fuse_token
        self.num_prefix = num_prefix
        self.has_class_token = has_class_token
        self.reducer = reducer
        self.positions = positions
        self.attention = attention
        self.family = family
        self.r: List[int] = [0] * depth
        self.r_spec: RSpec = 0
        self._local = threading.local()

    def begin(self) -> ForwardContext:
        """A fresh context for a forward of the calling thread (the previous one is forgotten)."""
        ctx = ForwardContext()
        ctx.track = self.trace_source or getattr(self._local, "track", False)
        self._local.ctx = ctx
        return ctx

    def set_tracking(self, on: bool) -> bool:
        """Make the calling thread's next forwards record the grid index map; returns the previous value."""
        old = getattr(self._local, "track", False)
        self._local.track = bool(on)
        return old

    def context(self) -> ForwardContext:
        """The calling thread's current context (a fresh one if this thread never ran a forward)."""
        ctx = getattr(self._local, "ctx", None)
        return self.begin() if ctx is None else ctx

    def last(self) -> Optional[ForwardContext]:
        """The calling thread's last context, or ``None``."""
        return getattr(self._local, "ctx", None)

    def __getstate__(self):  # threading.local does not pickle / deepcopy: a copy starts with no forward
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
