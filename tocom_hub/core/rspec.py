"""The one rule for ``r`` (tokens removed per block) and its one error message.

Every ``r`` the library accepts — :func:`tocom_hub.set_r`'s int or per-block list, the bank's source /
target degrees, the r values an evaluation or a latency controller sweeps — is checked here, and every
refusal reads the same way::

    r must be an int in [0, 32] (the model sees 65 tokens (1 prefix) and tome removes at most 32 in one block); got 40
    target_r must be an int in [0, 8] (the bank's range); got 9
    r must be an int or a list of 12 ints (one per block); got 3 entries: [4, 4, 4]

An ``r`` is an integer that is not a ``bool`` (``r=True`` is a mistake, not 1); NumPy integers are
accepted and come back as ``int``. The checks only read: on a ``ValueError`` nothing was changed.
"""

from __future__ import annotations

import numbers
from typing import Any, List, Optional, Sequence, Tuple, Union

from torch import nn

from .merge import max_merge
from .prune import max_prune

__all__ = ["RSpec", "BANK_RANGE", "is_r", "check_r", "check_r_values", "model_r_limit", "resolve_r"]

RSpec = Union[int, Sequence[int]]

BANK_RANGE = "the bank's range"  # the ``why`` of every check against a bank's ``r_max``


def is_r(value: Any) -> bool:
    """Whether ``value`` is an integer usable as ``r`` (any sign): ``int`` or a NumPy integer, not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _bounds(r_max: Optional[int], why: Optional[str]) -> str:
    text = "a non-negative int" if r_max is None else f"an int in [0, {r_max}]"
    return f"{text} ({why})" if why else text


def check_r(value: Any, name: str = "r", *, r_max: Optional[int] = None, why: Optional[str] = None) -> int:
    """``value`` as an ``int`` in ``[0, r_max]`` (no upper bound for ``r_max=None``), or ``ValueError``
    ``"<name> must be an int in [0, r_max] (<why>); got <value>"``."""
    if not is_r(value) or not 0 <= int(value) <= (int(value) if r_max is None else r_max):
        raise ValueError(f"{name} must be {_bounds(r_max, why)}; got {value!r}")
    return int(value)


def check_r_values(
    values: Any, name: str = "r_values", *, r_max: Optional[int] = None, why: Optional[str] = None
) -> List[int]:
    """A non-empty sequence of r values as a list of ``int`` (each as :func:`check_r`), or ``ValueError``."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a non-empty sequence of r values, each {_bounds(r_max, why)}; got {values!r}")
    out = list(values)
    if not out:
        raise ValueError(f"{name} must be a non-empty sequence of r values; got {values!r}")
    return [check_r(v, f"{name}[{i}]", r_max=r_max, why=why) for i, v in enumerate(out)]


def model_r_limit(model: nn.Module, method: str, dense_ratio: int = 1) -> Tuple[Optional[int], str]:
    """The largest ``r`` one block of ``model`` can take with ``method`` (``"tome"`` / ``"evit"``) and why.

    From the token count at the model's configured image size: ToMe merges at most half the non-prefix
    tokens, EViT keeps at least one; in dense mode ``k = dense_ratio·r`` tokens are removed, so the limit
    on ``r`` is divided by ``dense_ratio``. ``(None, "")`` when the count is not fixed (NaFlexViT).
    """
    num_patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if num_patches is None:
        return None, ""
    prefix = int(model.num_prefix_tokens)
    tokens = int(num_patches) + prefix
    limit = max_merge(tokens, prefix) if method == "tome" else max_prune(tokens, prefix)
    why = f"the model sees {tokens} tokens ({prefix} prefix) and {method} removes at most {limit} in one block"
    if dense_ratio != 1:
        why = f"dense mode: k = {dense_ratio}·r tokens share an MLP; {why}"
    return limit // dense_ratio, why


def resolve_r(model: nn.Module, r: Any, method: str, dense_ratio: int = 1) -> List[int]:
    """Validate ``r`` for ``model`` (an int for every block or a list with one int per block) and expand
    it to one ``int`` per block; no side effects."""
    depth = len(model.blocks)
    if isinstance(r, (list, tuple)):
        if len(r) != depth:
            raise ValueError(f"r must be an int or a list of {depth} ints (one per block); got {len(r)} entries: {r!r}")
        names, values = [f"r[{i}]" for i in range(depth)], list(r)
    elif is_r(r):
        names, values = ["r"] * depth, [r] * depth
    else:
        raise ValueError(f"r must be an int or a list of {depth} ints (one per block); got {r!r}")
    for name, v in zip(names, values):
        check_r(v, name)  # type and sign first, then the model's limit
    limit, why = model_r_limit(model, method, dense_ratio)
    return [check_r(v, name, r_max=limit, why=why) for name, v in zip(names, values)]
