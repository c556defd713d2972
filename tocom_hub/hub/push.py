"""Putting banks on the Hub: :func:`push_bank` (what ``tocom-hub push`` runs).

The upload itself is the bank's own ``ToComBank.push_to_hub`` (``HfApi.create_repo`` / ``create_branch`` /
``upload_folder``, one commit with ``tocom.safetensors``, ``tocom_config.json`` and the model card): a
function here would only say it twice. This module checks what it is given and names the CLI's entry point.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import nn

from ..core.bank import ToComBank

__all__ = ["push_bank"]


def push_bank(
    bank: nn.Module,
    repo_id: str,
    *,
    revision: Optional[str] = None,
    private: Optional[bool] = None,
    token: Union[str, bool, None] = None,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    create_pr: bool = False,
    license: Optional[str] = None,
    dtype: Any = None,
):
    """Upload ``tocom.safetensors``, ``tocom_config.json`` and a ``README.md`` model card to ``repo_id``.

    ``create_repo(exist_ok=True)`` (``private`` only applies to a new repo), then one
    ``upload_folder`` commit; a ``revision`` branch that does not exist yet is created from ``main``.
    The model card is regenerated on every push (see :func:`create_model_card`; ``license=`` sets
    its license). Returns huggingface_hub's ``CommitInfo``. Same as ``bank.push_to_hub(...)``. Example::

        bank = tocom_hub.ToComBank.from_pretrained("out/bank")
        tocom_hub.hub.push_bank(bank, "my-org/tocom-deit-base", private=True)
        bank = tocom_hub.ToComBank.from_pretrained("my-org/tocom-deit-base")
    """
    if not isinstance(bank, ToComBank):
        raise TypeError(f"push_bank needs a ToComBank; got {type(bank).__name__}")
    return bank.push_to_hub(
        repo_id,
        revision=revision,
        private=private,
        token=token,
        commit_message=commit_message,
        commit_description=commit_description,
        create_pr=create_pr,
        license=license,
        dtype=dtype,
    )
