"""Upload a bank to the Hugging Face Hub (``HfApi.create_repo`` / ``create_branch`` / ``upload_folder``):
``tocom.safetensors``, ``tocom_config.json`` and the model card, in one commit. ``ToComBank.push_to_hub``
(the ``ModelHubMixin`` side of the bank) and ``tocom_hub.hub.push_bank`` both come here.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional, Union

from torch import nn

from .bank_card import create_model_card
from .bank_config import CONFIG_NAME, LIBRARY_NAME, WEIGHTS_NAME, ToComConfig
from .bank_download import BankHubError, _rev

__all__ = ["push_bank", "CARD_NAME"]

CARD_NAME = "README.md"


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
    its license). Returns huggingface_hub's ``CommitInfo``. ``bank.push_to_hub(...)`` calls this. Example::

        bank = tocom_hub.ToComBank.from_pretrained("out/bank")
        tocom_hub.hub.push_bank(bank, "my-org/tocom-deit-base", private=True)
        bank = tocom_hub.ToComBank.from_pretrained("my-org/tocom-deit-base")
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    from .. import __version__

    if not isinstance(getattr(bank, "config", None), ToComConfig) or not hasattr(bank, "save_pretrained"):
        raise TypeError(f"push_bank needs a ToComBank; got {type(bank).__name__}")
    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)
    cfg = bank.config
    message = commit_message or (
        f"Upload ToCom bank ({cfg.method}, r 0-{cfg.r_max}, rank {cfg.rank}, {'+'.join(cfg.targets)})"
    )
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tocom-push-") as tmp:
            bank.save_pretrained(tmp, dtype=dtype)
            card = create_model_card(
                type(bank).from_pretrained(tmp),  # the files as uploaded: their dtype and format version
                repo_id=repo_id,
                path=tmp,
                license=license,
            )
            card.save(os.path.join(tmp, CARD_NAME))
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                revision=revision,
                commit_message=message,
                commit_description=commit_description,
                create_pr=create_pr,
                allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, CARD_NAME],
            )
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if status in (401, 403) or isinstance(e, RepositoryNotFoundError):
            todo = (
                ": check that you may write to it: pass a write token (token=... / --token) or log in with "
                "`hf auth login`"
            )
        elif status in (412, 429) or (status or 0) >= 500:
            todo = ": retry later"
        else:
            todo = ""
        raise BankHubError(
            f"pushing the ToCom bank to {repo_id!r} failed (HTTP {status}: {first}){todo}",
            repo_id=repo_id,
            revision=_rev(revision),
        ) from e
