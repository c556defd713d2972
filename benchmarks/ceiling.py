"""The merge-free *ceiling* of ``throughput.py --ceiling`` and ``gpu.py``: ToMe's token counts, merging free.

:data:`CEILING` is a reducer (``tocom_hub.patch(model, method="tome", reducer=CEILING)``) that truncates to the
number of tokens ToMe would keep instead of matching and merging. A patched model then runs every block with
ToMe's token counts, its proportional-attention bias included, but pays nothing for matching and merging:
its outputs are meaningless, its time is what any ToMe implementation would cost if the merge step itself
were free. Nothing in the library is modified; the seam is ``patch(reducer=...)``.
"""

from __future__ import annotations

import torch

from tocom_hub.core.merge import max_merge

__all__ = ["CEILING", "CeilingReducer", "truncate", "truncate_plan"]


def truncate_plan(metric, r, num_prefix=0):
    """Stands in for ``bipartite_soft_matching``: the number of tokens to keep, or ``None``."""
    num_tokens = metric.shape[1]
    r = min(r, max_merge(num_tokens, num_prefix))
    return num_tokens - r if r > 0 else None


def truncate(num_out, x, size=None):
    """Stands in for ``merge_wavg``: the first ``num_out`` tokens and their (float32) sizes."""
    size = torch.ones(x.shape[0], num_out, 1, device=x.device) if size is None else size[:, :num_out]
    return x[:, :num_out].contiguous(), size


class CeilingReducer:
    """A reducer (see ``tocom_hub.core.reducers``) that keeps the first ``N - r`` tokens: ToMe's counts, no merge."""

    info = "keys"

    def plan(self, info, r, num_prefix):
        return truncate_plan(info, r, num_prefix)

    def apply(self, plan, x, size):
        return truncate(plan, x, size)

    def source(self, plan, source):
        if source is None:
            return None
        return source[:, :plan]

    def index(self, plan):
        return torch.arange(plan).unsqueeze(0)

    def __repr__(self) -> str:
        return "CeilingReducer()"


CEILING = CeilingReducer()
