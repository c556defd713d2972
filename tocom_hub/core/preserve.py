"""Remember a model's patch and bank state and put it back: :func:`preserved`.

The tools (evaluation, benchmark, latency controller, visualisation) patch a model, switch ``r`` and
apply a bank while they work, and must leave the model as they found it, also when they fail. This
module owns that "remember, then restore" step, built only on the public functions of
:mod:`~tocom_hub.core.patch` and :mod:`~tocom_hub.core.compensation.api`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional

from torch import nn

from .compensation.api import apply, get_compensation, remove, set_pair
from .patch import get_r, get_settings, patch, set_r, unpatch

__all__ = ["preserved", "snapshot", "restore"]


def snapshot(model: nn.Module) -> Dict[str, Any]:
    """What :func:`restore` needs: the patch settings and ``r``, the bank and its ``source → target``
    pair, and every module's train/eval mode. Holds references only (no tensor copies)."""
    settings = get_settings(model)
    comp = get_compensation(model)
    bank: Optional[Dict[str, Any]] = None
    if comp is not None:
        bank = dict(
            state=comp,
            bank=comp.bank,
            source_r=comp.source_r,
            target_r=comp.target_r,
            scale=comp.scale,
            merge=comp.merge,
            patched_here=comp.patched_here,
        )
    return {
        "settings": settings,
        "r": get_r(model) if settings is not None else None,
        "bank": bank,
        "training": [(m, m.training) for m in model.modules()],
    }


def restore(model: nn.Module, snap: Dict[str, Any]) -> nn.Module:
    """Put ``model`` back into the state :func:`snapshot` recorded.

    When the recorded compensation is still attached and enabled under the same patch settings, it is
    moved back in place: :func:`~tocom_hub.core.compensation.api.set_pair` to the recorded pair and ``r``,
    merged weights re-derived exactly from its pristine rows (``exact=True``), so a model whose weights
    held the closed form before holds the same bits after, and nothing is rebuilt. Otherwise (the bank was
    removed, replaced or disabled, or the patch changed) the bank goes, the patch is put back and the
    recorded bank is applied again."""
    settings, bank = snap["settings"], snap["bank"]
    current = get_compensation(model)
    if bank is not None and current is bank["state"] and current.enabled and get_settings(model) == settings:
        set_pair(model, bank["source_r"], bank["target_r"], r=snap["r"], exact=True)
    else:
        remove(model)
        if bank is not None:
            if bank["patched_here"]:  # apply patches the model itself, so remove() unpatches it again
                unpatch(model)
            else:
                patch(model, **settings)
            apply(
                model,
                bank["source_r"],
                bank["target_r"],
                bank=bank["bank"],
                scale=bank["scale"],
                merge=bank["merge"],
                ignore_base_model=True,  # it was attached to this very model before
            )
        if settings is None:
            unpatch(model)
        else:
            patch(model, **settings)
            set_r(model, snap["r"])
    for module, training in snap["training"]:
        module.training = training
    return model


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block change the patch (method, settings, ``r``), the bank or train/eval mode freely;
    on exit — also through an exception — the model is back as it was. Example::

        with preserved(model):
            tocom_hub.patch(model, method="evit"); tocom_hub.set_r(model, 8)
            logits = model(x)
        # model: unpatched again (or patched at its previous method and r, with its bank)
    """
    snap = snapshot(model)
    try:
        yield model
    finally:
        restore(model, snap)
