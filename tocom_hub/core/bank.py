"""The ToCom bank: ``R`` groups of LoRA factors, one group per compression step ``i → i+1``.

Group ``i`` holds, for every block and every target matrix (``"q"``, ``"v"`` by default; any of
``"q"``, ``"k"``, ``"v"``, ``"proj"``), a pair of factors ``A_i`` (``[d_out, h]``, the "up" factor) and
``B_i`` (``[h, d_in]``, the "down" factor) in torch's ``[out, in]`` convention, so the weight update is
``ΔW_i = A_i @ B_i``. Going from compression degree ``m`` to ``n`` adds ``s · Σ_{i=m}^{n-1} A_i B_i``
when ``n > m`` and subtracts ``s · Σ_{i=n}^{m-1} A_i B_i`` when ``n < m`` (:meth:`ToComBank.delta`).

Storage is stacked so that the arithmetic is one matrix product per (block, target): per target one
parameter ``A[t]`` of shape ``[depth, d_out, R·h]`` and one ``B[t]`` of shape ``[depth, R·h, d_in]``;
group ``i`` owns inner indices ``[i·h, (i+1)·h)``. The sum over groups ``m … n-1`` is therefore the
single product ``A[t][b][:, m·h:n·h] @ B[t][b][m·h:n·h]``, and an inner-dimension ``±1/0`` mask turns
the bank into one adapter of inner dim ``R·h`` (the official formulation, used by the training path).

On disk (:meth:`ToComBank.save_pretrained`): ``tocom.safetensors`` (tensors ``A.q``, ``B.q``, … in the
layout above, plus string metadata: format version, the config as JSON and a SHA-256 over the tensor
bytes and that config) and ``tocom_config.json`` (:class:`ToComConfig`). No pickle anywhere. Loading
checks everything read from the files: the checksum (a file without one is refused unless the caller
passes ``trust_unverified=True``), every config field's type and range, the tensors' shapes and
finiteness, and that ``tocom_config.json`` says exactly what the embedded config says.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .checks import METHODS, is_int

__all__ = [
    "ToComConfig",
    "ToComBank",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT_VERSION",
    "TARGETS",
    "MAX_SCALE",
]

CONFIG_NAME = "tocom_config.json"
WEIGHTS_NAME = "tocom.safetensors"
FORMAT_VERSION = 1
TARGETS = ("q", "k", "v", "proj")
# largest ToCom scale a bank or apply() accepts: the paper searches s in {0.01 … 0.15}; far beyond
# that the "compensation" replaces the weights rather than correcting them (1e30 overflows fp32)
MAX_SCALE = 100.0
# JSON files we read (configs, registries) are a few KB; nesting deeper than this is not a config
_MAX_JSON_DEPTH = 64

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------------
# config


@dataclass
class ToComConfig:
    """Everything needed to rebuild a :class:`ToComBank` and check it against a model.

    Saved as ``tocom_config.json`` (like peft's ``adapter_config.json``) and embedded in the
    safetensors metadata, so a lone ``tocom.safetensors`` file is self-describing.

    Args:
        embed_dim: token width ``d`` of the backbone (``blk.attn.qkv.in_features``).
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        r_max: ``R``, the largest compression degree the bank covers (groups ``0 → 1 … R-1 → R``).
        rank: LoRA rank ``h`` of every group.
        targets: weight matrices the bank adapts, any of ``"q"``, ``"k"``, ``"v"``, ``"proj"``.
        scale: default ``s`` used when :func:`tocom_hub.apply` gets no ``scale``.
        method: token reduction the bank was trained for, ``"tome"`` or ``"evit"``.
        attn_dim: width of q/k/v (``num_heads · head_dim``); ``None`` means ``embed_dim``.
        base_model: timm architecture name of the backbone, e.g. ``"deit_base_patch16_224"``.
        pretrained_tag: timm pretrained tag of the backbone, e.g. ``"fb_in1k"``.
        format_version: on-disk format version.
        training_recipe: free-form facts about how the bank was trained (for the model card).
        eval_results: free-form evaluation table (for the model card).

    Example::

        config = ToComConfig(embed_dim=768, depth=12, num_heads=12, r_max=16, rank=2)
        bank = ToComBank(config)
        config.save_pretrained("out/bank")  # tocom_config.json
    """

    embed_dim: int
    depth: int
    num_heads: int
    r_max: int = 16
    rank: int = 2
    targets: Tuple[str, ...] = ("q", "v")
    scale: float = 0.1
    method: str = "tome"
    attn_dim: Optional[int] = None
    base_model: Optional[str] = None
    pretrained_tag: Optional[str] = None
    format_version: int = FORMAT_VERSION
    training_recipe: Optional[Dict[str, Any]] = field(default=None)
    eval_results: Optional[Dict[str, Any]] = field(default=None)

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "r_max", "rank"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"ToComConfig.{name} must be a positive int; got {value!r}")
        if self.attn_dim is not None and (not is_int(self.attn_dim) or self.attn_dim < 1):
            raise ValueError(f"ToComConfig.attn_dim must be a positive int or None; got {self.attn_dim!r}")
        if isinstance(self.targets, str):
            raise ValueError(f"ToComConfig.targets must be a sequence such as ('q', 'v'); got {self.targets!r}")
        self.targets = tuple(self.targets)
        bad = [t for t in self.targets if t not in TARGETS]
        if not self.targets or bad or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"ToComConfig.targets must be distinct names from {TARGETS}; got {self.targets!r}")
        if self.method not in METHODS:
            raise ValueError(f"ToComConfig.method must be one of {METHODS}; got {self.method!r}")
        if (
            isinstance(self.scale, bool)
            or not isinstance(self.scale, (int, float))
            or not math.isfinite(self.scale)
            or not 0.0 <= self.scale <= MAX_SCALE
        ):
            raise ValueError(f"ToComConfig.scale must be a finite number in [0, {MAX_SCALE:g}]; got {self.scale!r}")
        self.scale = float(self.scale)
        for name in ("base_model", "pretrained_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or len(value) > 256):
                raise ValueError(f"ToComConfig.{name} must be a timm name (a non-empty string) or None; got {value!r}")
        if self.training_recipe is not None and not isinstance(self.training_recipe, dict):
            raise ValueError(
                f"ToComConfig.training_recipe must be a JSON object or None; got {type(self.training_recipe).__name__}"
            )
        if self.eval_results is not None and not isinstance(self.eval_results, (dict, list)):
            raise ValueError(
                f"ToComConfig.eval_results must be a JSON object, a list or None; "
                f"got {type(self.eval_results).__name__}"
            )
        if isinstance(self.format_version, bool) or self.format_version != FORMAT_VERSION:
            if (
                isinstance(self.format_version, int)
                and not isinstance(self.format_version, bool)
                and self.format_version > FORMAT_VERSION
            ):
                raise ValueError(
                    f"bank format version {self.format_version} is newer than this tocom-hub supports "
                    f"({FORMAT_VERSION}); upgrade tocom-hub"
                )
            raise ValueError(f"unknown bank format version {self.format_version!r}; expected {FORMAT_VERSION}")

    # -- shapes ------------------------------------------------------------------------------------
    @property
    def qkv_dim(self) -> int:
        """Width of each of q / k / v (``attn_dim`` or ``embed_dim``)."""
        return self.attn_dim if self.attn_dim is not None else self.embed_dim

    def target_shape(self, target: str) -> Tuple[int, int]:
        """``(d_out, d_in)`` of the weight matrix ``target`` adapts."""
        if target == "proj":
            return self.embed_dim, self.qkv_dim
        return self.qkv_dim, self.embed_dim

    @property
    def base_model_id(self) -> Optional[str]:
        """``"architecture.tag"`` (timm's pretrained name) or ``None`` when unknown."""
        if self.base_model is None:
            return None
        return f"{self.base_model}.{self.pretrained_tag}" if self.pretrained_tag else self.base_model

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ToComConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a ToCom config must be a JSON object; got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            warnings.warn(f"ignoring unknown ToCom config keys {unknown} (written by a newer tocom-hub?)", stacklevel=2)
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"ToCom config lacks required keys {missing}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def save_pretrained(self, save_directory: PathLike) -> None:
        """Write ``tocom_config.json`` into ``save_directory`` (atomically)."""
        os.makedirs(save_directory, exist_ok=True)
        _atomic_write_bytes(Path(save_directory) / CONFIG_NAME, self.to_json_string().encode("utf-8"))

    @classmethod
    def from_json_file(cls, path: PathLike) -> "ToComConfig":
        data = _read_json_file(path, what="ToCom config")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: invalid ToCom config: {e}") from None


# ---------------------------------------------------------------------------------------------------
# bank


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
    model with :func:`tocom_hub.apply`. Parameters: ``bank.A[t]`` ``[depth, d_out, R·h]`` (up factors)
    and ``bank.B[t]`` ``[depth, R·h, d_in]`` (down factors); group ``i`` is inner slice
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
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for t in config.targets:
            d_out, d_in = config.target_shape(t)
            self.A[t] = nn.Parameter(torch.empty(config.depth, d_out, inner, **dd))
            self.B[t] = nn.Parameter(torch.empty(config.depth, inner, d_in, **dd))
        self.reset_parameters()

    # -- construction -----------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Standard LoRA init: up factors ``A`` zero (the bank starts as a no-op), down factors ``B``
        ``U(-1/√d_in, 1/√d_in)`` (what ``kaiming_uniform_(a=√5)`` gives, as in peft)."""
        with torch.no_grad():
            for t in self.config.targets:
                self.A[t].zero_()
                bound = 1.0 / math.sqrt(self.B[t].shape[-1])
                self.B[t].uniform_(-bound, bound)

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
        return cls(config, device=model.blocks[0].attn.qkv.weight.device, dtype=torch.float32)

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
        for name, v in (("source r", m), ("target r", n)):
            if not is_int(v) or not 0 <= v <= self.r_max:
                raise ValueError(f"{name} must be an int in [0, {self.r_max}] for this bank; got {v!r}")

    def group_slice(self, m: int, n: int) -> slice:
        """Inner-dimension slice holding the groups between degrees ``m`` and ``n`` (either order)."""
        return signed_group_slice(m, n, self.rank)[0]

    def delta(self, block: int, target: str, m: int, n: int, scale: Optional[float] = None) -> torch.Tensor:
        """Dense weight update ``[d_out, d_in]`` (fp32) that takes ``target`` of ``block`` from r=m to r=n.

        ``s · Σ_{i=m}^{n-1} A_i B_i`` for ``n > m``, ``-s · Σ_{i=n}^{m-1} A_i B_i`` for ``n < m``,
        zero for ``m == n``; ``s`` defaults to ``config.scale``. Example::

            d = bank.delta(0, "q", 0, 16)       # [d, d]
            assert torch.allclose(bank.delta(0, "q", 16, 0), -d)
            assert not bank.delta(3, "v", 5, 5).any()
        """
        if target not in self.A:
            raise ValueError(f"this bank adapts {self.targets}; got target {target!r}")
        if not is_int(block) or not 0 <= block < self.depth:
            raise ValueError(f"block must be an int in [0, {self.depth}); got {block!r}")
        self._check_step(m, n)
        s = self.scale if scale is None else float(scale)
        sl, sign = signed_group_slice(m, n, self.rank)
        up = self.A[target][block, :, sl].detach().float()
        down = self.B[target][block, sl, :].detach().float()
        return (up @ down).mul_(sign * s)

    # -- files ------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: PathLike, *, dtype: Optional[torch.dtype] = None) -> None:
        """Write ``tocom.safetensors`` + ``tocom_config.json`` into ``save_directory``.

        Tensors are stored in the bank's dtype unless ``dtype`` is given; both files are written
        atomically (temporary file + ``os.replace``). Example::

            bank.half().save_pretrained("out/bank")           # fp16 on disk
            bank.save_pretrained("out/bank32", dtype=torch.float32)
            bank = ToComBank.from_pretrained("out/bank")
        """
        from safetensors.torch import save_file

        from .. import __version__

        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype; got {dtype}")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: v.detach().to(device="cpu", dtype=dtype or v.dtype).contiguous() for k, v in self.state_dict().items()
        }
        config_json = json.dumps(self.config.to_dict(), sort_keys=True)
        metadata = {
            "format": "pt",
            "library": "tocom-hub",
            "library_version": str(__version__),
            "tocom_format_version": str(FORMAT_VERSION),
            "tocom_config": config_json,
            "tocom_sha256": _tensors_sha256(tensors, config_json),
        }
        target = save_directory / WEIGHTS_NAME
        fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS_NAME}.", suffix=".tmp", dir=save_directory)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.chmod(tmp, 0o644)
            _fsync_path(tmp)
            os.replace(tmp, target)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        self.config.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained: PathLike,
        *,
        revision: Optional[str] = None,
        cache_dir: Optional[PathLike] = None,
        token: Union[str, bool, None] = None,
        local_files_only: bool = False,
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device, None] = None,
        trust_unverified: bool = False,
    ) -> "ToComBank":
        """Load a bank from a directory, a ``.safetensors`` file, or a Hub repo id.

        Local paths are read directly; any other string is handed to
        ``tocom_hub.hub.download_bank`` (``revision``, ``cache_dir``, ``token``, ``local_files_only``
        apply there). Tensors keep the file's dtype unless ``dtype`` is given. A truncated or
        modified file, missing tensors, shapes that disagree with the config, a config field of the
        wrong type or out of range (``scale`` in ``[0, MAX_SCALE]``), or a ``tocom_config.json`` that
        disagrees with the config embedded in ``tocom.safetensors`` raise ``ValueError`` naming the
        file. A file without the ``tocom_sha256`` checksum (not written by ``save_pretrained``) is
        refused unless ``trust_unverified=True``: its tensors and config cannot be checked. Example::

            bank = ToComBank.from_pretrained("out/bank")
            bank = ToComBank.from_pretrained("out/bank/tocom.safetensors", dtype=torch.float32)
            tocom_hub.apply(model, 0, 16, bank=bank)
        """
        path = Path(pretrained)
        if not path.exists():
            if _looks_local(str(pretrained)):
                raise FileNotFoundError(f"no ToCom bank at {pretrained!s}: the path does not exist")
            try:
                from ..hub import download_bank
            except ImportError as e:
                raise ImportError(
                    f"{pretrained!s} is not a local path and Hub support (tocom_hub.hub.download_bank) "
                    f"is not available: {e}. Pass a local directory or .safetensors file."
                ) from e
            path = Path(
                download_bank(
                    str(pretrained),
                    revision=revision,
                    cache_dir=cache_dir,
                    token=token,
                    local_files_only=local_files_only,
                )
            )
        return cls._from_local(path, dtype=dtype, device=device, trust_unverified=trust_unverified)

    @classmethod
    def _from_local(
        cls,
        path: Path,
        *,
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device, None] = None,
        trust_unverified: bool = False,
    ) -> "ToComBank":
        json_config: Optional[ToComConfig] = None
        if path.is_dir():
            weights = path / WEIGHTS_NAME
            if not weights.is_file():
                raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} in this directory (is it a ToCom bank?)")
            if (path / CONFIG_NAME).is_file():
                json_config = ToComConfig.from_json_file(path / CONFIG_NAME)
        else:
            weights = path
        tensors, file_config = _read_bank_file(weights, trust_unverified=trust_unverified)
        config = file_config  # the checksummed one; tocom_config.json must say the same
        if json_config is not None:
            a, b = json_config.to_dict(), file_config.to_dict()
            diff = [k for k in a if a[k] != b[k]]
            if diff:
                raise ValueError(
                    f"{path / CONFIG_NAME} disagrees with the config embedded in {weights} on {diff}; "
                    f"one of the two files was replaced or edited — re-download or re-save the bank"
                )
        _check_tensors(weights, tensors, config)
        bank = cls(config, device="meta")
        bank.load_state_dict(tensors, assign=True)
        if dtype is not None or device is not None:
            bank.to(device=device, dtype=dtype)
        return bank

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the bank (and a model card) to the Hugging Face Hub; see ``tocom_hub.hub.push_bank``.

        Example::

            bank = ToComBank.from_pretrained("out/bank")
            bank.half().push_to_hub("my-org/tocom-deit-base", private=True)
            bank = ToComBank.from_pretrained("my-org/tocom-deit-base")
        """
        try:
            from ..hub import push_bank
        except ImportError as e:
            raise ImportError(f"Hub support (tocom_hub.hub.push_bank) is not available: {e}") from e
        return push_bank(self, repo_id, **kwargs)


# ---------------------------------------------------------------------------------------------------
# model introspection (no side effects)


def model_dims(model: nn.Module) -> Dict[str, int]:
    """``embed_dim``, ``attn_dim``, ``depth``, ``num_heads`` of a timm ViT built from ``Block``/``Attention``.

    Raises ``TypeError`` naming the model class when ``model.blocks[i].attn.qkv`` is not a fused
    ``nn.Linear(d, 3·attn_dim)`` with the same shape in every block.
    """
    name = type(model).__name__
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise TypeError(f"{name}: expected a timm VisionTransformer with a non-empty `model.blocks`")
    shapes = set()
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        qkv = getattr(attn, "qkv", None)
        proj = getattr(attn, "proj", None)
        if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear) or qkv.out_features % 3:
            raise TypeError(
                f"{name}: block {i} has no fused `attn.qkv` nn.Linear(d, 3·d) and `attn.proj` nn.Linear; "
                f"ToCom supports timm ViT blocks with timm's `Attention`"
            )
        shapes.add(
            (
                qkv.in_features,
                qkv.out_features // 3,
                int(getattr(attn, "num_heads", 0)),
                proj.in_features,
                proj.out_features,
            )
        )
    if len(shapes) != 1:
        raise TypeError(f"{name}: attention shapes differ between blocks ({sorted(shapes)}); not supported")
    embed_dim, attn_dim, num_heads, proj_in, proj_out = shapes.pop()
    if proj_in != attn_dim or proj_out != embed_dim:
        raise TypeError(f"{name}: attn.proj is {proj_in}→{proj_out}, expected {attn_dim}→{embed_dim}")
    return {"embed_dim": embed_dim, "attn_dim": attn_dim, "depth": len(blocks), "num_heads": num_heads}


# ---------------------------------------------------------------------------------------------------
# file helpers


def _looks_local(s: str) -> bool:
    """Whether a missing path was clearly meant as a local file rather than a Hub repo id."""
    if s.startswith((".", "/", "~")) or os.path.isabs(s) or "\\" in s:
        return True
    if s.endswith((".safetensors", ".json", ".pth", ".pt", ".bin")):
        return True
    return s.count("/") > 1


def _tensors_sha256(tensors: Dict[str, torch.Tensor], config_json: Optional[str] = None) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of ``tensors`` (sorted by name), then over the
    embedded config JSON when given (what ``save_pretrained`` writes; files written before the config
    was covered hold the tensor-only digest)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    if config_json is not None:
        h.update(b"tocom_config|" + config_json.encode("utf-8"))
    return h.hexdigest()


def _json_depth_ok(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return True


def _parse_json_text(text: Union[str, bytes], where: str, what: str) -> Any:
    """``json.loads`` with errors that name ``where``: not UTF-8, not JSON, nested deeper than a config."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{where}: the {what} is not UTF-8 text ({e.reason} at byte {e.start}); expected a JSON file"
            ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: the {what} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{where}: the {what} is nested too deeply; not a valid {what}") from None
    if not _json_depth_ok(data, _MAX_JSON_DEPTH):
        raise ValueError(f"{where}: the {what} is nested deeper than {_MAX_JSON_DEPTH} levels; not a valid {what}")
    return data


def _read_json_file(path: PathLike, *, what: str, max_bytes: int = 16 << 20) -> Any:
    """Read a small JSON file (a config or a registry) with errors that name the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path}: {e.strerror or e}") from None
    if len(raw) > max_bytes:
        raise ValueError(f"{path}: the {what} is larger than {max_bytes >> 20} MB; not a valid {what}")
    return _parse_json_text(raw, str(path), what)


def _read_bank_file(path: Path, *, trust_unverified: bool = False) -> Tuple[Dict[str, torch.Tensor], ToComConfig]:
    """Read a ``tocom.safetensors`` file: tensors + embedded config, with integrity checks."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no ToCom bank file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers / sizes
        raise ValueError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); it is truncated or "
            f"corrupted — download or save it again"
        ) from None
    version = metadata.get("tocom_format_version")
    if version is None:
        raise ValueError(f"{path}: no 'tocom_format_version' in the safetensors metadata; not a ToCom bank file")
    try:
        version_int = int(version)
    except ValueError:
        raise ValueError(f"{path}: malformed tocom_format_version {version!r}") from None
    if version_int > FORMAT_VERSION:
        raise ValueError(
            f"{path}: bank format version {version_int} is newer than this tocom-hub supports "
            f"({FORMAT_VERSION}); upgrade tocom-hub"
        )
    if version_int != FORMAT_VERSION:
        raise ValueError(f"{path}: unknown bank format version {version_int}; expected {FORMAT_VERSION}")
    config_json = metadata.get("tocom_config", "")
    expected_sha = metadata.get("tocom_sha256")
    if expected_sha is None:
        if not trust_unverified:
            raise ValueError(
                f"{path}: no 'tocom_sha256' checksum in the safetensors metadata, so neither the tensors nor "
                f"the config can be verified (every bank ToComBank.save_pretrained writes has one; this file "
                f"was written or edited by another tool). Re-save it with ToComBank.save_pretrained, or pass "
                f"trust_unverified=True if you trust where it comes from"
            )
    elif expected_sha not in (_tensors_sha256(tensors, config_json), _tensors_sha256(tensors)):
        raise ValueError(
            f"{path}: checksum mismatch — the tensors or the embedded config were modified or corrupted "
            f"after the file was written; download or save it again"
        )
    try:
        config = ToComConfig.from_dict(_parse_json_text(config_json, str(path), "embedded 'tocom_config'"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid 'tocom_config' in the safetensors metadata: {e}") from None
    return tensors, config


def _check_tensors(path: Path, tensors: Dict[str, torch.Tensor], config: ToComConfig) -> None:
    inner = config.r_max * config.rank
    expected = {}
    for t in config.targets:
        d_out, d_in = config.target_shape(t)
        expected[f"A.{t}"] = (config.depth, d_out, inner)
        expected[f"B.{t}"] = (config.depth, inner, d_in)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: tensors do not match the config (targets {config.targets}): "
            f"missing {missing}, unexpected {unexpected}"
        )
    for k, shape in expected.items():
        t = tensors[k]
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{path}: tensor {k} has shape {tuple(t.shape)}, the config (r_max={config.r_max}, "
                f"rank={config.rank}, depth={config.depth}) needs {shape}"
            )
        if not t.dtype.is_floating_point:
            raise ValueError(f"{path}: tensor {k} has dtype {t.dtype}; expected a floating point dtype")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {k} contains NaN or inf")


def _fsync_path(path: PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without O_RDONLY on files
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _unlink_quiet(path: PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
