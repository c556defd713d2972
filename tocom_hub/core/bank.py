"""The ToCom bank: ``R`` groups of LoRA factors, one group per compression step ``i → i+1``.

Group ``i`` holds, for every block and every target matrix (``"q"``, ``"v"`` by default; any of
``"q"``, ``"k"``, ``"v"``, ``"proj"``), a pair of factors in torch's ``[out, in]`` convention and peft's
names: ``lora_A_i`` (``[h, d_in]``, the "down" factor) and ``lora_B_i`` (``[d_out, h]``, the "up" factor,
zero-initialised), so the weight update is ``ΔW_i = lora_B_i @ lora_A_i``. Going from compression degree
``m`` to ``n`` adds ``s · Σ_{i=m}^{n-1} ΔW_i`` when ``n > m`` and subtracts ``s · Σ_{i=n}^{m-1} ΔW_i`` when
``n < m`` (paper, Eq. 8–9; :meth:`ToComBank.delta`).

Storage is stacked so that the arithmetic is one matrix product per (block, target): per target one
parameter ``lora_A[t]`` of shape ``[depth, R·h, d_in]`` and one ``lora_B[t]`` of shape ``[depth, d_out, R·h]``;
group ``i`` owns inner indices ``[i·h, (i+1)·h)``. The sum over groups ``m … n-1`` is therefore the
single product ``lora_B[t][b][:, m·h:n·h] @ lora_A[t][b][m·h:n·h]``, and an inner-dimension ``±1/0`` mask
turns the bank into one adapter of inner dim ``R·h`` (the official formulation, used by the training path).

Files: :mod:`.bank_config` (``tocom_config.json``), :mod:`.bank_file` (``tocom.safetensors``, its format versions
and checks). The class is a ``huggingface_hub.ModelHubMixin``: ``from_pretrained`` also takes a Hub repo id
(``hf_hub_download``) and ``push_to_hub`` uploads (``HfApi``); the library owns the network, :mod:`.bank_repo`
(no network) says what its errors mean. ``tocom_hub.hub`` builds on this class; nothing here imports it.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from huggingface_hub import ModelHubMixin
from torch import nn

from .bank_card import CARD_NAME, create_model_card, write_upload_folder
from .bank_config import (
    CONFIG_NAME,
    FORMAT_VERSION,
    LIBRARY_NAME,
    MAX_SCALE,
    TARGETS,
    WEIGHTS_NAME,
    PathLike,
    ToComConfig,
)
from .bank_config import model_dims as model_dims
from .bank_file import _looks_local as _looks_local
from .bank_file import read_bank, write_bank_file
from .bank_repo import explain_push_error, fetch_bank_files, unreachable_error
from .checks import is_int
from .rspec import BANK_RANGE, check_r

__all__ = ["ToComConfig", "ToComBank", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION", "TARGETS", "MAX_SCALE"]


def signed_group_slice(m: int, n: int, rank: int) -> Tuple[slice, float]:
    """The bank groups that take a model from r = ``m`` to r = ``n``, and their sign.

    Group ``i`` (step r = i → i+1) is the inner-dimension slice ``[i·rank, (i+1)·rank)``; going up
    (``n > m``) adds groups ``m … n-1``, going down subtracts groups ``n … m-1`` (paper, Eq. 8–9).
    Returns ``(slice(min·rank, max·rank), +1.0 or -1.0)``; the slice is empty for ``m == n``.
    """
    lo, hi = (m, n) if m <= n else (n, m)
    return slice(lo * rank, hi * rank), (1.0 if n >= m else -1.0)


def hub_download(repo_id: str, filename: str, **kwargs: Any) -> str:
    """``hf_hub_download``, after one HEAD request without retries (``get_hf_file_metadata``) made sure the Hub
    answers: for a file the cache does not hold, huggingface_hub would otherwise retry a dead connection for
    ~25 s ("Retrying in …") before it gives up. Cached files, ``local_files_only`` and ``HF_HUB_OFFLINE`` skip it."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    revision, cache_dir = kwargs.get("revision"), kwargs.get("cache_dir")
    if not (kwargs.get("local_files_only") or constants.HF_HUB_OFFLINE):
        try:
            cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
            if not isinstance(cached, str) or kwargs.get("force_download"):
                url = hf_hub_url(repo_id, filename, revision=revision)
                get_hf_file_metadata(url, token=kwargs.get("token"), timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except (HfHubHTTPError, HFValidationError, ValueError):
            pass  # the Hub answered (404, 401, …) or a bad id: hf_hub_download raises the precise error
        except Exception as e:  # no answer at all: DNS, refused connection, timeout
            raise unreachable_error(repo_id, filename, revision, cache_dir, e) from None
    return hf_hub_download(repo_id, filename, **kwargs)


class ToComBank(nn.Module, ModelHubMixin, library_name="tocom-hub", paper_url="https://arxiv.org/abs/2408.06798"):
    """A bank of ``R`` LoRA groups (one per step ``r → r+1``) for the q/v (or other) weights of a ViT.

    Build a fresh one with :meth:`for_model`, load one with :meth:`from_pretrained`, plug it into a
    model with :func:`tocom_hub.apply`. Parameters: ``bank.lora_A[t]`` ``[depth, R·h, d_in]`` (down
    factors) and ``bank.lora_B[t]`` ``[depth, d_out, R·h]`` (up factors); group ``i`` is inner slice
    ``[i·h, (i+1)·h)``. Example::

        bank = ToComBank.for_model(model, r_max=16, rank=2)
        bank.save_pretrained("my-bank")
        bank = ToComBank.from_pretrained("my-bank")
    """

    def __init__(
        self, config: ToComConfig, *, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None
    ) -> None:
        super().__init__()
        if not isinstance(config, ToComConfig):
            raise TypeError(f"config must be a ToComConfig; got {type(config).__name__}")
        self.config = config
        inner = config.r_max * config.rank
        dd = {"device": device, "dtype": dtype}
        # up factors registered first: parameters() keeps the order optimizer states in training checkpoints have
        self.lora_B = nn.ParameterDict()
        self.lora_A = nn.ParameterDict()
        for t in config.targets:
            d_out, d_in = config.target_shape(t)
            self.lora_B[t] = nn.Parameter(torch.empty(config.depth, d_out, inner, **dd))
            self.lora_A[t] = nn.Parameter(torch.empty(config.depth, inner, d_in, **dd))
        self.reset_parameters()

    # -- construction -----------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Standard LoRA init: up factors ``lora_B`` zero (the bank starts as a no-op), down factors
        ``lora_A`` ``U(-1/√d_in, 1/√d_in)`` (what ``kaiming_uniform_(a=√5)`` gives, as in peft)."""
        with torch.no_grad():
            for t in self.config.targets:
                self.lora_B[t].zero_()
                bound = 1.0 / math.sqrt(self.lora_A[t].shape[-1])
                self.lora_A[t].uniform_(-bound, bound)

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        r_max: int = 16,
        rank: int = 2,
        targets: Sequence[str] = ("q", "v"),
        method: str = "tome",
        scale: float = 0.1,
        **config_kwargs: Any,
    ) -> "ToComBank":
        """A fresh (LoRA-initialised, no-op) bank sized for a timm ViT.

        Reads ``embed_dim``, ``depth``, ``num_heads`` from ``model.blocks`` and the base model name /
        tag from ``model.pretrained_cfg``; extra keyword arguments go to :class:`ToComConfig`. The bank
        is fp32 on the model's device (``bank.half()`` before saving for a 2-byte file). Example::

            model = timm.create_model("deit_small_patch16_224")
            bank = ToComBank.for_model(model, r_max=16, rank=2, method="tome")
            print(bank.num_parameters())
        """
        dims = model_dims(model)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        config_kwargs.setdefault("base_model", cfg.get("architecture"))
        config_kwargs.setdefault("pretrained_tag", cfg.get("tag") or None)
        attn_dim = dims["attn_dim"] if dims["attn_dim"] != dims["embed_dim"] else None
        config = ToComConfig(
            embed_dim=dims["embed_dim"],
            depth=dims["depth"],
            num_heads=dims["num_heads"],
            attn_dim=attn_dim,
            r_max=r_max,
            rank=rank,
            targets=tuple(targets),
            method=method,
            scale=scale,
            **config_kwargs,
        )
        # fp32 on the model's device whatever the model's dtype (like peft's autocast_adapter_dtype):
        # the factors are trained and summed in fp32; merging rounds once, into the model's dtype
        return cls(config, device=next(model.parameters()).device, dtype=torch.float32)

    # -- properties -------------------------------------------------------------------------------
    @property
    def r_max(self) -> int:
        return self.config.r_max

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def targets(self) -> Tuple[str, ...]:
        return self.config.targets

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def dense(self) -> bool:
        return self.config.dense

    @property
    def dense_ratio(self) -> Optional[int]:
        return self.config.dense_ratio

    @property
    def scale(self) -> float:
        return self.config.scale

    @property
    def depth(self) -> int:
        return self.config.depth

    def num_parameters(self) -> int:
        """Total number of bank parameters (``R · depth · Σ_t h·(d_out + d_in)``)."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"r_max={c.r_max}, rank={c.rank}, targets={c.targets}, method={c.method!r}, "
            f"embed_dim={c.embed_dim}, depth={c.depth}, scale={c.scale}"
        )

    # -- arithmetic -------------------------------------------------------------------------------
    def _check_step(self, m: int, n: int) -> None:
        check_r(m, "source r", r_max=self.r_max, why=BANK_RANGE)
        check_r(n, "target r", r_max=self.r_max, why=BANK_RANGE)

    def group_slice(self, m: int, n: int) -> slice:
        """Inner-dimension slice holding the groups between degrees ``m`` and ``n`` (either order)."""
        return signed_group_slice(m, n, self.rank)[0]

    def delta(self, block: int, target: str, m: int, n: int, scale: Optional[float] = None) -> torch.Tensor:
        """Dense weight update ``[d_out, d_in]`` (fp32) that takes ``target`` of ``block`` from r=m to r=n.

        ``s · Σ_{i=m}^{n-1} B_i A_i`` for ``n > m``, ``-s · Σ_{i=n}^{m-1} B_i A_i`` for ``n < m`` (``B_i``, ``A_i``:
        group ``i`` of ``lora_B`` / ``lora_A``),
        zero for ``m == n``; ``s`` defaults to ``config.scale``. Example::

            d = bank.delta(0, "q", 0, 16)       # [d, d]
            assert torch.allclose(bank.delta(0, "q", 16, 0), -d)
            assert not bank.delta(3, "v", 5, 5).any()
        """
        if target not in self.lora_B:
            raise ValueError(f"this bank adapts {self.targets}; got target {target!r}")
        if not is_int(block) or not 0 <= block < self.depth:
            raise ValueError(f"block must be an int in [0, {self.depth}); got {block!r}")
        self._check_step(m, n)
        s = self.scale if scale is None else float(scale)
        sl, sign = signed_group_slice(m, n, self.rank)
        up = self.lora_B[target][block, :, sl].detach().float()
        down = self.lora_A[target][block, sl, :].detach().float()
        return (up @ down).mul_(sign * s)

    # -- files (ModelHubMixin: save_pretrained / from_pretrained / push_to_hub) ---------------------
    # The mixin's own versions are overridden: from_pretrained fetches config.json first (a bank repo has
    # none; offline or with a local .safetensors path it fails before our code), save_pretrained adds
    # README.md + config.json to every local save, push_to_hub cannot push to a new branch.
    def save_pretrained(self, save_directory: PathLike, *, dtype: Optional[torch.dtype] = None) -> None:
        """Write ``tocom.safetensors`` + ``tocom_config.json`` into ``save_directory``.

        Tensors are stored in the bank's dtype unless ``dtype`` is given; both files are written
        atomically (temporary file + ``os.replace``), in bank format :data:`FORMAT_VERSION`. Example::

            bank.half().save_pretrained("out/bank")           # fp16 on disk
            bank.save_pretrained("out/bank32", dtype=torch.float32)
            bank = ToComBank.from_pretrained("out/bank")
        """
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype; got {dtype}")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self._save_pretrained(save_directory, dtype=dtype)

    def _save_pretrained(self, save_directory: Path, dtype: Optional[torch.dtype] = None) -> None:
        tensors = {
            k: v.detach().to(device="cpu", dtype=dtype or v.dtype).contiguous() for k, v in self.state_dict().items()
        }
        config = dataclasses.replace(self.config, format_version=FORMAT_VERSION)
        write_bank_file(save_directory / WEIGHTS_NAME, tensors, config)
        config.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained: PathLike,
        *,
        revision: Optional[str] = None,
        cache_dir: Optional[PathLike] = None,
        token: Union[str, bool, None] = None,
        local_files_only: bool = False,
        force_download: bool = False,
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device, None] = None,
        trust_unverified: bool = False,
    ) -> "ToComBank":
        """Load a bank from a directory, a ``.safetensors`` file, or a Hub repo id.

        Local paths are read directly; any other string is fetched with huggingface_hub's ``hf_hub_download``
        (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download`` apply there; its failures
        become ``BankNotFoundError`` / ``BankHubError`` that say what to do, see :mod:`.bank_repo`). Tensors keep the
        file's dtype unless ``dtype`` is given. A truncated or modified file, missing tensors, shapes that disagree
        with the config, a config field of the wrong type or out of range (``scale`` in ``[0, MAX_SCALE]``), or a
        ``tocom_config.json`` that disagrees with the config embedded in ``tocom.safetensors`` raise ``ValueError``
        naming the file. A file without the ``tocom_sha256`` checksum (not written by ``save_pretrained``) is
        refused unless ``trust_unverified=True``: its tensors and config cannot be checked. Example::

            bank = ToComBank.from_pretrained("out/bank")
            bank = ToComBank.from_pretrained("out/bank/tocom.safetensors", dtype=torch.float32)
            tocom_hub.apply(model, 0, 16, bank=bank)
        """
        if not Path(pretrained).exists() and _looks_local(str(pretrained)):
            raise FileNotFoundError(f"no ToCom bank at {pretrained!s}: the path does not exist")
        return cls._from_pretrained(
            model_id=str(pretrained),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            dtype=dtype,
            device=device,
            trust_unverified=trust_unverified,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: Optional[str],
        cache_dir: Optional[PathLike],
        force_download: bool,
        local_files_only: bool,
        token: Union[str, bool, None],
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device, None] = None,
        trust_unverified: bool = False,
    ) -> "ToComBank":
        path = Path(model_id)
        if not path.exists():
            hub = dict(revision=revision, cache_dir=cache_dir, token=token, force_download=force_download)
            path = Path(fetch_bank_files(hub_download, model_id, local_files_only=local_files_only, **hub))
        tensors, config = read_bank(path, trust_unverified=trust_unverified)
        bank = cls(config, device="meta")
        bank.load_state_dict(tensors, assign=True)
        if dtype is not None or device is not None:
            bank.to(device=device, dtype=dtype)
        return bank

    def push_to_hub(
        self,
        repo_id: str,
        *,
        revision: Optional[str] = None,
        private: Optional[bool] = None,
        token: Union[str, bool, None] = None,
        commit_message: Optional[str] = None,
        commit_description: Optional[str] = None,
        create_pr: bool = False,
        license: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> Any:
        """Upload ``tocom.safetensors``, ``tocom_config.json`` and a ``README.md`` model card to ``repo_id``.

        ``HfApi.create_repo(exist_ok=True)`` (``private`` only applies to a new repo), then one
        ``upload_folder`` commit; a ``revision`` branch that does not exist yet is created from ``main``.
        The model card is regenerated on every push (:meth:`generate_model_card`; ``license=`` sets its
        license). Returns huggingface_hub's ``CommitInfo``. Example::

            bank = ToComBank.from_pretrained("out/bank")
            bank.half().push_to_hub("my-org/tocom-deit-base", private=True)
            bank = ToComBank.from_pretrained("my-org/tocom-deit-base")
        """
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        from .. import __version__

        api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)
        cfg = self.config
        message = commit_message or (
            f"Upload ToCom bank ({cfg.method}, r 0-{cfg.r_max}, rank {cfg.rank}, {'+'.join(cfg.targets)})"
        )
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="tocom-push-") as tmp:
                write_upload_folder(self, tmp, repo_id=repo_id, dtype=dtype, license=license)
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
            raise explain_push_error(e, repo_id, revision) from e

    def generate_model_card(self, *args: Any, **kwargs: Any) -> Any:
        """The model card :meth:`push_to_hub` uploads (``tocom_hub.hub.create_model_card``)."""
        return create_model_card(self, **kwargs)
