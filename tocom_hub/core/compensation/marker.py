"""A compensated state is recognisable: the ``tocom_compensation`` entry of a merged model's ``state_dict``.

While a merged bank is attached, ``model.state_dict()`` (and so ``torch.save``, timm's ``save_for_hf``,
safetensors files of it) carries one extra entry, :data:`MARKER_KEY`: a ``uint8`` tensor holding JSON that says
what the weights hold — the bank's identity (``bank_sha256``: the SHA-256 ``ToComBank.save_pretrained`` writes as
``tocom_sha256`` for the bank in its dtype), ``source_r`` / ``target_r``, ``scale``, ``method``, ``targets``.
Read it with :func:`read_marker`. A model whose bank adds nothing (``source_r == target_r``, or inside
``disabled``) holds plain weights and writes no entry.

Loading such a state dict:

* into a plain model: ``load_state_dict`` (strict) refuses the unexpected key ``tocom_compensation`` — the
  weights already hold a bank's update, so applying a bank to them would count it twice. Take it out with
  ``tocom_hub.remove`` before saving to export plain weights, or pop the key to keep the compensated weights
  deliberately;
* into a model that carries the same bank merged: the loaded weights are taken with the pair they hold and the
  model is moved to its own pair (the result is the closed form on the loaded weights);
* into a model that carries another bank, or the same bank at another scale: refused before anything is loaded.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

import torch

from ..jsonio import canonical_dumps

__all__ = ["MARKER_KEY", "read_marker", "encode_marker", "decode_marker"]

MARKER_KEY = "tocom_compensation"


def encode_marker(facts: Dict[str, Any]) -> torch.Tensor:
    """``facts`` as the ``uint8`` tensor of its sorted JSON."""
    raw = canonical_dumps(facts).encode("utf-8")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def decode_marker(value: Any, where: str = MARKER_KEY) -> Dict[str, Any]:
    """The facts a marker tensor holds; ``ValueError`` naming ``where`` when it is not one."""
    try:
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
            raise TypeError("not a 1-d uint8 tensor")
        facts = json.loads(bytes(value.detach().cpu().tolist()).decode("utf-8"))
        if not isinstance(facts, dict) or not isinstance(facts.get("bank_sha256"), str):
            raise TypeError("no bank_sha256")
        for key in ("source_r", "target_r"):
            if not isinstance(facts.get(key), int):
                raise TypeError(f"no {key}")
        if not isinstance(facts.get("scale"), (int, float)):
            raise TypeError("no scale")
    except (TypeError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"state_dict entry {where!r} is not a readable ToCom compensation marker ({e})") from None
    return facts


def read_marker(state_dict: Dict[str, Any], prefix: str = "") -> Optional[Dict[str, Any]]:
    """What the weights of ``state_dict`` hold (the facts of its ``tocom_compensation`` entry), or ``None`` for
    plain weights. Example::

        sd = torch.load("model.pth")
        facts = tocom_hub.core.compensation.marker.read_marker(sd)
        if facts: print("compensated by", facts["bank_sha256"][:12], facts["source_r"], "->", facts["target_r"])
    """
    key = prefix + MARKER_KEY
    return decode_marker(state_dict[key], key) if key in state_dict else None


def describe(facts: Dict[str, Any]) -> str:
    """One line: which bank at which pair."""
    return (
        f"ToCom bank {facts['bank_sha256'][:12]} ({facts.get('method')}, scale {facts['scale']:g}) merged at "
        f"{facts['source_r']} -> {facts['target_r']}"
    )


class MarkerHooks:
    """The three module hooks a merged compensation registers on its model (module-level classes: a model
    pickles and deep-copies with them). ``state`` provides ``_marker_facts()``, ``_on_load(facts)`` and
    ``_after_load(model)``."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.handles: list = []

    def register(self, model: torch.nn.Module) -> None:
        self.handles = [
            model.register_state_dict_post_hook(_SaveHook(self.state)),
            model.register_load_state_dict_pre_hook(_LoadPreHook(self.state)),
            model.register_load_state_dict_post_hook(_LoadPostHook(self.state)),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class _SaveHook:
    def __init__(self, state: Any) -> None:
        self.state = state

    def __call__(self, module: torch.nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
        facts = self.state._marker_facts()
        if facts is not None:
            state_dict[prefix + MARKER_KEY] = encode_marker(facts)


class _LoadPreHook:
    def __init__(self, state: Any) -> None:
        self.state = state

    def __call__(self, module: torch.nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + MARKER_KEY
        if key in state_dict:  # load_state_dict passes its own copy of the user's dict: popping is private
            self.state._on_load(decode_marker(state_dict[key], key))
            del state_dict[key]


class _LoadPostHook:
    def __init__(self, state: Any) -> None:
        self.state = state

    def __call__(self, module: torch.nn.Module, incompatible_keys: Any) -> None:
        self.state._after_load(module)
