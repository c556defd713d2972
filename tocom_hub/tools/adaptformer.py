"""AdaptFormer (Chen et al., NeurIPS 2022): bottleneck adapters parallel to the MLP of every ViT block.

The ToCom paper makes its VTAB-1k off-the-shelf models with AdaptFormer (appendix, Eq. 10)::

    X' = X + FFN(LN(X)) + s · ReLU(X · W_down) · W_up          (W_down: d × 32, W_up: 32 × d)

where ``X`` is the block's token stream entering the MLP branch (after attention and, in a patched
model, after token merging/pruning). The frozen part is the block itself; only the adapters (and
usually the classifier head) train. ``W_up`` starts at zero, so a fresh AdaptFormer is a no-op.

Attached with hooks, like the ToCom bank: a forward pre-hook on ``blk.norm2`` captures ``X`` and a
forward hook on the block adds ``s · up(relu(down(X)))`` to its output — exactly Eq. 10 (the adapter
path bypasses the MLP's layer scale and drop path). The model's classes, parameters and
``state_dict`` are untouched, so it works on plain timm blocks and on ``tocom_hub.patch``-ed (ToMe /
EViT) blocks alike, and the adapters live in their own module (save them with ``state_dict()``)::

    adapters = AdaptFormer.for_model(model, bottleneck=32, scale=0.1)
    adapters.attach(model)
    logits = model(x)            # adapters active
    adapters.detach(model)
"""

from __future__ import annotations

import threading
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["Adapter", "AdaptFormer"]


class Adapter(nn.Module):
    """``s · up(relu(down(x)))``; ``up`` is zero-initialised (a fresh adapter adds nothing)."""

    def __init__(self, dim: int, bottleneck: int = 32, scale: float = 0.1) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = float(scale)
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x))) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class _Capture:
    """norm2 pre-hook: remember the block's MLP-branch input ``X``, per thread (two threads running forwards
    on one model each read their own ``X``); copies and pickles start empty."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def x(self) -> Optional[torch.Tensor]:
        return getattr(self._local, "x", None)

    @x.setter
    def x(self, value: Optional[torch.Tensor]) -> None:
        self._local.x = value

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        self.x = args[0]


class _AddAdapter:
    """block hook: ``output + adapter(X)``."""

    def __init__(self, owner: "AdaptFormer", index: int, capture: _Capture) -> None:
        self.owner, self.index, self.capture = owner, index, capture

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x, self.capture.x = self.capture.x, None
        if x is None or not self.owner.enabled:
            return output
        if x.shape != output.shape:
            raise RuntimeError(
                f"AdaptFormer: block {self.index} produced {tuple(output.shape)} but its MLP input was "
                f"{tuple(x.shape)}; the block is not a timm pre-norm ViT block"
            )
        return output + self.owner.adapters[self.index](x).to(output.dtype)


class AdaptFormer(nn.Module):
    """One :class:`Adapter` per block of a timm ViT; :meth:`attach` / :meth:`detach` install the hooks.

    Args:
        dim: token width of the backbone.
        depth: number of blocks.
        bottleneck: adapter width (paper: 32).
        scale: ``s`` (paper: searched in {0.01, 0.1, 1, 10, 100}).
    """

    def __init__(self, dim: int, depth: int, bottleneck: int = 32, scale: float = 0.1) -> None:
        super().__init__()
        if bottleneck < 1 or depth < 1 or dim < 1:
            raise ValueError(f"dim, depth and bottleneck must be >= 1; got {dim}, {depth}, {bottleneck}")
        self.dim, self.depth, self.bottleneck, self.scale = dim, depth, bottleneck, float(scale)
        self.adapters = nn.ModuleList(Adapter(dim, bottleneck, scale) for _ in range(depth))
        self.enabled = True
        self._handles: List[Any] = []

    @classmethod
    def for_model(cls, model: nn.Module, bottleneck: int = 32, scale: float = 0.1) -> "AdaptFormer":
        """Sized for ``model.blocks`` (timm ViT), on the model's device and dtype."""
        blocks = getattr(model, "blocks", None)
        if blocks is None or len(blocks) == 0 or not all(hasattr(b, "norm2") and hasattr(b, "mlp") for b in blocks):
            raise TypeError(f"{type(model).__name__}: AdaptFormer needs timm ViT blocks with norm2 and mlp")
        dim = blocks[0].norm2.normalized_shape[0]
        w = next(model.parameters())
        return cls(dim, len(blocks), bottleneck, scale).to(device=w.device, dtype=w.dtype)

    def attach(self, model: nn.Module) -> "AdaptFormer":
        """Install the hooks on ``model.blocks`` (once; attaching to a second model raises)."""
        if self._handles:
            raise RuntimeError("this AdaptFormer is already attached; call detach() first")
        if len(model.blocks) != self.depth:
            raise ValueError(f"AdaptFormer has {self.depth} adapters but the model has {len(model.blocks)} blocks")
        for i, blk in enumerate(model.blocks):
            capture = _Capture()
            self._handles.append(blk.norm2.register_forward_pre_hook(capture))
            self._handles.append(blk.register_forward_hook(_AddAdapter(self, i, capture)))
        return self

    def detach(self, model: Optional[nn.Module] = None) -> None:
        """Remove the hooks (the model is exactly what it was before :meth:`attach`)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def extra_repr(self) -> str:
        return f"dim={self.dim}, depth={self.depth}, bottleneck={self.bottleneck}, scale={self.scale}"
