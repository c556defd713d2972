"""Putting a bank on the Hub: :func:`push_bank` (what ``tocom-hub push`` runs; ``dry_run=True`` shows what would
be uploaded without any request).

One commit (``HfApi.create_repo(exist_ok=True)``, ``create_branch`` for a new ``revision``, ``upload_folder``)
holds ``tocom.safetensors``, ``tocom_config.json`` and the ``README.md`` model card, all written by
``ToComBank.save_pretrained`` into a temporary folder (the card's snippet names ``repo_id``). Every failure is
one line with its reason (:func:`~.errors.explain_push_error`: offline, unreachable, rejected token, no write
access, the Hub's HTTP error).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, Optional, Union

from ..core.bank.card import CARD_NAME
from ..core.bank.config import CONFIG_NAME, LIBRARY_NAME, WEIGHTS_NAME, PathLike
from ..core.bank.module import ToComBank
from .errors import explain_push_error, one_line

__all__ = ["push_bank", "write_upload_folder", "UPLOAD_FILES"]

UPLOAD_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)


def write_upload_folder(
    bank: ToComBank, folder: PathLike, *, repo_id: str, dtype: Any = None, license: Optional[str] = None
) -> Dict[str, Any]:
    """Write what :func:`push_bank` uploads into ``folder``; returns ``{"files": {name: bytes}, "card": text}``."""
    bank.save_pretrained(folder, dtype=dtype, repo_id=repo_id, license=license)
    files = {name: os.path.getsize(os.path.join(folder, name)) for name in UPLOAD_FILES}
    with open(os.path.join(folder, CARD_NAME), encoding="utf-8") as f:
        return {"files": files, "card": f.read()}


def push_bank(
    bank: ToComBank,
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
    dry_run: bool = False,
) -> Any:
    """Upload ``tocom.safetensors``, ``tocom_config.json`` and the ``README.md`` model card to ``repo_id``.

    ``private`` only applies to a new repo; a ``revision`` branch that does not exist yet is created from
    ``main``; ``license=`` sets the card's license. Returns huggingface_hub's ``CommitInfo``, or with
    ``dry_run=True`` (no request at all) ``{"repo_id", "revision", "commit_message", "files": {name: bytes},
    "card": text}``. Raises ``BankHubError`` with a one-line reason. Example::

        bank = tocom_hub.ToComBank.from_pretrained("out/bank")
        tocom_hub.hub.push_bank(bank, "my-org/tocom-deit-base", dry_run=True)["files"]
        tocom_hub.hub.push_bank(bank, "my-org/tocom-deit-base", private=True)
        bank = tocom_hub.load_bank("my-org/tocom-deit-base")
    """
    if not isinstance(bank, ToComBank):
        raise TypeError(f"push_bank needs a ToComBank; got {type(bank).__name__}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"{repo_id!r} is not a Hub repo id such as 'my-org/tocom-deit-base': {one_line(e)}") from None
    cfg = bank.config
    message = commit_message or (
        f"Upload ToCom bank ({cfg.method}, r 0-{cfg.r_max}, rank {cfg.rank}, {'+'.join(cfg.targets)})"
    )
    with tempfile.TemporaryDirectory(prefix="tocom-push-") as tmp:
        written = write_upload_folder(bank, tmp, repo_id=repo_id, dtype=dtype, license=license)
        if dry_run:
            return {"repo_id": repo_id, "revision": revision or "main", "commit_message": message, **written}
        from huggingface_hub import HfApi

        from .. import __version__

        api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=str(__version__))
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                revision=revision,
                commit_message=message,
                commit_description=commit_description,
                create_pr=create_pr,
                allow_patterns=list(UPLOAD_FILES),
            )
        except Exception as e:
            explained = explain_push_error(e, repo_id, revision)
            if explained is e:
                raise
            raise explained from e
