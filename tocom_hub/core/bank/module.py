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
and checks), :mod:`.bank_card` (``README.md``, the model card). Everything here is local: ``from_pretrained``
reads a directory or file, ``save_pretrained`` writes one. The Hub (``tocom_hub.load_bank`` for repo ids,
``tocom_hub.hub.push_bank``) builds on this class in ``tocom_hub.hub``; nothing in the core imports it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checks import is_int
from ..rspec import BANK_RANGE, check_r
from .card import write_model_card
from .config import (
    CONFIG_NAME,
    FORMAT_VERSION,
    MAX_SCALE,
    TARGETS,
    WEIGHTS_NAME,
    PathLike,
    ToComConfig,
)
from .config import model_dims as model_dims
from .file import read_bank, write_bank_file

__all__ = ["ToComConfig", "ToComBank", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION", "TARGETS", "MAX_SCALE"]


def signed_group_slice(m: int, n: int, rank: int) -> Tuple[slice, float]:
    """The bank groups that take a model from r = ``m`` to r = ``n``, and their sign.

    Group ``i`` (step r = i → i+1) is the inner-dimension slice ``[i·rank, (i+1)·rank)``; going up
    (``n > m``) adds groups ``m … n-1``, going down subtracts groups ``n … m-1`` (paper, Eq. 8–9).
    Returns ``(slice(min·rank, max·rank), +1.0 or -1.0)``; the slice is empty for ``m == n``.
    """
    lo, hi = (m, n) if m <= n else (n, m)
    return slice(lo * rank, hi * rank), (1.0 if n >= m else -1.0)


class ToComBank(nn.Module):
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

    # -- files: save_pretrained / from_pretrained (local; the Hub: tocom_hub.load_bank, tocom_hub.hub.push_bank) ---
    def save_pretrained(
        self,
        save_directory: PathLike,
        *,
        dtype: Optional[torch.dtype] = None,
        repo_id: Optional[str] = None,
        license: Optional[str] = None,
    ) -> None:
        """Write ``tocom.safetensors``, ``tocom_config.json`` and the model card ``README.md`` into ``save_directory``.

        Tensors are stored in the bank's dtype unless ``dtype`` is given; the two bank files are written
        atomically (temporary file + ``os.replace``), in bank format :data:`FORMAT_VERSION`, and the same tensors
        always give the same bytes. The card (:func:`~.bank_card.render_model_card`) describes the files as
        written; its "Use it" snippet loads the bank from ``repo_id`` (what ``push_bank`` passes), else from
        ``save_directory``; ``license`` goes into its front matter. Example::

            bank.half().save_pretrained("out/bank")           # fp16 on disk
            bank.save_pretrained("out/bank32", dtype=torch.float32)
            bank = ToComBank.from_pretrained("out/bank")
        """
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype; got {dtype}")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: v.detach().to(device="cpu", dtype=dtype or v.dtype).contiguous() for k, v in self.state_dict().items()
        }
        config = dataclasses.replace(self.config, format_version=FORMAT_VERSION)
        write_bank_file(save_directory / WEIGHTS_NAME, tensors, config)
        config.save_pretrained(save_directory)
        saved = type(self).from_pretrained(save_directory)  # the card tells what the files hold
        write_model_card(saved, save_directory, repo_id=repo_id or os.fspath(save_directory), license=license)

    @classmethod
    def from_pretrained(
        cls,
        pretrained: PathLike,
        *,
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device, None] = None,
        trust_unverified: bool = False,
    ) -> "ToComBank":
        """Load a bank from a local directory (``save_pretrained``'s layout) or a ``tocom.safetensors`` file.

        Tensors keep the file's dtype unless ``dtype`` is given. A truncated or modified file, missing tensors,
        shapes that disagree with the config, a config field of the wrong type or out of range (``scale`` in
        ``[0, MAX_SCALE]``), or a ``tocom_config.json`` that disagrees with the config embedded in
        ``tocom.safetensors`` raise ``ValueError`` naming the file. A file without the ``tocom_sha256`` checksum
        (not written by ``save_pretrained``) is refused unless ``trust_unverified=True``: its tensors and config
        cannot be checked. A Hub repo id is loaded by ``tocom_hub.load_bank`` (which downloads, then calls this).
        Example::

            bank = ToComBank.from_pretrained("out/bank")
            bank = ToComBank.from_pretrained("out/bank/tocom.safetensors", dtype=torch.float32)
            tocom_hub.apply(model, 0, 16, bank=bank)
        """
        if not isinstance(pretrained, (str, os.PathLike)):
            raise TypeError(f"from_pretrained needs a local path; got {type(pretrained).__name__}")
        path = Path(pretrained).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"no ToCom bank at {os.fspath(pretrained)!r}: the path does not exist (ToComBank.from_pretrained "
                f"reads local files; a Hub repo id is loaded with tocom_hub.load_bank({os.fspath(pretrained)!r}))"
            )
        tensors, config = read_bank(path, trust_unverified=trust_unverified)
        bank = cls(config, device="meta")
        bank.load_state_dict(tensors, assign=True)
        if dtype is not None or device is not None:
            bank.to(device=device, dtype=dtype)
        return bank
