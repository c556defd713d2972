"""What :func:`tocom_hub.apply` attaches to a model: the :class:`Compensation` base class.

A compensation holds the bank, the pair ``source_r → target_r`` and the scale, and knows which weight rows
of which Linear layers the bank adapts (its *layout*). How the update reaches the forward is the job of a
subclass: :class:`~tocom_hub.core.compensation.merged.MergedCompensation` writes it into the weights,
:class:`~tocom_hub.core.compensation.hooked.HookedCompensation` adds it in the forward of the adapted
Linears. The functions of :mod:`tocom_hub.core.compensation.api` validate every input, take the model's
switch lock and then call the ``_attach`` / ``_detach`` / ``_switch`` / ``_set_enabled`` methods defined
here; nothing else should.
"""

from __future__ import annotations

from typing import List, Tuple

from torch import nn

from ..bank.module import ToComBank
from ..families import find_family

__all__ = ["Compensation"]

# (block, Linear, [(target, first row, row after the last)]): the rows of one Linear the bank adapts
Layout = List[Tuple[int, nn.Linear, List[Tuple[str, int, int]]]]


def bank_layout(model: nn.Module, bank: ToComBank) -> Layout:
    """Where each of the bank's targets lives in ``model``, as its family says (``Family.qv``): row ranges of
    a fused ``attn.qkv`` (rows ``[0, d)`` q, ``[d, 2d)`` k, ``[2d, 3d)`` v), or whole separate
    ``q_proj`` / ``k_proj`` / ``v_proj``; ``proj`` is all of ``attn.proj``. One entry per (block, Linear)."""
    family = find_family(model)
    layout: Layout = []
    for b, blk in enumerate(family.model_blocks(model)):
        where = family.qv(blk)
        per_linear: dict = {}
        for t in bank.targets:
            module, start, stop = where[t]
            per_linear.setdefault(id(module), (module, []))[1].append(
                (t, start, module.out_features if stop is None else stop)
            )
        layout.extend((b, module, entries) for module, entries in per_linear.values())
    return layout


class Compensation:
    """What :func:`apply` attached to a model; read it with :func:`get_compensation`.

    Attributes: ``bank``, ``source_r``, ``target_r``, ``scale``, ``merge`` (``True``: weights merged;
    ``False``: LoRA path in the forward), ``enabled``.
    """

    merge: bool  # set by each subclass

    def __init__(
        self, model: nn.Module, bank: ToComBank, source_r: int, target_r: int, scale: float, patched_here: bool
    ) -> None:
        self.bank = bank
        self.source_r, self.target_r = source_r, target_r
        self.scale = scale
        self.patched_here = patched_here  # apply() patched the model, so remove() unpatches it
        self.enabled = True
        self._rank = bank.rank
        self._layout = bank_layout(model, bank)

    def __repr__(self) -> str:
        return (
            f"Compensation(source_r={self.source_r}, target_r={self.target_r}, scale={self.scale}, "
            f"merge={self.merge}, targets={self.bank.targets})"
        )

    def _attach(self) -> None:
        """Put the update ``source_r → target_r`` into the model (the inputs are already validated)."""
        raise NotImplementedError

    def _detach(self) -> None:
        """Take the update out: the model is exactly as it was before :meth:`_attach`."""
        raise NotImplementedError

    def _switch(self, m: int, n: int, exact: bool = False) -> None:
        """Move to the pair ``m → n`` (``exact``: the merged weights re-derived from the pristine rows)."""
        raise NotImplementedError

    def _set_enabled(self, enabled: bool) -> None:
        """Turn the update off (the plain model) or back on at the current pair."""
        self.enabled = enabled
