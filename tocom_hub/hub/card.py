"""The model card as a ``huggingface_hub.ModelCard`` (:func:`create_model_card`), for code that works with the
Hub's card objects (``card.data``, ``card.push_to_hub``). The text is the core's
(:func:`tocom_hub.core.bank.card.render_model_card`, also what ``save_pretrained`` writes as ``README.md``).
"""

from __future__ import annotations

from typing import Any, Optional

from ..core.bank.card import render_model_card
from ..core.bank.config import PathLike

__all__ = ["create_model_card"]


def create_model_card(
    bank: Any,
    *,
    repo_id: Optional[str] = None,
    path: Optional[PathLike] = None,
    license: Optional[str] = None,
    template_path: Optional[PathLike] = None,
):
    """A ``huggingface_hub.ModelCard`` of ``bank`` (arguments: :func:`~tocom_hub.core.bank.card.render_model_card`).
    Example::

        card = tocom_hub.hub.create_model_card(bank, repo_id="my-org/tocom-deit-base")
        print(card.data.base_model)          # None unless the backbone is that Hub model
    """
    from huggingface_hub import ModelCard

    text = render_model_card(bank, repo_id=repo_id, path=path, license=license, template_path=template_path)
    return ModelCard(text)
