"""The merge-free *ceiling* of ``throughput.py --ceiling`` and ``gpu.py``: ToMe's token counts, merging free.

:func:`set_merge_step` swaps the patch layer's ``bipartite_soft_matching`` / ``merge_wavg`` for
truncation to the same number of tokens (:func:`truncate_plan`, :func:`truncate`), or puts the real merge
step back. A patched model then runs every block with ToMe's token counts, its proportional-attention
bias included, but pays nothing for matching and merging: its outputs are meaningless, its time is what
any ToMe implementation would cost if the merge step itself were free.
"""

from __future__ import annotations

import torch

import tocom_hub.core.patch as _PATCH
from tocom_hub.core.merge import max_merge

__all__ = ["MERGE_STEP", "set_merge_step", "truncate", "truncate_plan"]

MERGE_STEP = (_PATCH.bipartite_soft_matching, _PATCH.merge_wavg)


def truncate_plan(metric, r, num_prefix=0):
    """Stands in for ``bipartite_soft_matching``: the number of tokens to keep, or ``None``."""
    num_tokens = metric.shape[1]
    r = min(r, max_merge(num_tokens, num_prefix))
    return num_tokens - r if r > 0 else None


def truncate(num_out, x, size=None):
    """Stands in for ``merge_wavg``: the first ``num_out`` tokens and their (float32) sizes."""
    size = torch.ones(x.shape[0], num_out, 1, device=x.device) if size is None else size[:, :num_out]
    return x[:, :num_out].contiguous(), size


def set_merge_step(ceiling: bool) -> None:
    """Truncation in the patch layer (``ceiling``), or the real merge step."""
    _PATCH.bipartite_soft_matching, _PATCH.merge_wavg = (truncate_plan, truncate) if ceiling else MERGE_STEP
