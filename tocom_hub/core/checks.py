"""Names and argument checks shared by every layer. Imports nothing heavy (the CLI's ``--help`` uses it)."""

from __future__ import annotations

from typing import Any

__all__ = ["METHODS", "is_int", "token_mode"]

# token reduction methods: "tome" merges tokens (Bolya et al., 2023), "evit" prunes them (Liang et al., 2022)
METHODS = ("tome", "evit")


def is_int(value: Any) -> bool:
    """``True`` for an ``int`` that is not a ``bool`` (``True`` is an ``int`` in Python,
    and ``r=True`` is a mistake, not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def token_mode(dense: Any = False, dense_ratio: Any = None) -> str:
    """How a model reduces tokens, as a bank records it: ``"regular"`` (the grid shrinks) or
    ``"dense (k = 32·r)"`` (every patch kept, ``k`` tokens share an MLP; see ``patch(dense=True)``)."""
    return f"dense (k = {dense_ratio}·r)" if dense else "regular"
