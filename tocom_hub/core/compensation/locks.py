"""The switch lock: one re-entrant lock per model that serialises everything that changes its bank.

:func:`tocom_hub.apply`, :func:`~tocom_hub.core.compensation.api.set_target_r`, ``set_pair``, ``remove`` and
``disabled`` hold it while they change the weights (or hooks) and the patcher's ``r``. It lives in the
model's ``__dict__``, so it goes wherever the model goes; copies and pickles of the model get a fresh one.
"""

from __future__ import annotations

import threading
from typing import Any

from torch import nn

__all__ = ["switch_lock"]

_LOCK_ATTR = "_tocom_switch_lock"
_LOCK_CREATION = threading.Lock()


class _SwitchLock:
    """A re-entrant lock stored on the model; copies and pickles of the model get a fresh one."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        self.lock = threading.RLock()

    def __reduce__(self):
        return (_SwitchLock, ())

    def __deepcopy__(self, memo: Any) -> _SwitchLock:
        return _SwitchLock()


def switch_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises switching on ``model`` (:func:`apply`, :func:`set_target_r`,
    :func:`set_pair`, :func:`remove`, :func:`disabled` take it). Hold it around a forward that must not
    overlap a switch from another thread. Example::

        with tocom_hub.compensate.switch_lock(model), torch.no_grad():
            logits = model(x)      # a control thread's set_target_r waits for this batch
    """
    holder = model.__dict__.get(_LOCK_ATTR)
    if holder is None:
        with _LOCK_CREATION:
            holder = model.__dict__.get(_LOCK_ATTR)
            if holder is None:
                holder = model.__dict__[_LOCK_ATTR] = _SwitchLock()
    return holder.lock
