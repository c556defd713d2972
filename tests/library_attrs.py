"""What the benchmarks may never do: assign to an attribute of a tocom_hub module."""

from __future__ import annotations

import sys
from typing import Dict, Tuple


def library_attrs() -> Dict[Tuple[str, str], int]:
    """``{(module, attribute): id(value)}`` over every loaded ``tocom_hub`` module."""
    return {
        (name, attr): id(value)
        for name, mod in list(sys.modules.items())
        if name == "tocom_hub" or name.startswith("tocom_hub.")
        for attr, value in list(vars(mod).items())
    }


def changed_since(before: Dict[Tuple[str, str], int]) -> list:
    """The attributes present in ``before`` whose value is no longer the same object."""
    now = library_attrs()
    return sorted(key for key, ident in before.items() if key in now and now[key] != ident)
